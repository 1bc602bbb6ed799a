"""The from-scratch switches of the joint recipe: the norm after the projector and the embedding of each image
token's place (both off for Molmo2, so parity with transformers is untouched), and the answers scored during
validation (they must be what eval.py scores)."""

import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import eval as evaluation  # noqa: E402
import sample  # noqa: E402
import training  # noqa: E402
from connector import token_centres  # noqa: E402
from model import Molmo2, Molmo2Config, molmo2_config_to_hf  # noqa: E402

TINY = ["--model_preset=tiny", "--overlap_margins=(1, 1)", "--max_crops=2", "--max_row_crops=8",
        "--max_video_frames=4", "--max_seq_len=256", "--batch_size=2", "--device=cpu"]


def tiny_model(projector_norm, seed=0, position_bins=0):
    torch.manual_seed(seed)
    return training.build_model("scratch", "tiny", projector_norm=projector_norm, position_bins=position_bins)


def test_molmo2_has_no_projector_norm_and_writes_none():
    """Molmo2's own connector ends at the projector: every preset is built without the switch and its config.json
    carries no key transformers would not know."""
    for preset in ("tiny", "small", "nanomolmo2"):
        config = Molmo2Config.preset(preset)
        assert config.connector.projector_norm is False and config.connector.position_bins == 0
        assert not {"projector_norm", "position_bins"} & set(molmo2_config_to_hf(config)["adapter_config"])
    model = tiny_model(False)
    assert model.connector.norm is None and model.connector.position_x is None
    assert not any("position_" in name for name in model.state_dict())


def test_projector_norm_gives_every_image_token_the_gains_scale():
    """RMSNorm with gain g maps each token x to g * x / rms(x): at init g = 0.02 everywhere, so every token's root
    mean square is 0.02 * sqrt(ms / (ms + eps)), 0.02 up to float32 rounding (ms >> eps = 1e-6 here), whatever
    scale the projector's output has."""
    model = tiny_model(True)
    torch.manual_seed(1)
    features = [10.0 * torch.randn(2, 16, model.config.vit.hidden_size) for _ in model.config.connector.vit_layers]
    pooling = torch.arange(32).view(8, 4)
    with torch.no_grad():
        raw = model.connector.projector(model.connector.pooling(
            torch.cat(features, -1).reshape(32, -1)[pooling], torch.ones(8, 4, dtype=torch.bool)))
        tokens = model.connector(features, pooling)
    assert raw.pow(2).mean(-1).min() > 1e-3  # far from eps: the rms below is the gain's
    rms = tokens.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 0.02), rtol=1e-5, atol=0)  # float32: ~1e-7 relative


def test_projector_norm_survives_save_and_load(tmp_path):
    """A model with the norm saved and loaded back gives the same logits bit for bit, and a trained gain comes back."""
    model = tiny_model(True)
    with torch.no_grad():
        model.connector.norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["adapter_config"]["projector_norm"] is True
    loaded = Molmo2.from_pretrained(str(tmp_path))
    assert loaded.config.connector.projector_norm
    torch.testing.assert_close(loaded.connector.norm.weight, model.connector.norm.weight, rtol=0, atol=0)
    torch.manual_seed(2)
    features = [torch.randn(1, 16, model.config.vit.hidden_size) for _ in model.config.connector.vit_layers]
    pooling = torch.arange(16).view(4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.connector(features, pooling), model.connector(features, pooling),
                                   rtol=0, atol=0)


def test_projector_norm_asked_of_a_checkpoint_without_it_is_an_error(tmp_path):
    """A checkpoint keeps its own connector: asking for the switch there names the checkpoint."""
    tiny_model(False).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="no norm after its projector"):
        training.build_model(str(tmp_path), projector_norm=True)
    assert training.build_model(str(tmp_path)).connector.norm is None


