"""The README's "Using it" commands, read from README.md itself and run in order, as typed, each exiting 0: the
proof that a newcomer can follow them after `make demo` (issue 13).

- The demo is shortened: demo.py's own steps (its world, its stages, its evaluation) run with a tiny model for two
  steps, in a scratch folder that stands for the repository root, so data/demo and out/demo/joint are where
  `make demo` puts them. The README's commands then run there in their order, so the training ones come after
  sample.py and eval.py have used the demo's outputs, as they would for a newcomer.
- Every command gets a few knobs appended that make it take seconds on a CPU (SHORTER); a script gets only the
  knobs it has. Commands that need GPUs or the Hugging Face hub are left out (NEEDS_GPU_OR_HUB).
- Where a command asks about a shape of a named test image of the demo's world, that image has such a shape: the
  world is seeded, so the scratch world's test images are the demo's.
"""

import json
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

import configurator
import prepare_data
import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300  # a stuck command fails the test instead of hanging it

# Left out, because this test runs on one CPU with no network: several GPUs (torchrun), a preset sized for a GPU,
# and the hub's released checkpoints and pretrained parts.
NEEDS_GPU_OR_HUB = ("torchrun", "config/gpu_", "allenai/", "Qwen/", "google/")

# Appended to every command of a script: a tiny model (56-px crops need 1-patch margins), two steps, a few
# questions and short answers, a small training split.
SHORTER = {
    "train_": ["--model_preset=tiny", "--overlap_margins=(1, 1)", "--max_crops=2", "--max_row_crops=8",
               "--max_video_frames=4", "--max_seq_len=256", "--batch_size=1", "--device=cpu", "--max_steps=2",
               "--eval_every=0"],
    "sample.py": ["--max_new_tokens=12"],
    "eval.py": ["--max_examples=2", "--max_new_tokens=12", "--n_show=2"],
    "prepare_data.py": ["--train_images=16"],
}


def readme_commands():
    """The commands of the README's "Using it" section, in order, as argument lists (comments dropped, lines
    continued with a backslash joined)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def shorter(script):
    """SHORTER's knobs for a script, those it has (the names of its knob block)."""
    extra = next((args for prefix, args in SHORTER.items() if script.startswith(prefix)), [])
    block = configurator.knob_block(os.path.join(ROOT, script))
    if block is None:
        return extra
    names = {name for names, _ in block for name in names}
    return [arg for arg in extra if arg.split("=", 1)[0][2:] in names]


