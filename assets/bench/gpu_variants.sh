#!/usr/bin/env bash
# Variants of the GPU demo's align + joint stages on one GPU, each from the same stage-1 ViT and scored on the
# held-out test images: a same-run comparison of recipe switches (BENCHMARKS.md, "The GPU demo"). Stage 1 runs first
# (python train_vision.py with the GPU demo's configs) unless out/demo_gpu/vision/final already exists. Each variant is
# "name|args for both stages|args for the joint stage alone" (extra --key=value words; a stage ignores none), e.g.
#   bash assets/bench/gpu_variants.sh OUT 570 "base|" "bins32|--position_bins=32" \
#       "long|--position_bins=32|--max_steps=2000"
# VISION_ARGS adds stage-1 arguments. Variants run in order while the budget (seconds, the whole script's) leaves room
# for one more, from the time the previous one took; each variant's logs and scores are copied to OUT as soon as it
# ends. PARALLEL=1 runs them all at once instead (the small model leaves the GPU mostly idle; the CPU cores that make
# the batches are shared out: two 64-row runs at once took 0.21-0.54 s a step each, BENCHMARKS.md "The GPU demo").
set -u
OUT=${1:?out dir}; BUDGET=${2:?seconds}; shift 2
# shellcheck source=assets/bench/bench_start.sh
. "$(dirname "$0")/bench_start.sh"
if [ ! -f data/demo/synth_image/test.jsonl ]; then  # the demo's world; TRAIN_IMAGES=n makes a bigger one
  $PY prepare_data.py --dataset=synthetic --out=data/demo --max_objects=5 --train_images="${TRAIN_IMAGES:-10000}" \
      > "$OUT/world.log" 2>&1
  stamp "world of ${TRAIN_IMAGES:-10000} training images made ($?)"
fi
if [ ! -f out/demo_gpu/vision/final/config.json ]; then
  # shellcheck disable=SC2086  # VISION_ARGS: extra --key=value words for stage 1, e.g. "--max_steps=1600"
  $PY train_vision.py config/demo_vision.py config/demo_gpu_vision.py --out_dir=out/demo_gpu/vision ${VISION_ARGS:-} \
      > "$OUT/vision.log" 2>&1
  stamp "stage 1 (${VISION_ARGS:-}) trained ($?)"
  cp out/demo_gpu/vision/log.jsonl "$OUT/vision_log.jsonl" 2>/dev/null
fi
END=$(( T0 + BUDGET - 5 ))  # bench_start.sh's left() counts down to it
# name, args, joint args: align, joint and eval of one variant; its logs and scores copied to OUT at its end
run_variant() {
  local name=$1 args=$2 joint_args=$3
  # args are split into words unquoted (no word may hold a space): --styles=('pointing','short_answer') is one word
  # shellcheck disable=SC2086
  timeout "$(left)" $PY train_align.py config/demo_align.py config/demo_gpu_align.py \
      --out_dir="out/var_$name/align" --vit_from=out/demo_gpu/vision $args > "$OUT/${name}_align.log" 2>&1 &&
  timeout "$(left)" $PY train_joint.py config/demo_joint.py config/demo_gpu_joint.py \
      --out_dir="out/var_$name/joint" --init_from="out/var_$name/align" $args $joint_args \
      > "$OUT/${name}_joint.log" 2>&1 &&
  timeout "$(left)" $PY eval.py --init_from="out/var_$name/joint" --split=test --data_dir=data/demo \
      "--datasets=['synth_image']" "--tasks=['counting', 'pointing']" --out_dir="out/var_$name/eval" \
      > "$OUT/${name}_eval.log" 2>&1
  stamp "$name ($args | $joint_args): exited with $?"
  cp "out/var_$name/joint/log.jsonl" "$OUT/${name}_log.jsonl" 2>/dev/null
  cp "out/var_$name/eval/metrics.json" "$OUT/${name}_metrics.json" 2>/dev/null
}
if [ -n "${PARALLEL:-}" ]; then  # all variants at once on the one GPU, the loader cores shared out among them
  workers=$(( ($(nproc) - 2) / $# ))
  for variant in "$@"; do
    IFS='|' read -r name args joint_args <<< "$variant"
    run_variant "$name" "$args --loader_workers=$workers" "$joint_args" &
  done
  wait
  exit 0
fi
LAST=0
for variant in "$@"; do
  left=$(( BUDGET - $(elapsed) ))
  IFS='|' read -r name args joint_args <<< "$variant"
  if [ "$LAST" -gt 0 ] && [ "$left" -lt "$LAST" ]; then stamp "$name: skipped, ${left} s left"; continue; fi
  start=$(elapsed)
  run_variant "$name" "$args" "$joint_args"
  LAST=$(( $(elapsed) - start ))
done
