#!/usr/bin/env bash
# Does the CPU demo's joint step slow down because of what a run has learned (its weights, its optimizer's state), or
# because of the machine? A: 1,000 joint steps from an align checkpoint, saved at the end; then 150 steps each of
# B: A's weights with a new optimizer, C: A resumed (weights and optimizer state), D: the align checkpoint again.
# BENCHMARKS.md "The crops' overlap margins" holds a run's medians. In a clone where make demo has run (out/demo/align),
# nothing else running:
#   bash assets/bench/cpu_slowdown.sh [SCRATCH_DIR]
set -eu
S=${1:-/tmp/slowdown}
PY=${PY:-.venv/bin/python}
ALIGN=out/demo/align
J="config/demo_joint.py --eval_every=0 --log_every=50"
mkdir -p "$S"
$PY train_joint.py $J --init_from=$ALIGN --max_steps=1000 --save_every=1000 --out_dir="$S/A" > "$S/A.log" 2>&1
cp -r "$S/A" "$S/C"
$PY train_joint.py $J --init_from="$S/A" --max_steps=150 --save_every=0 --resume=False --out_dir="$S/B" > "$S/B.log" 2>&1
$PY train_joint.py $J --init_from=$ALIGN --max_steps=1150 --save_every=0 --out_dir="$S/C" > "$S/C.log" 2>&1
$PY train_joint.py $J --init_from=$ALIGN --max_steps=150 --save_every=0 --out_dir="$S/D" > "$S/D.log" 2>&1
$PY - "$S" <<'PYEOF'
import json, statistics, sys
def median(run, first, last):
    steps = [json.loads(line) for line in open(f"{sys.argv[1]}/{run}/log.jsonl") if '"step_s"' in line]
    return statistics.median(s["step_s"] for s in steps if first <= s["step"] < last)
print("A (from the align checkpoint), median step by 100 steps:",
      " ".join(f"{a}: {median('A', a, a + 100):.3f}" for a in range(0, 1000, 100)))
print(f"B (A's weights, a new optimizer) {median('B', 10, 150):.3f} | C (A resumed) {median('C', 1010, 1150):.3f} | "
      f"D (the align checkpoint again) {median('D', 10, 150):.3f}")
PYEOF
