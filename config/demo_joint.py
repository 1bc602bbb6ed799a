# The README demo's joint stage: a small nanoMolmo2 from scratch on the synthetic world's single images,
# counting and pointing, on a 2-core CPU in float32 (see demo.py).
out_dir = "out/demo/joint"
init_from = "out/demo/align"
model_preset = "small"
data_mixture = {"image": (1.0, ["synth_image"])}
styles = ("point_count", "pointing")
max_crops = 4
overlap_margins = (2, 2)
max_seq_len = 512
batch_size = 4
max_steps = 250
lr_connector, lr_vit, lr_llm = 2e-3, 2e-3, 2e-3  # from scratch: far above Molmo2's fine-tuning rates
warmup_connector, warmup_vit, warmup_llm = 30, 30, 30
resid_dropout = 0.0
eval_every = 100
eval_batches = 2
save_every = 100
log_every = 10
