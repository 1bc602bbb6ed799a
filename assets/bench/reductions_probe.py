"""Which ops launch the graphed step's ~133 small aten reductions a step (`reduce_kernel`, ~3.3 ms of the full
preset's graphed step on an H100: BENCHMARKS.md "cuBLASLt, inductor's coordinate-descent tuning, and the committed
step kernel by kernel"): the graphed step's own eager run (GraphedStep._run, the ops a replay holds) profiled with
the ops' input shapes, the aten ops that ran reductions on the GPU listed by their GPU time.

    python assets/bench/reductions_probe.py
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, ROOT)
sys.argv = [sys.argv[0], "--hf=False", "--trainer=False"]  # bench's knobs, read when it is imported

import bench  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import data  # noqa: E402
import model as nano  # noqa: E402
from training import build_optimizer  # noqa: E402


def main():
    dev = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    cfg = nano.Molmo2Config.preset("nanomolmo2")
    cpu_batch = data.collate([[ex] for ex in bench.photo_examples(cfg, 4, np.random.default_rng(0))])
    model = bench.build_ours(dev).train()
    nano.compile_each_block(model)
    optimizer = build_optimizer(model, {"connector": 1e-5, "vit": 1e-5, "llm": 1e-5}, {})
    step = bench.graphed_step(model, optimizer, cpu_batch, dev, fresh_grads=True)
    graphed, padded = step.graphed, step.batch

    def eager():
        for _, p in graphed.named:
            p.grad = None
        graphed._run(padded)
        optimizer.step()

    for _ in range(3):
        eager()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        eager()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages(group_by_input_shape=True)
            if e.self_device_time_total > 0 and any(w in e.key for w in ("sum", "norm", "mean", "max", "min", "reduce",
                                                                        "logsumexp", "var", "std", "prod", "any"))]
    rows.sort(key=lambda e: -e.self_device_time_total)
    print(f"{'op':<40} {'GPU us':>9} {'calls':>6}  input shapes")
    for e in rows[:60]:
        print(f"{e.key[:40]:<40} {e.self_device_time_total:9.0f} {e.count:6d}  {str(e.input_shapes)[:150]}")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=70))


if __name__ == "__main__":
    main()
