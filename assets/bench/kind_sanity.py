"""Can the small preset's ViT, from scratch, learn the kind of one shape at all, and at which learning rate? Images of
the demo world's renderer with a single solid shape (random kind, colour and place on a plain background), the global
112-px crop the processor makes, the ViT's last block mean-pooled into a linear head, AdamW, batch 32; accuracy on 256
held-out images every 100 steps. BENCHMARKS.md "Stage 1 names each token's shape" holds what it printed.

    python assets/bench/kind_sanity.py [--radius=0.12] [--lr=3e-4] [--steps=300] [--init=big_vision]
"""

import os
import random
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import data  # noqa: E402
import prepare_data  # noqa: E402
from configurator import configure  # noqa: E402
from vision import SigLIP2, SigLIP2Config  # noqa: E402

radius = 0.12  # the shape's equal-area radius, a fraction of the 224-px image (the world's: 0.035-0.085)
lr = 3e-4
steps = 300
seed = 0
init = "ours"  # ours: SigLIP2.init_weights (std 0.02, as GPT) | big_vision: SigLIP2.init_big_vision (SigLIP's own
#   code's: Xavier-uniform matrices, a LeCun-normal patch embedding, position embeddings of std 1 / sqrt(width))
configure(globals())
if init not in ("ours", "big_vision"):
    raise SystemExit(f"kind_sanity: init={init!r}: expected 'ours' or 'big_vision'")

processor = data.Molmo2Processor(max_crops=4, crop_size=112, patch_size=14, overlap_margins=(2, 2))


def images(rng, n):
    """-> (n, 64, 588) global crops, (n,) kind indices."""
    crops, kinds = [], []
    for _ in range(n):
        kind = rng.randrange(len(prepare_data.SHAPE_KINDS))
        shape = {"kind": prepare_data.SHAPE_KINDS[kind], "colour": rng.choice(list(prepare_data.SHAPE_COLOURS)),
                 "size": "large", "radius": radius, "texture": "solid", "x": rng.uniform(0.25, 0.75),
                 "y": rng.uniform(0.25, 0.75)}
        scene = {"background": {"name": "light grey", "colour": [214, 214, 214], "pattern": "plain"}, "shapes": [shape]}
        crops.append(processor.image(prepare_data.render_scene(scene, 224)).patches[0])
        kinds.append(kind)
    return torch.stack(crops), torch.tensor(kinds)


torch.manual_seed(seed)
train_rng, held_out = random.Random(seed), images(random.Random(seed + 1), 256)
vit, head = SigLIP2(SigLIP2Config.preset("small")), nn.Linear(128, len(prepare_data.SHAPE_KINDS))
last = vit.config.num_hidden_layers - 1
if init == "big_vision":
    vit.init_big_vision()
optimizer = torch.optim.AdamW(list(vit.parameters()) + list(head.parameters()), lr=lr)
for step in range(steps + 1):
    if step % 100 == 0:
        with torch.no_grad():
            said = head(vit(held_out[0], [last])[0].mean(1)).argmax(-1)
        print(f"step {step:4d} | held-out kind accuracy {(said == held_out[1]).float().mean():.3f} (chance 0.25)",
              flush=True)
    if step == steps:
        break
    x, y = images(train_rng, 32)
    loss = F.cross_entropy(head(vit(x, [last])[0].mean(1)), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
