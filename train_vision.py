"""
Stage 1: vision pretraining. The SigLIP2 ViT learns to see from image-text records, before any LLM reads it.

    python train_vision.py                                  # CPU or one GPU: the small preset's ViT, from scratch
    python train_vision.py --init_from=google/siglip2-so400m-patch14-384 --model_preset=nanomolmo2   # continue one
    torchrun --nproc_per_node=4 train_vision.py --batch_size=64
    then: python train_align.py --vit_from=out/vision  ->  python train_joint.py --init_from=out/align

Why a stage of its own: trained from scratch inside Molmo2, the ViT gets gradient only through a few answer
tokens read by an LLM that is itself untrained, so neither side can improve first (BENCHMARKS.md: such runs
never looked at their images). Here the ViT gets a dense signal of its own, and the later stages start from
features that already say what is where.

Design choices (after SigLIP2, which combines a sigmoid image-text loss with the LocCa decoder's dense losses):
- The ViT sees exactly what Molmo2 gives it: the processor's crops (a global view and overlapping tiles), and
  the features the connector will read (blocks config.connector.vit_layers, concatenated), mean-pooled over
  the same 2x2 windows as the connector's pooling. A small head maps each pooled token to an embedding.
- Sigmoid image-text loss (SigLIP): the mean of an image's tokens, projected, against a caption encoded by a
  small text tower (the ViT's own blocks, bidirectional, over Qwen3's token ids hashed into a small table);
  every (image, caption) pair of the micro-batch is a binary problem, logit = exp(t) * cos + b with a learned
  temperature t (from log 10) and bias b (from -10), as in the paper. Two images with the same caption text are
  both positives.
- Localisation loss (in the spirit of LocCa): for every pointed object label of an image ("red circles"), each
  pooled token says whether a point of that label lies in its cell, as a sigmoid of the cosine between the
  token's embedding and the label's text embedding (learned scale and bias); and where one does, the token
  predicts where in its cell. Points come from the <points> tags of any record's answers, so the synthetic
  world, PixMo-Points and CoSyn-Point feed it alike. A label is compared only with the tokens of its own image
  (another image may hold that label unannotated).
- Only single-image records with a caption or points train; others are skipped and counted.
- The heads and the text tower are thrown away: final/ holds the ViT alone, in transformers' SiglipVisionModel
  layout, and the validation line reads counts and points straight off the localisation head (no LLM).
The heads and losses are vision.py's VisionPretrainer; the examples and their targets are training.py's
VisionLoader.
"""

import collections
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch

import data
from configurator import configure
from eval import point_scores
from model import Molmo2Config, ready_for_compile, save_siglip
from sample import python_command
from training import (Dist, GraphedStep, MuonAdamW, StepBudget, StepProfiler, StepsAhead, VisionLoader, autocast_dtype,
                      eta_seconds, full_state_dicts, image_feature_stats, load_vit, lr_at, plot_vision_run,
                      resume_run, rng_state, save_checkpoint, scene_attributes, scene_classes, scene_hits,
                      seed_everything, step_autocast, stop_nonfinite, vision_batch_to, whole, wrap_model)
from vision import SigLIP2, VisionPretrainer

