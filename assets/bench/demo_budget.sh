#!/usr/bin/env bash
# Issue 15: the CPU demo on a CPU ~4x slower than the one its recipe was made on (no bf16 matrix instructions: a
# stage-1 step of 32 images and a joint step of 16 rows both take ~1.2-1.3 s there, and the demo's 15 minutes hold
# ~137 + 412 of them: demo.py's max_minutes). How should those minutes be spent? The CPU demo's chain
# (config/demo_vision.py, demo_align.py, demo_joint.py) replayed on one GPU with the steps of each variant, two joint
# seeds each, every run scored on the 200 test images. A step of 8 rows (or 16 images) costs ~0.54x one of 16 (32)
# on that CPU, so halving the batch doubles the steps. BENCHMARKS.md "The CPU demo in 15 minutes on a slower CPU"
# holds the results. Usage, on a GPU machine: bash assets/bench/demo_budget.sh OUT_DIR
set -u
OUT=${1:?out dir}
RUNS=out/budget
source "$(dirname "$0")/replay_common.sh"
stamp "world ready"
# name | stage-1 arguments | joint arguments (stage 1's warmup is a tenth of its steps, as the demo's 30 of 300)
VARIANTS=(
  "demo|--max_steps=137 --warmup=14|--max_steps=412"
  "more_vision|--max_steps=300 --warmup=30|--max_steps=250"
  "less_vision|--max_steps=60 --warmup=6|--max_steps=480"
  "joint_rows8|--max_steps=137 --warmup=14|--max_steps=760 --batch_size=8"
  "vision_images16|--max_steps=254 --warmup=25 --batch_size=16|--max_steps=412"
)
chain() {
  local name=$1 vision=$2 joint=$3 V=$RUNS/$1
  $PY train_vision.py config/demo_vision.py $LOC_STAGE1 $vision --eval_every=100000 --save_every=0 --loader_workers=1 \
      --out_dir="$V" > "$OUT/$name-vision.log" 2>&1 || { stamp "$name: stage 1 failed"; return; }
  $PY train_align.py config/demo_align.py --vit_from="$V" --out_dir="$V-align" --loader_workers=1 \
      > "$OUT/$name-align.log" 2>&1 || { stamp "$name: align failed"; return; }
  stamp "$name: stage 1 and align done"
  for seed in 1337 1338; do
    (
      dir=$V-s$seed
      $PY train_joint.py config/demo_joint.py --init_from="$V-align" $joint --eval_every=100000 --save_every=0 \
          --seed="$seed" --loader_workers=1 --log_every=50 --out_dir="$dir" > "$OUT/$name-s$seed.log" 2>&1 \
          || { stamp "$name-s$seed failed"; exit; }
      score "$dir" "$name-s$seed"
    ) &
  done
  wait
}
for spec in "${VARIANTS[@]}"; do
  IFS='|' read -r name vision joint <<< "$spec"
  chain "$name" "$vision" "$joint" &
done
wait
stamp "all done"
