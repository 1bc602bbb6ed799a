"""What a model gets wrong when it counts, from eval.py's predictions.jsonl on the demo world's test split: accuracy by
what the question asks about (a colour, a kind of shape, or both), in scenes with and without shapes that do not
match, and how the wrong counts miss (too high, too low, or the number of all the shapes in the image).

    python assets/bench/count_errors.py out/demo/eval/predictions.jsonl [data/demo]

With --readout, stage 1's own read-out instead (no LLM): a stage-1 out_dir's checkpoint (ckpt.pt, with its heads)
reads counts off its localisation head on the first batches of the val split, as train_vision.py's validation
does, split by what the label names:

    python assets/bench/count_errors.py --readout out/demo/vision [data/demo] [batches]

With --kinds, a stage-1 run trained with the scene loss (--scene_weight): how often its scene head names the kind of
each shape of the first val images, on the token that holds the shape's centre, by view (global or high-res), size,
texture and kind, and which kinds it says for each true kind on the high-res tokens:

    python assets/bench/count_errors.py --kinds out/demo_gpu/vision [data/demo] [images]
"""

import collections
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import prepare_data  # noqa: E402
from eval import extract_count  # noqa: E402


def table(groups):
    for name, rows in groups.items():
        print(f"  {name:<36} n {len(rows):>4}  accuracy {sum(rows) / max(len(rows), 1):.2f}")


def main(predictions, world="data/demo"):
    with open(os.path.join(world, "synth_image", "test.jsonl")) as f:
        scenes = {r["id"]: r["scene"] for r in map(json.loads, filter(str.strip, f))}
    groups, misses = collections.defaultdict(list), collections.Counter()
    with open(predictions) as f:
        for p in map(json.loads, filter(str.strip, f)):
            if p["task"] != "counting":
                continue
            scene = scenes[p["id"]]
            true = sum(prepare_data.shape_matches(s, scene["query"]) for s in scene["shapes"])
            said = extract_count(p["answer"])
            right = said == true
            groups[f"asks about {prepare_data.query_asks_about(scene['query'])}"].append(right)
            distractors = true < len(scene["shapes"])
            groups["shapes that do not match" if distractors else "every shape matches"].append(right)
            if not right:
                misses["no count" if said is None else "all the shapes" if distractors and said == len(scene["shapes"])
                       else "too high" if said > true else "too low"] += 1
    n = sum(len(v) for k, v in groups.items() if k.startswith("asks"))
    right = sum(sum(v) for k, v in groups.items() if k.startswith("asks"))
    print(f"{n} counting answers, accuracy {right / max(n, 1):.3f}")
    table(dict(sorted(groups.items())))
    print("  wrong counts: " + ", ".join(f"{k} {v}" for k, v in misses.most_common())
          + " ('all the shapes': the number of every shape in the image, where some do not match)")


def load_stage1(run):
    """A stage-1 out_dir's checkpoint (ckpt.pt, heads included) -> (VisionPretrainer in eval mode, its processor,
    its run config)."""
    import torch

    import data
    from model import Molmo2Config
    from training import scene_classes
    from vision import SigLIP2, VisionPretrainer
    ckpt = torch.load(os.path.join(run, "ckpt.pt"), map_location="cpu", weights_only=False)
    cfg = ckpt["config"]
    preset = Molmo2Config.preset(cfg["model_preset"])
    pretrainer = VisionPretrainer(SigLIP2(preset.vit), preset.connector.vit_layers, cfg["text_layers"],
                                  cfg["text_max_len"], cfg["embed_dim"], cfg["sigmoid_weight"] > 0, True,
                                  cfg["text_vocab_rows"], cfg.get("position_loss", False),
                                  scene_classes() if cfg.get("scene_weight", 0) > 0 else ())
    pretrainer.load_state_dict(ckpt["model"])
    pretrainer.eval()
    processor = data.Molmo2Processor(max_crops=cfg["max_crops"], crop_size=preset.vit.image_size,
                                     patch_size=preset.vit.patch_size, overlap_margins=cfg["overlap_margins"])
    return pretrainer, processor, cfg


