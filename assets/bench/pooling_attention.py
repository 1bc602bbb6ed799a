"""The connector's pooling attention three ways (BENCHMARKS.md "The pooling attention written out"): one query (a
window's mean) over its K patches in float32, through F.scaled_dot_product_attention with a bool mask (as the
connector did before), through SDPA's math backend, and written out as connector.PoolingAttention does now. Random
windows; forward and forward+backward, median ms of 20, and each one's largest difference from the written-out one.

    python assets/bench/pooling_attention.py            # a GPU: 16 heads of 72 (the full preset), inputs in bf16
    python assets/bench/pooling_attention.py --device=cpu   # 4 heads of 32 (the small preset), float32
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from clock import median_ms  # noqa: E402 (assets/bench/clock.py)
from configurator import configure  # noqa: E402

device = "auto"  # auto | cuda | cpu
steps = 20
configure(globals())

dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
heads, head_dim = (16, 72) if dev.type == "cuda" else (4, 32)
windows = (11_000, 40_000) if dev.type == "cuda" else (4_000,)
dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32


def through_sdpa(q, k, v, valid):
    """q (M, 1, h, d), k and v (M, K, h, d), valid (M, K) -> (M, h, d)."""
    y = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                       v.float().transpose(1, 2), attn_mask=valid[:, None, None, :])
    return y.transpose(1, 2).squeeze(1)


def through_sdpa_math(q, k, v, valid):
    with sdpa_kernel([SDPBackend.MATH]):
        return through_sdpa(q, k, v, valid)


def written_out(q, k, v, valid):
    scores = (q.float() * k.float()).sum(-1) * head_dim ** -0.5  # (M, K, h)
    scores = scores.masked_fill(~valid[:, :, None], float("-inf"))
    return (scores.softmax(1)[..., None] * v.float()).sum(1)  # (M, h, d)


generator = torch.Generator(device=dev).manual_seed(0)
print(f"{dev.type}, {heads} heads of {head_dim}, inputs in {dtype}, torch {torch.__version__}")
for M in windows:
    for K in (4, 9):
        q, k, v = (torch.randn(M, n, heads, head_dim, device=dev, dtype=dtype, generator=generator,
                               requires_grad=True) for n in (1, K, K))
        valid = torch.rand(M, K, device=dev, generator=generator) > 0.2
        valid[:, 0] = True  # every window has a patch, as the connector's windows do
        reference = written_out(q, k, v, valid)
        for name, fn in (("SDPA", through_sdpa), ("SDPA, math backend", through_sdpa_math),
                         ("written out", written_out)):
            diff = (fn(q, k, v, valid) - reference).abs().max().item()
            forward = median_ms(lambda: fn(q, k, v, valid), steps)
            both = median_ms(lambda: fn(q, k, v, valid).sum().backward(), steps)
            print(f"{M:6d} windows x {K} | {name:18s} | forward {forward:7.3f} ms | forward+backward {both:7.3f} ms"
                  f" | largest difference {diff:.1e}", flush=True)
