#!/usr/bin/env bash
# Stage 1 -> joint on the demo world, several variants side by side on one GPU, each evaluated on the held-out
# test images (BENCHMARKS.md, "Stage 1: vision pretraining"). Usage, on a GPU machine:
#   bash assets/bench/stage1_chains.sh OUT_DIR "name|train_vision args|train_joint args" ...
# A variant whose train_vision args are "none" skips stage 1 (its ViT starts random).
set -u
OUT=${1:?out dir}; shift
PY=${PY:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # several chains share the CPUs: one thread each besides their loader workers
[ -f data/demo/synth_image/test.jsonl ] || $PY prepare_data.py --dataset=synthetic --out=data/demo --max_objects=5 --train_images=10000 > /dev/null
run_chain() {
  local name=$1 vision_args=$2 joint_args=$3 dir=out/chains/$1 log=$OUT/$1.log
  mkdir -p "$dir"
  {
    local vit=""
    if [ "$vision_args" != "none" ]; then
      echo "== vision: $vision_args"
      $PY train_vision.py --data_dir=data/demo --out_dir="$dir/vision" --save_every=0 --log_every=100 $vision_args || return
      vit="--vit_from=$dir/vision"
    fi
    echo "== joint: $joint_args"
    $PY train_joint.py config/demo_joint.py --init_from=scratch --vocab=data $vit --out_dir="$dir/joint" \
        --save_every=0 --log_every=100 $joint_args || return
    echo "== eval"
    $PY eval.py --init_from="$dir/joint" --split=test --data_dir=data/demo "--datasets=['synth_image']" \
        "--tasks=['counting', 'pointing']" --out_dir="$dir/eval" | tail -n 12
  } > "$log" 2>&1
}
for spec in "$@"; do
  IFS='|' read -r name vision_args joint_args <<< "$spec"
  run_chain "$name" "$vision_args" "$joint_args" &
done
wait
grep -h -E "counting_accuracy|pointing_f1|^== |val loss|done:" "$OUT"/*.log > "$OUT/summary.txt" || true
