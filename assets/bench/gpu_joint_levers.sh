#!/usr/bin/env bash
# The GPU recipe's joint stage (config/demo_gpu_joint.py) several ways at once on ONE GPU, all from one align
# checkpoint, each scored on the 200 test images: what a joint-stage lever does with stage 1 and the align stage
# held fixed (the whole recipe's counting moves ~0.1 between runs, much of it stage 1's). The runs share the GPU and
# split the cores, so their step times say nothing; their step counts are fixed (unless --max_minutes). Usage,
# after a GPU recipe run left out/demo_gpu/align on the machine (bash assets/bench/gpu_recipes.sh OUT SECONDS gpu):
#   bash assets/bench/gpu_joint_levers.sh OUT SECONDS "name|data_dir|train_joint args" ...
# A data_dir that does not exist yet is made first: the GPU recipe's world (TRAIN_IMAGES training images, 60,000
# unless set), with as many extra questions an image as its name's "_q<N>" says (none without one). Logs and metrics
# go into OUT/logs.tgz as each run ends. Run on one H200 on 2026-12-06 after `bash assets/bench/gpu_recipes.sh $OUT 585
# gpu` (BENCHMARKS.md "Two more questions an image in the GPU recipe's world"), on the same warm machine (idle release
# is 30 s), with --max_minutes in each run's args so that runs sharing the GPU end with a checkpoint and are scored:
#   bash assets/bench/gpu_joint_levers.sh $OUT 585 "q0|data/demo_gpu_60k_q0|--max_minutes=7.0" \
#       "q2_half|data/demo_gpu_60k|--lr_connector=1e-3 --lr_llm=1e-3 --max_minutes=7.0"
# (the recipe's world data/demo_gpu_60k then had its 2 extra questions an image by a device-copy edit; demo.py now
# asks them). Untried on a GPU: Muon (--muon_lr=0.005, the CPU recipe's).
set -u
OUT=${1:?out dir}; BUDGET=${2:?seconds}; shift 2
# shellcheck source=assets/bench/bench_start.sh
. "$(dirname "$0")/bench_start.sh"
LOGS=$(mktemp -d)
END=$(( T0 + BUDGET - 10 ))
ALIGN=${ALIGN:-out/demo_gpu/align}
for spec in "$@"; do
  IFS='|' read -r _ world _ <<< "$spec"
  if [ ! -f "$world/synth_image/test.jsonl" ]; then
    q=$(sed -n 's/.*_q\([0-9]*\)$/\1/p' <<< "$world")
    $PY prepare_data.py --dataset=synthetic --out="$world" --max_objects=5 --train_images="${TRAIN_IMAGES:-60000}" \
        --extra_queries="${q:-0}" > "$LOGS/world_$(basename "$world").log" 2>&1
    stamp "world $world made"
  fi
done
read -r -a cores <<< "$($PY -c "import os; print(*sorted(os.sched_getaffinity(0)))")"
per=$(( ${#cores[@]} / $# )); i=0
for spec in "$@"; do
  IFS='|' read -r name world args <<< "$spec"
  (
    taskset -pc "$(IFS=,; echo "${cores[*]:i*per:per}")" $BASHPID > /dev/null
    dir=out/levers/$name
    # shellcheck disable=SC2086  # args are --key=value words
    timeout "$(left)" $PY train_joint.py config/demo_joint.py config/demo_gpu_joint.py --data_dir="$world" \
        --init_from="$ALIGN" --out_dir="$dir" --save_every=0 --loader_workers=$(( per - 2 )) $args \
        > "$LOGS/${name}_joint.log" 2>&1
    stamp "$name: train_joint exited with $?"
    cp "$dir/log.jsonl" "$LOGS/${name}_log.jsonl" 2>/dev/null
    test_eval "$dir" "$name" "$world"
    stamp "$name: $(grep -ho '"counting_accuracy": [0-9.]*\|"f1": [0-9.]*' "$dir/eval/metrics.json" | tr '\n' ' ')"
    pack
  ) &
  i=$(( i + 1 ))
done
wait
stamp "all done"; pack
