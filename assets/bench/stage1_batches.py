"""How fast stage 1's batches are made, with no training: one example in this process, then whole steps of the GPU
recipe's stage 1 (128 images of the demo world, its crops and targets) from the loader's workers in this process,
and through StepsAhead (a thread, or a forked process: the GPU trainers' default), the way train_vision.py takes them.
BENCHMARKS.md "Stage 1's step, made and launched" holds what it printed on an H200 machine's 16 cores.

    python prepare_data.py --dataset=synthetic --out=data/demo_gpu --max_objects=5 --train_images=30000
    python assets/bench/stage1_batches.py [--data_dir=data/demo_gpu] [--workers=14] [--steps=40]

With a GPU the batches are page-locked for it, as in training; without one they are not. Last, the workers in this
process once more, timed inside: what an example costs in its worker beside the others (against one by one: the
cores' contention) and what collating costs this process, to say which of the two bounds a step.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import torch  # noqa: E402

import data  # noqa: E402
import training  # noqa: E402
from configurator import configure  # noqa: E402
from model import Molmo2Config  # noqa: E402

# -- knobs (override with --key=value) -------------------------------------------------------------------------
data_dir = "data/demo_gpu"
batch_size = 128  # config/demo_gpu_vision.py's
workers = 14  # loader_workers=-1 on a 16-core machine with one GPU
steps = 40  # timed steps of each way, after 5 untimed
examples = 300  # made one by one in this process first (the first 30 untimed)
shared_pixels = True  # False: the workers send their pixels back through their pipes (VisionLoader.shared_pixels)
configure(globals())
# ----------------------------------------------------------------------------------------------------------------

vit = Molmo2Config.preset("small").vit
processor = data.Molmo2Processor(max_crops=4, crop_size=vit.image_size, patch_size=vit.patch_size,
                                 overlap_margins=(2, 2))  # config/demo_vision.py's
pin = torch.device("cuda", 0) if torch.cuda.is_available() else None
training.VisionLoader.shared_pixels = shared_pixels


def loader(n_workers):
    return training.VisionLoader(data_dir=data_dir, mixture={"image": (1.0, ["synth_image"])}, split="train",
                                 batch_size=batch_size, processor=processor, text_max_len=96, use_sigmoid=False,
                                 use_loc=True, seed=0, use_scene=True, workers=n_workers)


def timed(name, steps_from):
    for _ in range(5):
        steps_from.next_step()
    start = time.time()
    for _ in range(steps):
        steps_from.next_step()
    print(f"{name}: {(time.time() - start) / steps * 1e3:.1f} ms a step of {batch_size}", flush=True)
    steps_from.close()


_making = training._vision_worker_example


def timed_example(key_and_slot):
    """In a worker (forked after breakdown() put this in its place): the example, its making's time riding on it."""
    start = time.perf_counter()
    ex, counted = _making(key_and_slot)
    if ex is not None:
        ex.bench_s = time.perf_counter() - start
    return ex, counted


def breakdown():
    """The workers in this process again, timed inside: each example's making in its worker (against one by one
    above: contention for the cores shows), and this process's collating, against the whole step."""
    made, collating = [], []
    collate = training.collate_vision

    def timed_collate(examples, *args):
        made.extend(getattr(ex, "bench_s", 0.0) for ex in examples)
        start = time.perf_counter()
        batch = collate(examples, *args)
        collating.append(time.perf_counter() - start)
        return batch

    training._vision_worker_example, training.collate_vision = timed_example, timed_collate
    try:
        steps_from = loader(workers)
        for _ in range(5):
            steps_from.next_step()
        made.clear(), collating.clear()
        start = time.time()
        for _ in range(steps):
            steps_from.next_step()
        step = (time.time() - start) / steps
        steps_from.close()
    finally:
        training._vision_worker_example, training.collate_vision = _making, collate
    per = sum(made) / len(made)
    print(f"{workers} workers, in this process, timed inside: {step * 1e3:.1f} ms a step; an example {per * 1e3:.2f} ms "
          f"in its worker ({per * batch_size / workers * 1e3:.1f} ms a step if the workers shared it evenly), "
          f"collating {sum(collating) / len(collating) * 1e3:.1f} ms", flush=True)


serial = loader(0)
keys = [next(serial.shards[0]) for _ in range(examples)]
for key in keys[:30]:
    serial.example(key)
start = time.time()
for key in keys[30:]:
    serial.example(key)
print(f"one by one: {(time.time() - start) / (examples - 30) * 1e3:.2f} ms an example", flush=True)
timed(f"{workers} workers, in this process", loader(workers))
timed(f"{workers} workers, StepsAhead thread", training.StepsAhead(loader(workers), pin_device=pin))
timed(f"{workers} workers, StepsAhead process", training.StepsAhead(loader(workers), pin_device=pin, process=True))
breakdown()