def test_token_centres_by_hand():
    """An image of a 2 x 2 low-res view and a 2 x 3 high-res view, then a video of 2 frames of 1 x 2 and one of 1 frame
    of 2 x 1: each token's centre is ((col + 0.5) / cols, (row + 0.5) / rows) of its own view, row-major, frame after
    frame (halves, quarters and sixths: exact in float32 up to rounding of 1/6)."""
    images = token_centres(torch.tensor([[2, 2, 2, 3]]), 10)
    expected = [[1 / 4, 1 / 4], [3 / 4, 1 / 4], [1 / 4, 3 / 4], [3 / 4, 3 / 4],
                [1 / 6, 1 / 4], [3 / 6, 1 / 4], [5 / 6, 1 / 4], [1 / 6, 3 / 4], [3 / 6, 3 / 4], [5 / 6, 3 / 4]]
    torch.testing.assert_close(images, torch.tensor(expected), rtol=0, atol=1e-7)
    videos = token_centres(torch.tensor([[2, 1, 2], [1, 2, 1]]), 6)
    expected = [[1 / 4, 1 / 2], [3 / 4, 1 / 2], [1 / 4, 1 / 2], [3 / 4, 1 / 2], [1 / 2, 1 / 4], [1 / 2, 3 / 4]]
    torch.testing.assert_close(videos, torch.tensor(expected), rtol=0, atol=1e-7)


def tiny_image_batch(seed=0):
    """The processor's inputs for one random 80 x 60 image and a question, as the model takes them."""
    import numpy as np

    import data
    rng = np.random.default_rng(seed)
    processor = data.Molmo2Processor(max_crops=2, crop_size=56, overlap_margins=(1, 1))
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    return processor(text="<|image|>How many?", images=[image])


def test_position_bins_add_each_tokens_bin_embeddings_and_nothing_at_init():
    """The switch adds position_x[bin(x)] + position_y[bin(y)] to each image token, the bins those of token_centres.
    Its tables start at 0: the logits equal those of the same weights without the switch, bit for bit."""
    plain, placed = tiny_model(False), tiny_model(False, position_bins=8)
    missing = placed.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["connector.position_x.weight", "connector.position_y.weight"]
    batch = tiny_image_batch()
    with torch.no_grad():
        torch.testing.assert_close(placed(**batch), plain(**batch), rtol=0, atol=0)
        torch.manual_seed(3)
        placed.connector.position_x.weight.normal_()
        placed.connector.position_y.weight.normal_()
        features = plain.vision_features(batch["pixel_values"], batch["image_token_pooling"])
        moved = placed.place(features, batch["image_grids"], "image")
    xy = token_centres(batch["image_grids"], features.shape[0])
    grids = batch["image_grids"]
    assert features.shape[0] == int(grids[:, :2].prod(-1).sum() + grids[:, 2:].prod(-1).sum())
    for k, (x, y) in enumerate(xy.tolist()):
        bx, by = min(int(x * 8), 7), min(int(y * 8), 7)
        added = placed.connector.position_x.weight[bx] + placed.connector.position_y.weight[by]
        torch.testing.assert_close(moved[k], features[k] + added, rtol=1e-6, atol=1e-6)  # float32 sums
    with pytest.raises(ValueError, match="image_grids"):
        placed.place(features, None, "image")


def test_position_bins_survive_save_and_load_and_stay_out_of_weight_decay(tmp_path):
    """A model with the switch saved and loaded back has its bins and tables and gives the same logits bit for bit.
    The tables are embeddings: AdamW's weight decay leaves them alone."""
    model = tiny_model(False, position_bins=8)
    torch.manual_seed(4)
    with torch.no_grad():
        model.connector.position_x.weight.normal_()
        model.connector.position_y.weight.normal_()
    model.save_pretrained(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["adapter_config"]["position_bins"] == 8
    loaded = Molmo2.from_pretrained(str(tmp_path))
    assert loaded.config.connector.position_bins == 8
    batch = tiny_image_batch(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch), model(**batch), rtol=0, atol=0)
    optimizer = training.build_optimizer(model, {"connector": 0.1, "vit": 0.0, "llm": 0.0}, {}, weight_decay=0.5)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.connector.position_x.weight) not in decayed and id(model.connector.position_y.weight) not in decayed
    assert id(model.connector.projector.up_proj.weight) in decayed


