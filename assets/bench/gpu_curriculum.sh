#!/usr/bin/env bash
# Stage 1 in parts (a curriculum), then the GPU demo's align, joint and evaluation, one variant per GPU at once
# (BENCHMARKS.md, "The GPU demo"). Each variant is "name|part;part;...[|joint args[|every stage's args]]": each part is
# train_vision.py's extra --key=value words on top of the GPU demo's stage-1 configs, and each part after the first
# starts from the one before (--init_from). Its own world by a part's --data_dir=; otherwise the GPU demo's,
# data/demo_gpu. The last field's words go to every stage's command after the rest (--max_crops=9, say). Usage:
#   bash assets/bench/gpu_curriculum.sh OUT SECONDS \
#       "easy|--data_dir=data/easy --max_steps=600 --vit_init=big_vision;" "plain|--vit_init=big_vision --max_steps=2000"
# data/easy is made first when a part names it (the big_solid world of one shape or none, 10,000 images). Variant i
# runs on the i-th GPU (of CUDA_VISIBLE_DEVICES, if set) with the i-th share of the cores the script may use. All logs
# go into OUT/logs.tgz, rewritten after every step, so a cut-off run still brings back what it did, with each stage-1
# part's final ViT when it is small (a few MB at the small preset: a later call can carry it and skip stage 1).
# STAGE_ARGS adds words to every training command (a quick check on a CPU: "--max_steps=2 --batch_size=4
# --loader_workers=0").
set -u
OUT=${1:?out dir}; BUDGET=${2:?seconds}; shift 2
# shellcheck source=assets/bench/bench_start.sh
. "$(dirname "$0")/bench_start.sh"
LOGS=$(mktemp -d)  # packed into OUT/logs.tgz by bench_start.sh's pack
END=$(( T0 + BUDGET - 10 ))  # bench_start.sh's left() counts down to it

{
  [ -f data/demo_gpu/synth_image/test.jsonl ] || $PY prepare_data.py --dataset=synthetic --out=data/demo_gpu \
      --max_objects=5 --train_images=30000 > "$LOGS/world.log" 2>&1 &
  if [[ "$*" == *data/easy* ]] && [ ! -f data/easy/synth_image/test.jsonl ]; then
    $PY prepare_data.py --dataset=synthetic --out=data/easy --shape_style=big_solid --max_objects=1 \
        --train_images=10000 > "$LOGS/easy_world.log" 2>&1 &
  fi
  wait
}
stamp "worlds made"; pack

# name, parts, joint args, every stage's args: the stage-1 parts in order, then align, joint and eval, on this
# process's GPU and cores
run_variant() {
  local name=$1 joint_args=$3 every=$4 dir=out/cur_$1 init="" i=0 part
  IFS=';' read -r -a parts <<< "$2"
  [ ${#parts[@]} -gt 0 ] || parts=("")
  [[ "$2" != *";" ]] || parts+=("")  # read drops a last empty part: "easy;" is the easy part, then the world's
  for part in "${parts[@]}"; do
    i=$(( i + 1 ))
    # shellcheck disable=SC2086  # a part is --key=value words, none holding a space
    timeout "$(left)" $PY train_vision.py config/demo_vision.py config/demo_gpu_vision.py --data_dir=data/demo_gpu \
        --out_dir="$dir/vision$i" --save_every=0 $init $part $every ${STAGE_ARGS:-} \
        > "$LOGS/${name}_vision$i.log" 2>&1 || return
    cp "$dir/vision$i/log.jsonl" "$LOGS/${name}_vision${i}_log.jsonl"
    keep_vit "$dir/vision$i" "${name}_vision$i"
    stamp "$name: stage-1 part $i ($part) trained"; pack
    init="--init_from=$dir/vision$i"
  done
  timeout "$(left)" $PY train_align.py config/demo_align.py config/demo_gpu_align.py --data_dir=data/demo_gpu \
      --out_dir="$dir/align" --vit_from="$dir/vision$i" $every ${STAGE_ARGS:-} > "$LOGS/${name}_align.log" 2>&1 \
      || return
  timeout "$(left)" $PY train_joint.py config/demo_joint.py config/demo_gpu_joint.py --data_dir=data/demo_gpu \
      --out_dir="$dir/joint" --init_from="$dir/align" $joint_args $every ${STAGE_ARGS:-} \
      > "$LOGS/${name}_joint.log" 2>&1
  cp "$dir/joint/log.jsonl" "$LOGS/${name}_joint_log.jsonl"
  stamp "$name: joint trained"; pack
  test_eval "$dir/joint" "$name"
  stamp "$name: evaluated"; pack
}

g=0
for variant in "$@"; do
  IFS='|' read -r name parts joint_args every <<< "$variant"
  (  # this variant's GPU and cores (bench_start.sh's take_share)
    take_share "$g" $#
    run_variant "$name" "$parts" "$joint_args" "$every"
  ) &
  g=$(( g + 1 ))
done
wait
stamp "all variants done"; pack