# -- knobs (override with config/*.py files and --key=value) -------------------------------------------------
out_dir = "out/vision"
init_from = "scratch"  # scratch (the ViT of model_preset) | a SigLIP checkpoint dir or hub id | a stage-1 out_dir
init_heads = False  # with init_from a stage-1 out_dir: its heads and text tower too (its ckpt.pt), not the ViT alone.
#   After the easy world, on this CPU's 300 world steps: kinds 0.34 against 0.35 with new heads (BENCHMARKS.md)
vit_init = "gpt"  # a ViT from scratch: gpt (every matrix at std 0.02, vision.py's default) | big_vision (SigLIP's own
#   code's: SigLIP2.init_big_vision). Alone, the small ViT told a 15-px shape's kind after 500 steps at lr 3e-4 at
#   0.81 / 0.56 / 0.82 over three seeds with big_vision, 0.54 / 0.57 / 0.61 with gpt; on this CPU's 300 demo steps it
#   did not help yet (read-out 0.328 / 0.580 against 0.328 / 0.656). BENCHMARKS.md "Stage 1 names each token's shape"
vit_position_std = 0.0  # a ViT from scratch: its position embeddings redrawn at this std (0: vit_init's own, 0.02 or
#   1 / sqrt(width)). Both starts make them small beside a patch's embedding (~1/20 of its std with gpt, ~1/30 with
#   big_vision at 1,152 wide), so the tokens of a plain background start nearly alike and where a token sits is a
#   faint signal (BENCHMARKS.md "Both recipes as one command each, ..., its stage 1 stuck")
vit_residual_scale = 1.0  # a ViT from scratch: each block's output projections (attention's o_proj, the MLP's fc2)
#   times this at the start, as GPT-2 draws them 1 / sqrt(2 x blocks) smaller. At 1, the 25 blocks of the full ViT
#   add outputs ~5x its input, nearly the same for every token; 0.14 with vit_position_std=0.9 starts its tokens at
#   a mean cosine of 0.50 instead of 0.997 (BENCHMARKS.md "Both recipes as one command each")
model_preset = "small"  # the Molmo2Config preset whose ViT (and connector layers) it trains: tiny | small | nanomolmo2
vit_image_size = 0  # a ViT from scratch: crops of this many pixels a side (a multiple of its patch, 14), not the
#   preset's (378 for nanomolmo2, 112 for small); the later stages take it from the checkpoint. Not Molmo2's: its
#   ViT sees 378-px crops. The full recipe's ViT at 112 px sees 64 patches a crop, not 729 (config/demo_full_vision.py)
data_dir = "data"
data_mixture = {"image": (1.0, ["synth_image"])}
max_crops = 4  # crops per image (Molmo2: 8 in training), as the later stages will see them
overlap_margins = (2, 2)
sigmoid_weight = 1.0  # SigLIP's image-caption loss; 0 = off
loc_weight = 1.0  # the localisation loss (which token holds a point of which label, and where); 0 = off
scene_weight = 0.0  # the synthetic world's attribute loss: each pooled token names the kind and the colour of the
#   shape whose centre is in its cell, or none, from the record's scene (records without one add nothing); 0 = off
scene_digits = 0.0  # with the scene loss: each token also names the first digit of the x and of the y its centre is
#   written with (training.scene_attributes), at this weight against the kind's and the colour's; 0 = off. In the CPU
#   demo's chain the joint stage's points then land on their shapes (F1 0.504 and 0.512 against 0.351 and 0.402) but
#   it counts less (0.490 and 0.505 against 0.545 and 0.520; GPU replays F1 +0.07, counting -0.09; one `make demo`
#   with it 0.360 / 0.426): off in the demo (BENCHMARKS.md "The coordinates' digits taught in stage 1")
scene_balanced = False  # the scene loss's tokens that hold a centre weigh as much, together, as the (about nine times
#   as many) that hold none: colours were named 0.93 at step 150 against 0.54 (BENCHMARKS.md "What holds the kinds
#   back"); config/demo_gpu_vision.py turns it on
position_loss = False  # with it: the global view's tokens holding a point also say where it is in the whole image
text_layers = 2  # blocks of the text tower (as wide as the ViT)
text_max_len = 96  # caption tokens kept
text_vocab_rows = 16384  # the text tower's token table: Qwen3 id % rows (a small table; 151,936 rows and their
#   AdamW state were most of a CPU step's optimizer time and of the checkpoint, for ~500 tokens in use)
embed_dim = 128  # width of the token, image and text embeddings the losses compare
batch_size = 32  # images per micro-batch per process
grad_accum = 1
loader_workers = -1  # processes that make the next step's images while this one trains (Linux);
#   0 = in this process; -1 = auto: every core of its share but two on a GPU, 0 on a CPU
batch_process = True  # on a GPU the next steps' batches are made in a forked process (training.StepsAhead);
#   False: in a thread of this one, where its Python holds the GIL the training thread needs
max_steps = 600
batch_echo = 1  # > 1: each batch trains this many steps in a row (data echoing, Choi et al. 2019, arXiv 1907.05550).
#   On a GPU stage 1's step waits for its batches (~48 ms of 128 images where the GPU computes ~10): echoed steps
#   take the GPU's time alone, so the ViT gets more updates in the same minutes. max_steps counts the updates
max_minutes = 0.0  # > 0: end the steps within about this many minutes of the script's start, whatever the machine:
#   every 20 steps the run sets max_steps to what fits at its mean step time (training.StepBudget, never past the
#   max_steps asked), its learning rates decaying to there. What follows the last step (export, pictures) is not
#   counted; a resumed run fits its own minutes. 0: all max_steps
lr = 1e-3  # AdamW peak for every trained weight (ViT, heads, text tower)
vit_lr_fan_in = 0  # > 0: each ViT weight matrix learns at lr x min(1, this / its fan-in), muP's rule for Adam
#   (off at 0). An Adam step moves each element by about the rate, so a matrix's output moves by about rate x
#   fan-in: the so400m ViT (fan-ins 1,152 and 4,304) at the small one's rate grew its features 4.7x in six steps
#   into one direction and never learned kinds; the small ViT at 10x its rate stalls the same way (BENCHMARKS.md
#   "Why the full ViT's features become one direction"). 256 leaves the small ViT's blocks as they are (its patch
#   embedding, fan-in 588, at 0.44x). Not yet run on a GPU
vit_lr = 0.0  # > 0: the ViT's own weights learn at this peak rate (times the vit_lr_fan_in factor), the heads and the
#   text tower at lr; the schedule scales both. Tried for the full ViT, which wants ~5e-5: its heads at 1e-3 beside
#   it named 0.37 of the kinds after 600 steps, against 0.46 with everything at 5e-5 (one H200, 2026-12-02;
#   BENCHMARKS.md "The full ViT in the easy world first")
muon_lr = 0.0  # > 0: the ViT's 2-D matrices (not its position table) learn by Muon at this peak rate
#   (training.MuonAdamW: orthogonalised momentum), the heads, norms and tables by AdamW at lr; 0: AdamW alone. On the
#   CPU demo's stage 1 with the scene loss, 0.02 named 0.72 of the kinds after 600 steps where AdamW stayed at chance
#   (BENCHMARKS.md "Stage 1 by Muon"). Not with vit_lr or vit_lr_fan_in, which scale AdamW's ViT rates
warmup = 50
lr_decay_frac = 1.0  # the cosine decay over this last fraction of the steps after the warmup, the peak held before it
#   (training.lr_at; 1.0: cosine over all of them)
weight_decay = 0.05  # on matrices only; norms, biases, position and token embeddings are not decayed
grad_clip = 1.0
device = "auto"  # auto | cpu | cuda
dtype = "bfloat16"  # autocast dtype on GPU, and on a CPU with cpu_autocast
cpu_autocast = "off"  # CPU: autocast to dtype too: off | on | auto (where the CPU has bf16 matrix instructions, whose
#   bf16 matmuls run several times faster than float32: training.cpu_has_bf16_matmul)
parallel = "ddp"  # ddp | fsdp (with torchrun)
compile = False  # torch.compile the step's forward (the model and its losses)
cuda_graph = False  # True: on one GPU, one micro-batch a step, not compiled, the step (forward, backward, clipping)
#   as CUDA graphs, one per batch shape (training.GraphedStep): its ~1,100 small kernels launched at once. The GPU
#   demo's step then needs ~12 ms of the GPU and little host time, but its batches take ~50 ms to make: alone it
#   gained nothing (61 ms a step against 57 eagerly, the same losses: BENCHMARKS.md "Stage 1's step, made and
#   launched"); with batch_echo the echoed steps cost the ~12 ms, and the GPU recipe turns both on
profile = 0  # > 0: torch.profiler over this many steps, 10 into the run: out_dir/profile.txt, the trace, GPU busy time
log_every = 10
eval_every = 100  # validation: losses and the head's counting / pointing on val images
eval_batches = 4
save_every = 100  # steps between resumable checkpoints
seed = 1337
resume = True  # continue from out_dir/ckpt.pt if it exists
config = configure(globals())
# ------------------------------------------------------------------------------------------------------------