def test_position_bins_asked_of_a_checkpoint_or_pretrained_parts_is_an_error(tmp_path):
    """A checkpoint keeps its own connector: asking it for other bins names the checkpoint; leaving the switch at 0
    keeps the checkpoint's bins."""
    tiny_model(False, position_bins=8).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="keeps its own connector"):
        training.build_model(str(tmp_path), position_bins=16)
    assert training.build_model(str(tmp_path)).config.connector.position_bins == 8
    assert training.build_model(str(tmp_path), position_bins=8).config.connector.position_bins == 8
    with pytest.raises(ValueError, match="switches for models from scratch"):
        training.build_model("parts", llm_from="x", vit_from="y", position_bins=8)


def test_a_scratch_model_takes_the_crop_size_of_its_stage_1_vit(tmp_path):
    """train_vision.py's vit_image_size draws a ViT for crops of another size (84 px: 6 x 6 patches, not the tiny
    preset's 4 x 4). A model from scratch whose ViT comes from it takes that size, and its weights bit for bit; the
    size survives save and load (its processor's crop size is read from it). A ViT of another width stays an error.
    (The setting's own checks are in test_train_vision.py's test_settings_are_checked_before_any_work.)"""
    from dataclasses import replace

    from model import save_siglip
    from vision import SigLIP2
    torch.manual_seed(0)
    config = replace(Molmo2Config.preset("tiny").vit, image_size=84)
    vit = SigLIP2(config)
    save_siglip(vit, str(tmp_path / "vit"))
    model = training.build_model("scratch", "tiny", vit_from=str(tmp_path / "vit"))
    assert model.config.vit.image_size == 84 and model.vit.positional_embedding.shape[0] == 36
    state = model.vit.state_dict()
    assert all(torch.equal(state[k], v) for k, v in vit.state_dict().items() if k in state)
    model.save_pretrained(str(tmp_path / "model"))
    assert Molmo2.from_pretrained(str(tmp_path / "model")).config.vit.image_size == 84
    save_siglip(SigLIP2(replace(config, intermediate_size=96)), str(tmp_path / "wider"))
    with pytest.raises(ValueError, match="is not the model's"):
        training.build_model("scratch", "tiny", vit_from=str(tmp_path / "wider"))


def test_answers_scored_at_validation_are_eval_pys_on_the_same_weights(tiny_world, tmp_path, monkeypatch):
    """train_joint's eval_answers scores greedy answers at each validation. Its last validation runs after the last
    update, on the weights it exports: eval.py's own evaluate() on the exported model, over the same questions,
    gives the same numbers; and they are logged and drawn (answers.png). The run leaves compile_blocks at its default,
    which compiles on one GPU only: on a CPU the blocks stay eager."""
    import model as model_module
    monkeypatch.setattr(model_module, "compile_each_block", lambda m: pytest.fail("compiled by default on a CPU"))
    out_dir = str(tmp_path / "joint")
    args = ["train_joint.py", f"--out_dir={out_dir}", *TINY, f"--data_dir={tiny_world}",
            "--data_mixture={'image': (1.0, ['synth_image'])}", "--max_steps=3", "--eval_every=3", "--eval_batches=1",
            "--eval_answers=4", "--save_every=0", "--resid_dropout=0.0", "--vocab=data"]
    monkeypatch.setattr(sys, "argv", args)
    run = runpy.run_path(os.path.join(ROOT, "train_joint.py"), run_name="__main__")
    items = run["answer_items"]
    assert 0 < len(items) <= 4 and {task for _, task, _, _ in items} <= {"counting", "pointing"}
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        logged = [r for r in map(json.loads, f) if "val_loss" in r][-1]
    model, processor, _ = sample.load_model(out_dir)
    with torch.no_grad():
        expected = evaluation.headline(evaluation.evaluate(model, processor, items, log=lambda *_: None))
    for metric, value in expected.items():
        if value is None:
            assert f"val_{metric}" not in logged
        else:
            assert logged[f"val_{metric}"] == value
    assert any(value is not None for value in expected.values())
    assert os.path.isfile(os.path.join(out_dir, "answers.png"))


