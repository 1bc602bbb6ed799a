import math
import os
import sys

import pytest

import configurator
from configurator import ConfigError, configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def knobs():
    return {"batch_size": 8, "learning_rate": 3e-4, "compile": False, "init_from": "scratch",
            "betas": (0.9, 0.95), "wandb_run": None, "_private": 1}


def test_overrides_parse_literals():
    ns = knobs()
    cfg = configure(ns, ["--batch_size=16", "--learning_rate=1", "--compile=True", "--init_from=Qwen/Qwen3-0.6B",
                         "--betas=(0.8, 0.9)", "--wandb_run='x'"])
    assert ns["batch_size"] == 16 and ns["learning_rate"] == 1.0 and isinstance(ns["learning_rate"], float)
    assert ns["compile"] is True and ns["init_from"] == "Qwen/Qwen3-0.6B" and ns["betas"] == (0.8, 0.9)
    assert cfg["wandb_run"] == "x" and "_private" not in cfg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'batchsize'"):
        configure(knobs(), ["--batchsize=4"])


@pytest.mark.parametrize("arg, msg", [("--batch_size=1.5", "batch_size=1.5 is float, expected int"),
                                      ("--compile=1", "compile=1 must be True or False"),
                                      ("--batch_size=abc", "not a Python literal")])
def test_wrong_type_is_named(arg, msg):
    with pytest.raises(ConfigError, match=msg):
        configure(knobs(), [arg])


def test_preset_file_then_override(tmp_path):
    preset = tmp_path / "p.py"
    preset.write_text("import math\nbatch_size = 32\nlearning_rate = math.pi\n")
    ns = knobs()
    configure(ns, [str(preset), "--batch_size=4"])
    assert ns["batch_size"] == 4 and ns["learning_rate"] == math.pi
    bad = tmp_path / "bad.py"
    bad.write_text("nope = 1\n")
    with pytest.raises(ConfigError, match="bad.py': unknown key 'nope'"):
        configure(knobs(), [str(bad)])
    with pytest.raises(ConfigError, match="missing.py"):
        configure(knobs(), [str(tmp_path / "missing.py")])


def _stage_knobs(script):
    """A stage script's knobs as it defines them: its source up to `configure(globals())`, executed."""
    with open(os.path.join(ROOT, script)) as f:
        source = f.read()
    head = source[:source.index("config = configure(globals())")]
    namespace = {"__name__": "knobs"}
    exec(compile(head, script, "exec"), namespace)
    return namespace


def test_every_shipped_preset_applies_to_a_stage_script():
    """Each config/*.py sets only knobs a stage script has, with the right types (as `--key=value` would be
    checked): a preset with a stale or misspelled key fails here, not an hour into a run."""
    stages = {script: _stage_knobs(script) for script in ("train_vision.py", "train_align.py", "train_joint.py")}
    presets = sorted(f for f in os.listdir(os.path.join(ROOT, "config")) if f.endswith(".py"))
    assert {"demo_vision.py", "demo_align.py", "demo_joint.py", "mix_pretrain.py", "mix_sft.py"} <= set(presets)
    for preset in presets:
        errors = {}
        for script, knobs in stages.items():
            try:
                configurator.configure(dict(knobs), [os.path.join(ROOT, "config", preset)])
            except configurator.ConfigError as e:
                errors[script] = str(e)
        assert len(errors) < len(stages), f"config/{preset} fits no stage script: {errors}"
    # the joint stage's recipe is left to where its LLM starts (training.default_recipe), its vocabulary full
    assert stages["train_joint.py"]["weight_decay"] is None and stages["train_joint.py"]["vocab"] == "full"


# ---------------------------------------------------------------------------
# --help: the knob block of the calling script, with defaults and comments
# ---------------------------------------------------------------------------

