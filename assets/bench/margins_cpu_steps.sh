#!/usr/bin/env bash
# The CPU demo's joint step at each of the crops' overlap margins (2, 2) / (1, 1) / (0, 0), in rows of 448 / 464 / 480
# tokens: a 10-step stage 1 and a 4-step align stage at each (the step's cost does not depend on what they learned),
# then 140 joint steps; prints the median step of steps 40-139 (median_step.py). BENCHMARKS.md "The crops' overlap
# margins". In a clone where data/demo exists (make demo, or demo.py's world command), nothing else running:
#   bash assets/bench/margins_cpu_steps.sh [SCRATCH_DIR]
set -eu
S=${1:-/tmp/margins_steps}
PY=${PY:-.venv/bin/python}
mkdir -p "$S"
for spec in "2|448" "1|464" "0|480"; do
  IFS='|' read -r m rows <<< "$spec"
  M="--overlap_margins=($m,$m)"
  $PY train_vision.py config/demo_vision.py "$M" --max_steps=10 --eval_every=0 --save_every=0 --out_dir="$S/v$m" \
      > "$S/v$m.log" 2>&1
  $PY train_align.py config/demo_align.py "$M" --vit_from="$S/v$m" --max_steps=4 --eval_every=0 --save_every=0 \
      --out_dir="$S/a$m" > "$S/a$m.log" 2>&1
  $PY train_joint.py config/demo_joint.py "$M" --init_from="$S/a$m" --max_steps=140 --max_seq_len="$rows" \
      --eval_every=0 --save_every=0 --log_every=20 --out_dir="$S/j$m" > "$S/j$m.log" 2>&1
  echo "margins ($m, $m), rows of $rows:"
  $PY assets/bench/median_step.py "$S/j$m" 40-139
done
