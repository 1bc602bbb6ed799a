"""training.GraphedStep on a GPU, when the warm-up before a second batch layout's capture runs out of memory: the
graphs go and the run goes on eagerly (BENCHMARKS.md "The full recipe on an 80 GB H100"). A stack of wide Linears
whose activations are most of its memory; the process's GPU memory capped (torch.cuda.set_per_process_memory_fraction)
so that the eager step fits but the first layout's graph pool beside the second layout's eager warm-up does not, as
for the full preset's joint stage on an 80 GB card. Prints each step's loss against the same step run eagerly on a
copy of the model, the memory the graphs' private pools still reserve and hold live before each step (once the
graphs are let go, nothing should be left there: cuBLAS's workspace for the capture's stream was, until
GraphedStep cleared it), and what GraphedStep said. One GPU:

    python assets/bench/graph_oom_fallback.py
"""

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

import training  # noqa: E402

WIDTH, DEPTH, ROWS = 4096, 8, 32768
dev = torch.device("cuda")
torch.manual_seed(0)
net = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)]).to(dev)
ref = copy.deepcopy(net)
gen = torch.Generator(device=dev).manual_seed(0)
batches = [torch.randn(rows, WIDTH, device=dev, generator=gen).cpu() for rows in (ROWS - 8, ROWS, ROWS - 8)]


def loss_of(model, x):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(x).float().square().mean()


def eager_loss(x):
    with torch.no_grad():
        return loss_of(ref, x.to(dev))


def eager_peak(x):
    """The GPU memory an eager step of the reference model adds at its peak, in bytes."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss_of(ref, x.to(dev)).backward()
    ref.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.empty_cache()  # nothing cached beside the graphs' pool, so the cap below is what is left
    return peak


grads = sum(p.numel() * 4 for p in net.parameters())  # one set of float32 gradients
params = 2 * grads  # the two models' weights
peak = eager_peak(batches[1])
said = []
step = training.GraphedStep(net, prepare=lambda b: b, loss_of=lambda p: p["loss"], grad_clip=1e9, dtype=torch.bfloat16,
                            print_fn=said.append, fresh_grads=True,
                            forward=lambda b: {"loss": net(b["x"]).float().square().mean()})
total = torch.cuda.get_device_properties(dev).total_memory
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: weights {params / 2**30:.1f} GiB (two copies), "
      f"an eager step's peak {peak / 2**30:.1f} GiB more", flush=True)


def private_pools():
    """MiB reserved and MiB live in the CUDA graphs' private memory pools, from the allocator's snapshot."""
    segments = [s for s in torch.cuda.memory_snapshot() if tuple(s.get("segment_pool_id", (0, 0))) != (0, 0)]
    return sum(s["total_size"] for s in segments) >> 20, sum(s["allocated_size"] for s in segments) >> 20


for i, x in enumerate(batches):
    print("before step %d: the graphs' pools reserve %d MiB, %d MiB of it live" % (i, *private_pools()), flush=True)
    if i == 1:  # after the first capture: room for the weights, a gradient set and one eager step with some slack,
        #   not for the graph's pool (~one step's activations and a gradient set) beside a warm-up
        torch.cuda.empty_cache()
        cap = params + grads + peak * 1.3
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
        print(f"memory capped at {cap / 2**30:.1f} GiB; reserved now {torch.cuda.memory_reserved() / 2**30:.1f}",
              flush=True)
    losses, _ = step.step({"x": x})
    want = eager_loss(x)
    print(f"step {i} ({x.shape[0]} rows): loss {losses['loss'].item():.6f}, eagerly on the copy {want.item():.6f}; "
          f"replays {step.replays}, eager steps {step.eager_steps}, graphs {len(step.graphs)}", flush=True)
print("GraphedStep said:", *said, sep="\n  ")
