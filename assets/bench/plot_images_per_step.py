"""Stage 1's world part on one H200 at 64, 128 and 192 images a step: how often its scene head names the kind of
shape a validation token holds, against the images it has seen and against its minutes (BENCHMARKS.md "Stage 1 at
128 images a step"). The validation lines are kept in assets/bench/stage1_batch_gpu/; the minutes are each run's
steps times its median step (the step waits on the host, so it grows far slower than the images a step).

    python assets/bench/plot_images_per_step.py    # -> assets/bench/stage1_batch_gpu/kinds_{images,minutes}.png
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from training import plot_curves  # noqa: E402

RUNS = os.path.join(HERE, "stage1_batch_gpu")
# file -> (label, images a step, median seconds a step measured in its run's log)
RUNS_MEASURED = {
    "b64.jsonl": ("64 a step, lr 1e-3 (the recipe before; compiled)", 64, 0.058),
    "b128.jsonl": ("128 a step, lr 1.4e-3", 128, 0.090),
    "b192.jsonl": ("192 a step, lr 1.7e-3, 1,600 steps", 192, 0.133),
    "b128_demo.jsonl": ("128 a step in demo.py --recipe=gpu (the recipe now)", 128, 0.077),
}


def kinds(path):
    """[(steps done, val_kind_acc)] of a run's validation lines."""
    with open(path) as f:
        return [(r["step"] + 1, r["val_kind_acc"]) for r in map(json.loads, f) if "val_kind_acc" in r]


by_images, by_minutes = {}, {}
for name, (label, per_step, step_s) in RUNS_MEASURED.items():
    points = kinds(os.path.join(RUNS, name))
    by_images[label] = [(steps * per_step / 1000, acc) for steps, acc in points]
    by_minutes[label] = [(steps * step_s / 60, acc) for steps, acc in points]
plot_curves(by_images, os.path.join(RUNS, "kinds_images.png"), title="stage 1's world part: kinds named",
            xlabel="images seen (thousands)", ylabel="kind accuracy (validation tokens)")
plot_curves(by_minutes, os.path.join(RUNS, "kinds_minutes.png"), title="stage 1's world part: kinds named",
            xlabel="minutes (steps x median step)", ylabel="kind accuracy (validation tokens)")
print(f"wrote {RUNS}/kinds_images.png and kinds_minutes.png")
