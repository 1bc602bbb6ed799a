#!/usr/bin/env bash
# The CPU demo's joint step in one process on both cores (8 rows a step) against two DDP processes of one thread
# each (gloo, 4 rows a step each: the same 8 rows a step), alternated twice: the median step of each run over RANGES
# (median_step.py; steps 40-199 of 200 by default; STEPS=800 RANGES="40-599 650-799" also times steps whose crops the
# ViT's feature cache already holds: the demo's 5,000 images fill it by step ~625). A 10-step stage 1 and a 4-step
# align stage first (a step's cost does not depend on what they learned). BENCHMARKS.md "Two processes on the two
# cores". In a clone where data/demo exists (make demo, or demo.py's world command), nothing else running:
#   bash assets/bench/cpu_two_processes.sh [SCRATCH_DIR]
set -eu
S=${1:-/tmp/cpu_two_processes}
PY=${PY:-.venv/bin/python}
mkdir -p "$S"
$PY train_vision.py config/demo_vision.py --max_steps=10 --eval_every=0 --save_every=0 --out_dir="$S/v" \
    > "$S/v.log" 2>&1
$PY train_align.py config/demo_align.py --vit_from="$S/v" --max_steps=4 --eval_every=0 --save_every=0 \
    --out_dir="$S/a" > "$S/a.log" 2>&1
STEPS=${STEPS:-200}
RANGES=${RANGES:-40-199}
J=(config/demo_joint.py --init_from="$S/a" --max_steps="$STEPS" --eval_every=0 --save_every=0 --log_every=20)
for round in 1 2; do
  $PY train_joint.py "${J[@]}" --out_dir="$S/one$round" > "$S/one$round.log" 2>&1
  # shellcheck disable=SC2086  # RANGES: several words
  $PY assets/bench/median_step.py "$S/one$round" $RANGES
  # torchrun gives each process one thread (OMP_NUM_THREADS=1)
  "$(dirname "$PY")/torchrun" --standalone --nproc_per_node=2 train_joint.py "${J[@]}" --batch_size=4 \
      --out_dir="$S/two$round" > "$S/two$round.log" 2>&1
  # shellcheck disable=SC2086
  $PY assets/bench/median_step.py "$S/two$round" $RANGES
done
