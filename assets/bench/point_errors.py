"""Where a model's predicted points land, from eval.py's predictions.jsonl on the demo world's test split: within
0.05 of a shape it was asked for (a hit, eval.py's radius), 0.05-0.10 from one (near, and nearer than any other
shape), within 0.10 of a shape it was not asked for (wrong shape), or further than 0.10 from every shape (nowhere).
Tells a model that knows which shape but not exactly where from one that points at the wrong shapes.

    python assets/bench/point_errors.py out/demo/eval/predictions.jsonl [data/demo]
"""

import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import data  # noqa: E402
import prepare_data  # noqa: E402


def main(predictions, world="data/demo"):
    with open(os.path.join(world, "synth_image", "test.jsonl")) as f:
        scenes = {r["id"]: r["scene"] for r in map(json.loads, filter(str.strip, f))}
    kinds = {"hit": 0, "near": 0, "wrong shape": 0, "nowhere": 0}
    with open(predictions) as f:
        for p in map(json.loads, filter(str.strip, f)):
            if p["task"] != "pointing":
                continue
            scene = scenes[p["id"]]
            asked = [(s["x"], s["y"]) for s in scene["shapes"] if prepare_data.shape_matches(s, scene["query"])]
            other = [(s["x"], s["y"]) for s in scene["shapes"] if not prepare_data.shape_matches(s, scene["query"])]
            for tag in data.parse_points(p["answer"]).tags:
                for point in tag.points:
                    d_asked = min((math.dist((point.x, point.y), q) for q in asked), default=math.inf)
                    d_other = min((math.dist((point.x, point.y), q) for q in other), default=math.inf)
                    kind = ("hit" if d_asked <= 0.05 else "near" if d_asked <= 0.10 and d_asked <= d_other
                            else "wrong shape" if d_other <= 0.10 else "nowhere")
                    kinds[kind] += 1
    n = sum(kinds.values())
    print(f"{n} predicted points: " + ", ".join(f"{k} {v / max(n, 1):.2f}" for k, v in kinds.items()))


if __name__ == "__main__":
    main(*sys.argv[1:])
