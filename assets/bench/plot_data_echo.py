"""Data echoing on one H200 (BENCHMARKS.md "Data echoing"): stage 1's world part with each batch of 128 images
trained 1, 2 or 4 steps, as the kinds of shape its scene head names against the batches it has drawn; and the GPU
recipe's joint stage after the 4-step stage 1, as its validation answers against the rows it has trained on, in two
one-command runs. The validation lines are kept in assets/bench/data_echo_gpu/ (the 1-step run is the earlier
recipe's, in a world of 30,000 images: assets/bench/stage1_batch_gpu/b128_demo.jsonl).

    python assets/bench/plot_data_echo.py    # -> assets/bench/data_echo_gpu/{kinds,answers}.png
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from training import plot_curves  # noqa: E402

RUNS = os.path.join(HERE, "data_echo_gpu")
BATCH, ROWS = 128, 64  # images a stage-1 batch (config/demo_gpu_vision.py), rows a joint step (demo_gpu_joint.py)


def lines(path, key):
    """[(steps done, value of key)] of a run's validation lines."""
    with open(path) as f:
        return [(r["step"] + 1, r[key]) for r in map(json.loads, f) if key in r]


STAGE1 = {  # file -> (label, steps a batch)
    os.path.join(HERE, "stage1_batch_gpu", "b128_demo.jsonl"): ("1 step a batch (the earlier recipe)", 1),
    os.path.join(RUNS, "echo2.jsonl"): ("2 steps a batch", 2),
    os.path.join(RUNS, "echo4.jsonl"): ("4 steps a batch (the recipe now)", 4),
}
kinds = {label: [(steps / echo * BATCH / 1000, acc) for steps, acc in lines(path, "val_kind_acc")]
         for path, (label, echo) in STAGE1.items()}
plot_curves(kinds, os.path.join(RUNS, "kinds.png"), title="stage 1's world part: kinds named",
            xlabel="images drawn (thousands)", ylabel="kind accuracy (validation tokens)")

answers = {}
for call in (2, 3):
    path = os.path.join(RUNS, f"joint_call{call}.jsonl")
    for key, name in (("val_counting_accuracy", "counting"), ("val_pointing_f1", "pointing F1")):
        answers[f"{name}, run {call - 1}"] = [(steps * ROWS / 1000, v) for steps, v in lines(path, key)]
plot_curves(answers, os.path.join(RUNS, "answers.png"), title="the joint stage after it: validation answers",
            xlabel="rows trained on (thousands)", ylabel="accuracy / F1 (100 questions each)")
print(f"wrote {RUNS}/kinds.png and answers.png")
