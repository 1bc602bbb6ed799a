"""
Stage 2: connector alignment. The ViT and the LLM stay frozen; the connector (multi-layer features, attention
pooling, SwiGLU projector) and the 128 new token embeddings learn to turn a pretrained SigLIP2 into words a
pretrained Qwen3 reads, on captions and pointing.

    python train_align.py                                   # CPU or one GPU, the synthetic world
    python train_align.py --vit_from=out/vision             # around stage 1's ViT (train_vision.py), LLM from scratch
    python train_align.py --init_from=parts --llm_from=Qwen/Qwen3-0.6B --vit_from=google/siglip2-so400m-patch14-384
    torchrun --nproc_per_node=4 train_align.py --batch_size=16

Molmo2's pretraining objective (no per-token weighting, style prefixes with length hints, dropout on response
tokens only), with only the connector's learning rate above zero. Then train_joint.py --init_from=out/align.
"""

import math
import os
from contextlib import nullcontext

import torch

from configurator import configure
from model import ready_for_compile
from training import (Dist, Progress, StepProfiler, StepsAhead, TrainLoader, batch_to, build_model, build_optimizer,
                      evaluate_loss, export_final, freeze_untrained_parts, lineage, mixture_has_text_only, model_inputs,
                      resume_run, rng_state, save_checkpoint, seed_everything, set_learning_rates, step_autocast,
                      stop_nonfinite, whole, wrap_model)

# -- knobs (override with config/*.py files and --key=value) -------------------------------------------------
out_dir = "out/align"
init_from = "scratch"  # scratch (model_preset; its ViT from vit_from if set) | parts (llm_from + vit_from) | a Molmo2
#   checkpoint
model_preset = "small"  # Molmo2Config preset for scratch: tiny | small | nanomolmo2
projector_norm = False  # scratch: an RMSNorm after the connector's projector (not Molmo2's; connector.py says why)
position_bins = 0  # scratch: > 0 embeds where each image token sits, x and y in this many bins (not Molmo2's;
#   connector.py says why); a checkpoint keeps its own
vocab = "full"  # full | data: from scratch, LLM rows only for the tokens of the mixture's records (the
#   151,936-row head is most of a small model's CPU step); a checkpoint keeps its own
llm_from = ""  # init_from=parts: a Qwen3 hub id or local HF directory (Qwen/Qwen3-0.6B)
vit_from = ""  # stage 1's out_dir (out/vision) or a SigLIP hub id / dir (google/siglip2-so400m-patch14-384)
data_dir = "data"
data_mixture = {"image": (1.0, ["synth_image"])}  # Molmo2 pretrain: config/mix_pretrain.py
max_seq_len = 1024  # tokens per packed row
max_crops = 4  # crops per image (Molmo2: 8 in training)
max_row_crops = 16  # crops (and frames) per packed row
max_video_frames = 8
overlap_margins = (2, 2)  # patches shared with the neighbouring crop on each side (Molmo2 at 378 px: (4, 4))
styles = None  # train on these annotation styles only, e.g. ("point_count", "pointing"); None = all
prefix_mode = "pretrain"  # style prefixes with length hints
loss_weighting = "none"  # pretraining weighs every answer token alike
batch_size = 8  # rows per micro-batch per process
grad_accum = 1  # micro-batches per optimizer step
loader_workers = -1  # processes that make the training examples ahead of the step (Linux); 0 = in this
#   process; -1 = auto: every core of its share but two on a GPU, 0 on a CPU
batch_process = True  # on a GPU the next steps' batches are made in a forked process (training.StepsAhead);
#   False: in a thread of this one, where its Python holds the GIL the training thread needs
max_steps = 300
lr_connector, lr_vit, lr_llm = 2e-4, 0.0, 0.0  # 0 = frozen
warmup_connector, warmup_vit, warmup_llm = 200, 0, 0
grad_clip = 1.0
weight_decay = 0.0  # AdamW's decoupled decay on every trained weight (Molmo2: 0)
z_loss = 1e-4
resid_dropout = 0.0  # Molmo2 pretraining: dropout on response tokens only
response_dropout = 0.1
device = "auto"  # auto | cpu | cuda
dtype = "bfloat16"  # autocast dtype on GPU, and on a CPU with cpu_autocast
cpu_autocast = "off"  # CPU: autocast to dtype too: off | on | auto (where the CPU has bf16 matrix instructions, whose
#   bf16 matmuls run several times faster than float32: training.cpu_has_bf16_matmul)
parallel = "ddp"  # ddp | fsdp (with torchrun)
compile = False
profile = 0  # > 0: torch.profiler over this many steps, 10 into the run: out_dir/profile.txt, the trace, GPU busy time
activation_checkpointing = False
log_every = 1
wandb_project = ""  # also log to this Weights & Biases project (pip install wandb; wandb login)
eval_every = 100  # validation loss on the val split
eval_batches = 4
save_every = 100  # steps between resumable checkpoints (0: none, only the exported final model)
seed = 1337
resume = True  # continue from out_dir/ckpt.pt if it exists
config = configure(globals())
# ------------------------------------------------------------------------------------------------------------