def build_optimizer(module, lr, weight_decay, fused=None, vit_fan_in=0, vit_scale=1.0, muon_lr=0.0,
                    muon_dtype=torch.float32):
    """AdamW (0.9, 0.95, eps 1e-6) in groups: matrices decay; norm gains, biases, embedding tables and the
    scalars (temperatures, biases of the losses) do not: decaying them pulls norms and embeddings toward 0
    for no gain. A ViT weight whose rate differs from lr goes into a group of its own rate, lr_scale (the schedule
    multiplies by it): vit_scale for every ViT tensor, times min(1, vit_fan_in / fan-in) for its matrices where
    vit_fan_in > 0. The first group (the matrices at lr: the heads', and the ViT's when its rate is lr too) always
    learns at the schedule's rate, the one the log shows. muon_lr > 0: the ViT's matrices go to one group under
    Muon (training.MuonAdamW, which runs AdamW's update on the rest, its iteration in muon_dtype) at lr_scale
    muon_lr / lr."""
    decay, no_decay, scaled, muon = [], [], collections.defaultdict(list), []
    for name, p in module.named_parameters():
        plain = p.dim() < 2 or name in ("vit.positional_embedding", "text.token_embedding.weight",
                                        "text.position_embedding")  # tables; patch_embedding is a matrix
        if muon_lr > 0 and name.startswith("vit.") and not plain:
            muon.append(p)
            continue
        scale = 1.0
        if name.startswith("vit."):
            scale = vit_scale * (min(1.0, vit_fan_in / p.shape[1]) if vit_fan_in and not plain else 1.0)
        if scale != 1.0:
            scaled[(scale, plain)].append(p)
        else:
            (no_decay if plain else decay).append(p)
    if fused is None:
        fused = all(p.is_cuda for p in module.parameters())
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups += [{"params": ps, "weight_decay": 0.0 if plain else weight_decay, "lr_scale": s}
               for (s, plain), ps in sorted(scaled.items())]
    if muon:
        groups.append({"params": muon, "weight_decay": weight_decay, "lr_scale": muon_lr / lr, "muon": True})
        return MuonAdamW([{**g, "lr": lr * g.get("lr_scale", 1.0)} for g in groups], betas=(0.9, 0.95), eps=1e-6,
                         matmul_dtype=muon_dtype)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-6, fused=fused)


