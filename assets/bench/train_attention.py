"""The training step's attention by SDPA backend (BENCHMARKS.md, issue 16): forward and forward+backward of
F.scaled_dot_product_attention at the shapes of tools/bench.py's train step (the full preset, 4 photos of 5 crops),
each backend forced in turn (sdpa_kernel), and the one SDPA picks itself. Median ms of `steps` calls, inputs in
bf16; a backend that cannot run a case says so.

- ViT: 20 crops x 16 heads x 729 patches x 72, no mask; also with the head dimension zero-padded to 80 and 128
  (the same result: zero columns add nothing to q.k, and the output's extra columns are dropped), since some
  kernels are tuned for those sizes only.
- LLM: 4 rows x 16 query heads (8 key/value heads) x 1,128 tokens x 128 (`tokens`), as in tools/bench.py's batch:
  causal through is_causal; causal as a dense bool mask; Molmo2's mask (causal, its image tokens bidirectional among
  themselves: `image`, the bench rows' span [1, 753), 752 vision tokens of the 1,128).
- LLM, three more ways to Molmo2's mask: the same mask as an additive bf16 one (0 / -inf), made once, as a model
  could once a step for its 28 layers (SDPA otherwise converts a boolean mask in every call); and two without a
  mask, exact where a row's image is one contiguous span [s, e) of vision tokens (a vision query sees every key
  before it and every vision key after it, all of them before e): is_causal attention for every query, then the
  span's rows again over the keys before e; and three calls over only the work the mask leaves (the rows before s
  causal, the span's rows over the keys before e, the rows after e causal over all keys, aligned lower right: through
  torch's causal_lower_right, or a mask of those rows alone). How far each lies from the dense mask's output and
  gradients is printed under the table.
- "flex": FlexAttention (torch.nn.attention.flex_attention, compiled) with a block mask made from the same mask,
  which skips the key blocks a query block never sees (not SDPA: a candidate for an optional path, issue 16).
- `--flash_impl=FA4`: SDPA's flash backend served by FlashAttention 4 (the `flash-attn-4` package, registered
  through torch.nn.attention.activate_flash_attention_impl), so the "flash" column is FA4's kernels; each case
  also prints how far FA4's output and gradients lie from cuDNN's.

    python assets/bench/train_attention.py
    python assets/bench/train_attention.py --flash_impl=FA4
"""

import contextlib
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
tokens = 1128  # an LLM row: tools/bench.py's batch has rows of 1,128 (a photo of 5 crops, a long caption)
image = (1, 753)  # its vision tokens' span [s, e): 752 of them, right after the row's first token
flash_impl = ""  # "" for torch's own flash kernels, "FA4" for FlashAttention 4's
flex = True  # False leaves FlexAttention's column out (it compiles for a minute)
configure(globals())

BACKENDS = {"picked": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "flex": "flex"}
if not flex:
    del BACKENDS["flex"]
FLEX = {}  # the compiled flex_attention, made once


