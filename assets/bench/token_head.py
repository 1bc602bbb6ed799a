"""What the image tokens of a joint-stage run with token_loss carry: its token head (kept in the run's ckpt.pt, taken
off the exported model) read on the validation rows, top-1 accuracy per attribute on the tokens that hold a shape's
centre, and how often it names "no centre" there. Beside stage 1's read-out of the same attributes (its own head on
the ViT's features), it says where the kinds are lost: in the ViT's features, or after the tokens, in the LLM.

    python assets/bench/token_head.py out/demo/joint [data/demo] [batches]

The rows are those of train_joint.py's validation (its seed, styles, crops and row length, from the checkpoint's
config), in float32 on the CPU.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from training import TokenAttributeLoss, TrainLoader, batch_to, build_model, model_inputs  # noqa: E402


def main(run="out/demo/joint", data_dir="data/demo", batches=8):
    path = os.path.join(run, "ckpt.pt")
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no checkpoint, and the token head lives only there (a run with save_every > 0)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    config = ckpt["config"]
    if not config.get("token_loss"):
        raise SystemExit(f"{run}: trained without token_loss, so it has no token head")
    model = build_model(run).float().eval()
    names = tuple(config["token_attributes"])
    head = TokenAttributeLoss(model, names, config.get("token_weights", ()))
    model.connector.token_head.load_state_dict({k.split("token_head.")[1]: v for k, v in ckpt["model"].items()
                                                if k.startswith("connector.token_head.")})
    loader = TrainLoader(data_dir, config["data_mixture"], "val", config["batch_size"], config["max_seq_len"],
                         config["max_crops"], config["max_row_crops"], config["max_video_frames"],
                         model.config.vit.image_size, model.config.vit.patch_size, config["overlap_margins"],
                         config.get("prefix_mode", "sft"), config["loss_weighting"],
                         config["seed"], styles=config["styles"], token_attributes=names)
    right, empty, total = torch.zeros(len(names)), 0, 0
    with torch.no_grad():
        for _ in range(int(batches)):
            batch = batch_to(loader.next_step()[0], "cpu")
            model(**model_inputs(batch))
            placed = model.place(head.features, batch["image_grids"], "image")
            logits = torch.split(model.connector.token_head(placed), head.classes, dim=-1)
            targets = batch["image_scene_targets"]
            centre = targets[:, 0] > 0
            for a, x in enumerate(logits):
                right[a] += (x.argmax(-1) == targets[:, a])[centre].sum()
            empty += (logits[0].argmax(-1) == 0)[centre].sum().item()
            total += int(centre.sum())
            head.features = None
    print(f"{run}: {total} image tokens holding a shape's centre, {batches} validation batches")
    for name, r in zip(names, right.tolist()):
        print(f"  {name:10s} top-1 {r / total:.3f}")
    print(f"  named 'no centre' there: {empty / total:.3f} (by the first attribute's head)")


if __name__ == "__main__":
    main(*sys.argv[1:])
