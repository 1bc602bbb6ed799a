#!/usr/bin/env bash
# Two things at once on a 2-GPU machine, from a stage-1 ViT made earlier (VIT_DIR: a train_vision.py out_dir's
# final/, carried to the machine), at the GPU demo's settings with --max_crops=9 (BENCHMARKS.md, "The GPU demo"):
# - GPU 0: where a step's time goes. torch.profiler (the trainers' --profile) over stage 1's and the joint stage's
#   steps, eager and compiled; then tools/bench.py's train section at the small preset (the real trainer against the
#   model alone at the demo's 64 rows of 512 tokens) and at the full preset with --compile=True (transformers from
#   TF_ZIP, a zip of its package folder, unpacked first, if given).
# - GPU 1: the joint stage for longer, two runs side by side on one GPU (each its half of the cores): JOINT_A and
#   JOINT_B are train_joint.py's extra words (defaults: 3,200 steps of 64 rows; 1,600 steps of 128 rows).
# Usage: bash assets/bench/gpu_profile_long.sh OUT SECONDS VIT_DIR [TF_ZIP]
# STAGE_ARGS and BENCH_ARGS add words to every training command and to bench.py (a quick check on a CPU:
# STAGE_ARGS="--max_steps=16 --batch_size=4 --loader_workers=0" BENCH_ARGS="--device=cpu --steps=1 --warmup=0").
# Logs, profiles and results go into OUT/logs.tgz, rewritten as each part ends.
set -u
OUT=${1:?out dir}; BUDGET=${2:?seconds}; VIT=${3:?stage-1 ViT dir}; TF_ZIP=${4:-}
# shellcheck source=assets/bench/bench_start.sh
. "$(dirname "$0")/bench_start.sh"
LOGS=$(mktemp -d)  # packed into OUT/logs.tgz by bench_start.sh's pack
END=$(( T0 + BUDGET - 10 ))  # bench_start.sh's left() counts down to it
JOINT_A=${JOINT_A:---max_steps=3200 --eval_every=400}
JOINT_B=${JOINT_B:---max_steps=1600 --eval_every=200 --batch_size=128}
GPU_STAGE="--data_dir=data/demo_gpu --max_crops=9"
S=${STAGE_ARGS:-}
B=${BENCH_ARGS:-}

[ -f data/demo_gpu/synth_image/test.jsonl ] || $PY prepare_data.py --dataset=synthetic --out=data/demo_gpu \
    --max_objects=5 --train_images=30000 > "$LOGS/world.log" 2>&1
stamp "world made"; pack

# shellcheck disable=SC2086  # the command strings are words with no spaces inside
profile_part() {  # GPU 0: stage 1, then (once the align stage is there) the joint stage, then bench.py
  $PY train_vision.py config/demo_vision.py config/demo_gpu_vision.py $GPU_STAGE --init_from="$VIT" \
      --out_dir=out/prof/vision --max_steps=30 --eval_every=0 --save_every=0 --profile=5 $S \
      > "$LOGS/prof_vision.log" 2>&1
  cp out/prof/vision/profile.txt "$LOGS/prof_vision_ops.txt"
  cp out/prof/vision/profile_trace.json "$LOGS/prof_vision_trace.json"
  stamp "profiled stage 1"; pack
  while [ ! -f out/long/align/final/config.json ] && [ "$(left)" -gt 0 ]; do sleep 2; done
  for mode in eager compiled; do
    extra=""; [ $mode = compiled ] && extra="--compile=True"
    timeout "$(left)" $PY train_joint.py config/demo_joint.py config/demo_gpu_joint.py $GPU_STAGE \
        --init_from=out/long/align --out_dir=out/prof/joint_$mode --max_steps=30 --eval_every=0 --save_every=0 \
        --profile=5 $extra $S > "$LOGS/prof_joint_$mode.log" 2>&1
    cp out/prof/joint_$mode/profile.txt "$LOGS/prof_joint_${mode}_ops.txt"
    cp out/prof/joint_$mode/profile_trace.json "$LOGS/prof_joint_${mode}_trace.json"
    stamp "profiled the joint stage, $mode"; pack
  done
  timeout "$(left)" $PY tools/bench.py --sections=train --model_preset=small --hf=False --trainer_batch_size=64 \
      --trainer_seq_len=512 --steps=20 --out_dir=out/prof/bench_small $B > "$LOGS/bench_small.log" 2>&1
  stamp "bench, small preset"; pack
  if [ -n "$TF_ZIP" ]; then  # transformers reads its own folders: a zip on PYTHONPATH fails at import
    TF_DIR=$(mktemp -d) && $PY -m zipfile -e "$TF_ZIP" "$TF_DIR"
  fi
  PYTHONPATH=${TF_DIR:+$TF_DIR:}${PYTHONPATH:-} timeout "$(left)" $PY tools/bench.py --sections=train --compile=True \
      --hf=$([ -n "$TF_ZIP" ] && echo True || echo False) --steps=8 --out_dir=out/prof/bench_full $B \
      > "$LOGS/bench_full.log" 2>&1
  stamp "bench, full preset"; pack
}

long_run() {  # name, extra words: one joint run on GPU 1, then its test images
  # shellcheck disable=SC2086
  timeout "$(left)" $PY train_joint.py config/demo_joint.py config/demo_gpu_joint.py $GPU_STAGE \
      --init_from=out/long/align --out_dir="out/long/$1" --save_every=0 $2 $S > "$LOGS/$1.log" 2>&1
  cp "out/long/$1/log.jsonl" "$LOGS/$1_log.jsonl"
  stamp "$1 trained"; pack
  test_eval "out/long/$1" "$1"
  stamp "$1 evaluated"; pack
}

read -r -a cores <<< "$($PY -c "import os; print(*sorted(os.sched_getaffinity(0)))")"
half=$(( ${#cores[@]} / 2 )); quarter=$(( half / 2 ))
share() { IFS=,; echo "${cores[*]:$1:$2}"; }
( export CUDA_VISIBLE_DEVICES=0; taskset -pc "$(share 0 $half)" $BASHPID > /dev/null; profile_part ) &
(
  export CUDA_VISIBLE_DEVICES=1; taskset -pc "$(share $half $half)" $BASHPID > /dev/null
  # shellcheck disable=SC2086
  $PY train_align.py config/demo_align.py config/demo_gpu_align.py $GPU_STAGE --out_dir=out/long/align \
      --vit_from="$VIT" $S > "$LOGS/align.log" 2>&1
  stamp "align trained"; pack
  ( taskset -pc "$(share $half $quarter)" $BASHPID > /dev/null; long_run joint_a "$JOINT_A" ) &
  ( taskset -pc "$(share $(( half + quarter )) $quarter)" $BASHPID > /dev/null; long_run joint_b "$JOINT_B" ) &
  wait
) &
wait
stamp "all done"; pack
