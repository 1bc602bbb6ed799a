"""
What one decode step's attention costs, backend by backend, on a GPU: Qwen3-0.6B's shapes (16 query heads on 8
key/value heads of 128, the query heads grouped onto their key/value head as model.Attention does in decoding), one
new token against a static KV cache under a key mask, bf16, replayed from a CUDA graph as DecodeStep replays it.

    python assets/bench/decode_attention.py [--cache=1024] [--batches="(1, 16)"]

Prints microseconds a call per SDPA backend (PyTorch's own choice, cuDNN, memory-efficient, math; and, for reference,
the arithmetic written out under torch.compile) and each one's largest difference from the math backend in float32.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from configurator import configure  # noqa: E402

# -- knobs (override with --key=value) -------------------------------------------------------------------------
cache = 1024  # KV cache slots (600 of them real)
batches = (1, 16)
reps = 200  # calls captured in one CUDA graph
configure(globals())
# ----------------------------------------------------------------------------------------------------------------

BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}


def graph_time(fn):
    """Microseconds a call of fn, reps calls captured in one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up: plans, workspaces
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / (5 * reps) * 1e6


torch.manual_seed(0)
dev = torch.device("cuda")
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cache {cache} slots, 600 filled, bf16")
print("| batch | backend | us a call | max abs diff vs math in float32 |")
print("|---|---|---|---|")
for B in batches:
    q = torch.randn(B, 8, 2, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, 8, cache, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, 8, cache, 128, device=dev, dtype=torch.bfloat16)
    mask = torch.zeros(B, 1, 1, cache, dtype=torch.bool, device=dev)
    mask[..., :600] = True
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    for name, backend in BACKENDS.items():
        ctx = sdpa_kernel(backend) if backend is not None else torch.autocast("cuda", enabled=False)
        try:
            with ctx:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                us = graph_time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
            diff = (out.float() - ref).abs().max().item()
            print(f"| {B} | {name} | {us:.1f} | {diff:.2e} |", flush=True)
        except RuntimeError as e:  # a backend that does not take these inputs
            print(f"| {B} | {name} | not available: {str(e).splitlines()[0][:80]} | |", flush=True)
    # a reference, not a backend: the same arithmetic written out and fused by torch.compile
    written = torch.compile(lambda q, k, v, m: (q @ k.transpose(-1, -2) * 128 ** -0.5).masked_fill(~m, float("-inf"))
                            .softmax(-1) @ v, fullgraph=True, dynamic=False)
    out = written(q, k, v, mask)
    us = graph_time(lambda: written(q, k, v, mask))
    print(f"| {B} | written out, torch.compile | {us:.1f} | {(out.float() - ref).abs().max().item():.2e} |", flush=True)
