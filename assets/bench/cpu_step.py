"""Where a CPU step of the demo's joint stage goes: matmul speed in float32 and bf16 at the demo LLM's MLP shapes, the
attention (F.scaled_dot_product_attention) at its rows' shape by backend and mask, and under bf16 autocast against
vision.attend (float32 on a CPU), then a torch.profiler table of 16 steps of `train_joint.py config/demo_joint.py`
from the demo's align checkpoint, in bf16 where the CPU has bf16 matrix instructions (cpu_autocast="auto", as the
demo runs). BENCHMARKS.md "The CPU demo" holds what it printed.

    python assets/bench/cpu_step.py [out/demo/align]     # after make demo (or its align stage)
"""

import os
import runpy
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)


def timed(fn, n=10):
    for _ in range(2):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main(align="out/demo/align"):
    torch.manual_seed(0)
    rows, width, hidden = 16 * 368, 128, 512  # the demo's tokens a step; the small LLM's width and MLP width
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(rows, width, dtype=dtype), torch.randn(width, hidden, dtype=dtype)
        seconds = timed(lambda: a @ b, 50)
        gflops = 2 * rows * width * hidden / seconds / 1e9
        print(f"matmul {rows} x {width} by {width} x {hidden}, {dtype}: {gflops:.0f} GFLOP/s")
    B, H, L, D = 16, 4, 368, 32  # the demo's rows: 16 of 368 tokens, the small LLM's 4 heads of 32
    mask = torch.ones(L, L, dtype=torch.bool).tril().expand(B, 1, L, L).contiguous()
    for dtype in (torch.float32, torch.bfloat16):
        cases = ((SDPBackend.FLASH_ATTENTION, {"attn_mask": mask}), (SDPBackend.MATH, {"attn_mask": mask}),
                 (SDPBackend.FLASH_ATTENTION, {"is_causal": True}))
        for backend, kwargs in cases:
            q, k, v = (torch.randn(B, H, L, D, dtype=dtype, requires_grad=True) for _ in range(3))

            def step():
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, **kwargs).sum().backward()
            what = "a (B, 1, L, L) bool mask" if "attn_mask" in kwargs else "is_causal"
            print(f"attention {B} x {H} x {L} x {D}, {dtype}, {backend.name}, {what}: "
                  f"{timed(step) * 1e3:.1f} ms forward and backward")
    # under bf16 autocast (cpu_autocast="auto"): autocast's own bf16 kernel against vision.attend's float32, at the
    # LLM's rows and at stage 1's ViT crops (32 images of 5 crops, 8 x 8 patches, 4 heads of 32)
    from vision import attend
    for shape, kwargs in (((B, H, L, D), {"attn_mask": mask}), ((160, 4, 64, 32), {})):
        q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))
        for name, fn in (("F.scaled_dot_product_attention", F.scaled_dot_product_attention), ("vision.attend", attend)):
            def step():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = fn(q, k, v, **kwargs)
                out.float().sum().backward()
            print(f"attention {' x '.join(map(str, shape))} under bf16 autocast, {name}: "
                  f"{timed(step) * 1e3:.1f} ms forward and backward")
    from torch.profiler import ProfilerActivity, profile
    os.chdir(ROOT)
    sys.argv = ["train_joint.py", "config/demo_joint.py", f"--init_from={align}", "--out_dir=/tmp/cpu_step_profile",
                "--max_steps=16", "--eval_every=0", "--save_every=0", "--resume=False", "--log_every=100"]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runpy.run_path("train_joint.py", run_name="__main__")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main(*sys.argv[1:])
