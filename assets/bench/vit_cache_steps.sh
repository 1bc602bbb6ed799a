#!/usr/bin/env bash
# The CPU demo's joint step with and without the frozen ViT's feature cache (train_joint.py --vit_feature_cache), in a
# world of 1,000 training images so that the second pass over them (every crop met before) starts at step 125: 300
# steps each way from one align checkpoint, twice, alternating; prints the median step of steps 20-119 (first pass)
# and 150-299 (second), and the loss at the last step. BENCHMARKS.md "A frozen ViT's features kept". In a clone where
# make demo has run (out/demo/align), nothing else running:
#   bash assets/bench/vit_cache_steps.sh [SCRATCH_DIR]
set -eu
S=${1:-/tmp/vit_cache_steps}
PY=${PY:-.venv/bin/python}
mkdir -p "$S"
[ -f data/demo_1k/world.json ] || $PY prepare_data.py --dataset=synthetic --out=data/demo_1k --max_objects=5 \
    --train_images=1000 --extra_queries=2 > /dev/null
J="config/demo_joint.py --init_from=out/demo/align --data_dir=data/demo_1k --max_steps=300 --eval_every=0"
J="$J --save_every=0"
for run in off on off2 on2; do
  case $run in on*) cache=4.0 ;; *) cache=0.0 ;; esac
  $PY train_joint.py $J --log_every=50 --vit_feature_cache=$cache --out_dir="$S/$run" > "$S/$run.log" 2>&1
  $PY assets/bench/median_step.py "$S/$run" 20-119 150-299
done
grep -h "vit_feature_cache:" "$S"/on*.log
