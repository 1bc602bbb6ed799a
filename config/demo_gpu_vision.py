# The GPU demo's stage 1 (python demo.py --recipe=gpu), on top of config/demo_vision.py: twice the images a step and
# 5.3x the steps (102,400 images: counting is what the ViT learns last, and what the joint stage can count is
# bounded by it; BENCHMARKS.md "The CPU demo's levers"), with workers making the crops ahead.
batch_size = 64
max_steps = 1600
eval_every = 800
save_every = 800
log_every = 100
loader_workers = 8
