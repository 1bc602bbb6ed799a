"""vision.window_means (its CPU path, F.embedding_bag) against vision.gathered_window_means (the (M, K, D) windows),
at the CPU demo's stage-1 shapes: 160 crops (32 images of 5) of 64 patches, two blocks of 128 features, 1,664
windows of 4 patches (some of 3). Forward and backward timed apart, medians of 30 after 5 warm-up calls, on this
process's threads; the outputs and gradients compared. BENCHMARKS.md "Each record to one rank".
    .venv/bin/python assets/bench/window_means.py"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import training  # noqa: E402
import vision  # noqa: E402


def timed(fn, blocks, pooling, n=30):
    forward, backward = [], []
    for i in range(n + 5):
        for b in blocks:
            b.grad = None
        t0 = time.perf_counter()
        out = fn(blocks, pooling)
        t1 = time.perf_counter()
        out.square().sum().backward()
        t2 = time.perf_counter()
        if i >= 5:
            forward.append(t1 - t0)
            backward.append(t2 - t1)
    return statistics.median(forward) * 1e3, statistics.median(backward) * 1e3, out.detach(), [b.grad for b in blocks]


training.keep_freed_memory()  # as the trainers run
gen = torch.Generator().manual_seed(0)
blocks = [torch.randn(160, 64, 128, generator=gen).requires_grad_() for _ in range(2)]
pooling = torch.randint(0, 160 * 64, (1664, 4), generator=gen)
pooling[::7, 3] = -1  # some windows at the edge of a crop hold 3 patches
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
results = {name: timed(fn, blocks, pooling) for name, fn in (("gathered", vision.gathered_window_means),
                                                          ("window_means", vision.window_means))}
for name, (f, b, _, _) in results.items():
    print(f"{name:13s} forward {f:5.2f} ms, backward {b:5.2f} ms, together {f + b:5.2f} ms")
(_, _, out_a, grad_a), (_, _, out_b, grad_b) = results.values()
print(f"largest difference: output {(out_a - out_b).abs().max().item():.2e}, "
      f"gradient {max((x - y).abs().max().item() for x, y in zip(grad_a, grad_b)):.2e} (float32)")
