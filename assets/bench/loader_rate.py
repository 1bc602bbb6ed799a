"""How fast the GPU demo's joint stage gets its batches, with no model at all (issue 16: a trainer that keeps the GPU
busy). Its step as CUDA graphs takes ~28-31 ms where the GPU computes ~13, and train_joint.py's summary says the loop
waited ~16 ms a step for its batches: is the batch process the bottleneck, and which part of it?

The loader as train_joint.py builds it from config/demo_joint.py + config/demo_gpu_joint.py (64 rows of 512 tokens,
the small preset's 112-px crops, fixed shapes for the graphs), ms a step over `steps` steps after `warm`:

    example      one example made in this process (TrainLoader._example, ms an example over `steps` examples
                 after `warm`): what each of the workers spends on each
    in-process   TrainLoader.next_step() in this process, its `workers` making the examples: the batch process's own
                 work (packing, collating, padding the media, taking the workers' results), without the socket; this
                 process keeps the memory it frees as the batch process does (keep_memory)
    steps-ahead  training.StepsAhead(process=True) as the trainer uses it: what a training loop whose step took no
                 time would wait for
    to-device    the same, each batch also copied to the GPU and made into the model's batch (training.batch_to)

plus the CPU time a step of the process making the batches (its threads, not the workers': this one in-process,
StepsAhead's batch process otherwise), and a cProfile of the in-process loader (by own time)
in out/loader_rate/profile.txt. `--shared_pixels=False`, `--keep_memory=False` and `--memo_tokenizer=False` put
back how the batches were made before 2026-12-06's changes (pixels through the workers' pipes; freed memory handed
back to the kernel; every text encoded afresh).

    python assets/bench/loader_rate.py --data_dir=data/demo_gpu_60k
"""

import cProfile
import os
import pstats
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import model as nano  # noqa: E402
import training  # noqa: E402
from configurator import configure  # noqa: E402
from training import StepsAhead, TrainLoader, batch_to, usable_cores  # noqa: E402

data_dir = "data/demo_gpu_60k"
configs = ("config/demo_joint.py", "config/demo_gpu_joint.py")  # the stage's settings, read as train_joint.py would
workers = -1  # -1: train_joint.py's default on a GPU, every usable core but two
shared_pixels = True  # False: the workers' pixels come back through their pipes (TrainLoader.shared_pixels)
keep_memory = True  # False: the batch process hands freed memory back as before (training.keep_freed_memory)
memo_tokenizer = True  # False: the workers encode every text afresh, as before 2026-12-06 (training.levels_processor)
steps = 60
warm = 5
rows = ("example", "in-process", "steps-ahead", "to-device")
out_dir = "out/loader_rate"
configure(globals())


def stage_settings():
    settings = {}
    for path in configs:
        with open(os.path.join(ROOT, path)) as f:
            exec(f.read(), {}, settings)  # the config files are Python assignments, as configurator runs them
    return settings


def make_loader(s, n_workers):
    TrainLoader.shared_pixels = shared_pixels
    cfg = nano.Molmo2Config.preset(s["model_preset"])
    loader = TrainLoader(data_dir=data_dir, mixture=s["data_mixture"], split="train", batch_size=s["batch_size"],
                       max_seq_len=s["max_seq_len"], max_crops=s["max_crops"], max_row_crops=16, max_video_frames=8,
                       crop_size=cfg.vit.image_size, patch_size=cfg.vit.patch_size,
                       overlap_margins=s["overlap_margins"], prefix_mode="sft", weighting=s["loss_weighting"], seed=1,
                       styles=s["styles"], workers=n_workers, fixed_shapes=True)
    if not memo_tokenizer:  # before the workers are forked from it
        loader.example_processor.tokenizer = loader.processor.tokenizer
    return loader


def timed(next_step, n, cpu_time=time.process_time):
    for _ in range(warm):
        next_step()
    start, cpu = time.perf_counter(), cpu_time()
    for _ in range(n):
        next_step()
    return (time.perf_counter() - start) / n * 1e3, (cpu_time() - cpu) / n * 1e3


def process_cpu(pid):
    """Seconds of CPU another process (all its threads) has used: Linux's /proc/PID/stat, user + system time."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    os.makedirs(out_dir, exist_ok=True)
    if keep_memory:  # this process then makes its batches as the batch process does
        training.keep_freed_memory()
    else:  # and the batch process (forked from this one) finds the function doing nothing
        training.keep_freed_memory = lambda: False
    s = stage_settings()
    n_workers = max(1, usable_cores() - 2) if workers < 0 else workers
    cuda = torch.cuda.is_available()
    card = f", {torch.cuda.get_device_name()}" if cuda else ""
    print(f"# assets/bench/loader_rate.py, {usable_cores()} usable cores, {n_workers} workers, torch "
          f"{torch.__version__}{card}; shared_pixels={shared_pixels}, keep_memory={keep_memory}, "
          f"memo_tokenizer={memo_tokenizer}; "
          f"{s['batch_size']} rows of {s['max_seq_len']} a step, {steps} steps timed after {warm}", flush=True)
    torch.set_num_threads(1)  # as the batch process runs it
    if "example" in rows:  # on one thread, as a worker makes it
        loader = make_loader(s, 0)
        keys = iter(loader.packers[0].items)
        ms, cpu = timed(lambda: loader._example(next(keys)), steps)
        print(f"example: {ms:.2f} ms an example, this process's CPU {cpu:.2f} ms", flush=True)
    if "in-process" in rows:
        loader = make_loader(s, n_workers)
        ms, cpu = timed(loader.next_step, steps)
        print(f"in-process: {ms:.1f} ms a step, this process's CPU {cpu:.1f} ms a step", flush=True)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(steps):
            loader.next_step()
        profile.disable()
        with open(os.path.join(out_dir, "profile.txt"), "w") as f:
            pstats.Stats(profile, stream=f).sort_stats("tottime").print_stats(40)
        loader.close()
    for row in ("steps-ahead", "to-device"):
        if row not in rows or (row == "to-device" and not cuda):
            continue
        ahead = StepsAhead(make_loader(s, n_workers), pin_device="cuda" if cuda else None, process=True)
        if row == "steps-ahead":
            step = ahead.next_step
        else:
            def step():
                batch = batch_to(ahead.next_step()[0], torch.device("cuda"))
                torch.cuda.synchronize()
                return batch
        step()  # the batch process started
        ms, cpu = timed(step, steps, lambda: process_cpu(ahead.child.pid))
        print(f"{row}: {ms:.1f} ms a step, the batch process's CPU {cpu:.1f} ms a step", flush=True)
        ahead.close()


if __name__ == "__main__":
    main()