def readout(run, world="data/demo", batches=6):
    """Stage 1's read-out split by what the label names ('green shapes', 'circles', 'red circles')."""
    import numpy as np
    import torch

    import data
    from eval import point_scores
    from training import VisionLoader, vision_batch_to
    pretrainer, processor, cfg = load_stage1(run)
    loader = VisionLoader(data_dir=world, mixture=cfg["data_mixture"], split="val", batch_size=32, processor=processor,
                          text_max_len=cfg["text_max_len"], use_sigmoid=cfg["sigmoid_weight"] > 0, use_loc=True, seed=0,
                          rank=0, world_size=1, grad_accum=1, workers=0)
    tokenizer = data.get_tokenizer()
    groups = collections.defaultdict(list)
    with torch.no_grad():
        for _ in range(int(batches)):
            batch = vision_batch_to(loader.next_step()[0], torch.device("cpu"))
            tokens = pretrainer.token_embeddings(batch["patches"], batch["pooling"])
            predicted = pretrainer.read_out(tokens, batch)  # as train_vision.py's validation reads it
            for j, (pred, true) in enumerate(zip(predicted, batch["label_points"])):
                label = tokenizer.decode([int(t) for t in batch["label_ids"][j] if int(t) >= 0]).strip()
                about = "colour" if label.endswith(" shapes") else "kind" if " " not in label else "colour and kind"
                groups[about].append((len(pred) == len(true), len(pred) - len(true),
                                      point_scores(pred, true, radius=0.05)["f1"]))
    for about, rows in sorted(groups.items()):
        right, diff, f1 = np.array(rows).mean(0)
        print(f"  asks about {about:<16} n {len(rows):>4}  counting {right:.2f}  mean (said - true) {diff:+.2f}  "
              f"F1 {f1:.2f}")


def kinds(run, world="data/demo", images=200):
    """The scene head's kind on each shape's centre token, split by view, size, texture and kind."""
    import numpy as np
    import torch

    import data
    import training
    pretrainer, processor, cfg = load_stage1(run)
    if pretrainer.scene_head is None:
        raise SystemExit(f"count_errors: {run} was trained without the scene loss (--scene_weight): no kinds to read")
    kinds_ = training.scene_attributes()["kind"]
    groups, said_for = collections.defaultdict(list), np.zeros((len(kinds_), len(kinds_) + 1), dtype=int)
    val = data.open_mixture({"image": (1.0, ["synth_image"])}, world, "val", 0, rank=0, report=data.SkipReport())[1]
    records = [val["synth_image"].get(i) for i in range(int(images))]  # with its image decoded
    with torch.no_grad():
        for record in records:
            example = training.VisionExample(record, 0, processor, cfg["text_max_len"], False, True, use_scene=True)
            batch = training.vision_batch_to(training.collate_vision([example]), torch.device("cpu"))
            tokens = pretrainer.token_embeddings(batch["patches"], batch["pooling"])
            said = pretrainer.scene_logits(tokens)[0].argmax(-1).numpy()  # 0: none, k: kinds_[k - 1]
            n_global = example.grid[0] * example.grid[1]
            for shape in record["scene"]["shapes"]:
                true = kinds_.index(shape["kind"]) + 1
                holds, _ = training.cell_targets(np.array([[shape["x"], shape["y"]]]), example.cells)
                for m in np.flatnonzero(holds & (example.scene_targets[:, 0] == true)):  # the shape on top there
                    view = "global" if m < n_global else "high-res"
                    right = said[m] == true
                    for key in (view, f"{view}, {shape['size']}", f"{view}, {shape['texture']}",
                                f"{view}, {shape['size']} {shape['texture']}", f"{view}, {shape['kind']}s"):
                        groups[key].append(right)
                    if view == "high-res":
                        said_for[true - 1, said[m]] += 1
    print(f"the scene head's kind on the centre token of each shape of {len(records)} val images:")
    table({k: groups[k] for k in sorted(groups)})
    print("high-res tokens, what it says for each true kind (none, " + ", ".join(kinds_) + "):")
    for k, row in zip(kinds_, said_for):
        print(f"  {k:<9} " + " ".join(f"{n:>4}" for n in row))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--readout"]:
        readout(*sys.argv[2:])
    elif sys.argv[1:2] == ["--kinds"]:
        kinds(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
