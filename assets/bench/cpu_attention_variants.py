"""The CPU demo's LLM attention at its joint rows' shape (8 rows of 448 tokens, 4 heads of 32, 2 key/value heads):
which mask, head split or written-out form would make a joint step cheaper on this CPU? Forward and backward, float32
(what vision.attend runs under CPU autocast), the median of 15 calls after 3. BENCHMARKS.md "The crops' overlap
margins" holds a run's numbers.

    python assets/bench/cpu_attention_variants.py
"""
import time

import torch
import torch.nn.functional as F

B, T, IMAGE_TOKENS = 8, 448, 100  # a demo row's image tokens come first and see each other both ways (Molmo2's mask)


def molmo_mask():
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    mask[:IMAGE_TOKENS, :IMAGE_TOKENS] = True
    return mask


def written_out(q, k, v, mask):
    """The attention as matmuls in the inputs' dtype and a float32 softmax."""
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).to(q.dtype) @ v


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def causal(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def median_ms(fn, heads, kv_heads, head_dim, dtype=torch.float32, mask=None, calls=15):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, head_dim, generator=gen, dtype=dtype, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    times = []
    for i in range(calls + 3):
        t0 = time.perf_counter()
        fn(q, k, v, mask).float().sum().backward()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[calls // 2]


def main():
    mask = molmo_mask()
    rows = [("SDPA, Molmo2's mask (as trained)", sdpa, (4, 2, 32), torch.float32),
            ("SDPA, is_causal (no image block)", causal, (4, 2, 32), torch.float32),
            ("SDPA, Molmo2's mask, 2 heads of 64, 1 kv head", sdpa, (2, 1, 64), torch.float32),
            ("SDPA, Molmo2's mask, 2 heads of 64, 2 kv heads", sdpa, (2, 2, 64), torch.float32),
            ("written out, float32", written_out, (4, 2, 32), torch.float32),
            ("written out, bf16 matmuls", written_out, (4, 2, 32), torch.bfloat16),
            ("written out, bf16, torch.compile", torch.compile(written_out), (4, 2, 32), torch.bfloat16)]
    print(f"attention forward + backward, {B} rows of {T} tokens, {torch.get_num_threads()} threads, ms (median)")
    for name, fn, shape, dtype in rows:
        print(f"{name:50s} {median_ms(fn, *shape, dtype=dtype, mask=mask):7.1f}")


if __name__ == "__main__":
    main()