@torch.no_grad()
def validate(pretrainer, loader, n_batches, point_radius=0.05):
    """-> {loss name: mean}, plus, where the localisation loss is on, 'count_acc' (the high-res tokens that pass
    0.5 count the label's points exactly) and 'point_f1' (those tokens' points against the true ones, a hit
    within point_radius of the image side), over every pointed label of the first n_batches batches of val;
    where the scene loss is on, '<attribute>_acc' (the scene head's class, on the tokens that hold a centre), and
    the same on the high-res and the low-res view's tokens alone ('<attribute>_high_res_acc', '..._low_res_acc');
    always 'feature_std' and 'feature_cos', training.image_feature_stats of the pooled ViT features the heads read,
    averaged over the batches: the full preset's ViT trained here handed the connector tokens of one direction
    (BENCHMARKS.md "The GPU demo at 3,000 joint steps"), and the heads' LayerNorm hides that from the losses.
    The loader should be a fresh one, so every validation sees the same images."""
    was_training = pretrainer.training
    pretrainer.eval()
    if hasattr(pretrainer, "unshard"):  # FSDP: the root's own weights, gathered as its forward would
        pretrainer.unshard()
    sums, n, hits, f1s, right, stats = {}, 0, [], [], collections.defaultdict(list), []
    for _ in range(n_batches):
        batch = vision_batch_to(loader.next_step()[0], d.device)
        with autocast:
            features = pretrainer.pooled_features(batch["patches"], batch["pooling"])
            tokens = pretrainer.token_head(features)
            losses = pretrainer.losses(tokens, batch)
            if pretrainer.use_loc:
                if batch["label_ids"].shape[0]:
                    predicted = pretrainer.read_out(tokens, batch)  # one (n, 2) array of points per label
                else:  # FSDP: the text tower's blocks gather on every rank as often as on the others
                    pretrainer.text(*pretrainer.one_token(tokens))
            if pretrainer.scene_head is not None:
                holds = batch["scene_targets"][:, 0] > 0  # tokens that hold a shape's centre
                logits = pretrainer.scene_logits(tokens[holds])  # one per attribute
                for name, hits in scene_hits(logits, batch["scene_targets"][holds], batch["high_res"][holds],
                                             use_digits).items():
                    right[name].extend(hits)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        stats.append(image_feature_stats(features))
        n += 1
        if pretrainer.use_loc and batch["label_ids"].shape[0]:
            for pred, true in zip(predicted, batch["label_points"]):
                hits.append(len(pred) == len(true))
                f1s.append(point_scores(pred, true, radius=point_radius)["f1"])
    if hasattr(pretrainer, "reshard"):
        pretrainer.reshard()
    pretrainer.train(was_training)
    out = {k: v / max(n, 1) for k, v in sums.items()}
    if hits:
        out["count_acc"], out["point_f1"] = float(np.mean(hits)), float(np.mean(f1s))
    out.update({f"{name}_acc": float(np.mean(r)) for name, r in right.items() if r})
    stats = [s for s in stats if s is not None]  # a batch of fewer than two tokens has none
    if stats:
        out["feature_std"], out["feature_cos"] = (float(np.mean(column)) for column in zip(*stats))
    return out


