#!/usr/bin/env bash
# Issue 20: training throughput and peak memory of the full preset on 1 and N GPUs of one host at the same per-GPU
# batch (tools/bench.py's train section: 4 photos a GPU, one per row), DDP and FSDP2, activation checkpointing off
# and on; then the full preset on N GPUs under a 40 GB card's memory (37.3 GiB a process). Usage, on a GPU machine:
#   bash assets/bench/scaling.sh OUT_DIR [N=2]
# Each run's table goes to OUT_DIR/scaling.md as it is printed; EXTRA adds bench.py knobs to every run. About 40 s a
# run on 2 x H200 (5-6 min for all eight): give it a command of its own.
set -u
OUT=${1:?out dir}; N=${2:-2}
PY=${PY:-python3}
mkdir -p "$OUT"
BENCH="tools/bench.py --sections=train --hf=False --trainer=False --steps=6 --warmup=2 ${EXTRA:-}"
run() {  # run GPUS ARGS...
  local n=$1; shift
  echo "## torchrun --nproc_per_node=$n $BENCH $*" >> "$OUT/scaling.md"
  $PY -m torch.distributed.run --standalone --nproc_per_node="$n" $BENCH --out_dir=out/scaling "$@" 2>&1 \
      | grep -v "^W1\|OMP_NUM_THREADS\|^\*\*\*" | tee -a "$OUT/scaling.md"
}
for ckpt in False True; do
  run 1 --activation_checkpointing=$ckpt
  for parallel in ddp fsdp; do
    run "$N" --parallel=$parallel --activation_checkpointing=$ckpt
  done
done
# a 40 GB card: FSDP2 with 2 rows a GPU without checkpointing, 4 rows with it (BENCHMARKS.md's arithmetic)
run "$N" --parallel=fsdp --activation_checkpointing=False --batch_images=2 --max_memory_gib=37.3
run "$N" --parallel=fsdp --activation_checkpointing=True --max_memory_gib=37.3
