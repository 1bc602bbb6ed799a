# The GPU demo's stage 1 (python demo.py --recipe=gpu), on top of config/demo_vision.py: twice the images a step and
# 8x the steps, with workers making the crops ahead, and the scene loss: each token also names the kind and colour of
# the shape whose centre it holds, balanced so the few tokens that hold one weigh as much as the many that do not
# (train_vision.py). It starts from the ViT that config/demo_gpu_vision_easy.py taught the kinds of shape in an easy
# world. On one H200 (2026-11-30) its scene head named 0.38 / 0.57 / 0.73 / 0.81 / 0.84 / 0.86 of the held shapes'
# kinds at steps 400-2,400 (0.30 at 1,400 unbalanced and without the easy start; 0.62 at 2,000 balanced from
# big_vision's start), and its read-out counted 0.719 with F1 0.870, in 2.4 min. With 1,400 steps the whole demo
# counted 0.630-0.670; with 2,400, 0.670-0.750 (0.670 as one command). 2,400 steps more (a second run from this ViT)
# named 0.935 of the kinds and the demo counted 0.785 / 0.790, but 1.7 min over its 10 (BENCHMARKS.md "The GPU demo").
batch_size = 64
max_steps = 2400
eval_every = 400
save_every = 800
log_every = 100
scene_weight = 1.0
scene_balanced = True
warmup = 100
