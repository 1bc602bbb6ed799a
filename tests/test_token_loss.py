"""train_joint.py's token_loss (a from-scratch switch, not Molmo2's): a head on each image token as the LLM receives
it names attributes of the synthetic world's shape whose centre the token holds. The targets are checked by hand
against the crop layout, the loss against its value at the start and the parts its gradient reaches, and the stage
against what it must export (the plain model, no head)."""

import json
import math
import os
import runpy
import sys
import types

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import training  # noqa: E402
from model import Molmo2  # noqa: E402

TINY = ["--model_preset=tiny", "--overlap_margins=(1, 1)", "--max_crops=2", "--max_row_crops=8",
        "--max_video_frames=4", "--max_seq_len=256", "--batch_size=2", "--device=cpu"]
IMAGES_ONLY = "--data_mixture={'image': (1.0, ['synth_image'])}"


def one_shape_example(x, y):
    """A 224-px image as the demo's processor makes it (112-px crops of 14-px patches, 2x2 pooling), and a record
    whose scene holds one red circle centred at (x, y)."""
    processor = data.Molmo2Processor(max_crops=4, crop_size=112, patch_size=14, overlap_margins=(2, 2))
    image = Image.new("RGB", (224, 224), (200, 200, 200))
    vision = processor.image(image)
    example = types.SimpleNamespace(image_token_pooling=vision.token_pooling,
                                    image_grids=torch.tensor([vision.grid]))
    shape = {"kind": "circle", "colour": "red", "x": x, "y": y, "radius": 0.04}
    return processor, example, {"images": [image], "scene": {"shapes": [shape]}}


def test_the_tokens_holding_a_centre_name_its_first_digits_and_the_rest_no_centre():
    """A centre at (0.37, 0.81) is written "370 810": its first digits are 3 and 8, classes 4 and 9 (0 is "no centre
    here"). By hand: the global view is the whole image in one 112-px crop, 8 x 8 patches pooled 2 x 2 into 4 x 4
    tokens a quarter of the image wide, so the centre is in its row 3, column 1 (token 13); the high-res view tiles
    the image too, so exactly one of its tokens holds it. The columns come in the order asked."""
    processor, example, record = one_shape_example(0.37, 0.81)
    assert tuple(example.image_grids[0].tolist())[:2] == (4, 4)
    targets = training.image_scene_targets(record, example, processor, ("x_tenths", "y_tenths"))
    assert targets.shape == (len(example.image_token_pooling), 2) and targets.dtype == torch.long
    holding = torch.nonzero(targets[:, 0]).flatten().tolist()
    assert holding[0] == 13 and len(holding) == 2 and holding[1] >= 16  # one global token, one high-res token
    assert targets[holding].tolist() == [[4, 9], [4, 9]]
    assert (targets[[k for k in range(len(targets)) if k not in holding]] == 0).all()
    ordered = training.image_scene_targets(record, example, processor, ("y_tenths", "colour", "kind"))
    red, circle = list(training.scene_attributes()["colour"]).index("red"), 0
    assert ordered[13].tolist() == [9, red + 1, circle + 1]


def test_images_without_a_scene_or_of_several_images_are_unknown_not_empty():
    """-1 (ignored by the loss) where nothing is known, not 0 ("no centre here"), which would teach a wrong lesson."""
    processor, example, record = one_shape_example(0.5, 0.5)
    for unknown in ({"images": record["images"]}, {**record, "images": record["images"] * 2}):
        targets = training.image_scene_targets(unknown, example, processor, ("x_tenths",))
        assert (targets == -1).all() and targets.shape == (len(example.image_token_pooling), 1)
    with pytest.raises(ValueError, match="token_attributes=.*'size'"):
        training.TokenAttributeLoss(training.build_model("scratch", "tiny"), ("x_tenths", "size"))
    with pytest.raises(ValueError, match=r"token_weights=\(2.0,\): one weight for each"):
        training.TokenAttributeLoss(training.build_model("scratch", "tiny"), ("x_tenths", "y_tenths"), (2.0,))


