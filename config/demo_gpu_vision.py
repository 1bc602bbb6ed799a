# The GPU demo's stage 1 (python demo.py --recipe=gpu), on top of config/demo_vision.py: four times the images a step
# and 8x the steps, with workers making the crops ahead, and the scene loss: each token also names the kind and colour
# of the shape whose centre it holds, balanced so the few tokens that hold one weigh as much as the many that do not
# (train_vision.py). It starts from the ViT that config/demo_gpu_vision_easy.py taught the kinds of shape in an easy
# world. On one H200 (2026-11-30) its scene head named 0.91-0.93 of the held shapes' kinds in 3.4-3.6 min, and the
# whole demo as one command counted 0.750 with F1 0.785 in 7.9 min. At 64 images a step, the same 2,400 steps named
# 0.864 in 2.8 min (the demo counted 0.670-0.750); the step waits on the host, so 128 images cost 77-90 ms a step
# against 62, and the kinds come per image, not per step (192 a step for 1,600 steps: 0.906). BENCHMARKS.md "The GPU
# demo", "Stage 1 at 128 images a step". 2,000 steps, not 2,400: its read-out was best at step 1,999 of 2,400
# (counting 0.949, F1 0.930), and the 40 s saved go to the joint stage (config/demo_gpu_joint.py).
# Each of the 2,000 batches now trains 4 steps as one CUDA graph: the step waited ~48 ms for its batches where the
# GPU computes ~12, so the 8,000 updates take about the minutes of 2,000 (112-126 s against 103) and name 0.966-0.970
# of the kinds against 0.922 (2 steps a batch: 0.959); the whole demo then counted 0.920 and 0.915 with F1 0.914 and
# 0.907 in two runs (BENCHMARKS.md "Data echoing").
batch_size = 128
max_steps = 8000
batch_echo = 4
cuda_graph = True
eval_every = 1600
save_every = 1600
log_every = 100
scene_weight = 1.0
scene_balanced = True
warmup = 100
lr = 1.4e-3  # ~sqrt(2) x the 1e-3 it had at 64 images a step
muon_lr = 0.0  # AdamW for the ViT too: every GPU result was measured so (the CPU recipe's Muon is untried here)
