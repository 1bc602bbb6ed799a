#!/usr/bin/env bash
# train_joint.py with compile_blocks and cuda_graph together, against compile_blocks alone: same batches, same seed.
# Run on one H200 (2026-12-04) with train_joint.py's graph_off not naming compile_blocks (the run's change, taken
# back: the graphed run fell to eager, 138 ms a step against 70). Since 3f76c2c GraphedStep checks the sync on its
# second warm-up run and train_joint.py graphs compiled blocks, so this script no longer reproduces that fall-back:
# assets/bench/gpu_graph_1204/compiled_graphed_warmup.sh is its successor. OUT: a folder for the logs. From the
# repository root:
#   OUT=/tmp/g bash assets/bench/gpu_recipes_1204/compiled_graphed.sh
set -x
python3 prepare_data.py --dataset=synthetic --out=data/t --max_objects=5 --train_images=2000 > $OUT/prep.log 2>&1
common="config/demo_joint.py config/demo_gpu_joint.py --data_dir=data/t --init_from=scratch --token_loss=0.0 --muon_lr=0.0
  --max_steps=120 --eval_every=0 --save_every=0 --log_every=20 --compile_blocks=True --resid_dropout=0.0"
for g in True False; do
  python3 train_joint.py $common --cuda_graph=$g --out_dir=out/t_$g > $OUT/joint_graph_$g.log 2>&1
  grep -E "^step|cuda_graph|^done" $OUT/joint_graph_$g.log | cut -c1-140
done
