# Sourced by the CPU demo's replays on a GPU machine (demo_budget.sh, demo_cpu_levers.sh) once OUT and RUNS are set:
# the out folders, stamp (a line with the seconds since the start, also appended to OUT/times.txt), one thread a run
# (~10 runs share the machine's cores), the demo's world, and score (a joint run's test counting and pointing).
PY=${PY:-python3}
# the demo's stage 1 before 2026-12-02's twentieth session (AdamW, the localisation loss alone, 300 steps), which
# the replays' stage-1 arguments amend; config/demo_vision.py now trains 600 steps by Muon with the scene loss
LOC_STAGE1="--muon_lr=0.0 --scene_weight=0.0 --scene_balanced=False --max_steps=300 --eval_every=150 --save_every=150"
mkdir -p "$OUT" "$RUNS"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/times.txt"; }
export OMP_NUM_THREADS=1
[ -f data/demo/synth_image/test.jsonl ] || $PY prepare_data.py --dataset=synthetic --out=data/demo --max_objects=5 \
    --train_images=10000 > /dev/null
score() {  # RUN_DIR NAME: eval.py on the 200 test images into RUN_DIR/eval, its tail into OUT/NAME.log, a stamp
  $PY eval.py --init_from="$1" --split=test --data_dir=data/demo "--datasets=['synth_image']" \
      "--tasks=['counting', 'pointing']" --out_dir="$1/eval" 2>&1 | tail -n 12 >> "$OUT/$2.log"
  stamp "$2: $(grep -ho '"counting_accuracy": [0-9.]*\|"f1": [0-9.]*' "$1/eval/metrics.json" | tr '\n' ' ')"
}
