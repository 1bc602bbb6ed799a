"""The backward of the train step's three gathers, two ways (issue 16; BENCHMARKS.md "The step's gathers through
index_select"): a step's autograd graph held three IndexBackward0 nodes, which a GPU runs as PyTorch's sort-based
`index_put_(accumulate=True)` (`indexing_backward_kernel`, ~1.1 ms of the full preset's graphed step). Each is
timed here forward and backward on tools/bench.py's batch (the full preset, 4 photos), float32 as in the step,
as written before (`x[idx]`) and through `index_select` (vision.take_rows, as now), whose backward is `index_add_`
(atomic adds on a GPU):

- windows: the connector's `features[pooled_patches_idx.clamp(min=0)]`, features (crops x patches, 2 x 1,152);
  its valid indices are unique
- tokens: add_vision_features' `features[k]`, k (rows, tokens), every text token repeating the index of the patch
  before it (its gradient zero there, through torch.where): many duplicates
- targets: the loss's `h[has_target]`, h (rows, tokens, 1,024), by a bool mask

Each case also says whether the two ways' gradients are equal bit for bit (they should be: at most one nonzero
term reaches a row). Mean ms a call over `steps` calls after 3 (tools/bench.py's measure). Runs on a CPU too (the
equality; its times say nothing of a GPU's).

    python assets/bench/gather_backward.py
"""

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, ROOT)
sys.argv = [sys.argv[0], "--hf=False"]  # bench's knobs, read when it is imported

import bench  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import model as nano  # noqa: E402
from vision import take_rows  # noqa: E402

steps = 20


def case(name, source, index, gather_index, gather_take, dev):
    """Time both gathers of `source` forward and backward (a fixed random output gradient); compare gradients."""
    source = source.detach().requires_grad_()
    out = gather_index(source, index)
    grad_out = torch.randn(out.shape, device=dev, generator=torch.Generator(dev).manual_seed(1))
    grads, times = [], []
    for gather in (gather_index, gather_take):
        def step():
            source.grad = None
            gather(source, index).backward(grad_out)
        times.append(bench.measure(step, dev, n_steps=steps, n_warmup=3)[0] * 1e3)
        grads.append(source.grad.clone())
    same = torch.equal(grads[0], grads[1])
    print(f"| {name} | {tuple(source.shape)} by {tuple(index.shape)} | {times[0]:.3f} | {times[1]:.3f} | "
          f"{'yes' if same else 'no: ' + format((grads[0] - grads[1]).abs().max().item(), '.1e')} |", flush=True)


def main():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = nano.Molmo2Config.preset("nanomolmo2")
    batch = data.collate([[ex] for ex in bench.photo_examples(cfg, 4, np.random.default_rng(0))])
    gen = torch.Generator().manual_seed(0)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"# assets/bench/gather_backward.py on {card}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
          f"float32, mean of {steps}, forward + backward ms")
    print("\n| gather | source by index | x[idx] | index_select (take_rows) | same gradients |\n|---|---|---:|---:|---|")

    idx = batch["image_token_pooling"].to(dev)
    n_patches = batch["pixel_values"].shape[0] * batch["pixel_values"].shape[1]
    width = cfg.vit.hidden_size * len(cfg.connector.vit_layers)
    features = torch.randn(n_patches, width, generator=gen).to(dev)
    valid = (idx >= 0)[..., None].float()
    case("windows", features, idx.clamp(min=0), lambda x, i: x[i] * valid,
         lambda x, i: take_rows(x, i) * valid, dev)

    is_patch = (batch["input_ids"] == cfg.image_patch_id).to(dev)
    k = (is_patch.flatten().cumsum(0) - 1).clamp(min=0).view_as(is_patch)
    pooled = torch.randn(int(is_patch.sum()), cfg.llm.hidden_size, generator=gen).to(dev)
    case("tokens", pooled, k, lambda x, i: torch.where(is_patch[..., None], x[i], 0.0),
         lambda x, i: torch.where(is_patch[..., None], take_rows(x, i), 0.0), dev)

    has_target = (batch["targets"] >= 0).to(dev)
    h = torch.randn(*has_target.shape, cfg.llm.hidden_size, generator=gen).to(dev)
    case("targets", h, has_target, lambda x, m: x[m],
         lambda x, m: take_rows(x.flatten(0, 1), m.flatten().nonzero().squeeze(1)), dev)


if __name__ == "__main__":
    main()