# A script as the stage scripts are laid out, written line by line so that this test file holds no knob block
SCRIPT = "\n".join([
    '"""A toy stage.',
    "",
    "    python toy.py --steps=3",
    "",
    "Design choices: not printed by --help.",
    '"""',
    "from configurator import configure",
    "HELPER_TABLE = (1, 2)  # a module-level value above the block: not a knob",
    "# -- knobs (override with --key=value) ----",
    "out_dir = 'out/toy'",
    "steps = 10  # optimizer steps",
    "lr_a, lr_b = 1e-3, 0.0  # 0 = frozen",
    "#   (the second line of that comment)",
    "mixture = {'image': (1.0, ['synth_image']),",
    "           'video': (0.0, [])}  # groups and shares",
    "config = configure(globals())",
    "# ----",
    "print('ran with', steps)",
])


def run_toy(tmp_path, monkeypatch, *args):
    import runpy
    path = tmp_path / "toy.py"
    path.write_text(SCRIPT)
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    return runpy.run_path(str(path), run_name="__main__")


def test_help_prints_the_knob_block_with_defaults_and_comments(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as stop:
        run_toy(tmp_path, monkeypatch, "--steps=3", "-h")
    assert stop.value.code == 0
    out = capsys.readouterr().out
    # hand-written: the usage, the docstring before its design notes, and each knob line of the block
    head, knobs = out.split("a config/*.py file sets the same names):\n")
    assert head.startswith("usage: toy.py [config/<name>.py ...] [--key=value ...]\n\nA toy stage.\n\n"
                           "    python toy.py --steps=3\n\nknobs and their defaults")
    assert knobs.splitlines() == [
        "  --out_dir='out/toy'",
        "  --steps=10                      # optimizer steps",
        "  --lr_a=0.001 --lr_b=0.0         # 0 = frozen (the second line of that comment)",
        "  --mixture={'image': (1.0, ['synth_image']), 'video': (0.0, [])}",
        "                                  # groups and shares",
    ]
    assert "ran with" not in out  # --help stops before the script's work, even after other arguments


def test_only_the_knob_block_is_settable(tmp_path, monkeypatch, capsys):
    namespace = run_toy(tmp_path, monkeypatch, "--steps=3", "--lr_b=0.5")
    assert (namespace["steps"], namespace["lr_b"]) == (3, 0.5) and "ran with 3" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="unknown config key 'HELPER_TABLE'.*--help lists the knobs"):
        run_toy(tmp_path, monkeypatch, "--HELPER_TABLE=(3,)")


def help_of(script, monkeypatch, capsys):
    """`python script --help` in this process: (its exit code, what it printed)."""
    import runpy
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    return stop.value.code, capsys.readouterr().out


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(ROOT) if f.startswith("train_") and f.endswith(".py")))
def test_every_stage_script_lists_each_knob_it_defines(script, monkeypatch, capsys):
    code, out = help_of(script, monkeypatch, capsys)
    assert code == 0
    knobs = {k: v for k, v in _stage_knobs(script).items() if not k.startswith("_") and k != "config"
             and isinstance(v, configurator.CONFIG_TYPES) and not callable(v)}
    assert knobs and all(f"--{k}={v!r}" in out for k, v in knobs.items())
    assert f"usage: {script}" in out


def test_help_carries_each_knobs_comment(monkeypatch, capsys):
    _, out = help_of("train_joint.py", monkeypatch, capsys)
    line = next(line for line in out.splitlines() if line.startswith("  --max_crops="))
    assert line.endswith("# crops per image (Molmo2: 8 in training)")
    vocab = next(line for line in out.splitlines() if line.startswith("  --vocab="))
    assert "(the 151,936-row head is most of a small model's CPU step); a checkpoint keeps its own" in vocab


def test_sample_and_eval_help(monkeypatch, capsys):
    import eval as E
    code, out = help_of("sample.py", monkeypatch, capsys)
    assert code == 0 and "--image" in out and "--max_new_tokens=384" in out and "DEFAULT_PROMPTS=" not in out
    code, out = help_of("eval.py", monkeypatch, capsys)
    knobs = [name for names, _ in configurator.knob_block(E.__file__) for name in names]
    assert code == 0 and len(knobs) > 10 and all(f"--{k}={getattr(E, k)!r}" in out for k in knobs)
    assert "make demo's data/demo" in out
