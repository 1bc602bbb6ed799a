"""The training step's attention as its arithmetic, compiled, against SDPA's fused kernels (BENCHMARKS.md "The
attention as its arithmetic, a newer cuDNN, and GraphedStep's fallback on a GPU", issue 16).

At the shapes of tools/bench.py's train step the fused kernels SDPA picks (cuDNN's) spend 4-5x their forward in the
backward (assets/bench/train_attention.py). The sequences are short (729 patches a crop, 1,128 tokens a row), so a
layer's whole score matrix is small: 20 x 16 x 729^2 bf16 scores are 340 MB, 4 x 16 x 1,128^2 are 163 MB. Kept
from the forward, the backward would be three batched products and one fused pass over the scores, each near the
card's memory bandwidth, where a flash kernel recomputes the scores tile by tile. Were those passes at the card's
bandwidth, the arithmetic would beat cuDNN's backward; this script measures whether it does, forward and
forward+backward:

- "sdpa": F.scaled_dot_product_attention as the compiled blocks run it (SDPA picks the kernel), inside torch.compile;
- "math": SDPA's math backend with its products and softmax in bf16 (as vision.math_bf16), inside torch.compile, so
  that inductor fuses the scale, the mask and the softmax and their gradients;
- "written": q @ k^T, the mask, a float32 softmax rounded to bf16, @ v, written out and compiled;
- "kept": the same forward as an autograd.Function whose backward is the one above (dS from the kept probabilities
  and rowsum(dO * O)), grouped query heads folded into the rows so k and v are read once; "keys padded to 8" pads
  the keys (masked out) so each row of scores starts on a 16-byte boundary.

Each is checked against SDPA's math backend in float32 on float32 copies of the same inputs: the largest difference
of the output and of each gradient over the largest value (a bf16 ulp is 2^-8 = 3.9e-3 of a value; the ways that
round the scores to bf16 before the softmax lie ~3x further off than the fused kernels, which keep them in float32).
The mask is Molmo2's for tools/bench.py's rows (causal, the image tokens [1, 753) both ways). Median ms of `steps`
calls, and the peak memory a call adds above its inputs.

    python assets/bench/attention_math.py
"""

import functools
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from clock import median_ms  # noqa: E402 (assets/bench/clock.py)
from configurator import configure  # noqa: E402

steps = 20
tokens = 1128  # an LLM row of tools/bench.py's batch
image = (1, 753)  # its vision tokens' span [s, e)
configure(globals())


def sdpa(q, k, v, **kwargs):
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def written(q, k, v, attn_mask=None, enable_gqa=False):
    """softmax(q k^T / sqrt(d) where the mask allows, else -inf) v, the scores and probabilities in bf16 between the
    products, the softmax computed in float32."""
    if enable_gqa and k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    s = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def math(q, k, v, **kwargs):
    """SDPA's math backend; main() lets it keep bf16 products (torch.backends.cuda's switch, read while tracing)."""
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