def run(words, cwd, stdin=subprocess.DEVNULL):
    """`.venv/bin/python script args` as typed in `cwd`, with this test's python, the script from the repository and
    SHORTER's knobs appended -> its stdout; fails naming the command unless it exits 0."""
    program, script, *args = words
    assert program == ".venv/bin/python", f"README: {' '.join(words)}: this test runs `.venv/bin/python` commands"
    command = [sys.executable, os.path.join(ROOT, script), *args, *shorter(script)]
    result = subprocess.run(command, cwd=cwd, stdin=stdin, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"`{' '.join(words)}` failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A scratch repository root after a shortened `make demo`: demo.py's steps, run as demo.py runs them."""
    root = tmp_path_factory.mktemp("clone")
    os.symlink(os.path.join(ROOT, "config"), root / "config")  # presets are named relative to the root
    for _, args, done_marker in demo.STEPS:
        run([".venv/bin/python", *args], root)
        assert (root / done_marker).exists(), done_marker
    return root


def shapes_of(root, image_path):
    """The shapes of a test image of the demo's world (by its path), from its record's scene."""
    folder, split, name = image_path.split("/")[-3:]
    with open(root / demo.WORLD / folder / f"{split}.jsonl") as f:
        for record in map(json.loads, f):
            paths = record.get("image", record.get("video"))
            paths = paths if isinstance(paths, list) else [paths]
            if f"{split}/{name}" in paths:
                scene = record["scene"]
                return [shape for s in scene.get("images", [scene]) for shape in s["shapes"]]
    raise AssertionError(f"README: {image_path} is not in the demo's world")


def assert_prompt_fits(root, words):
    """A prompt that names a colour or a kind of shape is asked about media holding such a shape."""
    prompt = next((w.split("=", 1)[1] for w in words if w.startswith("--prompt=")), "")
    colour = next((c for c in prepare_data.SHAPE_COLOURS if re.search(rf"\b{c}\b", prompt)), None)
    kind = next((k for k in prepare_data.SHAPE_KINDS if re.search(rf"\b{k}s?\b", prompt)), None)
    media = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--image", "--video")]
    if (colour or kind) and media and all(m.startswith(demo.WORLD) for m in media):
        shapes = [s for m in media for s in shapes_of(root, m)]
        assert any(prepare_data.shape_matches(s, {"colour": colour, "kind": kind}) for s in shapes), \
            f"README: {' '.join(words)}: no {colour or ''} {kind or 'shape'} in {media}"


def test_readme_commands_run_in_order_on_the_demo(clone):
    commands = readme_commands()
    ran, pictures = [], []
    for words in commands:
        if any(marker in " ".join(words) for marker in NEEDS_GPU_OR_HUB):
            continue
        assert_prompt_fits(clone, words)
        out = run(words, clone)  # interactive sample.py: no input, so it ends at once
        pictures += re.findall(r"points drawn: (\S+)", out)
        ran.append(words[1])
    assert {"sample.py", "eval.py", "prepare_data.py", "train_align.py", "train_joint.py"} <= set(ran)
    assert all((clone / path).is_file() for path in pictures) and len(set(pictures)) == len(pictures)


def test_demo_reports_what_its_steps_made(clone):
    """`python demo.py` after its steps are done only writes the report: eval.py's numbers, and a description of the
    model the joint stage exported (the tiny preset of the shortened steps, not the demo's small one). The
    shortened stages never validated, and the report says so rather than failing."""
    from model import Molmo2Config
    out = run([".venv/bin/python", "demo.py"], clone)
    assert out.count("already done") == len(demo.STEPS)
    report = (clone / "out/demo/report.md").read_text()
    with open(clone / "out/demo/eval/metrics.json") as f:
        metrics = json.load(f)
    assert f"| counting accuracy (exact final count) | {metrics['counting_accuracy']:.3f} |" in report
    assert f"| pointing F1 (a point counts inside the shape's radius) | {metrics['pointing_f1']:.3f} |" in report
    assert "| not measured (no validation) |" in report
    with open(clone / "out/demo/eval/predictions.jsonl") as f:
        n_counting = sum(json.loads(line)["task"] == "counting" for line in f)
    by_query = re.findall(r"^\| (?:a colour|a kind|both|every shape)[^|]*\| (\d+) \| [0-9.]+ \|$", report, re.M)
    assert by_query and sum(map(int, by_query)) == n_counting  # every counting question in one row
    # each training stage ran the steps SHORTER gave its command, and the report says so, with nothing about minutes
    steps = int(next(a for a in SHORTER["train_"] if a.startswith("--max_steps=")).split("=", 1)[1])
    stages = [name for name, args, _ in demo.STEPS if args[0].startswith("train_")]
    assert (f"| steps each stage ran, of those its command set: {' / '.join(stages)} | "
            f"{' / '.join([f'{steps} of {steps}'] * len(stages))} |") in report
    assert "The minutes ran out" not in report
    tiny = Molmo2Config.preset("tiny")
    kept_blocks = max(tiny.connector.vit_layers) + 1  # the ViT is kept up to the last block the connector reads
    assert (f"ViT {tiny.vit.hidden_size} wide x {kept_blocks} blocks at {tiny.vit.image_size} px, Qwen3-style LLM "
            f"{tiny.llm.hidden_size} wide x {tiny.llm.num_hidden_layers} blocks") in report


def test_the_report_names_a_stage_that_ran_out_of_minutes(tmp_path):
    """A stage that max_minutes ended early: its checkpoint's step is below the max_steps its config kept."""
    import torch
    for stage, step, max_steps in (("vision", 400, 400), ("joint", 2455, 3300)):
        os.makedirs(tmp_path / stage)
        torch.save({"step": step, "config": {"max_steps": max_steps}}, tmp_path / stage / "ckpt.pt")
    steps = [("vision", ["train_vision.py", "config/demo_vision.py", f"--out_dir={tmp_path}/vision"], ""),
             ("align", ["train_align.py", f"--out_dir={tmp_path}/align"], ""),  # no checkpoint: left out
             ("joint", ["train_joint.py", f"--out_dir={tmp_path}/joint"], ""),
             ("evaluate", ["eval.py", f"--out_dir={tmp_path}/vision"], "")]  # not a training stage
    rows = demo.steps_ran(steps)
    assert rows == [("vision", 400, 400), ("joint", 2455, 3300)]
    note = " ".join(demo.steps_note(rows).split())
    assert "The minutes ran out before the steps: joint ran 2,455 of its 3,300 steps," in note
    assert "vision" not in note
    assert demo.steps_note([("vision", 400, 400)]) == ""


def test_a_world_made_with_other_content_knobs_is_made_again(tmp_path):
    """demo.py takes a world as made when prepare_data.py wrote its world.json with the knobs the step asks for: a
    world from before the CPU recipe's extra questions (or with no world.json: older still) is made again, one of
    another size is not (the tests shorten it on purpose), and a stage's marker only has to exist."""
    name, args, marker = demo.STEPS[0]
    assert name == "demo world" and "--extra_queries=2" in args
    world = tmp_path / "world.json"
    assert not demo.is_done(args, str(world))
    made = {"seed": 0, "max_objects": 5, "shape_style": "world", "extra_queries": 0, "image_size": 224,
            "train_images": 10000}
    world.write_text(json.dumps(made))
    assert not demo.is_done(args, str(world))  # made before the extra questions
    world.write_text(json.dumps({**made, "extra_queries": 2, "train_images": 16}))
    assert demo.is_done(args, str(world))
    world.write_text(json.dumps({**made, "extra_queries": 2, "max_objects": 12}))
    assert not demo.is_done(args, str(world))
    (tmp_path / "config.json").write_text("{}")
    assert demo.is_done(["train_joint.py"], str(tmp_path / "config.json"))


def test_the_report_counts_right_by_what_each_question_names(tmp_path):
    """demo.counting_by_query worked by hand: four test images whose questions name a colour, a kind, both, and a
    colour again; eval.py scored the counting answers right on the first, third and fourth. A pointing answer and
    a test image with no counting answer count for nothing."""
    queries = [{"colour": "red", "kind": None}, {"colour": None, "kind": "circle"},
               {"colour": "red", "kind": "circle"}, {"colour": "blue", "kind": None}, {"colour": None, "kind": None}]
    assert [prepare_data.query_asks_about(q) for q in queries] == ["colour", "kind", "colour and kind", "colour",
                                                                     "nothing"]
    with open(tmp_path / "test.jsonl", "w") as f:
        f.writelines(json.dumps({"id": f"img{i}", "scene": {"query": q}}) + "\n" for i, q in enumerate(queries))
    answers = [("counting", "img0", 1.0), ("counting", "img1", 0.0), ("counting", "img2", 1.0),
               ("counting", "img3", 1.0), ("pointing", "img1", 1.0)]
    with open(tmp_path / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps({"task": task, "id": i, "scores": {"correct": right}}) + "\n"
                     for task, i, right in answers)
    assert demo.counting_by_query(tmp_path / "predictions.jsonl", tmp_path / "test.jsonl") == [
        ("colour", 2, 2), ("kind", 1, 0), ("colour and kind", 1, 1)]


def test_each_script_the_readme_names_answers_help(monkeypatch, capsys):
    """`--help` prints the script's options with their defaults and exits 0 (the README says each script has one);
    run in this process, it stops before any work."""
    import runpy
    scripts = sorted({words[1] for words in readme_commands() if words[0] == ".venv/bin/python"})
    assert {"sample.py", "eval.py", "prepare_data.py", "train_align.py", "train_joint.py"} <= set(scripts)
    for script in scripts:
        monkeypatch.setattr(sys, "argv", [script, "--help"])
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        out = capsys.readouterr().out
        assert stop.value.code == 0 and out.startswith("usage:"), script
        assert re.search(r"\n  --\w+=\S|\(default: \d", out), script  # an option with its default


def test_every_demo_recipe_names_files_and_knobs_its_scripts_have():
    """Each step of each demo.py recipe (the GPU ones too, which this CPU cannot run) starts a script that exists,
    with config files that exist and set only knobs the script has (a key of another stage fails here, not minutes
    into a GPU run), and --key=value knobs it has; the GPU recipes' joint steps can run as CUDA graphs; the CPU and
    full recipes' joint steps train by Muon; the GPU recipe's stage 1 starts where its easy part ended, and that part
    reads the easy world its step before made."""
    for recipe in demo.RECIPES:
        steps = {name: args for name, args, _ in demo.demo_steps(recipe)}
        for name, (script, *args) in steps.items():
            assert os.path.isfile(os.path.join(ROOT, script)), (recipe, name, script)
            knobs = {n for names, _ in configurator.knob_block(os.path.join(ROOT, script)) for n in names}
            for arg in args:
                if arg.startswith("--"):
                    assert arg[2:].split("=", 1)[0] in knobs, (recipe, name, arg)
                else:
                    assert arg.endswith(".py") and os.path.isfile(os.path.join(ROOT, arg)), (recipe, name, arg)
            if script.startswith("train_"):  # the config files' keys too, applied in order as the script would
                with open(os.path.join(ROOT, script)) as f:
                    head = f.read().split("config = configure(globals())")[0]
                knob_defaults = {}
                exec(compile(head, script, "exec"), knob_defaults)
                files_and_knobs = [a if a.startswith("--") else os.path.join(ROOT, a) for a in args]
                try:
                    resolved = configurator.configure(knob_defaults, files_and_knobs)
                except configurator.ConfigError as e:
                    raise AssertionError(f"demo recipe {recipe!r}, step {name!r}: {e}") from None
                if recipe != "cpu" and name == "joint":  # a GPU joint step: none of the switches that turn CUDA
                    # graphs off (train_joint.py's graph_off), which the CPU recipe's file turns on; the small
                    # recipe's step runs as graphs, the full preset's eagerly (its graphs' pool beside an eager
                    # warm-up ran out of an 80 GB card's memory: config/demo_full_joint.py)
                    off = [k for k in ("compile", "token_loss", "length_groups", "key_blocks", "join_rows")
                           if resolved[k]]
                    assert resolved["grad_accum"] == 1 and not off, (recipe, off)
                    assert resolved["cuda_graph"] == (recipe == "gpu"), recipe
                if name == "joint":  # Muon in every recipe's joint stage (the full preset's pointed at F1
                    # 0.712-0.718 against 0.40-0.47 by AdamW alone, the small GPU recipe's at 0.982-0.989 against
                    # 0.930-0.970), at the rate each was measured at: a file later in the chain must not drop it unseen
                    assert resolved["muon_lr"] == 0.005, (recipe, resolved["muon_lr"])
    gpu = {name: dict(a[2:].split("=", 1) for a in args if a.startswith("--"))
           for name, args, _ in demo.demo_steps("gpu")}
    assert gpu["vision"]["init_from"] == gpu["vision, easy world"]["out_dir"]
    assert gpu["vision, easy world"]["data_dir"] == gpu["easy world"]["out"]
    assert "init_from" not in gpu["vision, easy world"]


def test_cpu_joint_stage_runs_as_processes_that_share_the_cores_and_the_rows():
    """The CPU recipe's joint step under torch.distributed.run: JOINT_PROCESSES processes with the config's rows a
    step split between them (batch_size is per process) and the cores split between them (torchrun would give each
    one thread on any machine); as it is on a machine with fewer cores than processes."""
    args = next(args for name, args, _ in demo.STEPS if name == "joint")
    rows = runpy.run_path(os.path.join(ROOT, "config/demo_joint.py"))["batch_size"]
    n = demo.JOINT_PROCESSES
    for cores in (n, 2 * n + 1):
        launched, env = demo.joint_launch(args, cores)
        assert launched == ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args,
                            f"--batch_size={rows // n}"]
        assert env["OMP_NUM_THREADS"] == str(cores // n) and rows // n * n == rows
    assert demo.joint_launch(args, n - 1) == (args, None)


def test_demo_says_what_the_machine_means_before_its_first_step(monkeypatch, capsys):
    """Without CUDA a GPU recipe stops at once, naming the CPU recipe; the CPU recipe on a CPU without bf16 matrix
    instructions warns that it takes longer, on one with AVX512-BF16 but no AMX that its minutes hold fewer of the
    steps, and with AMX says nothing."""
    import torch

    import training
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for recipe in ("gpu", "full"):
        with pytest.raises(SystemExit, match=f"recipe='{recipe}' trains on a CUDA GPU, and this machine has none"):
            demo.preflight(recipe)
    monkeypatch.setattr(training, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(training, "cpu_has_bf16_matmul", lambda: False)
    demo.preflight("cpu")
    assert "this CPU has no bf16 matrix instructions" in capsys.readouterr().out
    monkeypatch.setattr(training, "cpu_has_bf16_matmul", lambda: True)
    demo.preflight("cpu")
    assert "AVX512-BF16 but no AMX" in capsys.readouterr().out
    monkeypatch.setattr(training, "cpu_has_amx", lambda: True)
    demo.preflight("cpu")
    assert capsys.readouterr().out == ""


def test_the_cpu_demo_gives_its_minutes_to_stage_1_and_the_joint_stage(tmp_path, monkeypatch):
    """demo.py's minutes (15, from when `make demo` started): stage 1 gets VISION_SHARE (0.25) of what is left after
    the align stage's 40 s and the last 60 s, the joint stage all but those 60 s, or all but 20 s and the align
    stage's own seconds where that ran in the same command, each as --max_minutes; the other steps run as they are.
    Started 300 s ago: stage 1 0.25 x (600 - 40 - 60) s = 2.08 min, the joint stage after an align stage of ~0 s
    (600 - 20) s = 9.67 min (the test's own seconds are within the 0.05 min allowed). The GPU recipes get none."""
    import subprocess
    import time
    from types import SimpleNamespace

    assert demo.stage_minutes("vision", 700) == 0.25 * 600 / 60 and demo.stage_minutes("joint", 600) == 9.0
    assert demo.stage_minutes("align", 600) is None and demo.stage_minutes("joint", 30) == 0.1  # the 20 probe steps
    assert demo.stage_minutes("joint", 600, align_s=11) == (600 - 31) / 60  # a fast CPU's align stage: 31 s back
    assert demo.stage_minutes("joint", 600, align_s=50) == 9.0  # a slow one's: at most the 60 s
    monkeypatch.chdir(tmp_path)  # nothing done yet: every step runs (here: is recorded)
    ran = []
    monkeypatch.setattr(subprocess, "run",
                        lambda command, env=None: ran.append(command[1:]) or SimpleNamespace(returncode=0))
    for recipe, started in (("cpu", time.time() - 300), ("gpu", time.time() - 300)):
        ran.clear()
        monkeypatch.setattr(demo, "started", started)
        monkeypatch.setattr(demo, "preflight", lambda recipe: None)
        with pytest.raises(FileNotFoundError):  # the steps did not really run: no metrics to report
            demo.main(recipe)
        # by script (the joint step's may come after torch.distributed.run's words: demo.joint_launch)
        budgets = {next(a for a in args if a.endswith(".py")): [float(a.split("=")[1]) for a in args
                                                                if a.startswith("--max_minutes=")] for args in ran}
        if recipe == "cpu":
            assert budgets["train_vision.py"] == [pytest.approx(2.08, abs=0.05)]
            assert budgets["train_joint.py"] == [pytest.approx(9.67, abs=0.05)]
            assert budgets["prepare_data.py"] == budgets["train_align.py"] == budgets["eval.py"] == []
        else:
            assert all(b == [] for b in budgets.values())
