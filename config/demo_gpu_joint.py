# The GPU demo's joint stage (python demo.py --recipe=gpu), on top of config/demo_joint.py: 64 rows of 512 tokens a
# step at twice the CPU demo's learning rates, the ViT learning too (on one H200 this beat 16 rows a step at the
# CPU's rates, a frozen ViT counted 0.36 against 0.47, and a norm after the projector made both worse:
# BENCHMARKS.md "Recipes that learn to point" and "Stage 1"). 750 steps: a step took 0.40 s on one H200, so the
# whole demo fits its 10 minutes (1,200 steps did not: BENCHMARKS.md "The GPU demo").
batch_size = 64
max_seq_len = 512
max_steps = 750
lr_connector, lr_vit, lr_llm = 2e-3, 2e-4, 2e-3
eval_every = 250
eval_answers = 100
eval_batches = 2
save_every = 375
log_every = 100
loader_workers = 8