def flex_attend(q, k, v, scale, attn_mask=None, is_causal=False, enable_gqa=False):
    """FlexAttention of one case: the mask (the same for every row and head here) as a block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if not FLEX:
        FLEX["fn"] = torch.compile(flex_attention)
    T, S = q.shape[-2], k.shape[-2]
    key = (id(attn_mask), is_causal, T, S)  # made once a case, as a model would once a step for all its layers
    if key not in FLEX:
        FLEX[key] = None
        if attn_mask is not None:
            dense = attn_mask[0, 0]
            FLEX[key] = create_block_mask(lambda b, h, qi, ki: dense[qi, ki], None, None, T, S, device=q.device)
        elif is_causal:
            FLEX[key] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, S, device=q.device)
    return FLEX["fn"](q, k, v, block_mask=FLEX[key], scale=scale, enable_gqa=enable_gqa)


def span_attention(q, k, v, span, **kwargs):
    """Molmo2's mask for one contiguous image span [s, e) of every row, with no mask: causal attention, its rows
    s..e-1 replaced by the same queries attending to keys 0..e-1 both ways."""
    s, e = span
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
    span_rows = F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], **kwargs)
    return torch.cat([out[:, :, :s], span_rows, out[:, :, e:]], dim=2)


def three_parts(q, k, v, span, after=None, **kwargs):
    """Molmo2's mask for one contiguous image span [s, e) of every row, as three calls over the work the mask leaves:
    rows before s causal among themselves, the span's rows over keys 0..e-1 both ways (no mask), and the rows after
    e causal over every key, aligned lower right (row e sees keys 0..e): through `after`, a small boolean mask of
    those rows alone (rows_after), or with None through torch's causal_lower_right, which only SDPA's flash backend
    runs and torch.compile cannot trace (it constructs a tensor subclass)."""
    from torch.nn.attention.bias import causal_lower_right
    s, e = span
    T, S = q.shape[2], k.shape[2]
    parts = []
    if s:  # (a span that starts its row leaves no rows before it)
        parts.append(F.scaled_dot_product_attention(q[:, :, :s], k[:, :, :s], v[:, :, :s], is_causal=True, **kwargs))
    parts.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], **kwargs))
    if e < T:  # (a span that ends its row leaves no rows after it)
        after = causal_lower_right(T - e, S) if after is None else after
        parts.append(F.scaled_dot_product_attention(q[:, :, e:], k, v, attn_mask=after, **kwargs))
    return torch.cat(parts, dim=2)


def rows_after(T, S, e, device):
    """three_parts' `after`: the mask of the T - e rows after the span over S keys, causal aligned lower right. Made
    once a layout, as the dense mask it replaces is made once a step, not again in each of the LLM's 28 layers."""
    return torch.ones(T - e, S, dtype=torch.bool, device=device).tril(diagonal=S - T + e)


def case(q, k, v, pad_to=None, span=None, split=span_attention, **kwargs):
    """(forward ms, forward+backward ms, output) for each backend of BACKENDS; span: split's (span_attention's or
    three_parts')."""
    d = q.shape[-1]
    if pad_to:
        q, k, v = (F.pad(t, (0, pad_to - d)) for t in (q, k, v))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    scale = d ** -0.5  # the unpadded dimension's scale
    results = {}
    for name, backend in BACKENDS.items():
        def attend():
            if backend == "flex":
                return flex_attend(q, k, v, scale, **kwargs)[..., :d]
            with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                if span is not None:
                    return split(q, k, v, span, scale=scale, **kwargs)[..., :d]
                return F.scaled_dot_product_attention(q, k, v, scale=scale, **kwargs)[..., :d]

        def forward_backward():
            attend().float().square().mean().backward()
        mask = kwargs.get("attn_mask")
        if backend == "flex" and (span is not None or (mask is not None and mask.dtype != torch.bool)):
            results[name] = "not a flex case"  # flex_attend reads a boolean mask
            continue
        try:
            with torch.no_grad():
                fwd = median_ms(attend, steps)
            results[name] = (fwd, median_ms(forward_backward, steps))
        except RuntimeError as e:
            results[name] = str(e).splitlines()[0][:60]
        torch.cuda.empty_cache()
    if flash_impl and isinstance(results.get("flash"), tuple):
        results["flash vs cuDNN"] = differences(q, k, v, d, kwargs, scale)
    return results


def outputs_and_grads(q, k, v, attend):
    """attend(q, k, v)'s output and the gradients of its mean square for q, k and v, in float32."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = attend(q, k, v)
    o.float().square().mean().backward()
    return [o.detach().float()] + [t.grad.float() for t in (q, k, v)]


def relative_errors(got, want):
    """The largest |got - want| of the output and of each input's gradient, over the largest |want| value."""
    rel = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)]
    return ", ".join(f"{n} {r:.1e}" for n, r in zip(("o", "dq", "dk", "dv"), rel))


