"""Can the small preset's ViT, from scratch, learn the kind of one shape at all, and at which learning rate? Images of
the demo world's renderer with a single solid shape (random kind, colour and place on a plain background), the global
112-px crop the processor makes, the ViT's last block mean-pooled into a linear head, AdamW, batch 32; accuracy on 256
held-out images every 100 steps. BENCHMARKS.md "Stage 1 names each token's shape" holds what it printed.

    python assets/bench/kind_sanity.py [--radius=0.12] [--lr=3e-4] [--steps=300] [--init=big_vision]

The knobs below move it one step at a time towards stage 1's task: the world's textures and backgrounds, the head
reading only the pooled token that holds the shape's centre, and other shapes in the image:

    python assets/bench/kind_sanity.py --radius=0.09 --init=big_vision --readout=token --distractors=3
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
beta2 = 0.999  # AdamW's second-moment decay (torch's default; big_vision's SigLIP recipes use 0.95)
warmup = 0  # steps of linear learning-rate warmup from 0
weight_decay = 0.01  # AdamW's (torch's default)
batch_size = 32
texture = "solid"  # solid | any: each shape solid, striped or outlined, as the world draws them
background = "plain"  # plain: light grey | world: the world's 4 colours x 3 patterns (plain, gradient, grid)
distractors = 0  # other shapes in the image (random kinds and colours, each in a token cell of its own); with them the
#   head must name the first shape's kind, so use readout=token
readout = "mean"  # mean: the head reads the mean of all 64 patches | token: only the 2x2-patch window (a pooled token,
#   as the connector and stage 1 make them) that holds the shape's centre, as stage 1's scene loss reads it
init = "ours"  # ours: SigLIP2.init_weights (std 0.02, as GPT) | big_vision: SigLIP2.init_big_vision (SigLIP's own
#   code's: Xavier-uniform matrices, a LeCun-normal patch embedding, position embeddings of std 1 / sqrt(width))
configure(globals())
for name, value, allowed in [("texture", texture, ("solid", "any")), ("background", background, ("plain", "world"))]:
    if value not in allowed:
        raise SystemExit(f"kind_sanity: {name}={value!r}: expected one of {allowed}")
if readout not in ("mean", "token"):
    raise SystemExit(f"kind_sanity: readout={readout!r}: expected 'mean' or 'token'")
if init not in ("ours", "big_vision"):
    raise SystemExit(f"kind_sanity: init={init!r}: expected 'ours' or 'big_vision'")

processor = data.Molmo2Processor(max_crops=4, crop_size=112, patch_size=14, overlap_margins=(2, 2))


def images(rng, n):
    """-> (n, 64, 588) global crops, (n,) kind indices, (n,) the pooled token (of 4 x 4) holding the centre."""
    crops, kinds, cells = [], [], []
    for _ in range(n):
        kind = rng.randrange(len(prepare_data.SHAPE_KINDS))
        shapes = []
        for k, cell in enumerate(rng.sample(range(16), 1 + distractors) if distractors else [None]):
            shape = {"kind": prepare_data.SHAPE_KINDS[kind] if k == 0 else rng.choice(prepare_data.SHAPE_KINDS),
                     "colour": rng.choice(list(prepare_data.SHAPE_COLOURS)), "size": "large", "radius": radius,
                     "texture": rng.choice(prepare_data.SHAPE_TEXTURES) if texture == "any" else "solid"}
            if cell is None:
                shape["x"], shape["y"] = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75)
            else:  # centred in the middle half of the cell: no centre near its cell's edge
                shape["x"] = (cell % 4 + rng.uniform(0.25, 0.75)) / 4
                shape["y"] = (cell // 4 + rng.uniform(0.25, 0.75)) / 4
            shapes.append(shape)
        shape = shapes[0]
        shapes = shapes[1:] + shapes[:1]  # drawn last, on top: where shapes overlap, the named one is never covered
        plain = {"name": "light grey", "colour": [214, 214, 214], "pattern": "plain"}
        scene = {"background": prepare_data._background(rng) if background == "world" else plain, "shapes": shapes}
        crops.append(processor.image(prepare_data.render_scene(scene, 224)).patches[0])
        kinds.append(kind)
        cells.append(int(shape["y"] * 4) * 4 + int(shape["x"] * 4))
    return torch.stack(crops), torch.tensor(kinds), torch.tensor(cells)


def features(x, cells):
    """The features the head reads: (n, 128)."""
    out = vit(x, [last])[0]  # (n, 64, C): an 8 x 8 grid of patches
    if readout == "mean":
        return out.mean(1)
    windows = out.reshape(-1, 4, 2, 4, 2, out.shape[-1]).mean((2, 4)).reshape(-1, 16, out.shape[-1])  # (n, 16, C)
    return windows[torch.arange(len(cells)), cells]


torch.manual_seed(seed)
train_rng, held_out = random.Random(seed), images(random.Random(seed + 1), 256)
vit, head = SigLIP2(SigLIP2Config.preset("small")), nn.Linear(128, len(prepare_data.SHAPE_KINDS))
last = vit.config.num_hidden_layers - 1
if init == "big_vision":
    vit.init_big_vision()
optimizer = torch.optim.AdamW(list(vit.parameters()) + list(head.parameters()), lr=lr, betas=(0.9, beta2),
                              weight_decay=weight_decay)
for step in range(steps + 1):
    if step % 100 == 0:
        with torch.no_grad():
            said = head(features(held_out[0], held_out[2])).argmax(-1)
        print(f"step {step:4d} | held-out kind accuracy {(said == held_out[1]).float().mean():.3f} (chance 0.25)",
              flush=True)
    if step == steps:
        break
    for group in optimizer.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
    x, y, c = images(train_rng, batch_size)
    loss = F.cross_entropy(head(features(x, c)), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
