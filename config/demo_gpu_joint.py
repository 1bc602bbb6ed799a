# The GPU demo's joint stage (python demo.py --recipe=gpu), on top of config/demo_joint.py: 64 rows of 512 tokens a
# step at twice the CPU demo's learning rates, the ViT learning too (on one H200 this beat 16 rows a step at the
# CPU's rates, a frozen ViT counted 0.36 against 0.47, and a norm after the projector made both worse:
# BENCHMARKS.md "Recipes that learn to point" and "Stage 1").
batch_size = 64
max_seq_len = 512
max_steps = 1200
lr_connector, lr_vit, lr_llm = 2e-3, 2e-4, 2e-3
eval_every = 300
eval_answers = 100
eval_batches = 2
save_every = 600
log_every = 100
loader_workers = 8
