# The README demo's stage 1: the small preset's ViT from scratch learns where the demo world's pointed shapes are
# (the localisation loss alone: on one H200 it read out the best counts and points and gave the joint stage its
# widest validation gap, BENCHMARKS.md "Stage 1: vision pretraining"), on a 2-core CPU (see demo.py). In bf16 where
# the CPU has bf16 matrix instructions (cpu_autocast), its attention in float32 (vision.attend): on this project's
# 2-core machine 300 steps then took 2.0 min against 3.0 in float32, read out 0.297 / 0.632 against 0.328 / 0.656
# (BENCHMARKS.md "Attention in float32 under CPU autocast"). On a GPU cpu_autocast does nothing.
out_dir = "out/demo/vision"
model_preset = "small"
data_dir = "data/demo"
data_mixture = {"image": (1.0, ["synth_image"])}
max_crops = 4
overlap_margins = (2, 2)
sigmoid_weight = 0.0
loc_weight = 1.0
position_loss = True  # the global view's tokens also say where their point is in the image: what the LLM must write
batch_size = 32
max_steps = 300
lr = 1e-3
warmup = 30
eval_every = 150
eval_batches = 2
save_every = 150
log_every = 25
cpu_autocast = "auto"
