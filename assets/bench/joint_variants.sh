#!/usr/bin/env bash
# One stage-1 ViT, then several joint-stage recipes around it side by side on one GPU, each scored on the
# held-out test images (BENCHMARKS.md, "Recipes that learn to point"). Usage, on a GPU machine:
#   bash assets/bench/joint_variants.sh OUT_DIR "train_vision args" "name|train_joint args" ...
# RUNS=dir holds the runs (default out/variants; the stage-1 ViT in RUNS/vision) and JOINT_ARGS are added to every
# joint run (e.g. --seed=2 --loader_workers=2), so that two of these can run at once, one per GPU.
# Every joint run answers validation questions as it trains (--eval_answers), so its log holds accuracy
# against steps. Logs go to OUT_DIR as they are written.
set -u
OUT=${1:?out dir}; shift
VISION_ARGS=${1:?train_vision args}; shift
PY=${PY:-python3}
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/times.txt"; }
[ -f data/demo/synth_image/test.jsonl ] || $PY prepare_data.py --dataset=synthetic --out=data/demo --max_objects=5 --train_images=10000 > /dev/null
stamp "world ready"
RUNS=${RUNS:-out/variants}
VISION=$RUNS/vision
$PY train_vision.py config/demo_vision.py --out_dir="$VISION" --save_every=0 --log_every=100 \
    $VISION_ARGS > "$OUT/vision.log" 2>&1 || { stamp "vision failed"; exit 1; }
stamp "vision done"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the joint runs share the CPUs: one thread each besides their workers
run_joint() {
  local name=$1 args=$2 dir=$RUNS/$1 log=$OUT/$1.log
  {
    $PY train_joint.py config/demo_joint.py --init_from=scratch --vocab=data --vit_from="$VISION" \
        --out_dir="$dir" --save_every=0 --log_every=100 ${JOINT_ARGS:-} $args || return
    stamp "$name trained"
    $PY eval.py --init_from="$dir" --split=test --data_dir=data/demo "--datasets=['synth_image']" \
        "--tasks=['counting', 'pointing']" --out_dir="$dir/eval" | tail -n 12
    stamp "$name evaluated"
  } > "$log" 2>&1
}
for spec in "$@"; do
  IFS='|' read -r name args <<< "$spec"
  run_joint "$name" "$args" &
done
wait
stamp "all done"
