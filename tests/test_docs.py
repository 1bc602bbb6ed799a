"""docs/ cannot rot: every python snippet of every chapter runs (a chapter's snippets in order, in one namespace, as a
reader would paste them), every bash command names a real script and real knobs, every code link points at a line
that still holds its text, and docs/figures.py draws every figure the chapters show, matching the committed ones."""

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import configurator
from test_sample import checkpoint  # noqa: F401  (a tiny saved model with its processor)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
sys.path.insert(0, DOCS)
import figures  # noqa: E402  (docs/figures.py)

CHAPTERS = sorted(name for name in os.listdir(DOCS) if re.fullmatch(r"\d_\w+\.md", name))


def read(name):
    with open(os.path.join(DOCS, name)) as f:
        return f.read()


def blocks(markdown, language):
    return re.findall(rf"```{language}\n(.*?)```", markdown, re.S)


def test_there_are_seven_chapters_each_with_a_figure_and_code_links():
    assert len(CHAPTERS) == 7, CHAPTERS
    assert all(f"(docs/{name})" in readme_tour() for name in CHAPTERS), "the README's tour links every chapter"
    for name in CHAPTERS:
        markdown = read(name)
        assert re.search(r"!\[[^\]]*\]\(figures/\w+\.png\)", markdown), f"{name}: no figure"
        assert figures.code_links(markdown), f"{name}: no link to the code"


@pytest.mark.parametrize("name", [name for name in CHAPTERS if blocks(read(name), "python")])
def test_python_snippets_run(name, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    namespace = {"__name__": f"docs_{name[:-3]}"}
    for k, code in enumerate(blocks(read(name), "python"), 1):
        exec(compile(code, f"docs/{name} (python block {k})", "exec"), namespace)


def readme_tour():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read().split("\n## See inside\n", 1)[1].split("\n## ", 1)[0]


def test_bash_commands_name_real_scripts_and_knobs():
    """The training commands of the chapters and of the README's tour are not run here (each is a training run, some
    on GPUs); each names a script of the repository, and each --key=value a knob of that script (or an option of
    prepare_data.py), each other argument a file."""
    checked = 0
    for where, markdown in [(f"docs/{name}", read(name)) for name in CHAPTERS] + [("README.md", readme_tour())]:
        for block in blocks(markdown, "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if not words or words[0] == ".venv/bin/pip":
                    continue
                assert words[0] in (".venv/bin/python", ".venv/bin/torchrun"), f"{where}: {line}"
                at = next(i for i, word in enumerate(words) if word.endswith(".py"))
                script, args = os.path.join(ROOT, words[at]), words[at + 1:]
                if words[at] == "prepare_data.py":
                    help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True,
                                               text=True).stdout
                    datasets = re.findall(r"\{([\w,]+)\}", help_text)[0].split(",")
                    knobs = set(re.findall(r"--([\w-]+)", help_text)) | set(datasets)
                else:
                    knobs = {n for names, _ in configurator.knob_block(script) for n in names}
                for arg in args:
                    if arg.startswith("--"):
                        assert arg[2:].split("=")[0] in knobs, f"{where}: {line}: {arg} is no knob of {words[at]}"
                    elif words[at] == "prepare_data.py":
                        assert arg in knobs, f"{where}: {line}: {arg} is no dataset of prepare_data.py"
                    else:
                        assert os.path.isfile(os.path.join(ROOT, arg)), f"{where}: {line}: no file {arg}"
                checked += 1
    assert checked >= 10


def test_code_links_point_at_lines_that_hold_their_text():
    for name in CHAPTERS:
        for text, path, line in figures.code_links(read(name)):
            with open(os.path.join(ROOT, path)) as f:
                lines = f.read().splitlines()
            found = figures.line_of(text, path)
            assert line <= len(lines) and text in lines[line - 1], (
                f"docs/{name}: [`{text}`](../{path}#L{line}) -- that line now reads {lines[line - 1].strip()!r}"
                f"{'' if found is None else f'; the text is at line {found}'}: run `.venv/bin/python docs/figures.py "
                f"--relink=True`")


def test_the_figure_script_draws_every_figure_the_docs_show(tmp_path):
    """docs/figures.py, as a reader runs it (no trained run at hand): each figure a chapter shows is drawn, with a
    printed line saying what it shows, and looks like the committed one; the figures that need a run say so and
    are committed, drawn from one."""
    result = subprocess.run([sys.executable, "docs/figures.py", f"--out_dir={tmp_path}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = {figure for name in CHAPTERS for figure in re.findall(r"\(figures/(\w+\.png)\)", read(name))}
    for figure in sorted(shown):
        committed = os.path.join(DOCS, "figures", figure)
        assert os.path.isfile(committed), f"docs/figures/{figure} is shown but not committed"
        if figure in figures.RUN_FIGURES:
            assert f"({figure[:-4]}: skipped; --run=" in result.stdout
            continue
        assert re.search(rf"^{re.escape(str(tmp_path / figure))}: \w+", result.stdout, re.M), figure
        if figure in figures.RUN_DRAWN:  # the committed one may come from a trained run
            continue
        drawn = np.asarray(Image.open(tmp_path / figure).convert("RGB"), dtype=np.float32)
        kept = np.asarray(Image.open(committed).convert("RGB"), dtype=np.float32)
        assert drawn.shape == kept.shape and np.abs(drawn - kept).mean() < 1.0, (
            f"docs/figures/{figure} is not what docs/figures.py draws now: run `.venv/bin/python docs/figures.py`")


def test_with_a_run_it_draws_where_the_model_looked_and_measures_it(checkpoint, tmp_path):
    """--run and --check on a demo-shaped run (here a tiny random model and a tiny world, so only the plumbing is
    checked: whether a trained model looks is what the measure is for, and no test-sized model learns to look)."""
    import shutil

    import prepare_data
    prepare_data.generate_synthetic_world(str(tmp_path / "world"), sizes={"test": {"image": 4}}, image_size=96,
                                          max_objects=5)
    shutil.copytree(os.path.join(checkpoint, "final"), tmp_path / "run" / "joint" / "final")
    result = subprocess.run([sys.executable, "docs/figures.py", f"--out_dir={tmp_path / 'figures'}",
                             f"--run={tmp_path / 'run'}", f"--data_dir={tmp_path / 'world'}", "--check=4",
                             "--max_new_tokens=6"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "figures" / "looked.png").is_file() and "(curves: skipped" in result.stdout
    measured = re.search(r"where it looked, over (\d) held-out counting questions with counted shapes: mean attention "
                         r"per token ([\d.]+) on the counted shapes, ([\d.]+) on the background", result.stdout)
    assert measured and 1 <= int(measured.group(1)) <= 4, result.stdout[-2000:]