if scene_digits < 0 or (scene_digits > 0 and scene_weight <= 0):
    raise SystemExit(f"train_vision: scene_digits={scene_digits} weighs digits the scene loss names: it needs "
                     f"scene_weight > 0 (it is {scene_weight}), and is never negative")
use_digits = scene_digits > 0
if sigmoid_weight <= 0 and loc_weight <= 0 and scene_weight <= 0:
    raise SystemExit("train_vision: sigmoid_weight, loc_weight and scene_weight are all 0: nothing to train")
# each loss's weight in the step's total; the localisation loss's parts (loc, offset, position) share loc_weight
weight_of = collections.defaultdict(lambda: loc_weight, sigmoid=sigmoid_weight, scene=scene_weight)
d = Dist(device)
budget = StepBudget(max_minutes, max_steps, d)  # max_minutes counts from here
loader_workers = d.resolve_loader_workers(loader_workers)
d.set_up_host(loader_workers)
seed_everything(seed)  # the same initial weights on every rank
ckpt_path = os.path.join(out_dir, "ckpt.pt")
# model_preset's ViT (trimmed after the deepest block the connector reads), fresh or of a checkpoint of that shape
preset = Molmo2Config.preset(model_preset)
vit_layers = preset.connector.vit_layers
if vit_init not in ("gpt", "big_vision"):
    raise SystemExit(f"train_vision: vit_init={vit_init!r}: expected 'gpt' or 'big_vision'")
if vit_init != "gpt" and init_from != "scratch":
    raise SystemExit(f"train_vision: vit_init={vit_init!r} draws a ViT from scratch, but init_from={init_from!r} "
                     "loads one: leave vit_init at 'gpt'")
for name, value, default in [("vit_position_std", vit_position_std, 0.0),
                             ("vit_residual_scale", vit_residual_scale, 1.0)]:
    if value != default and init_from != "scratch":
        raise SystemExit(f"train_vision: {name}={value!r} changes a new ViT's start, but init_from={init_from!r} "
                         f"loads one: leave {name} at {default}")
if not (isinstance(batch_echo, int) and batch_echo >= 1):
    raise SystemExit(f"train_vision: batch_echo={batch_echo!r}: the steps each batch trains, a whole number >= 1")
if vit_lr_fan_in < 0:
    raise SystemExit(f"train_vision: vit_lr_fan_in={vit_lr_fan_in!r}: a fan-in (> 0), or 0 for every matrix at lr")
if not (isinstance(vit_lr, (int, float)) and vit_lr >= 0):
    raise SystemExit(f"train_vision: vit_lr={vit_lr!r}: the ViT's peak rate (> 0), or 0 for lr like the rest")
if vit_lr and not lr:
    raise SystemExit(f"train_vision: vit_lr={vit_lr!r} is a rate beside lr, but lr is 0: set lr for the heads")
