# The full-preset demo's joint stage (python demo.py --recipe=full), on top of config/demo_joint.py and
# config/demo_gpu_joint.py: 64 rows of 512 tokens a step, the ViT frozen, the 0.6B LLM from scratch at 5e-4 and the
# connector at 1e-3. On one H200 (2026-11-30, the one attempt so far) a step took 0.82 s (22% MFU), and the train
# loss fell 6.10 -> 0.48 at step 100 -> 0.31 at step 340 (the small preset's demo ends near 0.33 after 2,000 steps);
# that run was cut off before it was scored (BENCHMARKS.md "Stage 1 at 128 images a step, ..., the full preset").
max_crops = 1
overlap_margins = (4, 4)
max_steps = 300  # about 4.3 minutes: with stage 1 and the evaluation, the whole command fits in 10
lr_connector, lr_vit, lr_llm = 1e-3, 0.0, 5e-4
eval_every = 300
save_every = 0  # a resumable checkpoint of 1B parameters with their AdamW state is 12 GB
log_every = 20
