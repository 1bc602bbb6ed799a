"""The full recipe (python demo.py --recipe=full) on one H200 (BENCHMARKS.md "The full recipe at 112-px crops"): its
joint stage's validation answers against the rows it has trained on, at Molmo2's 378-px crops (250 steps, blind) and
at the small recipe's 112-px ones (500 steps, two runs; then 600 and 900 steps with each block compiled,
BENCHMARKS.md "The full recipe's joint step compiled"; 800 and 880 steps from the ViT that learned kinds in the easy
world first, "The full ViT in the easy world first" and "The full recipe at 880 joint steps"), beside the small GPU
recipe's first 1,500 steps; and the mean cosine of the image tokens the LLM receives, step by step. The validation
lines and every tenth step's image statistics are kept in assets/bench/full_recipe_gpu/.

    python assets/bench/plot_full_recipe.py    # -> assets/bench/full_recipe_gpu/{answers,image_cosine}.png
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from training import plot_curves  # noqa: E402

RUNS = os.path.join(HERE, "full_recipe_gpu")
ROWS = 64  # rows of 512 tokens a joint step, in both recipes (config/demo_gpu_joint.py)
FULL = {"joint_378.jsonl": "full, 378 px", "joint_112_run1.jsonl": "full, 112 px, run 1",
        "joint_112_run2.jsonl": "full, 112 px, run 2", "joint_112_blocks600.jsonl": "full, 112 px, compiled, 600 steps",
        "joint_112_blocks900.jsonl": "full, 112 px, compiled, 900 steps",
        "joint_112_easy800.jsonl": "full, 112 px, easy world first, 800 steps",
        "joint_112_easy880.jsonl": "full, 112 px, easy world first, 880 steps"}
SMALL = os.path.join(HERE, "data_echo_gpu", "joint_call2.jsonl")  # the small GPU recipe as committed


def lines(path, key, last_step=None):
    """[(rows trained on, in thousands, value of key)] of a run's lines that hold key."""
    with open(path) as f:
        return [((r["step"] + 1) * ROWS / 1000, r[key]) for r in map(json.loads, f)
                if key in r and (last_step is None or r["step"] < last_step)]


answers = {label: lines(os.path.join(RUNS, name), "val_counting_accuracy") for name, label in FULL.items()}
answers["small recipe"] = lines(SMALL, "val_counting_accuracy", last_step=1500)
plot_curves(answers, os.path.join(RUNS, "answers.png"), title="the joint stage: validation counting",
            xlabel="rows trained on (thousands)", ylabel="counting accuracy (100 questions)")
cosine = {}
for name, label in FULL.items():
    with open(os.path.join(RUNS, name.replace(".jsonl", "_features.jsonl"))) as f:
        cosine[label] = [(r["step"], r["image_feature_cos"]) for r in map(json.loads, f)]
plot_curves(cosine, os.path.join(RUNS, "image_cosine.png"), title="the joint stage: image tokens' mean cosine",
            xlabel="step", ylabel="mean cosine between image tokens")
print(f"wrote {RUNS}/answers.png and image_cosine.png")
