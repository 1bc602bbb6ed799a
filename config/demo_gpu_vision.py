# The GPU demo's stage 1 (python demo.py --recipe=gpu), on top of config/demo_vision.py: twice the images a step
# and 2.7x the steps (one H200: 1.3 min, with workers making the crops ahead; BENCHMARKS.md "Recipes that learn").
batch_size = 64
max_steps = 800
eval_every = 400
save_every = 400
log_every = 100
loader_workers = 8
