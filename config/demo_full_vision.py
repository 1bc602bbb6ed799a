# The full-preset demo's stage 1 (python demo.py --recipe=full), on top of config/demo_vision.py and
# config/demo_gpu_vision.py: the nanomolmo2 preset's SigLIP2-so400m ViT, at the small recipe's 112-px crops, goes on
# in the demo's world from where config/demo_full_vision_easy.py left it (the kinds of shape, learned in the easy
# world): on one H200 (2026-12-02) its scene head then named 0.49 of the kinds after 600 steps and its read-out
# pointed at F1 0.66, against 0.46 and 0.51 from a random start (BENCHMARKS.md "The full ViT in the easy world
# first"). An AdamW step moves a matrix's output by about lr x its fan-in, and this ViT's fan-ins are 4.5-17x the
# small one's: at 378 px and lr 1e-4 to 1e-3 it learned which tokens hold a shape and their colours, then stalled on
# kinds with its features turning toward one direction; at 5e-5 they stayed apart and it learned kinds (BENCHMARKS.md
# "The full ViT at a rate for its width").
model_preset = "nanomolmo2"
batch_size = 64
batch_echo = 1  # every step a new batch: the GPU recipe's 4 steps a batch (config/demo_gpu_vision.py) left this ViT
#   at kinds 0.22 and a feature cosine of 0.83 after 600 steps at 378 px, against 0.41 and 0.55 without (one H200,
#   2026-12-01; BENCHMARKS.md "The full recipe's stage 1 without data echoing")
lr = 5e-5  # 1/20 of the small ViT's 1e-3 (above)
warmup = 30
max_steps = 600  # ~1.6 min on one H200; 800 steps named no more kinds (0.44 against 0.46 at 600; 2026-12-02)
eval_every = 200
save_every = 0  # a resumable checkpoint of 0.4B parameters and their AdamW state costs more than the stage
log_every = 20
