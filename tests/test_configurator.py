import os

import pytest

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
    assert ns["batch_size"] == 4 and abs(ns["learning_rate"] - 3.14159) < 1e-4
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
    import configurator
    stages = {script: _stage_knobs(script) for script in ("train_align.py", "train_joint.py")}
    presets = sorted(f for f in os.listdir(os.path.join(ROOT, "config")) if f.endswith(".py"))
    assert {"demo_align.py", "demo_joint.py", "mix_pretrain.py", "mix_sft.py"} <= set(presets)
    for preset in presets:
        errors = {}
        for script, knobs in stages.items():
            try:
                configurator.configure(dict(knobs), [os.path.join(ROOT, "config", preset)])
            except configurator.ConfigError as e:
                errors[script] = str(e)
        assert len(errors) < len(stages), f"config/{preset} fits no stage script: {errors}"
    assert stages["train_joint.py"]["weight_decay"] == 0.0 and stages["train_joint.py"]["vocab"] == "full"
