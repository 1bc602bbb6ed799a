"""The ViT's Linears with bias, compiled, two ways (BENCHMARKS.md "The attention as its arithmetic, a newer cuDNN,
and GraphedStep's fallback on a GPU", issue 16): the bias in cuBLAS's epilogue (addmm, as inductor lowers
F.linear(x, w, b)), or the product alone and the bias added in the pointwise kernel that adds the output to the
float32 residual stream. inductor's max-autotune timings (2026-12-06) had cuBLAS's addmm of 14,580 x 1,152 by
1,152 x 1,152 at 0.115 ms against 0.060 for the same product without bias. Each of the ViT's four shapes at
tools/bench.py's 14,580 patch rows (q, k, v stacked; the attention's output; the MLP's two), bf16 operands, a float32
residual; forward / forward+backward ms, median of 30, and how far the two outputs lie apart over the largest value
(the unfused product is rounded to bf16 before the bias is added: about one bf16 ulp, 3.9e-3).

    python assets/bench/vit_bias_addmm.py
"""

import time

import torch
import torch.nn.functional as F

from clock import median_ms  # assets/bench/clock.py

ROWS = 14580  # 20 crops of 729 patches


def epilogue(x, w, b, residual):
    return residual + F.linear(x, w, b).float()


def pointwise(x, w, b, residual):
    return residual + (F.linear(x, w).float() + b.float())


def main():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    print(f"# assets/bench/vit_bias_addmm.py on {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    for k, n in ((1152, 3456), (1152, 1152), (1152, 4304), (4304, 1152)):
        x = torch.randn(ROWS, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(n, k, device=dev) * k ** -0.5).to(torch.bfloat16).requires_grad_()
        b = torch.randn(n, device=dev, dtype=torch.bfloat16, requires_grad=True)
        residual = torch.randn(ROWS, n, device=dev, requires_grad=True)
        grad = torch.randn(ROWS, n, device=dev)
        cells, outs = [], []
        for name, way in (("bias in the epilogue", epilogue), ("bias in the pointwise kernel", pointwise)):
            compiled = torch.compile(way)
            with torch.no_grad():
                forward = median_ms(lambda: compiled(x, w, b, residual), calls=30, warmup=5)

            def forward_backward():
                x.grad = w.grad = b.grad = residual.grad = None
                compiled(x, w, b, residual).backward(grad)
            cells.append(f"{name} {forward:.3f} / {median_ms(forward_backward, calls=30, warmup=5):.3f}")
            outs.append(compiled(x, w, b, residual).detach())
        apart = ((outs[0] - outs[1]).abs().max() / outs[0].abs().max()).item()
        print(f"{ROWS}x{k} @ {k}x{n}: " + ", ".join(cells) + f"; apart {apart:.1e}", flush=True)


if __name__ == "__main__":
    main()
