#!/usr/bin/env bash
# The GPU demo end to end on one GPU (python demo.py --recipe=gpu), timed stage by stage; then, in what is left of
# a 10-minute command, its joint stage again from the same align checkpoint with as many steps as its measured step
# time allows, scored on the held-out test images: how far more joint steps take the same recipe (BENCHMARKS.md,
# "The GPU demo"). Usage, on a GPU machine:
#   bash assets/bench/gpu_demo.sh OUT_DIR [SECONDS]     # SECONDS: the whole script's budget (default 570)
set -u
OUT=${1:?out dir}; BUDGET=${2:-570}
# shellcheck source=assets/bench/bench_start.sh
. "$(dirname "$0")/bench_start.sh"
timeout $(( BUDGET - 60 )) $PY demo.py --recipe=gpu > "$OUT/demo.log" 2>&1
stamp "demo.py --recipe=gpu exited with $?"
for stage in vision align joint; do
  cp "out/demo_gpu/$stage/log.jsonl" "$OUT/${stage}_log.jsonl" 2>/dev/null
done
cp out/demo_gpu/report.md out/demo_gpu/eval/metrics.json "$OUT/" 2>/dev/null
[ -f out/demo_gpu/joint/final/config.json ] || exit 0
# the longer joint stage: the demo's median step time sets how many steps fit, less a minute for export and eval
STEPS=$($PY - "$(( BUDGET - $(elapsed) - 75 ))" <<'PY'
import json, sys
times = sorted(json.loads(line)["step_s"] for line in open("out/demo_gpu/joint/log.jsonl") if '"step_s"' in line)
print(max(0, int(int(sys.argv[1]) / (1.15 * times[len(times) // 2]))) // 100 * 100)  # 15% for validations
PY
)
stamp "longer joint stage: $STEPS steps"
[ "$STEPS" -ge 200 ] || exit 0
$PY train_joint.py config/demo_joint.py config/demo_gpu_joint.py --init_from=out/demo_gpu/align \
    --data_dir=data/demo_gpu --out_dir=out/demo_gpu_long --max_steps="$STEPS" --eval_every=$(( STEPS / 4 )) \
    --save_every=0 \
    > "$OUT/long.log" 2>&1
stamp "longer joint trained ($?)"
$PY eval.py --init_from=out/demo_gpu_long --split=test --data_dir=data/demo_gpu "--datasets=['synth_image']" \
    "--tasks=['counting', 'pointing']" --out_dir=out/demo_gpu_long/eval > "$OUT/long_eval.log" 2>&1
stamp "longer joint evaluated ($?)"
cp out/demo_gpu_long/log.jsonl "$OUT/long_log.jsonl" 2>/dev/null