if not (isinstance(muon_lr, (int, float)) and muon_lr >= 0):
    raise SystemExit(f"train_vision: muon_lr={muon_lr!r}: Muon's peak rate for the ViT's matrices (> 0), "
                     "or 0 for AdamW")
if muon_lr and not lr:
    raise SystemExit(f"train_vision: muon_lr={muon_lr!r} is a rate beside lr, but lr is 0: set lr for the heads")
if muon_lr and (vit_lr or vit_lr_fan_in):
    raise SystemExit(f"train_vision: muon_lr={muon_lr!r} trains the ViT's matrices by Muon, but vit_lr / vit_lr_fan_in "
                     "scale AdamW's rates for them: leave those at 0")
if vit_image_size and init_from != "scratch":
    raise SystemExit(f"train_vision: vit_image_size={vit_image_size!r} sizes a new ViT, but init_from={init_from!r} "
                     "loads one, which keeps its own: leave vit_image_size at 0")
if vit_image_size and (not isinstance(vit_image_size, int) or vit_image_size < 0
                       or vit_image_size % preset.vit.patch_size):
    raise SystemExit(f"train_vision: vit_image_size={vit_image_size!r}: a crop of whole {preset.vit.patch_size}-px "
                     "patches, e.g. 112, 224 or 378")
vit_config = replace(preset.vit, image_size=vit_image_size or preset.vit.image_size)
vit = SigLIP2(vit_config) if init_from == "scratch" else load_vit(init_from, preset.vit, any_image_size=True)
if vit_init == "big_vision":
    vit.init_big_vision()
if vit_position_std:  # from a generator of its own: every other weight is drawn as without it
    torch.nn.init.normal_(vit.positional_embedding, std=vit_position_std, generator=torch.Generator().manual_seed(seed))
with torch.no_grad():  # every block's additions to the residual stream start smaller (times 1.0: exactly as drawn)
    for block in vit.layers:
        block.self_attn.o_proj.weight.mul_(vit_residual_scale)
        block.mlp.fc2.weight.mul_(vit_residual_scale)
# each scene attribute's weight: the kind's and the colour's 1, the digits' scene_digits
scene_weights = [1.0 if name in scene_attributes() else scene_digits for name in scene_attributes(use_digits)]
pretrainer = VisionPretrainer(vit, vit_layers, text_layers, text_max_len, embed_dim,
                              sigmoid_weight > 0, loc_weight > 0, text_vocab_rows, position_loss,
                              scene_classes(use_digits) if scene_weight > 0 else (), scene_balanced,
                              scene_weights if scene_weight > 0 else None).to(d.device)
if init_heads:  # a stage 1 that goes on from another's: what it learned on top of the ViT as well
    if not os.path.isfile(os.path.join(init_from, "ckpt.pt")):
        raise SystemExit(f"train_vision: init_heads=True needs init_from to be a stage-1 out_dir with a ckpt.pt; "
                         f"init_from={init_from!r} has none")
    heads = {k: v for k, v in torch.load(os.path.join(init_from, "ckpt.pt"), map_location="cpu",
                                         weights_only=False)["model"].items() if not k.startswith("vit.")}
    try:
        missing = [k for k in pretrainer.load_state_dict(heads, strict=False).missing_keys if not k.startswith("vit.")]
    except RuntimeError as e:  # a head of another shape: other losses or another embed_dim
        raise SystemExit(f"train_vision: init_heads=True: {init_from}'s heads do not fit this run's: {e}") from None
    if missing:
        raise SystemExit(f"train_vision: init_heads=True: {init_from} has no {missing[:4]} (trained with other losses)")
train_model = wrap_model(pretrainer, d, parallel, getattr(torch, dtype))
if compile:
    ready_for_compile()
    train_model = torch.compile(train_model)
autocast = step_autocast(d.device, dtype, cpu_autocast, print_fn=d.print)
optimizer = build_optimizer(pretrainer, lr, weight_decay, vit_fan_in=vit_lr_fan_in,
                            vit_scale=vit_lr / lr if vit_lr else 1.0, muon_lr=muon_lr,
                            muon_dtype=autocast_dtype(autocast))
