"""How fast a new ViT's features grow, and toward one direction, in stage 1's first AdamW steps; and which of its
parameters' changes do it. A preset's ViT at big_vision's start trains on stage 1's localisation and scene losses (as
train_vision.py with config/demo_vision.py, no warmup, a constant learning rate); after each step the features its
heads read (each token's window of patches averaged, the connector's blocks side by side) are measured on a fixed
batch of validation images: their std, their mean cosine, the norm of their mean token against the mean distance of a
token from it. Then the ViT is rebuilt from its start with only some of the trained tensors put back, to see which
changes the growth is made of (BENCHMARKS.md "The GPU demo at 3,000 joint steps").

    python assets/bench/vit_growth.py --model_preset=nanomolmo2 --lr=5e-4 --steps=6     # ~30 s a step, 2 cores
    python assets/bench/vit_growth.py --model_preset=small --lr=1e-3 --steps=6          # seconds
"""

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import data  # noqa: E402
import training  # noqa: E402
from configurator import configure  # noqa: E402
from model import Molmo2Config  # noqa: E402
from vision import SigLIP2, VisionPretrainer, window_means  # noqa: E402

model_preset = "nanomolmo2"  # nanomolmo2 | small
lr = 5e-4
steps = 6
batch_size = 2  # training images a step
val_images = 4  # the fixed batch the features are measured on
data_dir = "data/demo"
seed = 0
configure(globals())

torch.manual_seed(seed)
preset = Molmo2Config.preset(model_preset)
layers = list(preset.connector.vit_layers)
vit = SigLIP2(preset.vit)
vit.init_big_vision()
# stage 1's heads as config/demo_vision.py (+ demo_gpu_vision.py's scene loss) builds them: 2 text blocks, 96 caption
# tokens, 256-wide embeddings, the localisation loss with positions, the balanced scene loss
pretrainer = VisionPretrainer(vit, layers, 2, 96, 256, False, True, 16384, True, training.scene_classes(), True)
# the recipes' crops: the full preset's world images fit one 378-px crop; the small preset's demo cuts four
full = model_preset == "nanomolmo2"
processor = data.Molmo2Processor(max_crops=1 if full else 4, crop_size=preset.vit.image_size,
                                 patch_size=preset.vit.patch_size, overlap_margins=(4, 4) if full else (2, 2))
mixture = {"image": (1.0, ["synth_image"])}


def loader(split, n):
    return training.VisionLoader(data_dir, mixture, split, n, processor, 96, False, True, seed=seed, use_scene=True)


train = loader("train", batch_size)
val = training.vision_batch_to(loader("val", val_images).next_step()[0], torch.device("cpu"))
matrices = [p for n, p in pretrainer.named_parameters() if p.dim() >= 2 and n != "vit.positional_embedding"]
others = [p for n, p in pretrainer.named_parameters() if not (p.dim() >= 2 and n != "vit.positional_embedding")]
# AdamW with train_vision.py's betas and eps, decay 0.1 on every matrix but the position table (train_vision.py also
# spares the text tower's tables, and decays at 0.05: the ViT's first steps move alike, the numbers were taken so)
optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                              lr=lr, betas=(0.9, 0.95), eps=1e-6)
autocast = torch.autocast("cpu", torch.bfloat16)


def measure(model):
    with torch.no_grad(), autocast:
        f = window_means(model(val["patches"], layers), val["pooling"]).float()  # (tokens, width)
    std, cos = training.image_feature_stats(f)
    mean = f.mean(0)
    return (f"std {std:7.2f} | mean cosine {cos:.4f} | mean token's norm {mean.norm():8.1f} | "
            f"a token's distance from it {(f - mean).norm(dim=1).mean():7.1f}")


start = copy.deepcopy(vit.state_dict())
print(f"{model_preset} ViT, big_vision's start, lr {lr}, {batch_size} images a step")
print(f"{'start':34s} {measure(vit)}", flush=True)
for step in range(steps):
    batch = training.vision_batch_to(train.next_step()[0], torch.device("cpu"))
    with autocast:
        loss = sum(pretrainer(batch).values())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(pretrainer.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    print(f"{f'after step {step} (loss {loss.item():.2f})':34s} {measure(vit)}", flush=True)

trained = copy.deepcopy(vit.state_dict())
print("the start with only these trained tensors put back:")
for name, keep in [("biases", lambda k: k.endswith(".bias") and "layer_norm" not in k),
                   ("LayerNorms", lambda k: "layer_norm" in k),
                   ("o_proj and fc2 weights", lambda k: k.endswith(("o_proj.weight", "fc2.weight"))),
                   ("q, k, v and fc1 weights", lambda k: k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                                      "fc1.weight"))),
                   ("patch and position embeddings", lambda k: "embedding" in k)]:
    part = copy.deepcopy(vit)
    part.load_state_dict({k: trained[k] if keep(k) else start[k] for k in start})
    print(f"{name:34s} {measure(part)}", flush=True)
