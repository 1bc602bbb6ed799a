# The GPU demo's align stage (python demo.py --recipe=gpu): config/demo_align.py's short stage as it is. On a GPU
# the loader's workers and the batch thread come on by themselves (loader_workers=-1: every core but two).
