#!/usr/bin/env bash
# train_joint.py's CUDA graph with compiled blocks, once GraphedStep's first warm-up run goes unchecked (inductor
# compiles there), and with the graph's loss at the listed targets (TrainLoader's fixed_shapes batches list them).
# Same batches and seed in every run. The small preset (from scratch: the whole vocabulary) on the GPU demo's joint
# batch: compile_blocks on and off, each with the graph on and off. Then the full preset on the full recipe's joint
# stage, from the align checkpoint that `python demo.py --recipe=full` leaves in out/demo_full/align (run that
# first, on the same machine). One H200, 2026-12-04: logs every_position_* (the graph's loss at every position, the
# code before the listed targets; full and small), listed_* (small only: the machine had been handed back and the
# align checkpoint was gone). OUT: a folder for the logs. From the repository root:
#   OUT=/tmp/g bash assets/bench/gpu_graph_1204/compiled_graphed_warmup.sh
set -x
python3 prepare_data.py --dataset=synthetic --out=data/t --max_objects=5 --train_images=2000 > $OUT/prep.log 2>&1
small="config/demo_joint.py config/demo_gpu_joint.py --data_dir=data/t --init_from=scratch --token_loss=0.0
  --muon_lr=0.0 --max_steps=120 --eval_every=0 --save_every=0 --log_every=20 --resid_dropout=0.0"
full="config/demo_joint.py config/demo_gpu_joint.py config/demo_full_joint.py --data_dir=data/demo_gpu
  --init_from=out/demo_full/align --max_steps=140 --eval_every=0 --eval_answers=0 --save_every=0 --log_every=20"
for c in True False; do
  name=$([ $c = True ] && echo compiled || echo eager)
  for g in True False; do
    python3 train_joint.py $small --compile_blocks=$c --cuda_graph=$g --out_dir=out/t_${c}_${g} \
      > $OUT/listed_small_${name}_graph_$g.log 2>&1
    grep -E "^step|cuda_graph|^done" $OUT/listed_small_${name}_graph_$g.log | cut -c1-150
  done
done
for g in True False; do
  python3 train_joint.py $full --cuda_graph=$g --out_dir=out/f_$g > $OUT/listed_full_compiled_graph_$g.log 2>&1
  grep -E "^step|cuda_graph|^done" $OUT/listed_full_compiled_graph_$g.log | cut -c1-150
done
