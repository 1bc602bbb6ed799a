"""The full recipe's so400m ViT in stage 1 on one H200 (BENCHMARKS.md "The full ViT in the easy world first"): how
often its scene head names the kind of shape a validation token holds, and its training scene loss, against stage-1
steps of 64 images: from a random start in the demo's world (everything at 5e-5, and the heads at 1e-3 beside the
ViT's 5e-5), and the easy world's 300 steps first, then the demo's world from that ViT (the recipe now). The
validation lines and every tenth step's losses are kept in assets/bench/full_vit_easy_gpu/.

    python assets/bench/plot_full_kinds.py    # -> assets/bench/full_vit_easy_gpu/{kinds,scene_loss}.png
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from training import plot_curves  # noqa: E402

RUNS = os.path.join(HERE, "full_vit_easy_gpu")
EASY_STEPS = 300  # the easy part's steps: the world part's steps count on from there


def series(name, key, offset=0):
    """[(step, value of key)] of a run's kept lines, its steps moved by offset."""
    with open(os.path.join(RUNS, name)) as f:
        return [(r["step"] + 1 + offset, r[key]) for r in map(json.loads, f) if key in r]


RECIPES = {  # label: (file, offset)
    "from scratch in the world, all at 5e-5": ("scratch_600.jsonl", 0),
    "from scratch in the world, heads at 1e-3": ("heads_1e3_600.jsonl", 0),
    "part 1: the easy world (its own images)": ("easy_300.jsonl", 0),
    # the second part's heads start new (train_vision.py --init_from loads the ViT alone)
    "part 2: then the world, from part 1's ViT": ("easy_then_world_600.jsonl", EASY_STEPS),
}
plot_curves({label: series(name, "val_kind_acc", offset) for label, (name, offset) in RECIPES.items()},
            os.path.join(RUNS, "kinds.png"), title="the full ViT's stage 1: kinds of shape named (validation)",
            xlabel="stage-1 steps of 64 images (the easy world's included)", ylabel="kind accuracy")
plot_curves({label: series(name, "scene", offset) for label, (name, offset) in RECIPES.items()},
            os.path.join(RUNS, "scene_loss.png"), title="the full ViT's stage 1: scene loss (training)",
            xlabel="stage-1 steps of 64 images (the easy world's included)", ylabel="scene loss")
print(f"wrote {RUNS}/kinds.png and scene_loss.png")
