"""Stage 1's scene head on one H200: how often it names the kind of shape that a validation token holds, against
stage-1 steps, for the recipes of BENCHMARKS.md "Stage 1 in two parts" (their validation lines, kept in
assets/bench/stage1_curriculum_gpu/, and the one-part recipe's in assets/bench/stage1_scene_gpu/).

    python assets/bench/plot_kinds.py    # -> assets/bench/stage1_curriculum_gpu/kinds.png
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from training import plot_curves  # noqa: E402

RUNS = os.path.join(HERE, "stage1_curriculum_gpu")
EASY_STEPS = 600  # the easy part's steps: the world part's steps count on from there


def kinds(path, offset=0):
    """[(step, val_kind_acc)] of a run's log lines, its steps moved by offset."""
    with open(path) as f:
        return [(r["step"] + 1 + offset, r["val_kind_acc"]) for r in map(json.loads, f) if "val_kind_acc" in r]


curves = {
    "one part, unbalanced, std-0.02 start (before)": kinds(os.path.join(HERE, "stage1_scene_gpu", "log.jsonl")),
    "one part, balanced, big_vision start": kinds(os.path.join(RUNS, "plain_2000.jsonl")),
    "part 1: the easy world (its own images)": kinds(os.path.join(RUNS, "easy_600.jsonl")),
    # the second part's heads start new (train_vision.py --init_from loads the ViT alone): its first point is low
    "part 2: then the world, from part 1's ViT": kinds(os.path.join(RUNS, "easy_then_world_2400.jsonl"), EASY_STEPS),
}
plot_curves(curves, os.path.join(RUNS, "kinds.png"), title="stage 1 on one H200: kinds of shape named (validation)",
            xlabel="stage-1 steps of 64 images (the easy world's included)", ylabel="kind accuracy")
print(f"wrote {os.path.join(RUNS, 'kinds.png')}")
