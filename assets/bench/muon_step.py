"""The optimizer's step for the full preset's joint stage, by Muon and by AdamW alone (BENCHMARKS.md "The full
recipe's joint stage by Muon"): the demo's full model (the nanomolmo2 preset, its ViT frozen as the recipe freezes
it, the LLM and connector training), gradients of random values, `training.build_optimizer` as train_joint.py calls
it with config/demo_full_joint.py's rates, muon_lr 0.005 against 0. Wall ms a step and the GPU's busy ms a step
(torch.profiler), median of `steps`; the difference between the two is host time the GPU waits on.

    python assets/bench/muon_step.py
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

import training  # noqa: E402
from clock import median_ms  # noqa: E402 (assets/bench/clock.py)
from configurator import configure  # noqa: E402

steps = 10
configure(globals())


def main():
    dev = torch.device("cuda")
    model = training.build_model("scratch", "nanomolmo2").to(dev)
    lrs = {"connector": 1e-4, "vit": 0.0, "llm": 5e-4}
    warmups = {"connector": 0, "vit": 0, "llm": 0}
    print(f"# assets/bench/muon_step.py on {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    for muon_lr in (0.005, 0.0):
        opt = training.build_optimizer(model, lrs, warmups, muon_lr=muon_lr, muon_dtype=torch.bfloat16)
        params = [p for g in opt.param_groups for p in g["params"]]
        gen = torch.Generator(device=dev).manual_seed(0)
        for p in params:
            p.grad = torch.randn(p.shape, device=dev, generator=gen) * 1e-3
        wall = median_ms(opt.step, calls=steps, warmup=2)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                opt.step()
            torch.cuda.synchronize()
        busy = sum(e.self_device_time_total for e in prof.key_averages()) / 3e3
        n = sum(p.numel() for p in params)
        print(f"muon_lr {muon_lr}: {n / 1e6:.0f}M parameters in the optimizer, {wall:.1f} ms a step, the GPU busy "
              f"{busy:.1f} ms of it", flush=True)
        del opt
        for p in params:
            p.grad = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
