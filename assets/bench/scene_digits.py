"""Run train_vision.py with more attributes in stage 1's scene loss: digits of the x and of the y that a point on the
shape's centre is written with on Molmo2's 0-1000 scale, the tens (its second of three) or also the hundreds (the
first digit alone is train_vision.py's own `scene_digits`; PLACES=100 trained the same stage 1 as it, the read-out
the same to the last digit). Issue 15: the joint stage's model finds the token that holds a shape but writes the
second digit of its coordinates at chance (BENCHMARKS.md "More questions an image"); the digit is a sawtooth of the
position, hard to learn from the LLM's few coordinates. Taught densely to the ViT, it could be read off a token as
its colour is (BENCHMARKS.md "The coordinates' digits taught in stage 1": the ViT did not learn the second digit).

    PLACES=10 python assets/bench/scene_digits.py train_vision.py config/demo_vision.py ...   # or PLACES=100,10

Only stage 1 changes (its scene head grows by 11 outputs a digit); the align and joint stages load its ViT as always.
"""

import os
import runpy
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import data  # noqa: E402
import training  # noqa: E402

PLACES = [int(p) for p in os.environ.get("PLACES", "10").split(",")]
attributes, targets = training.scene_attributes, training.scene_targets


def scene_attributes(digits=False):
    return {**attributes(), **{f"{axis}{place}": tuple(range(10)) for place in PLACES for axis in "xy"}}


def with_digits(shape):
    x, y = data.scaled_point(shape["x"], shape["y"])
    return {**shape, **{f"{axis}{place}": v // place % 10 for place in PLACES for axis, v in (("x", x), ("y", y))}}


def scene_targets(scene, cells, digits=False):
    return targets({**scene, "shapes": [with_digits(s) for s in scene["shapes"]]}, cells)


training.scene_attributes, training.scene_targets = scene_attributes, scene_targets
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
