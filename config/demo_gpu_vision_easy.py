# The GPU demo's first part of stage 1, on top of config/demo_vision.py and config/demo_gpu_vision.py, in the easy world
# (prepare_data.py --shape_style=big_solid --max_objects=1: one large solid shape or none on plain grey). Alone in
# the image, a shape's kind is learned within a few hundred steps; among the world's other shapes it is not
# (BENCHMARKS.md "What holds the kinds back"). On one H200 its scene head named every held shape's kind (1.00) at step
# 600 (0.95 at 300), in 0.8 min. big_vision's start (SigLIP's own initialisation): with the std-0.02 start a small
# shape's kind stayed at chance for 500 steps in the one-shape test.
batch_size = 64  # not the world part's 128 at 1.4e-3: every kind is named by step 600 at these
lr = 1e-3
max_steps = 600
eval_every = 300
save_every = 600
vit_init = "big_vision"
