"""The CPU demo's levers as pictures: validation answers (pointing F1, counting) against optimizer steps, the mean
of the seeds, per joint variant, from the logs that assets/bench/demo_levers.sh writes (OUT/seed*/NAME.log).

    python assets/bench/plot_levers.py --logs=OUT --out=assets/bench   # -> levers_curves.json, levers_*.png
    python assets/bench/plot_levers.py --curves=assets/bench/levers_curves.json --out=assets/bench   # redraw
"""

import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configurator import configure  # noqa: E402
from training import plot_curves  # noqa: E402

logs = ""  # demo_levers.sh's OUT folder (its seed*/ folders hold one log per variant)
curves = ""  # or a levers_curves.json written before
out = "assets/bench"
configure(globals())

LINE = re.compile(r"step\s+(\d+) \| val loss .* answers: counting_accuracy ([\d.]+), pointing_f1 ([\d.]+)")


def read_logs(folder):
    """{variant: {seed: [(step, counting, f1), ...]}} from every seed*/variant.log of folder."""
    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "seed*", "*.log"))):
        with open(path) as f:
            rows = [(int(m[1]) + 1, float(m[2]), float(m[3])) for m in map(LINE.search, f) if m]
        if rows:
            seed = os.path.basename(os.path.dirname(path))
            found.setdefault(os.path.splitext(os.path.basename(path))[0], {})[seed] = rows
    if not found:
        raise SystemExit(f"no validation-answer lines in {folder}/seed*/*.log")
    return found


def mean_over_seeds(runs, column):
    """[(step, mean over the seeds that reached that step)] of one column (1 = counting, 2 = F1)."""
    by_step = {}
    for rows in runs.values():
        for row in rows:
            by_step.setdefault(row[0], []).append(row[column])
    return [(step, sum(v) / len(v)) for step, v in sorted(by_step.items())]


if __name__ == "__main__":
    if bool(logs) == bool(curves):
        raise SystemExit("give --logs=<demo_levers.sh OUT> or --curves=<levers_curves.json>")
    if logs:
        data = read_logs(logs)
    else:
        with open(curves) as f:
            data = json.load(f)
    os.makedirs(out, exist_ok=True)
    if logs:
        with open(os.path.join(out, "levers_curves.json"), "w") as f:
            json.dump(data, f, indent=1)
    for column, metric, stem in ((2, "pointing F1", "levers_f1"), (1, "counting accuracy", "levers_counting")):
        name = os.path.join(out, f"{stem}.png")
        plot_curves({variant: mean_over_seeds(runs, column) for variant, runs in data.items()}, name,
                    title=f"the CPU demo's joint stage: validation {metric} (mean of seeds)", xlabel="optimizer step",
                    ylabel=metric)
        print(f"wrote {name}")