processor = data.Molmo2Processor(max_crops=max_crops, crop_size=vit.config.image_size,
                                 patch_size=vit.config.patch_size, overlap_margins=overlap_margins)
loader_args = dict(data_dir=data_dir, mixture=data_mixture, batch_size=batch_size, processor=processor,
                   text_max_len=text_max_len, use_sigmoid=sigmoid_weight > 0, use_loc=loc_weight > 0, seed=seed,
                   use_scene=scene_weight > 0, scene_digits=use_digits)
graph_off = ("several processes" if d.world_size > 1 else "grad_accum > 1" if grad_accum > 1 else
             "compile=True" if compile else None)
graphed = None
if d.device.type == "cuda" and cuda_graph and graph_off is None:
    graphed = GraphedStep(pretrainer, lambda batch: vision_batch_to(batch, d.device),
                          lambda losses: sum(losses[k] * weight_of[k] for k in losses), grad_clip,
                          getattr(torch, dtype), print_fn=d.print)
if d.device.type == "cuda":
    d.print(f"cuda_graph: {'on' if graphed else 'off' if not cuda_graph else f'off ({graph_off})'}")
# with graphs the labels come padded to a few shapes: a graph for each
loader = VisionLoader(split="train", rank=d.rank, world_size=d.world_size, grad_accum=grad_accum,
                      workers=loader_workers, round_labels=graphed is not None, **loader_args)
if d.device.type == "cuda":  # the host makes the next batches while the GPU computes (on a CPU it has no spare core)
    loader = StepsAhead(loader, pin_device=d.device, process=batch_process)
start_step = resume_run(ckpt_path, train_model, optimizer, loader, d) if resume else 0
log_path = os.path.join(out_dir, "log.jsonl")
if d.is_master:
    os.makedirs(out_dir, exist_ok=True)
n_vit = sum(p.numel() for p in pretrainer.vit.parameters())
n_rest = sum(p.numel() for p in pretrainer.parameters()) - n_vit
start = f"{vit_init} start" if init_from == "scratch" else f"from {init_from}, heads {'too' if init_heads else 'new'}"
d.print(f"stage 1 | ViT {n_vit / 1e6:.1f}M ({model_preset}, {start}, blocks {list(vit_layers)} read), heads and text "
        f"tower {n_rest / 1e6:.1f}M (thrown away after) | losses: sigmoid x {sigmoid_weight}, "
        f"localisation x {loc_weight}, scene x {scene_weight}"
        + (f" (its first digits x {scene_digits})" if use_digits else "") + " "
        f"| {d.world_size} process(es) on {d.device.type} | {batch_size * grad_accum * d.world_size} images a step"
        + (f", each batch {batch_echo} steps" if batch_echo > 1 else "")
        + (f" | ViT at lr {vit_lr:g}, heads at {lr:g}" if vit_lr else "")
        + (f" | ViT matrices by Muon at {muon_lr:g}, the rest AdamW at {lr:g}" if muon_lr else ""))

