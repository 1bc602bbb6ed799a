"""
How fast TrainLoader makes training steps in the training process (reading records, decoding and cutting the
images into crops, formatting, packing, collating). Nothing trains: this is the data side of a step alone, to
set against a whole step's time (BENCHMARKS.md, 'Does the model learn to see?').

    python tools/bench_loader.py                                       # the small preset's crops, 16 rows a step
    python tools/bench_loader.py --crop_size=378 --max_seq_len=2048 --batch_size=8     # the full preset's
    python tools/bench_loader.py --workers=8                           # examples made by 8 worker processes
    python tools/bench_loader.py --workers=2 --prefilled=True          # this process's side alone

Needs the synthetic world (python prepare_data.py --dataset=synthetic --out=data). Wall-clock time, one process.
"""

import os
import sys
import time

# run as python tools/bench_loader.py: the project's modules are in the folder above
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configurator import configure  # noqa: E402
from training import TrainLoader  # noqa: E402

# -- knobs (override with --key=value) -------------------------------------------------------------------------
steps = 30  # timed steps, after 3 warm-up steps
data_dir = "data"
batch_size = 16
max_seq_len = 512
max_crops = 4
crop_size = 112  # the small preset's; the full preset's is 378
styles = ("point_count", "pointing", "short_answer", "long_caption")
workers = 0  # TrainLoader's worker processes (train_*.py --loader_workers); 0 = formatting in this process
prefilled = False  # with workers: let them make every example of the timed steps first, then time this
#   process's side alone (packing and collating): what the loader costs when the workers keep up
# ----------------------------------------------------------------------------------------------------------------


def steps_per_second(knobs):
    crop = knobs["crop_size"]
    loader = TrainLoader(data_dir=knobs["data_dir"], mixture={"image": (1.0, ["synth_image"])}, split="train",
                         batch_size=knobs["batch_size"], max_seq_len=knobs["max_seq_len"], max_crops=knobs["max_crops"],
                         max_row_crops=16, max_video_frames=8, crop_size=crop, patch_size=14,
                         overlap_margins=(2, 2) if crop < 378 else (4, 4), prefix_mode="sft", weighting="sft", seed=0,
                         styles=knobs["styles"], workers=knobs["workers"])
    for _ in range(3):
        loader.next_step()
    if knobs["prefilled"]:
        if not knobs["workers"]:
            raise SystemExit("bench_loader: prefilled=True needs workers > 0")
        prefetch = loader.packers[0].items
        prefetch.depth = 3 * knobs["batch_size"] * knobs["steps"]  # more examples than the timed steps take
        loader.next_step()  # tops the read-ahead up to depth
        while not all(chunk.done() for _, _, (chunk, _) in prefetch.queue):
            time.sleep(0.1)
        prefetch.depth = 0  # no more read-ahead: the workers stay idle while the steps are timed
    start = time.perf_counter()
    tokens = 0
    for _ in range(knobs["steps"]):
        tokens += int((loader.next_step()[0]["example_ids"] >= 0).sum())
    elapsed = time.perf_counter() - start
    loader.close()
    return knobs["steps"] / elapsed, tokens / elapsed


def main(knobs):
    """knobs: configure's dict of this module's knobs after the command line."""
    print(f"{knobs['batch_size']} rows of {knobs['max_seq_len']} tokens a step, crops of {knobs['crop_size']} px, "
          f"up to {knobs['max_crops']} crops an image, {knobs['workers']} worker process(es)"
          + (", examples made beforehand" if knobs["prefilled"] else ""))
    rate, tok_rate = steps_per_second(knobs)
    print(f"{rate:.2f} steps/s ({1000 / rate:.0f} ms a step), {tok_rate:,.0f} real tokens/s")


if __name__ == "__main__":
    main(configure(globals()))
