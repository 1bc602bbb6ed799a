"""Two costs of the CPU demo's steps, on this CPU: F.scaled_dot_product_attention by backend (flash, math) and dtype
(float32, bf16) at stage 1's ViT crops and at the joint stage's rows, forward and forward + backward; and one
MuonAdamW step over the joint stage's trainable weights with its Newton-Schulz iteration in float32 and in bf16
(training.orthogonalised's dtype), alternated twice. BENCHMARKS.md "Stage 1's share on a half-speed CPU; Muon's
iteration in bf16" holds what it printed.

    python assets/bench/cpu_costs.py [out/demo/align]     # after make demo (or its align stage)
"""

import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from training import build_model, build_optimizer  # noqa: E402


def timed_ms(fn, n=10):
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def attention():
    causal = torch.ones(448, 448, dtype=torch.bool).tril().expand(8, 1, 448, 448).contiguous()
    cases = (("stage 1's ViT crops", (160, 4, 64, 32), {}),  # 32 images of 5 crops, 8 x 8 patches, 4 heads of 32
             ("the joint rows, causal mask", (8, 4, 448, 32), {"attn_mask": causal}))  # 8 rows of 448 tokens
    for what, shape, kwargs in cases:
        for dtype in (torch.float32, torch.bfloat16):
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
                q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))

                def forward():
                    with sdpa_kernel(backend), torch.no_grad():
                        F.scaled_dot_product_attention(q, k, v, **kwargs)

                def both():
                    with sdpa_kernel(backend):
                        F.scaled_dot_product_attention(q, k, v, **kwargs).sum().backward()
                print(f"attention, {what} {' x '.join(map(str, shape))}, {dtype}, {backend.name}: forward "
                      f"{timed_ms(forward):.1f} ms, forward and backward {timed_ms(both):.1f} ms", flush=True)


def muon(align):
    model = build_model(align, "small")
    lrs, warmups = {"connector": 1e-3, "vit": 0.0, "llm": 1e-3}, {"connector": 50, "vit": 50, "llm": 50}
    for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):
        optimizer = build_optimizer(model, lrs, warmups, weight_decay=0.1, muon_lr=0.01, muon_dtype=dtype)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.randn_like(p) * 1e-3
        print(f"MuonAdamW step, the iteration in {dtype}: {timed_ms(optimizer.step, 30):.1f} ms", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    attention()
    muon(*(sys.argv[1:] or ["out/demo/align"]))