t_start = t_last = time.time()
step_times = []
profiler = StepProfiler(profile, out_dir, d, start_step, max_steps)
for step in range(start_step, max_steps):
    if step >= max_steps:  # max_minutes cut the run short (below)
        break
    profiler.step(step)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, lr, warmup, max_steps, decay_frac=lr_decay_frac) * group.get("lr_scale", 1.0)
    rng_before = rng_state()  # in case the step must be redone
    if step % batch_echo == 0 or step == start_step:  # a run resumed within an echo draws its batch again
        data_state = loader.state_dict()  # before this batch's draws
        micro_batches = loader.next_step()
    parts = {}
    if graphed is not None:  # one micro-batch: forward, backward and clipping in one replay
        parts, grad_norm = graphed.step(micro_batches[0])
    for i, mb in enumerate(micro_batches if graphed is None else []):
        last = i == len(micro_batches) - 1
        # DDP: gradients are averaged over the ranks once, in the step's last backward
        no_sync = train_model.no_sync() if (not last and d.world_size > 1 and parallel == "ddp") else nullcontext()
        with no_sync, autocast:
            losses = train_model(vision_batch_to(mb, d.device))
            loss = sum(losses[k] * weight_of[k] for k in losses)
            (loss / len(micro_batches)).backward()  # DDP and FSDP average over ranks
        for k, v in losses.items():
            parts[k] = parts.get(k, 0.0) + v.detach() / len(micro_batches)
    if graphed is None:
        grad_norm = torch.nn.utils.clip_grad_norm_(pretrainer.parameters(), grad_clip)
    grad_norm = whole(grad_norm).item()  # under FSDP the norm is a DTensor
    parts = {k: d.all_reduce_sum(v.reshape(1).float()).item() / d.world_size for k, v in parts.items()}
    total = sum(v * weight_of[k] for k, v in parts.items())
    if not (math.isfinite(total) and math.isfinite(grad_norm)):
        stop_nonfinite(step, total, grad_norm, micro_batches, ckpt_path, train_model, optimizer, d, data_state, config,
                       rng_before)
    optimizer.step()
    if graphed is None:  # a graph's gradients stay where it captured them, zeroed by the next replay
        optimizer.zero_grad(set_to_none=True)

    now = time.time()
    step_times.append(now - t_last)
    t_last = now
    done = step + 1
    max_steps = budget.fit(done, start_step, step_times, max_steps)  # max_minutes: what fits
    images = batch_size * grad_accum * d.world_size
    if d.is_master:
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, "loss": total, **parts, "lr": optimizer.param_groups[0]["lr"],
                                "grad_norm": grad_norm, "step_s": step_times[-1]}) + "\n")
        if step % log_every == 0 or done == max_steps:
            detail = " ".join(f"{k} {v:.4f}" for k, v in parts.items())
            print(f"step {step:5d}/{max_steps} | loss {total:.4f} ({detail}) | "
                  f"lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"| grad {grad_norm:.2f} | {images / step_times[-1]:.0f} images/s | "
                  f"{step_times[-1] * 1000:.0f} ms | ETA {eta_seconds(step_times, max_steps - done) / 60:.1f} min",
                  flush=True)
    if eval_every and (done % eval_every == 0 or done == max_steps):
        val_loader = VisionLoader(split="val", rank=d.rank, world_size=d.world_size, **loader_args)
        val = validate(train_model.module if d.world_size > 1 and parallel == "ddp" else pretrainer, val_loader,
                       eval_batches)
        line = " | ".join(f"{k} {v:.4f}" for k, v in val.items())
        d.print(f"step {step:5d} | val {line}"
                + (" (counting and pointing read off the localisation head alone)" if "count_acc" in val else ""))
        if d.is_master:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, **{f"val_{k}": v for k, v in val.items()}}) + "\n")
    if save_every and (done % save_every == 0 or done == max_steps):
        # within an echo the state before its batch, so that a resumed run draws that batch again
        save_checkpoint(ckpt_path, train_model, optimizer, done, d,
                        loader.state_dict() if done % batch_echo == 0 else data_state, config)

# -- the end: the ViT alone in SiglipVisionModel layout (under DDP/FSDP gathered, written by rank 0), pictures ------
final_dir = os.path.join(out_dir, "final")
if d.world_size > 1:
    state, _ = full_state_dicts(train_model, optimizer)
    if d.is_master:
        vit = SigLIP2(pretrainer.vit.config)
        vit.load_state_dict({k.removeprefix("vit."): v for k, v in state.items() if k.startswith("vit.")})
        save_siglip(vit, final_dir)
    d.barrier()
elif d.is_master:
    save_siglip(pretrainer.vit, final_dir)
if d.is_master:
    plot_vision_run(out_dir)
    graphs = (f" ({graphed.replays} as CUDA graphs of {len(graphed.graphs)} batch shapes, {graphed.eager_steps} "
              f"eagerly)" if graphed is not None else "")
    print(f"done: {max_steps - start_step} steps{graphs} in {(time.time() - t_start) / 60:.1f} min\n"
          f"{loader.summary()}\n"
          f"ViT: {final_dir} (SiglipVisionModel layout; next: "
          f"{python_command('train_align.py', f'--vit_from={out_dir}')}) | "
          f"log: {log_path} | checkpoint: {ckpt_path}", flush=True)
d.close()
