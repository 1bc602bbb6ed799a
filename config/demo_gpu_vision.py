# The GPU demo's stage 1 (python demo.py --recipe=gpu), on top of config/demo_vision.py: twice the images a step and
# 4.7x the steps, with workers making the crops ahead, and the scene loss: each token also names the kind and colour
# of the shape whose centre it holds (train_vision.py). On one H200 (2026-11-30) these 1,400 steps took 82-84 s and
# read out counting 0.553 and F1 0.848, where the label loss alone read out 0.430 / 0.802; both kept improving to
# 2,400 steps (0.605 / 0.880 with the scene loss, 0.570 / 0.856 without; BENCHMARKS.md "The GPU demo").
batch_size = 64
max_steps = 1400
eval_every = 700
save_every = 700
log_every = 100
scene_weight = 1.0
