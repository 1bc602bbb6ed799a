# The full-preset demo's first part of stage 1 (python demo.py --recipe=full), on top of config/demo_full_vision.py and
# config/demo_gpu_vision_easy.py: the so400m ViT from scratch (big_vision's start) in the easy world of one large
# solid shape or none, where it learns the kinds of shape; the second part (config/demo_full_vision.py) goes on from
# it in the demo's world. On one H200 (2026-12-02) its scene head named 0.99 of the held shapes' kinds at step 300
# (0.54 at 150) at the full ViT's rate; in the demo's world alone that ViT named 0.46 after 600 steps.
vit_init = "big_vision"
vit_image_size = 112  # not Molmo2's 378: the world's 224-px images in the small recipe's layout (the global view and
#   2x2 crops of 112 px, 80 image tokens), 64 patches a crop where 378 px has 729. At 378 (one crop, 392 tokens an
#   image) the whole recipe ended blind, "There are none." to every question (counting 0.160); at 112 one H200
#   counted 0.545 with the same minutes (BENCHMARKS.md "The full recipe at 112-px crops")
lr = 5e-5  # the full ViT's rate (config/demo_full_vision.py), not the small ViT's 1e-3
max_steps = 300  # ~45 s of steps
eval_every = 150
save_every = 0
