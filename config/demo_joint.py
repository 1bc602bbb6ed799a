# The README demo's joint stage: every part of the small nanoMolmo2 trains on the demo world's single images, on a
# 2-core CPU in float32 (see demo.py). The ViT arrives from stage 1 already pointing, so it learns gently (lr_vit
# 10x below the rest) and the LLM and connector learn to read it (BENCHMARKS.md, "Stage 1: vision pretraining":
# on one H200 this recipe counted 0.47 after 1,600 steps, where the same run from a random ViT never looked).
out_dir = "out/demo/joint"
init_from = "out/demo/align"  # keeps the align stage's ViT and kept-token vocabulary
model_preset = "small"
data_dir = "data/demo"
data_mixture = {"image": (1.0, ["synth_image"])}
styles = ("point_count", "pointing", "short_answer")
max_crops = 4
overlap_margins = (2, 2)
max_seq_len = 512
batch_size = 16
max_steps = 550
lr_connector, lr_vit, lr_llm = 1e-3, 1e-4, 1e-3  # from scratch: far above Molmo2's fine-tuning rates
warmup_connector, warmup_vit, warmup_llm = 50, 50, 50
weight_decay = 0.1
loss_weighting = "none"  # every answer token weighs 1: long point lists are the lesson here (Molmo2's sft weighting
#   gives an answer of n tokens 2/sqrt(n) each: on one H200 "none" counted 0.48 against 0.33)
resid_dropout = 0.0
eval_every = 138
eval_answers = 100  # answered and scored at each validation: answers.png, the learning curve in the report
eval_batches = 2
save_every = 275
log_every = 25
