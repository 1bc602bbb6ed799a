# The full-preset demo's stage 1 (python demo.py --recipe=full), on top of config/demo_vision.py and
# config/demo_gpu_vision.py: the nanomolmo2 preset's SigLIP2-so400m ViT from scratch (big_vision's start), in the
# demo's world alone. On one H200 (2026-11-30) a step of 32 images took 0.34-0.38 s. At lr 1e-4 to 1e-3 it learned
# which tokens hold a shape (read-out counting 0.80) and their colours (0.99) within 100 steps, then stalled: kinds at
# 0.19-0.33, no positions within a token's cell, its features turning toward one direction. An AdamW step moves a
# matrix's output by about lr x its fan-in, and this ViT's fan-ins are 4.5-17x the small one's: at 5e-5 its features
# stay apart (mean cosine 0.68 -> 0.57 over 600 steps, against 0.83 -> 0.80 at 5e-4 with --vit_lr_fan_in=256) and it
# learns kinds, 0.41-0.51 at step 600 in three runs and 0.59 at step 1,400. The small ViT's easy world is left out to
# keep the joint stage its minutes (BENCHMARKS.md "The full ViT at a rate for its width").
model_preset = "nanomolmo2"
vit_init = "big_vision"
max_crops = 1  # the world's 224-px images fit one 378-px crop: the global view and one crop, 392 tokens an image
overlap_margins = (4, 4)  # Molmo2's
batch_size = 32  # 64 images of 2 crops would hold ~100 GB of activations in the 25 blocks
batch_echo = 1  # every step a new batch: the GPU recipe's 4 steps a batch (config/demo_gpu_vision.py) left this ViT
#   at kinds 0.22 and a feature cosine of 0.83 after 600 steps, against 0.41 and 0.55 without (one H200, 2026-12-01;
#   BENCHMARKS.md "The full recipe's stage 1 without data echoing")
lr = 5e-5  # 1/20 of the small ViT's 1e-3 (above)
warmup = 30
max_steps = 600
eval_every = 200
save_every = 0  # a resumable checkpoint of 0.4B parameters and their AdamW state costs more than the stage
log_every = 20
