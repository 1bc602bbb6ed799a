# The README demo's stage 1: the small preset's ViT from scratch learns where the demo world's pointed shapes are (the
# localisation loss, BENCHMARKS.md "Stage 1: vision pretraining") and, at each shape's centre, its kind and colour
# (the scene loss), on a 2-core CPU (see demo.py). Its matrices learn by Muon: under AdamW this CPU's minutes never
# named the kinds above chance, under Muon 600 steps of 32 images name ~0.7 of them. On a 2-core CPU with AMX
# `make demo` then counted 0.565 and pointed at F1 0.409 against 0.425 / 0.462 with the AdamW, localisation-only
# stage 1 of 300 steps (the joint stage gets ~2,600 steps in the minutes left, not ~2,750; BENCHMARKS.md "Stage 1
# by Muon"). In bf16 where the CPU has bf16 matrix instructions (cpu_autocast), its attention in float32
# (vision.attend; BENCHMARKS.md "Attention in float32 under CPU autocast"). On a GPU cpu_autocast does nothing.
out_dir = "out/demo/vision"
model_preset = "small"
data_dir = "data/demo"
data_mixture = {"image": (1.0, ["synth_image"])}
max_crops = 4
overlap_margins = (2, 2)
sigmoid_weight = 0.0
loc_weight = 1.0
scene_weight = 2.0  # the kinds and colours at twice the localisation's weight: with lr_decay_frac 0.25, GPU replays
#   named 0.80 of the kinds and counted 0.615 over three joint seeds, against 0.77 and 0.570 at 1.0 (BENCHMARKS.md
#   "Stage 1's peak held")
scene_balanced = True  # the tokens that hold a centre weigh as much as the rest: colours come in 150 steps
position_loss = True  # the global view's tokens also say where their point is in the image: what the LLM must write
batch_size = 48  # at the same images seen, more images a step named more kinds (Muon's steps, each orthogonalised,
#   are worth more when the gradient they start from is less noisy). On this project's 2-core AMD CPU, ~15,000 images
#   (one thread a run): 32 a step (475 steps) named 0.70, 0.63 and 0.66 of the kinds at three seeds, 48 (320, 320
#   and 300) 0.79, 0.72 and 0.75, 64 (240) 0.76, 96 (160) 0.70, 16 (880) 0.43-0.52. A step of 48 costs ~10% more an
#   image than one of 32, so it is ahead where the minutes hold fewer images than the kinds need: in a fast hour
#   `make demo`'s stage 1 named 0.82 in 333-346 steps of 48 and 0.81 in 552 of 32 (BENCHMARKS.md "Stage 1 at 48
#   images a step")
max_steps = 400  # the 19,200 images of the 600 steps of 32 it had
lr = 1e-3  # AdamW: the heads, norms and tables
muon_lr = 0.02  # Muon: the ViT's matrices (0.05 named fewer kinds at step 300: 0.29 against 0.34)
warmup = 20  # the 960 images of the 30 steps of 32 it had
lr_decay_frac = 0.25  # the peak held to the last quarter of the steps, then the cosine: the kinds come late, at the
#   high rates (600 steps, GPU replays: kinds 0.77 against 0.61 with the cosine over all of them, kind questions
#   counted 0.48 against 0.25 at one joint seed; BENCHMARKS.md "Stage 1's peak held")
eval_every = 200
eval_batches = 2
save_every = 200
log_every = 25
cpu_autocast = "auto"
