"""The full preset's train-step matmuls one shape at a time, bf16 against float8 (vision.Float8Matmul, train_joint.py's
float8) and float8 scaled by rows (vision.Float8RowwiseMatmul, its float8_rowwise), forward and backward, on one GPU
(BENCHMARKS.md "Float8 matmuls"): the Linears of tools/bench.py's batch (the ViT's 20 crops x 729 patches = 14,580
tokens through 25 blocks, the LLM's 4 rows of 1,128 through 28, their stacked q/k/v and gate/up as vision.linears
runs them). Each shape as the step's compiled blocks would run it: a float32 weight, a bf16 input and output
gradient, under bf16 autocast; each way compiled alone (float8's scaling and casts, which inside a compiled block may
also fuse with their neighbours). Prints the median ms a shape (clock.median_ms) and the sum over the step's layers.

    python assets/bench/float8_matmuls.py
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from clock import median_ms  # noqa: E402
from vision import Float8Matmul, Float8RowwiseMatmul  # noqa: E402

# (name, tokens, in, out, layers): the step's Linears
SHAPES = [("vit qkv", 14580, 1152, 3456, 25), ("vit o", 14580, 1152, 1152, 25), ("vit fc1", 14580, 1152, 4304, 25),
          ("vit fc2", 14580, 4304, 1152, 25), ("llm qkv", 4512, 1024, 4096, 28), ("llm o", 4512, 2048, 1024, 28),
          ("llm gate,up", 4512, 1024, 6144, 28), ("llm down", 4512, 3072, 1024, 28)]


def main():
    dev = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    ways = {"bf16": F.linear, "float8": Float8Matmul.apply, "float8 rows": Float8RowwiseMatmul.apply}
    totals = dict.fromkeys(ways, 0.0)
    print("| shape | tokens x in -> out | layers | bf16 ms | float8 ms | float8 rows ms |\n"
          "|---|---|---:|---:|---:|---:|")
    for name, m, k, n, layers in SHAPES:
        x = torch.randn(m, k, device=dev, generator=gen, dtype=torch.bfloat16).requires_grad_()
        w = (torch.randn(n, k, device=dev, generator=gen) * k ** -0.5).requires_grad_()
        g = torch.randn(m, n, device=dev, generator=gen, dtype=torch.bfloat16)
        ms = {}
        torch._dynamo.reset()  # each shape compiled afresh: one function recompiled per shape hits dynamo's limit
        for how, matmul in ways.items():
            def step(matmul=matmul):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = matmul(x, w, None)
                gx, gw = torch.autograd.grad(y, (x, w), g)
                return gx, gw
            compiled = torch.compile(step, dynamic=False)
            ms[how] = median_ms(compiled)
            totals[how] += ms[how] * layers
        print(f"| {name} | {m} x {k} -> {n} | {layers} | {ms['bf16']:.3f} | {ms['float8']:.3f} | "
              f"{ms['float8 rows']:.3f} |", flush=True)
    print("\nover the step's layers: " + ", ".join(f"{how} {ms:.1f} ms" for how, ms in totals.items()), flush=True)


if __name__ == "__main__":
    main()