def test_compiled_blocks_train_and_answer_eagerly(tiny_world, tmp_path, monkeypatch):
    """train_joint.py --compile_blocks=True: the blocks are compiled (model.compile_each_block, here with a backend
    that counts dynamo's graphs and runs them as traced), the stage trains and validates, and the validation's
    answers are generated with the blocks eager: the graphs stay a few for the two kinds of block (training, a new
    crop count, validation's no_grad), not one per layer and cache length; and the answers are eval.py's on the
    exported weights. Asking for both compile switches is refused, and so is key_blocks (a host read of the mask)
    in the one graph of compile=True."""
    import model as model_module
    graphs, compile_each_block = [], model_module.compile_each_block

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(model_module, "compile_each_block", lambda m: compile_each_block(m, backend=counting_backend))
    out_dir = str(tmp_path / "joint")
    args = ["train_joint.py", f"--out_dir={out_dir}", *TINY, f"--data_dir={tiny_world}",
            "--data_mixture={'image': (1.0, ['synth_image'])}", "--max_steps=3", "--eval_every=3", "--eval_batches=1",
            "--eval_answers=4", "--save_every=0", "--resid_dropout=0.0", "--vocab=data", "--compile_blocks=True"]
    monkeypatch.setattr(sys, "argv", args)
    run = runpy.run_path(os.path.join(ROOT, "train_joint.py"), run_name="__main__")
    assert 2 <= len(graphs) <= 6, len(graphs)  # 2 kinds x (training, a new crop count, no_grad): 4 here
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        logged = [r for r in map(json.loads, f) if "val_loss" in r][-1]
    model, processor, _ = sample.load_model(out_dir)
    with torch.no_grad():
        expected = evaluation.headline(evaluation.evaluate(model, processor, run["answer_items"], log=lambda *_: None))
    assert any(value is not None for value in expected.values())
    assert all(logged.get(f"val_{metric}") == value for metric, value in expected.items() if value is not None)
    monkeypatch.setattr(sys, "argv", args + ["--compile=True"])
    with pytest.raises(SystemExit, match="compile=True and compile_blocks=True: choose one"):
        runpy.run_path(os.path.join(ROOT, "train_joint.py"), run_name="__main__")
    monkeypatch.setattr(sys, "argv", args[:-1] + ["--compile=True", "--key_blocks=True"])
    with pytest.raises(SystemExit, match="key_blocks reads the mask on the host"):
        runpy.run_path(os.path.join(ROOT, "train_joint.py"), run_name="__main__")


def test_compiled_blocks_on_a_cpu_without_a_cpp_compiler_run_eagerly_and_say_so(tiny_world, tmp_path, monkeypatch,
                                                                                  capsys):
    """torch.compile builds C++ on a CPU: where the machine has no compiler ($CXX names none here), train_joint.py's
    compile_blocks (on in the CPU demo) trains eagerly and says why, instead of failing at its first step."""
    import model as model_module
    import training

    monkeypatch.setenv("CXX", "no-such-compiler-for-nanomolmo2")
    assert training.cpp_compiler() is None
    monkeypatch.setattr(model_module, "compile_each_block", lambda m: pytest.fail("compiled without a compiler"))
    args = ["train_joint.py", f"--out_dir={tmp_path}", *TINY, f"--data_dir={tiny_world}",
            "--data_mixture={'image': (1.0, ['synth_image'])}", "--max_steps=1", "--eval_every=0", "--save_every=0",
            "--vocab=data", "--compile_blocks=True"]
    monkeypatch.setattr(sys, "argv", args)
    runpy.run_path(os.path.join(ROOT, "train_joint.py"), run_name="__main__")
    assert "compile_blocks: this machine has no C++ compiler ($CXX or g++)" in capsys.readouterr().out
    monkeypatch.delenv("CXX")
    assert training.cpp_compiler() is not None  # this machine's g++: the suite's compiled tests need it


