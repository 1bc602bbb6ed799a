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
$PY train_joint.py $J --init_from="$S/A" --max_steps=150 --save_every=0 --resume=False --out_dir="$S/B" \
    > "$S/B.log" 2>&1
$PY train_joint.py $J --init_from=$ALIGN --max_steps=1150 --save_every=0 --out_dir="$S/C" > "$S/C.log" 2>&1
$PY train_joint.py $J --init_from=$ALIGN --max_steps=150 --save_every=0 --out_dir="$S/D" > "$S/D.log" 2>&1
echo "A (from the align checkpoint), by 100 steps; B (A's weights, a new optimizer); C (A resumed); D (the align"\
     "checkpoint again):"
$PY assets/bench/median_step.py "$S/A" 0-99 100-199 200-299 300-399 400-499 500-599 600-699 700-799 800-899 900-999
$PY assets/bench/median_step.py "$S/B" 10-149
$PY assets/bench/median_step.py "$S/C" 1010-1149
$PY assets/bench/median_step.py "$S/D" 10-149
