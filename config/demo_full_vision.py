# The full-preset demo's stage 1 (python demo.py --recipe=full), on top of config/demo_vision.py and
# config/demo_gpu_vision.py: the nanomolmo2 preset's SigLIP2-so400m ViT from scratch (big_vision's start), in the
# demo's world alone. On one H200 (2026-11-30, the one attempt so far) a step of 32 images took 0.34 s; in 480 steps
# it learned where the shapes are (read-out counting 0.80) and their colours (0.99), not their kinds (0.26-0.28, an
# easy-world part first included): too few images for a ViT this size, and the small ViT's easy world is left out
# here to keep the joint stage its minutes (BENCHMARKS.md "Stage 1 at 128 images a step, ..., the full preset").
model_preset = "nanomolmo2"
vit_init = "big_vision"
max_crops = 1  # the world's 224-px images fit one 378-px crop: the global view and one crop, 392 tokens an image
overlap_margins = (4, 4)  # Molmo2's
batch_size = 32  # 64 images of 2 crops would hold ~100 GB of activations in the 25 blocks
lr = 5e-4
warmup = 30
max_steps = 300
eval_every = 150
save_every = 0  # a resumable checkpoint of 0.4B parameters and their AdamW state costs more than the stage
log_every = 20