def test_position_loss_is_the_l1_to_the_points_place_in_the_image_on_global_tokens_alone():
    """Stage 1's position loss, worked by hand: tokens 0-2 are the global view's, 3 the high-res view's. Token 0's
    cell is [0.25, 0.5] x [0, 0.25] and holds a point at offset (0.5, 0.2) of it: the point is at
    (0.25 + 0.5 * 0.25, 0 + 0.2 * 0.25) = (0.375, 0.05). Token 1 holds no point, token 2 holds one at offset
    (0, 1) of cell [0, 0.5] x [0.5, 1]: (0, 1). Token 3 holds a point but is high-res (its crop is not the
    image): left out. The head predicts sigmoid(0) = 0.5 everywhere: the loss is the mean over the two tokens of
    the summed absolute errors, (|0.5 - 0.375| + |0.5 - 0.05| + |0.5 - 0| + |0.5 - 1|) / 2 = 0.7875."""
    from vision import SigLIP2, SigLIP2Config, VisionPretrainer
    torch.manual_seed(0)
    vit = SigLIP2(SigLIP2Config.preset("tiny"))
    pretrainer = VisionPretrainer(vit, (1, 0), 1, 8, 16, use_sigmoid=False, use_loc=True, text_vocab_rows=64,
                                  use_position=True)
    with torch.no_grad():
        pretrainer.position_head.weight.zero_()
        pretrainer.position_head.bias.zero_()
    batch = {"offset_targets": torch.tensor([[0.5, 0.2], [-1.0, -1.0], [0.0, 1.0], [0.3, 0.3]]),
             "high_res": torch.tensor([False, False, False, True]),
             "cells": torch.tensor([[0.25, 0.0, 0.5, 0.25], [0.5, 0.0, 0.75, 0.25], [0.0, 0.5, 0.5, 1.0],
                                    [0.0, 0.0, 0.1, 0.1]])}
    loss = pretrainer.position_loss(torch.randn(4, 16), batch)
    assert loss.item() == pytest.approx(0.7875, rel=1e-6)  # float32 arithmetic on numbers of order 1
    assert VisionPretrainer(vit, (1, 0), 1, 8, 16, False, True, 64).position_head is None  # off by default


