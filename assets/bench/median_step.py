"""
The median step time of a training run over ranges of its steps, from its log (training.logged_steps: a resumed run's
log holds the steps before the resume too), and the loss at its last step. Used by the CPU step scripts beside it
(margins_cpu_steps.sh, cpu_slowdown.sh, vit_cache_steps.sh).

    python assets/bench/median_step.py OUT_DIR 20-119 150-299      # ranges of steps, both ends included
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import training  # noqa: E402


def main(out_dir, *ranges):
    train, _ = training.logged_steps(os.path.join(out_dir, "log.jsonl"))
    if not train:
        raise SystemExit(f"median_step: {out_dir}/log.jsonl holds no training steps")
    parts = []
    for spec in ranges:
        first, last = map(int, spec.split("-"))
        times = [r["step_s"] for step, r in train.items() if first <= step <= last and "step_s" in r]
        if not times:
            raise SystemExit(f"median_step: {out_dir} logged no step in {spec}")
        parts.append(f"steps {spec} {statistics.median(times):.3f} s")
    last_step = max(train)
    print(f"{out_dir}: {', '.join(parts)}; loss at step {last_step} {train[last_step]['loss']:.4f}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
