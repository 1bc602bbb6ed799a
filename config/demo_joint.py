# The README demo's joint stage: the small nanoMolmo2 learns counting, pointing, short answers and the world's long
# captions on its single images, on a 2-core CPU (see demo.py). The ViT arrives from stage 1 already
# pointing and stays frozen here: a CPU step then skips the ViT's backward, and with one image a row an image costs
# 20-30 ms. The captions say how many shapes of each colour there are and where each one is, in words: with them
# (rows of 368, 1,200 steps in the same minutes) the test images counted 0.440 and 0.460 over two seeds against
# 0.365 and 0.320 without (rows of 256, 1,760 steps), at about the same pointing F1 (0.177 and 0.217 against 0.216
# and 0.207; BENCHMARKS.md "The CPU demo"). Its matmuls run in bf16 where the CPU has bf16 matrix instructions
# (cpu_autocast): on this project's 2-core machine a step then takes 0.34-0.37 s instead of 0.44-0.48 s, so 1,650
# steps fit the minutes of 1,200 in float32; they counted 0.475 and pointed at F1 0.256 against 0.435 / 0.188 (one
# seed each). On a CPU without them the steps run in float32, ~4x slower than there, and demo.py's minutes hold a
# quarter of the steps: 8 rows a step, twice the updates on the same images, then widened the validation gap from
# 0.034 to 0.073 on that CPU (0.039 to 0.052 over two seeds on a GPU replay), where at the full minutes 8 rows and 16
# were alike (3,000 steps of 8: 0.480 / 0.252 against 0.475 / 0.256 on the bf16 CPU; BENCHMARKS.md "The CPU demo
# in 15 minutes on a slower CPU"): the demo trains 8 rows a step.
out_dir = "out/demo/joint"
init_from = "out/demo/align"  # keeps the align stage's ViT and kept-token vocabulary
model_preset = "small"
data_dir = "data/demo"
data_mixture = {"image": (1.0, ["synth_image"])}
styles = ("long_caption", "point_count", "pointing", "short_answer")
max_crops = 4
overlap_margins = (2, 2)
max_seq_len = 448  # the world's 2 extra questions an image (demo.py's EXTRA_QUERIES) make examples of 368 tokens on
#   average (509 at most; without them 285, at most ~367, in rows of 368): rows of 448 keep ~90% of them whole, and an
#   example that does not fit keeps the questions that do, in order (its own questions come first). On this 2-core CPU
#   the joint stage from one align checkpoint counted 0.610 and pointed at F1 0.457 in 2,536 steps of 448, against
#   0.565 / 0.391 in 2,939 of 368 without them; 4 extra questions in rows of 512 (2,151 steps) counted 0.610, F1 0.443
#   (BENCHMARKS.md "More questions an image")
batch_size = 8
max_steps = 3300  # the images of 1,650 steps of 16
cpu_autocast = "auto"
compile_blocks = True  # torch.compile each block (where the CPU has a C++ compiler): on this project's 2-core CPU
#   1,000-step runs took 0.20-0.22 s a step against 0.25-0.28 eagerly (1.2x), after ~26 s of compiling from a cold
#   cache (BENCHMARKS.md "Coordinates' digits against a Gaussian, and the joint stage compiled")
lr_connector, lr_vit, lr_llm = 5e-4, 0.0, 5e-4  # from scratch: far above Molmo2's fine-tuning rates; lr 0 freezes
#   the ViT. Half the 1e-3 they had, as is muon_lr below: from one align checkpoint, 2,750 steps, two seeds, the test
#   images counted 0.650 and 0.685 against 0.595 and 0.575 (the kind questions 0.64 / 0.66 against 0.52 / 0.34), F1
#   0.583 / 0.628 against 0.621 / 0.568 (BENCHMARKS.md "The joint stage at half its learning rates")
warmup_connector, warmup_vit, warmup_llm = 50, 50, 50
weight_decay = 0.1
muon_lr = 0.005  # Muon for the LLM's and connector's matrices (training.MuonAdamW): on a 2-core CPU with AMX, at 0.01
#   the same 2,536 steps pointed at F1 0.383 against AdamW's 0.208 and 0.250 (two runs), counted 0.450 against 0.485
#   and 0.455, and widened the validation gap to 0.380 from 0.155-0.179 (at 0.02: 0.355 / 0.316 / 0.311; BENCHMARKS.md
#   "Muon in the CPU demo's joint stage"); 0.005 with the rates above
token_loss = 1.0  # the image tokens also name the kind, colour and first digits of x and y of the shape whose centre
#   they hold (training.TokenAttributeLoss): a frozen ViT's features hold a centre's digits only spread over the
#   token's place and its offset in the cell. GPU replays of this stage's 2,800 steps (one H200, three seeds each,
#   one stage 1): counting 0.605 / pointing F1 0.601 at 1.0, 0.582 / 0.590 at 0.3, 0.548 / 0.610 at 0.1, against
#   0.587 / 0.485 without; the digits alone 0.378 / 0.553 (the tokens lose which shape is which), the kind and colour
#   alone 0.632 / 0.405. BENCHMARKS.md "The image tokens name their shapes"
token_weights = (4.0, 4.0, 1.0, 1.0)  # the kind and colour weigh 4 beside each digit's 1: counting follows the
#   kinds the tokens name. GPU replays, three seeds each: 0.622 / 0.603 against 0.605 / 0.601 at the 2,800 joint
#   steps above; at a slow day's steps (stage 1 480, the joint stage 2,200) 0.498 / 0.491 against 0.432 / 0.464.
#   BENCHMARKS.md "The kind and colour weighted above the digits"
loss_weighting = "none"  # every answer token weighs 1: long point lists are the lesson here (Molmo2's sft weighting
#   gives an answer of n tokens 2/sqrt(n) each: on one H200 "none" counted 0.48 against 0.33)
resid_dropout = 0.0
vit_feature_cache = 4.0  # GiB: the frozen ViT's features of each crop kept (vision.FeatureCache), so that a training
#   image met again (from joint step ~625, when the 5,000 images' first pass ends) skips the ViT: 1.5 GiB for all
#   25,000 crops. On this project's 2-core CPU such steps took 0.269-0.314 s against 0.326-0.358 (300 steps in a world
#   of 1,000 images, two hours, the same losses to the bit; BENCHMARKS.md "A frozen ViT's features kept")
key_blocks = True  # each chunk of 64 queries attends over only the key blocks it can see (model.KeyBlocks): its
#   example's image and the question's own branch, the same losses
join_rows = True  # the 8 rows joined into one, padded only at its end (training.TrainLoader): the same examples and
#   losses without the fifth of the tokens that was padding. On this project's 2-core AMD CPU a forward and backward
#   took 264 ms with both, 295 with the key blocks alone and 338 with neither (the same 12 batches alternated in one
#   process; BENCHMARKS.md "Attention over the key blocks, and the rows joined")
eval_every = 1100
eval_answers = 100  # answered and scored at each validation: answers.png, the learning curve in the report
eval_batches = 2
save_every = 3300
log_every = 100