d = Dist(device)
loader_workers = d.resolve_loader_workers(loader_workers)
d.set_up_host(loader_workers)
seed_everything(seed)  # the same initial weights on every rank (FSDP shards each rank's own copy)
ckpt_path = os.path.join(out_dir, "ckpt.pt")
model = build_model(init_from, model_preset, resid_dropout, response_dropout, llm_from, vit_from,
                    vocab=vocab, data_dir=data_dir, mixture=data_mixture, projector_norm=projector_norm,
                    position_bins=position_bins, workers=loader_workers).to(d.device)
seed_everything(seed + d.rank)  # dropout differs between ranks
model.llm.gradient_checkpointing = model.vit.gradient_checkpointing = activation_checkpointing
lrs = {"connector": lr_connector, "vit": lr_vit, "llm": lr_llm}
warmups = {"connector": warmup_connector, "vit": warmup_vit, "llm": warmup_llm}
freeze_untrained_parts(model, lrs)  # before DDP lists what wants gradients
train_model = wrap_model(model, d, parallel, getattr(torch, dtype),
                         find_unused=d.world_size > 1 and mixture_has_text_only(data_dir, data_mixture))
optimizer = build_optimizer(model, lrs, warmups, weight_decay=weight_decay)
if compile:
    ready_for_compile()
    train_model = torch.compile(train_model)
autocast = step_autocast(d.device, dtype, cpu_autocast, print_fn=d.print)

loader_args = dict(data_dir=data_dir, mixture=data_mixture, batch_size=batch_size, max_seq_len=max_seq_len,
                   max_crops=max_crops, max_row_crops=max_row_crops, max_video_frames=max_video_frames,
                   crop_size=model.config.vit.image_size, patch_size=model.config.vit.patch_size,
                   overlap_margins=overlap_margins, prefix_mode=prefix_mode,
                   weighting=loss_weighting, seed=seed, styles=styles)
loader = TrainLoader(split="train", rank=d.rank, world_size=d.world_size, grad_accum=grad_accum,
                     workers=loader_workers, **loader_args)
if d.device.type == "cuda":  # the host makes the next batches while the GPU computes (on a CPU it has no spare core)
    loader = StepsAhead(loader, pin_device=d.device, process=batch_process)
start_step = resume_run(ckpt_path, train_model, optimizer, loader, d) if resume else 0
progress = Progress(d, out_dir, max_steps, model, log_every, wandb_project, config)
d.print(f"parameters: vit {model.num_params('vit') / 1e6:.1f}M, connector {model.num_params('connector') / 1e6:.1f}M, "
        f"llm {model.num_params('llm') / 1e6:.1f}M ({model.config.llm.vocab_size:,} token rows) | "
        f"{d.world_size} process(es) on {d.device.type} | "
        f"global batch {batch_size * grad_accum * d.world_size} rows of {max_seq_len} tokens")

profiler = StepProfiler(profile, out_dir, d, start_step, max_steps)
for step in range(start_step, max_steps):
    profiler.step(step)
    set_learning_rates(optimizer, step, max_steps)
    # the state before this step's batches and dropout draws, in case the step must be redone
    data_state, rng_before = loader.state_dict(), rng_state()
    micro_batches = loader.next_step()
    # the divisor of this step's loss: every loss token's weight, on every rank
    weight_total = d.all_reduce_sum(sum(mb["loss_weights"].sum() for mb in micro_batches).to(d.device))
    weighted_ce = torch.zeros((), device=d.device)
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # DDP: gradients are averaged over the ranks once, in the step's last backward
        no_sync = train_model.no_sync() if (not last and d.world_size > 1 and parallel == "ddp") else nullcontext()
        with no_sync, autocast:
            mb = batch_to(mb, d.device)  # uint8 pixels to floats, the attention mask made there
            # Molmo2's loss summed over this micro-batch's tokens (model.linear_cross_entropy)
            loss_sum, wce = train_model(**model_inputs(mb, compile), targets=mb["targets"],
                                        loss_weights=mb["loss_weights"], z_loss=z_loss,
                                        response_mask=mb["targets"] >= 0)
            # divided by the step's weight on all ranks; times world_size as DDP and FSDP average gradients
            (loss_sum / weight_total * d.world_size).backward()
        weighted_ce += wce
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    grad_norm = whole(grad_norm).item()  # under FSDP the norm is a DTensor
    loss = (d.all_reduce_sum(weighted_ce) / weight_total).item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        stop_nonfinite(step, loss, grad_norm, micro_batches, ckpt_path, train_model, optimizer, d, data_state, config,
                       rng_before)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    progress.step(step, loss, optimizer, micro_batches, grad_norm)
    done = step + 1
    if eval_every and (done % eval_every == 0 or done == max_steps):
        progress.val(step, evaluate_loss(train_model, d, "val", eval_batches, autocast, **loader_args))
    if save_every and (done % save_every == 0 or done == max_steps):
        save_checkpoint(ckpt_path, train_model, optimizer, done, d, loader.state_dict(), config)

# -- the end: export, pictures, summary ------------------------------------------------------------------------
final_dir = os.path.join(out_dir, "final")
export_final(train_model, model, optimizer, d, final_dir, loader.processor,
             lineage(init_from, model_preset, vit_from, llm_from))
if d.is_master:
    print(progress.summary(loader, final_dir, ckpt_path))
d.close()
