#!/usr/bin/env bash
# Issue 15: which levers buy the CPU demo's joint stage more counting and pointing for its budget. The CPU demo's
# chain as it stood on 2026-11-29 (config/demo_vision.py, then config/demo_joint.py with BASE below: 550 steps of 16
# rows of 512, the ViT at lr 1e-4) replayed on GPUs, one seed per GPU, with the joint stage's variants side by side
# (assets/bench/joint_variants.sh); the variants named *_cpu_time get as many steps as fit that demo's CPU minutes
# (frozen ViT and 256-token rows make a CPU step 1.6x cheaper). BENCHMARKS.md "The CPU demo's levers" holds the
# results. Usage, on a machine with GPUS GPUs: bash assets/bench/demo_levers.sh OUT_DIR [GPUS=2] [SECONDS=320]
set -u
OUT=${1:?out dir}; GPUS=${2:-2}; LIMIT=${3:-320}
PY=${PY:-python3}
mkdir -p "$OUT"
[ -f data/demo/synth_image/test.jsonl ] || $PY prepare_data.py --dataset=synthetic --out=data/demo --max_objects=5 \
    --train_images=10000 > /dev/null
# config/demo_joint.py has changed since (it took these levers); BASE pins what the variants were measured against
BASE="--max_seq_len=512 --batch_size=16 --max_steps=550 --lr_vit=1e-4 --eval_every=138"
VARIANTS=(
  "base|"
  "frozen_vit|--lr_vit=0"
  "rows256|--max_seq_len=256 --batch_size=32"
  "fast_cpu_time|--lr_vit=0 --max_seq_len=256 --batch_size=32 --max_steps=880 --eval_every=220"
  "lr3|--lr_connector=3e-3 --lr_llm=3e-3 --lr_vit=3e-4"
  "batch8|--batch_size=8 --max_steps=1100 --eval_every=275"
  "no_short|--styles=('point_count','pointing')"
  "fast_lr3_cpu_time|--lr_vit=0 --max_seq_len=256 --batch_size=32 --max_steps=880 --eval_every=220 --lr_connector=3e-3 --lr_llm=3e-3"
)
for ((g = 0; g < GPUS; g++)); do
  seed=$((1337 + g))
  CUDA_VISIBLE_DEVICES=$g RUNS=out/levers$g JOINT_ARGS="--loader_workers=2 --seed=$seed $BASE" PY=$PY \
      timeout "$LIMIT" bash assets/bench/joint_variants.sh "$OUT/seed$seed" "--seed=$seed" "${VARIANTS[@]}" &
done
wait
pkill -f "train_joint.py config/demo_joint.py" ; pkill -f "eval.py --init_from=out/levers"  # cut off at LIMIT
grep -H "counting_accuracy\|trained\|evaluated\|Error" "$OUT"/seed*/*.log "$OUT"/seed*/times.txt 2>/dev/null | tail -n 80