def test_loader_workers_auto_is_every_core_but_two_per_gpu_process_and_none_on_cpu(monkeypatch):
    """loader_workers=-1 (the stages' default): on a CPU run no workers (they would take the arithmetic's cores);
    on a GPU each process keeps two cores of its share (training, collating) and the rest make examples, at least
    one (16 cores, 1 GPU: 14; 4 GPUs: 16 // 4 - 2 = 2; 2 cores: 1; 128 cores, 8 GPUs: 14); a number asked for
    is kept."""
    from types import SimpleNamespace
    assert training.Dist("cpu").resolve_loader_workers(-1) == 0
    assert training.Dist("cpu").resolve_loader_workers(3) == 3
    monkeypatch.setattr(sys, "platform", "linux")
    for cores, processes, expected in [(16, 1, 14), (16, 4, 2), (2, 1, 1), (128, 8, 14)]:
        monkeypatch.setattr(training, "usable_cores", lambda: cores)
        gpu = SimpleNamespace(device=torch.device("cuda", 0), local_world_size=processes)
        assert training.Dist.resolve_loader_workers(gpu, -1) == expected, (cores, processes)
        assert training.Dist.resolve_loader_workers(gpu, 0) == 0
    monkeypatch.undo()
    # a process pinned to one core (taskset, a container's cpuset) counts one, whatever the machine has
    code = ("import os, training; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "print(training.usable_cores())")
    pinned = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert pinned.stdout.strip() == "1"


def test_cpu_has_bf16_matmul_reads_the_kernels_flags(tmp_path):
    """AVX512-BF16 or AMX-BF16 in the flags line: yes; AVX2 and AVX-512 alone, or no cpuinfo at all: no."""
    for flags, expected in (("fpu avx2 avx512f avx512_bf16 avx512_vnni", True), ("fpu avx2 amx_bf16 amx_tile", True),
                            ("fpu avx2 avx512f avx512bw", False)):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nflags\t\t: {flags}\nbugs\t\t: none\n")
        assert training.cpu_has_bf16_matmul(str(path)) is expected, flags
    assert training.cpu_has_bf16_matmul(str(tmp_path / "missing")) is False


def test_cpu_has_amx_reads_the_kernels_flags(tmp_path):
    """AMX's bf16 tiles in the flags line: yes; AVX512-BF16 alone (a CPU whose bf16 products run several times
    slower), or no cpuinfo at all: no."""
    for flags, expected in (("fpu avx2 amx_bf16 amx_tile avx512_bf16", True), ("fpu avx2 avx512f avx512_bf16", False)):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nflags\t\t: {flags}\nbugs\t\t: none\n")
        assert training.cpu_has_amx(str(path)) is expected, flags
    assert training.cpu_has_amx(str(tmp_path / "missing")) is False


def test_step_autocast_on_a_cpu_is_float32_unless_asked(monkeypatch):
    """On a CPU: 'off' computes a matmul in float32, 'on' in bfloat16, 'auto' as the CPU's flags say (and only for
    bfloat16); anything else names the knob."""
    cpu = torch.device("cpu")
    a = torch.ones(2, 2)

    def product_dtype(context):
        with context:
            return (a @ a).dtype

    assert product_dtype(training.step_autocast(cpu, "bfloat16", "off")) == torch.float32
    assert product_dtype(training.step_autocast(cpu, "bfloat16", "on")) == torch.bfloat16
    said = []
    for has_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(training, "cpu_has_bf16_matmul", lambda has_bf16=has_bf16: has_bf16)
        assert product_dtype(training.step_autocast(cpu, "bfloat16", "auto", print_fn=said.append)) == expected
    assert said[0].endswith("bf16 matrix instructions") and said[1].endswith("float32")
    monkeypatch.setattr(training, "cpu_has_bf16_matmul", lambda: True)
    assert product_dtype(training.step_autocast(cpu, "float16", "auto", print_fn=said.append)) == torch.float32
    with pytest.raises(ValueError, match="cpu_autocast"):
        training.step_autocast(cpu, "bfloat16", True)


def test_a_cpu_step_in_bfloat16_gives_the_float32_loss_within_bf16_rounding(tiny_world, tmp_path, monkeypatch):
    """train_joint.py's first step on the same batch and weights, with and without --cpu_autocast=on: the losses agree
    to 2% (bf16 keeps 8 significant bits, ~0.4% per rounding, and the loss goes through a few dozen matmuls), and
    they are not the same number (the switch does change the arithmetic)."""
    losses = {}
    for mode in ("off", "on"):
        out_dir = str(tmp_path / mode)
        args = ["train_joint.py", f"--out_dir={out_dir}", *TINY, f"--data_dir={tiny_world}",
                "--data_mixture={'image': (1.0, ['synth_image'])}", "--max_steps=1", "--eval_every=0",
                "--save_every=0", "--resid_dropout=0.0", "--vocab=data", f"--cpu_autocast='{mode}'"]
        monkeypatch.setattr(sys, "argv", args)
        runpy.run_path(os.path.join(ROOT, "train_joint.py"), run_name="__main__")
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            losses[mode] = [r for r in map(json.loads, f) if "loss" in r][0]["loss"]
    assert losses["on"] != losses["off"]
    assert losses["on"] == pytest.approx(losses["off"], rel=2e-2)