def differences(q, k, v, d, kwargs, scale):
    """FlashAttention's output and gradients against cuDNN's (relative_errors)."""
    outs = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        with sdpa_kernel([backend]):
            outs[backend] = outputs_and_grads(
                q, k, v, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale, **kwargs)[..., :d])
    return relative_errors(outs[SDPBackend.FLASH_ATTENTION], outs[SDPBackend.CUDNN_ATTENTION])


def main():
    warnings.simplefilter("ignore", UserWarning)  # each backend that declines says why; the table says it once
    if flash_impl:
        from torch.nn.attention import activate_flash_attention_impl
        activate_flash_attention_impl(flash_impl)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    bf = dict(device=dev, dtype=torch.bfloat16)
    rows = []
    q, k, v = (torch.randn(20, 16, 729, 72, **bf) for _ in range(3))
    for pad in (None, 80, 128):
        rows.append((f"ViT, head dim 72{f' padded to {pad}' if pad else ''}", case(q, k, v, pad_to=pad)))
    T = tokens
    q = torch.randn(4, 16, T, 128, **bf)
    k, v = (torch.randn(4, 8, T, 128, **bf) for _ in range(2))
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    molmo = causal.clone()
    span = image
    molmo[span[0]:span[1], span[0]:span[1]] = True  # the image tokens see each other both ways
    rows.append(("LLM, is_causal", case(q, k, v, is_causal=True, enable_gqa=True)))
    rows.append(("LLM, causal as a bool mask", case(q, k, v, attn_mask=causal[None, None].expand(4, 1, T, T),
                                                   enable_gqa=True)))
    rows.append(("LLM, Molmo2's mask", case(q, k, v, attn_mask=molmo[None, None].expand(4, 1, T, T),
                                            enable_gqa=True)))
    additive = torch.zeros(T, T, **bf).masked_fill(~molmo, float("-inf"))
    rows.append(("LLM, Molmo2's mask, additive bf16", case(q, k, v, attn_mask=additive[None, None].expand(4, 1, T, T),
                                                           enable_gqa=True)))
    rows.append(("LLM, Molmo2's mask as is_causal + the image rows again", case(q, k, v, span=span, enable_gqa=True)))
    after = rows_after(T, T, span[1], dev)
    rows.append(("LLM, Molmo2's mask as three parts, causal_lower_right", case(q, k, v, span=span, split=three_parts,
                                                                               enable_gqa=True)))
    rows.append(("LLM, Molmo2's mask as three parts, the last rows' mask", case(
        q, k, v, span=span, split=functools.partial(three_parts, after=after), enable_gqa=True)))
    masked = outputs_and_grads(  # each way above against the boolean mask, SDPA picking the kernels
        q, k, v, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=molmo, enable_gqa=True))
    others = {"additive": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=additive, enable_gqa=True),
              "is_causal + the image rows": lambda q, k, v: span_attention(q, k, v, span, enable_gqa=True),
              "three parts": lambda q, k, v: three_parts(q, k, v, span, enable_gqa=True),
              "three parts, masked": lambda q, k, v: three_parts(q, k, v, span, after=after, enable_gqa=True)}
    notes = [f"{what} against the boolean mask (SDPA's pick): "
             f"{relative_errors(outputs_and_grads(q, k, v, attend), masked)}" for what, attend in others.items()]
    print(f"# assets/bench/train_attention.py on {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; bf16, median of {steps}: forward / forward+backward ms\n")
    columns = [f"flash ({flash_impl})" if b == "flash" and flash_impl else b for b in BACKENDS]
    columns += ["flash vs cuDNN"] if flash_impl else []
    print("| case | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for what, results in rows:
        cells = [f"{r[0]:.2f} / {r[1]:.2f}" if isinstance(r, tuple) else f"({r})" for r in results.values()]
        cells += [""] * (len(columns) - len(cells))
        print(f"| {what} | " + " | ".join(cells) + " |")
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
