# The full-preset demo's joint stage (python demo.py --recipe=full), on top of config/demo_joint.py and
# config/demo_gpu_joint.py: 64 rows of 512 tokens a step, the ViT frozen, the 0.6B LLM from scratch at 5e-4 and the
# connector at 1e-4, the images as the stage-1 ViT's 112-px crops (config/demo_full_vision.py). On one H200
# (2026-12-02) a step took ~0.30 s with its blocks compiled (40% MFU; 0.63 s eagerly); from the ViT that learned
# kinds in the easy world first, the validation answers counted 0.54 / 0.66 at steps 440 / 880 and the whole command
# took 9.5 min: test counting 0.615, pointing F1 0.408 (BENCHMARKS.md "The full recipe at 880 joint steps"; at 800
# steps 0.590 / 0.385 in 8.8 min; without the easy world, 900 steps: 0.530 / 0.407). At Molmo2's 378 px (392 image
# tokens an image, not 80) 250 steps of 0.82 s ended blind.
max_steps = 880  # ~0.30 s each with compile_blocks (below) on an H200, ~0.32 on an H100, ~0.355 there with Muon
#   (below): with both parts of stage 1 and the evaluation, the command took 9.5 of its 10 minutes by AdamW on an
#   H200 and 9.1 on an H100, ~9.2-9.7 by Muon on H100s
# the connector at 1e-4, not the small recipe's 1e-3: its matrices' fan-ins (2,304 channels of two ViT blocks, 3,072
# in the projector) are ~9x the small connector's, and an AdamW step moves a matrix's output by about lr x fan-in.
# One H200 run at 1e-4 (2026-12-01, at 378 px): the image tokens came apart sooner (mean cosine 0.78 at step 60
# against 0.945 at 1e-3) and the images were worth 0.35 of validation loss against 0.165
lr_connector, lr_vit, lr_llm = 1e-4, 0.0, 5e-4
# the LLM's and connector's matrices by Muon, as the CPU demo's joint stage (config/demo_joint.py: 0.005 with AdamW at
# 5e-4 for the rest) and the small GPU recipe's (config/demo_gpu_joint.py), set here too: this preset's rate was
# measured on its own. Two H100 runs (2026-12-07): test counting 0.690
# and 0.670, pointing F1 0.712 and 0.718, kind questions 0.57 and 0.45, against 0.605-0.630, 0.40-0.47 and 0.42 in
# four runs by AdamW alone (BENCHMARKS.md "The full recipe's joint stage by Muon", "The full recipe by Muon again");
# Muon's orthogonalising adds ~0.04 s a step
muon_lr = 0.005
eval_every = 440  # two validations with answers (each ~5 s of the 0.6B model generating)
cuda_graph = False  # eagerly, not config/demo_gpu_joint.py's CUDA graphs: they keep a memory pool of the size of a
#   step's activations beside the eager warm-up of each new batch layout, and on an 80 GB H100 (2026-12-07) the pool
#   held 44.6 GiB after the first layout, so the second layout's warm-up ran out of memory (the eager step peaks at
#   ~50 GiB). A step of ~0.3 s is the GPU's own work: the host's launches that graphs save hide behind it
compile_blocks = True  # each block compiled alone (model.compile_each_block): 12-15 s to compile, then ~0.30 s a step
#   (the whole model as one graph: 153 s to compile, then 0.32-0.53 s)
# the CPU demo's token loss (config/demo_joint.py) off, as this recipe was measured: inherited untried, on one H200
# (2026-12-04, BENCHMARKS.md "Both GPU recipes on the code of 2026-12-04") the recipe with it counted 0.520 and
# pointed at F1 0.232, against 0.615 / 0.408 without it (and with stage 1's earlier schedule). The 0.6B LLM's image
# tokens never learned to name their shapes (token loss ~8 at step 620, the answers' 0.56): at weight 1 its gradient
# outweighed the answers'
token_loss = 0.0
save_every = 0  # a resumable checkpoint of 1B parameters with their AdamW state is 12 GB
log_every = 20
