"""The fused output head (model.linear_cross_entropy) on the bench's loss rows, its softmax step eager and compiled
(BENCHMARKS.md "The output head's softmax compiled"): 1,440 loss rows (four ~360-token captions) of width 1,024
against Qwen3's 151,936-row head, bf16 rows and a float32 head as under autocast, z-loss 1e-4; forward+backward,
median ms of 20 (CUDA events), the peak memory above the inputs, and each variant's largest difference from the
first row's (loss, dh, dW), relative to the largest value.

    python assets/bench/head_softmax.py          # a GPU
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

import model as nano  # noqa: E402
from configurator import configure  # noqa: E402

rows = 1440
width = 1024
vocab = 151936
steps = 20
configure(globals())

if not torch.cuda.is_available():
    raise SystemExit("head_softmax.py times the GPU path (the compiled softmax runs on CUDA only)")
dev = torch.device("cuda")
torch.manual_seed(0)
h = torch.randn(rows, width, device=dev, dtype=torch.bfloat16, requires_grad=True)
head = (torch.randn(vocab, width, device=dev) * 0.02).requires_grad_()
targets, weights = torch.randint(0, vocab, (rows,), device=dev), torch.rand(rows, device=dev)
compiled_for = nano.softmax_grad_for


def eager_for(logits):
    return nano.head_softmax_grad


def run(chunk):
    loss, _ = nano.linear_cross_entropy(h, head, targets, weights, z_loss=1e-4, chunk_size=chunk)
    loss.backward()
    return loss.detach()


print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}: {rows} rows x {width} against {vocab:,}")
print("| softmax step | chunk rows | fwd+bwd ms | first call s | peak above inputs GiB | max rel diff (loss, dh, dW) |")
print("|---|---:|---:|---:|---:|---|")
first_result = None
default_rows = nano.loss_chunk_rows(vocab, on_gpu=True)
for label, chooser, chunk in (("eager", eager_for, 1024), ("compiled", compiled_for, 1024),
                              ("compiled", compiled_for, default_rows), ("eager", eager_for, default_rows)):
    nano.softmax_grad_for = chooser
    torch.cuda.synchronize()
    start = time.perf_counter()
    loss = run(chunk)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    result = (loss, h.grad.clone(), head.grad.clone())
    times = []
    for _ in range(steps):
        h.grad = head.grad = None
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run(chunk)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    h.grad = head.grad = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run(chunk)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    h.grad = head.grad = None
    first_result = first_result or result
    diff = ", ".join(f"{((a.float() - b.float()).abs().max() / b.float().abs().max()).item():.1e}"
                     for a, b in zip(result, first_result))
    print(f"| {label} | {chunk:,} | {statistics.median(times):.2f} | {first:.1f} | {peak:.2f} | {diff} |", flush=True)
nano.softmax_grad_for = compiled_for
