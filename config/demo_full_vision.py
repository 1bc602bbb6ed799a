# The full-preset demo's stage 1 (python demo.py --recipe=full), on top of config/demo_vision.py and
# config/demo_gpu_vision.py: the nanomolmo2 preset's SigLIP2-so400m ViT from scratch (big_vision's start), in the
# demo's world alone. On one H200 (2026-11-30) a step of 32 images took 0.34 s. It learns which tokens hold a shape
# (read-out counting 0.80) and their colours (0.99) within 100 steps, then stalls: not their kinds (0.19-0.33) nor
# where in a token's cell they lie, over 300-700 steps at lr 1e-4 to 1e-3 from big_vision's start or std 0.02. The
# small ViT's easy world is left out here to keep the joint stage its minutes (BENCHMARKS.md "Stage 1 at 128 images
# a step, ..., the full preset" and "Both recipes as one command each, the full preset scored, its stage 1 stuck").
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