def test_token_loss_starts_at_chance_and_its_gradient_reaches_the_connector(tiny_world):
    """The loader's targets line up with the batch's image tokens (one row each). The head starts at zero: every
    class alike, so each attribute's balanced loss is ln(11) over the tokens holding a centre plus ln(11) over the
    rest: 2 (3 + 1) ln 11 for the two digits weighted 3 and 1 (float32 sums of equal terms: 1e-5). Its first gradient reaches the head; once
    the head is not zero, it reaches the connector's projector and position tables too."""
    torch.manual_seed(0)
    model = training.build_model("scratch", "tiny", position_bins=8)
    loss_fn = training.TokenAttributeLoss(model, ("x_tenths", "y_tenths"), (3.0, 1.0))
    loader = training.TrainLoader(tiny_world, {"image": (1.0, ["synth_image"])}, "train", batch_size=2,
                                  max_seq_len=256, max_crops=2, max_row_crops=8, max_video_frames=4,
                                  crop_size=model.config.vit.image_size, patch_size=model.config.vit.patch_size,
                                  overlap_margins=(1, 1), prefix_mode="sft", weighting="sft", seed=0,
                                  token_attributes=("x_tenths", "y_tenths"))
    batch = training.batch_to(loader.next_step()[0], torch.device("cpu"))
    targets = batch["image_scene_targets"]
    assert len(targets) == int((batch["input_ids"] == model.config.image_patch_id).sum())
    assert (targets[:, 0] > 0).any() and (targets[:, 0] == 0).any()
    head = model.connector.token_head

    def backward():
        model.zero_grad(set_to_none=True)
        model(**training.model_inputs(batch))
        loss = loss_fn(batch)
        loss.backward()
        return loss

    assert backward().item() == pytest.approx(8 * math.log(11), rel=1e-5)
    assert head.weight.grad.abs().sum() > 0 and model.connector.projector.down_proj.weight.grad.abs().sum() == 0
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02)
    backward()
    for p in (model.connector.projector.down_proj.weight, model.connector.position_x.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert loss_fn.features is None  # consumed: a stale forward's tokens are never scored twice


def test_train_joint_with_token_loss_logs_it_keeps_the_head_in_checkpoints_and_exports_the_plain_model(
        tiny_world, tmp_path, monkeypatch):
    """The head trains with the connector (its part's optimizer groups) and sits in the resumable checkpoint, so a
    resumed run goes on with it; the exported model is the plain one, loadable as any Molmo2 checkpoint. token_loss
    with the whole model compiled as one graph is refused."""
    out_dir = str(tmp_path / "joint")
    args = ["train_joint.py", f"--out_dir={out_dir}", *TINY, f"--data_dir={tiny_world}", IMAGES_ONLY,
            "--max_steps=2", "--eval_every=0", "--save_every=2", "--vocab=data", "--token_loss=0.5",
            "--token_attributes=('kind', 'x_tenths')"]
    monkeypatch.setattr(sys, "argv", args)
    runpy.run_path(os.path.join(ROOT, "train_joint.py"), run_name="__main__")
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "loss" in r and "step" in r and "val_loss" not in r]
    assert len(steps) == 2 and all(r["token"] > 0 for r in steps)
    state = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=False)["model"]
    assert state["connector.token_head.weight"].shape[0] == 5 + 11  # 4 kinds and 10 digits, each + "no centre"
    exported = Molmo2.from_pretrained(os.path.join(out_dir, "final"))
    assert not any("token_head" in name for name in exported.state_dict())
    assert set(exported.state_dict()) == {k for k in state if "token_head" not in k}
    monkeypatch.setattr(sys, "argv", args + ["--compile=True"])
    with pytest.raises(SystemExit, match="token_loss trains a head"):
        runpy.run_path(os.path.join(ROOT, "train_joint.py"), run_name="__main__")
