"""Each SDPA backend's attention gradients against float32 arithmetic (BENCHMARKS.md "FlashAttention 4 behind SDPA",
issue 16): q, k, v and the output's gradient drawn in bf16 at the ViT's shape (20 crops x 16 heads x 729 patches)
for head dimensions 72 (SigLIP2 so400m's), 80 and 128; the output and dq, dk, dv of cuDNN's, flash's and the
memory-efficient kernels, each as its largest |error| over the largest |float32 value| of the math backend run on
the same inputs cast up (the oracle). Then FlashAttention 4 is made SDPA's flash backend
(torch.nn.attention.activate_flash_attention_impl; the flash-attn-4 package must be importable) and head dimensions
72 and 128 are checked the same way. bf16 rounds to 2^-8 = 3.9e-3 of a value, so errors of a few 1e-3 are bf16's;
an error near 1 is a wrong result.

    python assets/bench/attention_gradients.py
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, activate_flash_attention_impl, sdpa_kernel

dev = "cuda"


def check(d, backends):
    """One draw of q, k, v and the output's gradient at head dimension d; a line per backend: its errors."""
    q, k, v = (torch.randn(20, 16, 729, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    g = torch.randn(20, 16, 729, d, device=dev, dtype=torch.bfloat16)
    res = {}
    for name, b in (("math32", SDPBackend.MATH),) + backends:
        qq, kk, vv = ((t.float() if name == "math32" else t).detach().requires_grad_() for t in (q, k, v))
        with sdpa_kernel([b]):
            o = F.scaled_dot_product_attention(qq, kk, vv)
        o.backward(g.float() if name == "math32" else g)
        res[name] = [o.float(), qq.grad.float(), kk.grad.float(), vv.grad.float()]
    ref = res.pop("math32")
    for name, r in res.items():
        errors = (((a - b).abs().max() / b.abs().max()).item() for a, b in zip(r, ref))
        print(d, name, " ".join(f"{n} {e:.1e}" for n, e in zip("o q k v".split(), errors)), flush=True)


torch.manual_seed(0)
for d in (72, 80, 128):
    check(d, (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
              ("efficient", SDPBackend.EFFICIENT_ATTENTION)))
try:
    activate_flash_attention_impl("FA4")
except ImportError as e:  # PyTorch's own backends are checked above; FA4 is a package of its own
    raise SystemExit(f"FA4 not checked: {e} (pip install flash-attn-4)")
print("FA4 active")
for d in (72, 128):
    check(d, (("fa4", SDPBackend.FLASH_ATTENTION),))
