# The README demo's joint stage: a small nanoMolmo2 from scratch on the demo world's single images, on a
# 2-core CPU in float32 (see demo.py). The recipe is the one that made the small model look at its images
# soonest in BENCHMARKS.md ("Does the model learn to see?"): 16 rows a step, short questions beside the
# counting and pointing, and weight decay, which keeps the image tokens from growing until they all look alike.
out_dir = "out/demo/joint"
init_from = "out/demo/align"  # keeps the align stage's kept-token vocabulary
model_preset = "small"
data_dir = "data/demo"
data_mixture = {"image": (1.0, ["synth_image"])}
styles = ("point_count", "pointing", "short_answer")
max_crops = 4
overlap_margins = (2, 2)
max_seq_len = 512
batch_size = 16
max_steps = 550
lr_connector, lr_vit, lr_llm = 1e-3, 1e-3, 1e-3  # from scratch: far above Molmo2's fine-tuning rates
warmup_connector, warmup_vit, warmup_llm = 30, 30, 30
weight_decay = 1.0
resid_dropout = 0.0
eval_every = 275
eval_batches = 2
save_every = 275
log_every = 25
