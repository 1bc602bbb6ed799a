# The full-preset demo's joint stage (python demo.py --recipe=full), on top of config/demo_joint.py and
# config/demo_gpu_joint.py: 64 rows of 512 tokens a step, the ViT frozen, the 0.6B LLM from scratch at 5e-4 and the
# connector at 1e-3. On one H200 (2026-11-30) a step took 0.82 s (22% MFU) and the train loss fell to 0.37, but as
# one command (demo.py --recipe=full) the model answered "There are none." to every test question: counting 0.160,
# the image features one direction (mean cosine 1.000) to step 150. Its stage 1 has not learned enough for the LLM to
# read (config/demo_full_vision.py; BENCHMARKS.md "Both recipes as one command each, the full preset scored").
max_crops = 1
overlap_margins = (4, 4)
max_steps = 300  # about 4.3 minutes: with stage 1 and the evaluation, the whole command fits in 10
lr_connector, lr_vit, lr_llm = 1e-3, 0.0, 5e-4
eval_every = 300
save_every = 0  # a resumable checkpoint of 1B parameters with their AdamW state is 12 GB
log_every = 20
