# Sourced by the GPU bench scripts once OUT is set: makes OUT, sets PY (python3 unless given) and T0, and starts
# OUT/times.txt with the card and the torch version; `stamp message` appends "[seconds since T0] message" to it.
PY=${PY:-python3}
mkdir -p "$OUT"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
stamp() { echo "[$(elapsed) s] $*" | tee -a "$OUT/times.txt"; }
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__)"
} > "$OUT/times.txt" 2>&1
# left: the seconds before END, the caller's deadline (timeout "$(left)" stops a stage in time)
left() { echo $(( END - $(date +%s) )); }
# pack: times.txt and the caller's LOGS folder into OUT/logs.tgz, rewritten whole each time, so a run cut off still
# brings back what it did; each call writes its own temporary archive, so runs packing at once never mix theirs
pack() {
  cp "$OUT/times.txt" "$LOGS/"
  tar czf "$OUT/logs.tgz.$BASHPID" -C "$LOGS" . 2> /dev/null; mv "$OUT/logs.tgz.$BASHPID" "$OUT/logs.tgz"
}
# keep_vit DIR NAME: a stage-1 run's final ViT (DIR/final) into $LOGS/NAME, where it is small enough to come back:
# the device hands back no file over 16 MiB, so the full preset's 1.6-GB ViT inside logs.tgz once lost every log
keep_vit() {
  if [ -d "$1/final" ] && [ "$(du -sm "$1/final" | cut -f1)" -le 8 ]; then
    mkdir -p "$LOGS/$2" && cp "$1/final/"* "$LOGS/$2/"
  fi
}
# take_share I N, first thing in a subshell: the I-th of N equal shares of this machine for it and every process it
# starts: the I-th GPU (of CUDA_VISIBLE_DEVICES' list, if set) and the I-th slice of the cores this script may use
take_share() {
  local gpus cores per
  read -r -a gpus <<< "$(tr , ' ' <<< "${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $(( $2 - 1 )))}")"
  read -r -a cores <<< "$($PY -c "import os; print(*sorted(os.sched_getaffinity(0)))")"
  per=$(( ${#cores[@]} / $2 ))
  export CUDA_VISIBLE_DEVICES=${gpus[$1]}
  taskset -pc "$(IFS=,; echo "${cores[*]:$1*per:per}")" $BASHPID > /dev/null
}
# test_eval RUN NAME [WORLD]: eval.py on the test images (counting, pointing) of WORLD (the full recipe's
# data/demo_gpu unless given) of the joint run in RUN, its log, metrics and predictions copied into $LOGS as NAME_*;
# within the caller's left() seconds. EVAL_ARGS adds eval.py words: the full preset's 1B parameters want the GPU
# ("--device=cuda --dtype=bfloat16 --batch_size=100", demo.py's), where eval.py's own default, the CPU in float32,
# would take most of a call
test_eval() {
  # shellcheck disable=SC2086  # EVAL_ARGS is --key=value words, none holding a space
  timeout "$(left)" $PY eval.py --init_from="$1" --split=test --data_dir="${3:-data/demo_gpu}" \
      "--datasets=['synth_image']" "--tasks=['counting', 'pointing']" --out_dir="$1/eval" ${EVAL_ARGS:-} \
      > "$LOGS/$2_eval.log" 2>&1
  cp "$1/eval/metrics.json" "$LOGS/$2_metrics.json"
  cp "$1/eval/predictions.jsonl" "$LOGS/$2_predictions.jsonl"
}
