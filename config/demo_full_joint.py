# The full-preset demo's joint stage (python demo.py --recipe=full), on top of config/demo_joint.py and
# config/demo_gpu_joint.py: 64 rows of 512 tokens a step, the ViT frozen, the 0.6B LLM from scratch at 5e-4 and the
# connector at 1e-3. On one H200 (2026-11-30) a step took 0.82 s (22% MFU). It is still blind: the model answers
# "There are none." to every test question (counting 0.160-0.165). From the stage 1 at lr 5e-4 the image features
# stayed one direction (mean cosine 1.000) to step 150 and images were worth 0.025 of validation loss; from the one at
# 5e-5 (config/demo_full_vision.py now) the cosine fell from 1.000 to 0.57 by step 250 and the images were worth
# 0.165, so the LLM has started to read them when the stage ends (BENCHMARKS.md "The full ViT at a rate for its
# width").
max_crops = 1
overlap_margins = (4, 4)
max_steps = 250  # about 3.7 minutes: with stage 1's 600 steps and the evaluation, the whole command fits in 10
# the connector at 1e-4, not the small recipe's 1e-3: its matrices' fan-ins (2,304 channels of two ViT blocks, 3,072
# in the projector) are ~9x the small connector's, and an AdamW step moves a matrix's output by about lr x fan-in.
# One H200 run at 1e-4 (2026-12-01, its stage 1 weaker): the image tokens came apart sooner (mean cosine 0.78 at step
# 60 against 0.945 at 1e-3) and the images were worth 0.35 of validation loss against 0.165; blind in its answers
lr_connector, lr_vit, lr_llm = 1e-4, 0.0, 5e-4
eval_every = 250
save_every = 0  # a resumable checkpoint of 1B parameters with their AdamW state is 12 GB
log_every = 20
