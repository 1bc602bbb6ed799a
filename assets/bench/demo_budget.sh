#!/usr/bin/env bash
# Issue 15: the CPU demo on a CPU ~4x slower than the one its recipe was made on (no bf16 matrix instructions: a
# stage-1 step and a joint step both take ~1.3 s there, so ~500 steps fit the minutes that 15 leave after set-up,
# world, align and evaluation). How should those steps be split between stage 1 and the joint stage? The CPU demo's
# chain (config/demo_vision.py, demo_align.py, demo_joint.py) replayed on one GPU with S stage-1 steps and J joint
# steps, two joint seeds each, every run scored on the 200 test images; the full recipe (300 / 1,650) beside them.
# BENCHMARKS.md "The CPU demo in 15 minutes on a slower CPU" holds the results. Usage, on a GPU machine:
#   bash assets/bench/demo_budget.sh OUT_DIR
set -u
OUT=${1:?out dir}
PY=${PY:-python3}
RUNS=out/budget
mkdir -p "$OUT" "$RUNS"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/times.txt"; }
export OMP_NUM_THREADS=1  # ~10 runs share the machine's cores
[ -f data/demo/synth_image/test.jsonl ] || $PY prepare_data.py --dataset=synthetic --out=data/demo --max_objects=5 \
    --train_images=10000 > /dev/null
stamp "world ready"
SPLITS=("50 450" "100 400" "200 300" "300 200")
chain() {  # S: stage-1 steps; then the align stage and one joint run per "J seed" argument
  local S=$1; shift
  local V=$RUNS/v$S
  $PY train_vision.py config/demo_vision.py --max_steps="$S" --warmup=$(( S < 300 ? S / 10 : 30 )) \
      --eval_every="$S" --save_every="$S" --loader_workers=1 --out_dir="$V" > "$OUT/v$S.log" 2>&1 || { stamp "v$S failed"; return; }
  $PY train_align.py config/demo_align.py --vit_from="$V" --out_dir="$V-align" --loader_workers=1 \
      > "$OUT/v$S-align.log" 2>&1 || { stamp "v$S align failed"; return; }
  stamp "v$S and its align stage done"
  for spec in "$@"; do
    read -r J seed <<< "$spec"
    (
      dir=$RUNS/v$S-j$J-s$seed
      $PY train_joint.py config/demo_joint.py --init_from="$V-align" --max_steps="$J" --eval_every="$J" \
          --save_every="$J" --seed="$seed" --loader_workers=1 --log_every=50 --out_dir="$dir" \
          > "$OUT/v$S-j$J-s$seed.log" 2>&1 || { stamp "v$S-j$J-s$seed failed"; exit; }
      $PY eval.py --init_from="$dir" --split=test --data_dir=data/demo "--datasets=['synth_image']" \
          "--tasks=['counting', 'pointing']" --out_dir="$dir/eval" 2>&1 | tail -n 12 >> "$OUT/v$S-j$J-s$seed.log"
      stamp "v$S-j$J-s$seed: $(grep -ho '"counting_accuracy": [0-9.]*\|"pointing_f1": [0-9.]*' "$dir/eval/metrics.json" | tr '\n' ' ')"
    ) &
  done
  wait
}
for split in "${SPLITS[@]}"; do
  read -r S J <<< "$split"
  if [ "$S" = 300 ]; then
    chain "$S" "$J 1337" "$J 1338" "1650 1337" &  # the full recipe's joint stage beside them
  else
    chain "$S" "$J 1337" "$J 1338" &
  fi
done
wait
stamp "all done"
