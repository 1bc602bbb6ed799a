# The full nanoMolmo2 (Qwen3-0.6B + SigLIP2-so400m, random init) trained on the synthetic world's counting and
# pointing for one ~10-minute command on one GPU (BENCHMARKS.md), then: python eval.py --init_from=out/gpu ...
# The joint stage alone from random weights: a speed and memory workload, not a recipe that sees. Its image
# features grow ~10^4-fold and collapse to one direction within 40 steps, and it counted 0.070 (BENCHMARKS.md "The
# trainer compiled by default", "Training on one GPU"); python demo.py --recipe=full trains the same model to count.
out_dir = "out/gpu"
init_from = "scratch"
model_preset = "nanomolmo2"
overlap_margins = (4, 4)
max_crops = 8
max_row_crops = 32
max_seq_len = 2048
data_mixture = {"image": (1.0, ["synth_image"])}
styles = ("point_count", "pointing")
batch_size = 4
grad_accum = 2  # 8 rows a step; 4 rows of activations fit an 80 GB H100
max_steps = 300
lr_connector, lr_vit, lr_llm = 1e-3, 3e-4, 3e-4  # from scratch
warmup_connector, warmup_vit, warmup_llm = 50, 50, 50
resid_dropout = 0.0
eval_every = 0
save_every = 0  # no resumable checkpoint (12 GB with AdamW state): the exported final model only
log_every = 10
