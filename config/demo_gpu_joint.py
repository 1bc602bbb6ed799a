# The GPU demo's joint stage (python demo.py --recipe=gpu), on top of config/demo_joint.py: 64 rows of 512 tokens a
# step at twice the CPU demo's learning rates, the ViT learning too (on one H200 this beat 16 rows a step at the
# CPU's rates, a frozen ViT counted 0.36 against 0.47, and a norm after the projector made both worse:
# BENCHMARKS.md "Recipes that learn to point" and "Stage 1"), with the CPU demo's styles, captions included, on the
# GPU recipe's world of 30,000 training images (demo.py). 2,000 steps (0.09-0.11 s each on one H200): with the
# whole demo as one command (6.3-6.7 min) the test images counted 0.525 and 0.610 and pointed at F1 0.750 and 0.749
# over two runs; with 1,400 steps, 0.500-0.560 / 0.557-0.681. Without the captions and the position bins, on 10,000
# images: 0.340-0.510 / 0.486-0.573 over two runs, and 2,000 steps overfit those images (BENCHMARKS.md "The GPU demo").
batch_size = 64
max_seq_len = 512
max_steps = 2000
lr_connector, lr_vit, lr_llm = 2e-3, 2e-4, 2e-3  # the ViT at 6e-4 instead pointed worse: 0.545 / 0.534 (one run)
eval_every = 500
eval_answers = 100
eval_batches = 2
save_every = 1000
log_every = 100
