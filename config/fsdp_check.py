# The full nanoMolmo2 (Qwen3-0.6B + SigLIP2-so400m, random init) on the synthetic world, short: run once on
# one GPU with grad_accum=2 and once as `torchrun --nproc_per_node=2 ... --parallel=fsdp --grad_accum=1`.
# Both see exactly the same examples each step (training.TrainLoader deals draws over GPUs x micro-batches).
model_preset = "nanomolmo2"
overlap_margins = (4, 4)
max_crops = 8
max_row_crops = 24
max_seq_len = 2048
batch_size = 2
max_steps = 60
lr_connector, lr_vit, lr_llm = 3e-4, 1e-4, 1e-4
warmup_connector, warmup_vit, warmup_llm = 10, 10, 10
resid_dropout = 0.0  # no randomness that would differ between the two layouts
eval_every = 0
save_every = 1000
data_mixture = {"image": (1.0, ["synth_image"])}
