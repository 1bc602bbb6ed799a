"""
GraphedStep's two ways to hold gradients, checked against each other on a CUDA GPU (issue 16): the default, where
every replay zeroes each parameter's .grad in place and the backward adds into it, and fresh_grads=True, where the
captured backward writes each gradient whole into memory of the graph's own and each graph keeps its own set.
0 + g is g exactly in float32, so both must give the same losses, gradient norms and weights to the bit, over steps
that alternate between two batch layouts (two graphs, each replayed after the other has run).

    python assets/bench/graph_grads_check.py                      # the tiny preset, ~1 min with its start
    python assets/bench/graph_grads_check.py --preset=small --steps=6
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import model as nano  # noqa: E402
from training import MODEL_INPUTS, GraphedStep, build_optimizer, pad_media  # noqa: E402



def batches(cfg, seed):
    """Two collated batches of another layout each: rows of one photo and a short caption, 2 rows and 3 rows."""
    rng = np.random.default_rng(seed)
    processor = data.Molmo2Processor(crop_size=cfg.vit.image_size, max_crops=2, patch_size=cfg.vit.patch_size,
                                     overlap_margins=(1, 1))

    def example():
        record = {"images": [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)], "annotations": [
            {"style": "long_caption", "messages": [{"role": "user", "content": "Describe this image."},
                                                   {"role": "assistant", "content": "a red cube left of a ball"}]}]}
        return data.format_example(record, processor)
    return [pad_media(data.collate([[example()] for _ in range(n)]), list_targets=True) for n in (2, 3)]


def run(cfg, host_batches, steps, fresh):
    torch.manual_seed(0)
    model = nano.Molmo2(cfg).cuda().train()
    optimizer = build_optimizer(model, {"connector": 1e-3, "vit": 1e-3, "llm": 1e-3}, {})

    def losses(b):
        with model.fixed_shape_batches():
            loss_sum, _ = model(**{k: b[k] for k in MODEL_INPUTS if k in b}, targets=b["targets"],
                                loss_weights=b["loss_weights"], response_mask=b["targets"] >= 0,
                                target_positions=b.get("target_positions"))
        return {"loss_sum": loss_sum}
    graphed = GraphedStep(model, lambda b: b, lambda parts: parts["loss_sum"], 1.0, torch.bfloat16, forward=losses,
                          fresh_grads=fresh, print_fn=lambda *a: None)
    seen = []
    for step in range(steps):
        parts, norm = graphed.step(host_batches[step % 2])
        seen.append((parts["loss_sum"].item(), norm.item()))
        optimizer.step()
    torch.cuda.synchronize()
    assert graphed.replays == steps and len(graphed.graphs) == 2 and not graphed.eager_only, \
        (graphed.replays, len(graphed.graphs), graphed.eager_only)
    return seen, {n: p.detach().clone() for n, p in model.named_parameters()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("graph_grads_check: needs a CUDA GPU (CUDA graphs)")
    cfg = nano.Molmo2Config.preset(args.preset)
    host = batches(cfg, 0)
    zeroed, w_zeroed = run(cfg, host, args.steps, fresh=False)
    fresh, w_fresh = run(cfg, host, args.steps, fresh=True)
    for step, (a, b) in enumerate(zip(zeroed, fresh)):
        print(f"step {step}: loss / grad norm zeroed {a[0]:.6f} / {a[1]:.6f}, fresh {b[0]:.6f} / {b[1]:.6f}")
    differing = [n for n in w_zeroed if not torch.equal(w_zeroed[n], w_fresh[n])]
    same = zeroed == fresh and not differing
    print(f"{args.preset}, {args.steps} steps over 2 layouts: losses and norms "
          f"{'equal' if zeroed == fresh else 'DIFFER'}; weights {len(w_zeroed) - len(differing)} of {len(w_zeroed)} "
          f"equal to the bit{'' if not differing else f', differing: {differing[:4]}'}")
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
