"""
The ends a run with --max_minutes fits itself to, replayed from its log: every 20 steps (training.StepBudget) the
steps that fit the minutes left at the step cost of the steps so far, by the last 50 steps' mean (the rule before
this script) and by training.mean_step_seconds (typical step plus the slow steps' share). Prints the fitted ends
around each slow step and their spread, so the two can be compared on a real run's timings.

    python assets/bench/budget_fits.py out/demo/joint/log.jsonl 9.69      # the log, the run's max_minutes
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import training  # noqa: E402


def last_50_mean(times):
    recent = times[1:][-50:] or times
    return sum(recent) / len(recent)


def fitted_ends(times, max_minutes, cost):
    """{steps done: the end fitted then}, as StepBudget asks every BUDGET_PROBE_STEPS steps (the clock taken as the
    sum of the step times: the start-up before step 0 left out)."""
    ends, seconds = {}, 0.0
    for done, t in enumerate(times, 1):
        seconds += t
        if done % training.BUDGET_PROBE_STEPS == 0:
            ends[done] = done + int((max_minutes * 60 - seconds) / cost(times[:done]))
    return ends


def main(log_path, max_minutes):
    times = [r["step_s"] for r in map(json.loads, open(log_path)) if "step_s" in r]
    median = statistics.median(times)
    slow = [i for i, t in enumerate(times) if i and t > 2 * median]
    print(f"{len(times):,} steps, median {median:.3f} s; slow steps (over twice it): "
          + ", ".join(f"{i} ({times[i]:.2f} s)" for i in slow))
    rules = (("mean of the last 50", last_50_mean), ("training.mean_step_seconds", training.mean_step_seconds))
    for name, cost in rules:
        ends = fitted_ends(times, max_minutes, cost)
        later = [e for d, e in ends.items() if d >= 600]
        print(f"{name}: fitted ends from step 600 {min(later):,}-{max(later):,} (sd {statistics.pstdev(later):.1f})")
        for i in slow:
            near = [d for d in ends if i - 40 <= d <= i + 80]
            print("  around step", i, ": " + ", ".join(f"{d}: {ends[d]:,}" for d in near))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
