# The GPU demo's align stage (python demo.py --recipe=gpu), on top of config/demo_align.py: the same short stage,
# with workers making the examples ahead.
loader_workers = 4
