# The GPU demo's joint stage (python demo.py --recipe=gpu), on top of config/demo_joint.py: 64 rows of 512 tokens a
# step at twice the CPU demo's learning rates, with the CPU demo's styles, captions included, on the GPU recipe's
# world of 60,000 training images (demo.py). The ViT stays frozen, as on the CPU: from the two-part stage 1 (kinds of
# shape named 0.86), one H200 (2026-11-30) counted 0.750 with F1 0.770 frozen and 0.705 / 0.807 with the ViT learning
# at 2e-4, one run each (within the ~0.09 that counting moved between two runs of one recipe), at 0.103 s a step
# against 0.114 and 1.8 GiB against 2.5. From the one-part stage 1 before it, learning at 2e-4 had beaten 16 rows a
# step at the CPU's rates and a frozen ViT (0.47 against 0.36), and a norm after the projector made both worse
# (BENCHMARKS.md "Recipes that learn to point", "Stage 1" and "The GPU demo"). Without the captions and the position
# bins, 2,000 steps overfit a world of 10,000 images. 4,500 steps (~57-65 ms each on one H200), with stage 1's world
# part at 2,000: the whole demo as one command took 8.5 min and counted 0.835 with F1 0.858, against 9.8 min and
# 0.820 / 0.831 at 3,000 (stage 1 at 2,400) and 8.3 min and 0.810 / 0.804 at 3,500 (BENCHMARKS.md "The GPU demo at
# 4,500 joint steps"). With the batches made in a forked process (~40-45 ms a step) 5,500 steps fit the same
# minutes: 8.8 min, counting 0.880, F1 0.851; in a world of 60,000 images 9.6 min, 0.840 / 0.914 (BENCHMARKS.md
# "Batches made in a forked process"). With stage 1's batches made faster, 6,000 steps in the world of 60,000 (until
# 2026-12-04): 8.0 min, counting 0.865, F1 0.897, the validation loss still falling (BENCHMARKS.md "Stage 1's step,
# made and launched"). From the ViT of stage 1 with each batch trained four steps (kinds 0.966): 0.920 / 0.914 in
# 9.5 min and 0.915 / 0.907 in 8.9 min (BENCHMARKS.md "Data echoing"). The CPU recipe's token loss, inherited untried,
# counted 0.895 and 0.880 (F1 0.908 / 0.933); without it the step runs as CUDA graphs (30 ms against ~44), so 8,000
# steps fit the minutes of 6,000: 0.910 / 0.936 in 8.7 min and 0.895 / 0.907, validation loss 0.195 / 0.193 against
# 0.214 (BENCHMARKS.md "The small recipe without the token loss, as graphs, 8,000 joint steps").
batch_size = 64
max_seq_len = 512
max_steps = 8000
token_loss = 0.0  # config/demo_joint.py's token loss is for the CPU's fewer steps; off, the step can be a CUDA graph
cuda_graph = True  # the step replayed as CUDA graphs of a few padded batch layouts (train_joint.py): the host's
#   ~1,500 kernel launches a step were most of its time
key_blocks, join_rows = False, False  # config/demo_joint.py's exact CPU savings turn the graphs off, and the joined
#   row of 64 examples (~25,000 tokens) makes a dense mask of ~600 MB that the key blocks read on the host: one H200
#   took 0.45 s a step with both, against 0.036 s as graphs without (BENCHMARKS.md "The CPU savings on a GPU")
lr_connector, lr_vit, lr_llm = 1e-3, 0.0, 1e-3  # lr 0 freezes the ViT. Half the 2e-3 of every run above, as the
#   CPU recipe halved its own: in the world with 2 more questions an image (demo.py's EXTRA_QUERIES) the one command
#   counted 0.930 / F1 0.930 at 1e-3 against 0.915 / 0.946 at 2e-3, the same stage 1 (one H200, one run each, within
#   a run's ~0.02; BENCHMARKS.md "Two more questions an image in the GPU recipe's world")
muon_lr = 0.005  # the LLM's and connector's matrices by Muon (AdamW at lr_llm / lr_connector for the rest), the
#   CPU and full recipes' rate: two H100 runs (2026-12-07) counted 0.965 and 0.975 at pointing F1 0.982 and 0.989,
#   the images worth 1.34 and 1.31 of validation loss, against 0.930-0.980 / 0.930-0.970 and ~1.0 in ten runs by
#   AdamW alone (BENCHMARKS.md "The full recipe by Muon again", "Muon in the small GPU recipe, a second run"). Its
#   matrices are 256 wide, so orthogonalising them costs the step little
vit_feature_cache = 0.0  # the CPU demo's cache of the ViT's features is for a CPU (train_joint.py)
eval_every = 500
eval_answers = 100
eval_batches = 2
save_every = 1000
log_every = 100