class KeptProbabilities(torch.autograd.Function):
    """softmax(q k^T * scale, where mask) v whose backward reuses the probabilities kept from the forward: dP = dO v^T,
    dS = P (dP - rowsum(dO * O)) (rowsum(P dP) = rowsum(dO O), as flash kernels compute it), then dq = dS k * scale,
    dk = dS^T q * scale, dv = P^T dO: three batched products and one fused pass over the scores, where a flash
    kernel's backward recomputes the scores tile by tile. q (B, H, T, d), k and v (B, H, S, d), mask None or a bool
    (B, 1, T, S) that broadcasts over H."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        s = torch.matmul(q, k.transpose(-2, -1)).float() * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1).to(q.dtype)
        o = torch.matmul(p, v)
        ctx.save_for_backward(q, k, v, p, o)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, p, o = ctx.saved_tensors
        dp = torch.matmul(do, v.transpose(-2, -1))
        delta = (do.float() * o.float()).sum(-1, keepdim=True)
        ds = (p.float() * (dp.float() - delta) * ctx.scale).to(q.dtype)
        return torch.matmul(ds, k), torch.matmul(ds.transpose(-2, -1), q), torch.matmul(p.transpose(-2, -1), do), \
            None, None


def kept(q, k, v, attn_mask=None, enable_gqa=False, pad=1):
    """KeptProbabilities with grouped heads folded into the rows (q's g heads a key/value head as g x T rows of one,
    so k and v are read once, not repeated) and the keys padded to a multiple of `pad` (masked out), which keeps the
    scores' rows aligned to 16 bytes for cuBLAS."""
    B, H, T, d = q.shape
    S, g = k.shape[-2], H // k.shape[1]
    mask = attn_mask  # (B, 1, T, S) or None
    if S % pad:
        extra = pad - S % pad
        k, v = (F.pad(t, (0, 0, 0, extra)) for t in (k, v))
        if mask is None:
            mask = torch.arange(S + extra, device=q.device) < S  # (S + extra,): broadcasts over every row
        else:
            mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], extra)], dim=-1)
    if g > 1:
        q = q.reshape(B, H // g, g * T, d)
        if mask is not None and mask.dim() == 4:  # each query row's mask for each of its g heads' rows
            mask = mask.unsqueeze(2).expand(B, 1, g, T, mask.shape[-1]).reshape(B, 1, g * T, mask.shape[-1])
    o = KeptProbabilities.apply(q, k, v, mask, d ** -0.5)
    return o.reshape(B, H, T, d)


WAYS = {"sdpa": torch.compile(sdpa), "math": torch.compile(math), "written": torch.compile(written),
        "kept": torch.compile(kept), "kept, keys padded to 8": torch.compile(functools.partial(kept, pad=8))}


def run(way, q, k, v, grad, **kwargs):
    """The output and q, k, v's gradients for the output's gradient `grad`, in float32."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = way(q, k, v, **kwargs)
    o.backward(grad)
    return [o.detach().float()] + [t.grad.float() for t in (q, k, v)]


def case(q, k, v, **kwargs):
    grad = torch.randn_like(q)
    with sdpa_kernel([SDPBackend.MATH]):
        f32 = {key: (t.float() if torch.is_tensor(t) and t.is_floating_point() else t) for key, t in kwargs.items()}
        want = run(sdpa, q.float(), k.float(), v.float(), grad.float(), **f32)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = {}
    for name, way in WAYS.items():
        got = run(way, q, k, v, grad, **kwargs)
        errors = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)]
        with torch.no_grad():
            fwd = median_ms(lambda: way(q, k, v, **kwargs), steps)

        def forward_backward():
            q.grad = k.grad = v.grad = None
            way(q, k, v, **kwargs).backward(grad)
        both = median_ms(forward_backward, steps)
        (torch.cuda.synchronize() if torch.cuda.is_available() else None)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        out[name] = (fwd, both, peak, errors)
    return out


def main():
    warnings.simplefilter("ignore", UserWarning)
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    bf = dict(device=dev, dtype=torch.bfloat16)
    rows = [("ViT: 20 crops x 16 heads x 729 x 72, no mask",
             case(*(torch.randn(20, 16, 729, 72, **bf) for _ in range(3))))]
    T = tokens
    molmo = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    molmo[image[0]:image[1], image[0]:image[1]] = True
    q = torch.randn(4, 16, T, 128, **bf)
    k, v = (torch.randn(4, 8, T, 128, **bf) for _ in range(2))
    rows.append((f"LLM: 4 rows x 16 heads (8 kv) x {T} x 128, Molmo2's mask",
                 case(q, k, v, attn_mask=molmo[None, None].expand(4, 1, T, T), enable_gqa=True)))
    print(f"# assets/bench/attention_math.py on {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; bf16, median of {steps}\n")
    print("| case | way | forward ms | forward+backward ms | peak MiB | o, dq, dk, dv against float32 |")
    print("|---|---|---:|---:|---:|---|")
    for what, results in rows:
        for name, (fwd, both, peak, errors) in results.items():
            print(f"| {what} | {name} | {fwd:.3f} | {both:.3f} | {peak:.0f} | "
                  + ", ".join(f"{e:.1e}" for e in errors) + " |")


if __name__ == "__main__":
    main()
