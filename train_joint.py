"""
Stage 3: joint multimodal training of every part of Molmo2 (ViT, connector, LLM), with Molmo2's objective.

    python train_joint.py                                   # CPU or one GPU, the synthetic world
    python train_joint.py config/mix_sft.py --init_from=out/align --batch_size=4
    torchrun --nproc_per_node=4 train_joint.py --batch_size=16 --parallel=fsdp

Each part has its own learning rate and warmup (linear from 0), then cosine to 10% of the peak, chosen by
where the run starts unless set (Molmo2's SFT recipe from a checkpoint, a scratch recipe from scratch); AdamW
(0.9, 0.95, eps 1e-6); gradient clipping at 1.0; z-loss 1e-4; residual dropout. Molmo2's loss: the sum over loss
tokens of weight * (cross-entropy + z-loss * logsumexp^2) (model.linear_cross_entropy), divided by the sum of the
weights of the whole step, over its micro-batches on all ranks, so gradient accumulation and any number of ranks
give the gradient of one big batch. Runs resume from out_dir/ckpt.pt on the same trajectory. training.py holds the
plumbing the loop calls.
"""

import math
import os
from contextlib import nullcontext

import torch

from configurator import configure
from model import compile_each_block, ready_for_compile
from training import (Dist, GraphedStep, Progress, StepBudget, StepProfiler, StepsAhead, TokenAttributeLoss,
                      TrainLoader, autocast_dtype, batch_to, build_model, build_optimizer, cpp_compiler, default_recipe,
                      evaluate_loss, export_final, fill_recipe, freeze_untrained_parts, lineage, mixture_has_text_only,
                      model_inputs, resume_run, rng_state, save_checkpoint, seed_everything, set_learning_rates,
                      step_autocast, stop_nonfinite, whole, wrap_model)
from vision import FeatureCache, float8_linears

# -- knobs (override with config/*.py files and --key=value) -------------------------------------------------
out_dir = "out/joint"
init_from = "scratch"  # scratch (model_preset) | a previous stage's out_dir | a Molmo2 checkpoint dir or hub id
model_preset = "small"  # Molmo2Config preset for scratch: tiny | small | nanomolmo2
vit_from = ""  # scratch: the ViT from stage 1's out_dir (out/vision) or a SigLIP checkpoint of the preset's shape
projector_norm = False  # scratch: an RMSNorm after the connector's projector (not Molmo2's; connector.py says why)
position_bins = 0  # scratch: > 0 embeds where each image token sits, x and y in this many bins (not Molmo2's;
#   connector.py says why); a checkpoint keeps its own
token_loss = 0.0  # > 0: a linear head on each image token as the LLM receives it names token_attributes of the
#   synthetic world's shape whose centre the token holds, by stage 1's balanced scene loss at this weight beside the
#   answers' (training.TokenAttributeLoss; not Molmo2's, for a connector from scratch). The head is not exported
token_attributes = ("kind", "colour", "x_tenths", "y_tenths")  # of training.scene_attributes(digits=True): x_tenths
#   is the first digit of the x a point on the centre is written with. The digits alone cost the CPU demo's
#   counting ~0.2 (config/demo_joint.py)
token_weights = ()  # each of token_attributes' weight within token_loss, in their order; (): 1 each
vocab = "full"  # full | data: from scratch, LLM rows only for the tokens of the mixture's records (the
#   151,936-row head is most of a small model's CPU step); a checkpoint keeps its own
data_dir = "data"
data_mixture = {"image": (0.7, ["synth_image"]), "multi_image": (0.1, ["synth_multi"]), "video": (0.2, ["synth_video"])}
max_seq_len = 1024  # tokens per packed row
max_crops = 4  # crops per image (Molmo2: 8 in training)
length_groups = 0  # > 0: batches of rows of like length, each padded only to its longest row, from this many batches'
#   rows packed at once (training.TrainLoader): less padding to compute where rows hold one example each
max_row_crops = 16  # crops (and frames) per packed row
max_video_frames = 8
overlap_margins = (2, 2)  # patches shared with the neighbouring crop on each side (Molmo2 at 378 px: (4, 4))
styles = None  # train on these annotation styles only, e.g. ("point_count", "pointing"); None = all
prefix_mode = "sft"  # style prefixes: pretrain | sft | none
loss_weighting = "sft"  # sft (2/sqrt(n), grounding 0.2, video captions 0.1) | sqrt | none
batch_size = 8  # rows per micro-batch per process
grad_accum = 1  # micro-batches per optimizer step
loader_workers = -1  # processes that make the training examples ahead of the step (Linux); 0 = in this
#   process; -1 = auto: every core of its share but two on a GPU, 0 on a CPU
batch_process = True  # on a GPU the next steps' batches are made in a forked process (training.StepsAhead);
#   False: in a thread of this one, where its Python holds the GIL the training thread needs
max_steps = 500
batch_echo = 1  # > 1: each step's batches train this many steps in a row (data echoing, as train_vision.py's), for
#   a run whose step waits for its batches: echoed steps take the GPU's time alone. max_steps counts the updates. The
#   GPU demo's joint stage (~20 ms a step as CUDA graphs where the GPU computes ~10) took 120 s at 2 against 213, but
#   its 8,000 steps then learned what ~5,000 fresh ones do (validation loss 0.209 against 0.190; counting 0.895 and
#   F1 0.916 against 0.950 / 0.946), so the demo keeps 1 (BENCHMARKS.md "The GPU demo's crops written once")
max_minutes = 0.0  # > 0: end the steps within about this many minutes of the script's start, whatever the machine:
#   every 20 steps the run sets max_steps to what fits at its mean step time (training.StepBudget, never past the
#   max_steps asked), its learning rates decaying to there. What follows the last step (export, pictures) is not
#   counted; a resumed run fits its own minutes. 0: all max_steps
# None: chosen by where the run starts (training.default_recipe, printed): from a checkpoint Molmo2's SFT recipe
#   (5e-6, 5e-6, 1e-5, warmup 200, no weight decay) for a pretrained LLM; for one from scratch (also through an
#   align stage) 1e-3, the ViT 10x lower after stage 1
lr_connector, lr_vit, lr_llm = None, None, None
warmup_connector, warmup_vit, warmup_llm = None, None, None
lr_decay_frac = 1.0  # the cosine decay over this last fraction of the steps after the warmup, the peak held before it
#   (training.lr_at; 1.0: cosine over all of them)
grad_clip = 1.0
weight_decay = None  # AdamW's decoupled decay on matrices (Molmo2: 0; from scratch 0.1)
muon_lr = 0.0  # > 0: Muon at this peak rate for the LLM's and connector's matrices, AdamW for the rest (not Molmo2's;
#   training.MuonAdamW says why). Under parallel="fsdp" each matrix's look-ahead is gathered whole for the iteration
z_loss = 1e-4
resid_dropout = 0.1  # Molmo2 SFT: 0.1 everywhere
response_dropout = 0.0
device = "auto"  # auto | cpu | cuda
dtype = "bfloat16"  # autocast dtype on GPU, and on a CPU with cpu_autocast
cpu_autocast = "off"  # CPU: autocast to dtype too: off | on | auto (where the CPU has bf16 matrix instructions, whose
#   bf16 matmuls run several times faster than float32: training.cpu_has_bf16_matmul)
parallel = "ddp"  # ddp | fsdp (with torchrun)
compile = False  # torch.compile the whole model as one graph (no graph breaks, one graph for any image count)
compile_blocks = None  # torch.compile each transformer block alone, the rest eager (model.compile_each_block): the
#   full preset's joint step compiles in 12-15 s, not 153, and ran at 0.30 s against 0.32-0.53 as one graph (one
#   H200); this trainer's step on an H100 took 267 ms against 398 eagerly (two calls; BENCHMARKS.md "The trainer
#   compiled by default"). None: on for one process on a GPU, off on a CPU (there it needs a C++ compiler, and the
#   CPU demo's configs turn it on) and under torchrun, where it is not yet timed on GPUs (under FSDP its hooks gather
#   each block's weights around the compiled forward: on the CPU with gloo the two train exactly as eager FSDP,
#   assets/bench/compile_blocks_fsdp.py). On a CPU without a C++ compiler the blocks run eagerly, and the run says so
cuda_graph = False  # True: on one GPU, one micro-batch a step, the step (forward, backward, clipping) as CUDA
#   graphs (training.GraphedStep), its media padded to a few sizes and its target positions listed
#   (training.pad_media): a small model's ~1,500 kernels a step launched at once, where eagerly the GPU waits on the
#   host. The small preset's step from scratch (the whole vocabulary) on the GPU demo's batch, one H200: 74-83 ms
#   eager, 58-59 as graphs, 62-72 with compile_blocks, 53 with both (BENCHMARKS.md "Compiled blocks in the graph");
#   the full preset's step is the GPU's work (~300 ms at 40% MFU either way). Two GPU demo runs with it counted 0.900
#   and 0.800 against eager's 0.920 and 0.915, too few to tell from the spread between runs, so its recipe leaves it
#   off for now
vit_feature_cache = 0.0  # GiB > 0: on a CPU, with the ViT frozen (lr_vit 0), keep what the ViT gave each crop, up to
#   this much, and skip it for a crop met again (vision.FeatureCache): the CPU demo's joint stage meets each of its
#   5,000 training images 2-4 times, as fast as the CPU runs, and its ViT forward is ~9% of a step (BENCHMARKS.md "A
#   frozen ViT's features kept", "A smaller world for the CPU demo")
join_rows = False  # each batch's rows joined into one row, padded only at its end: the same examples and losses
#   (packing), without the padding between rows (a fifth of the CPU demo's tokens; training.TrainLoader). Not with
#   cuda_graph or length_groups
key_blocks = False  # the LLM's masked attention given only the key blocks each chunk of queries can see, the same
#   result (model.KeyBlocks): a row's queries see its prefix and their own branch, ~0.44 of the dense scores in the
#   CPU demo's rows. It reads the mask on the host each step, so not with cuda_graph (on a GPU it cost more than it
#   saved: BENCHMARKS.md "The CPU savings on a GPU")
profile = 0  # > 0: torch.profiler over this many steps, 10 into the run: out_dir/profile.txt, the trace, GPU busy time
activation_checkpointing = False
float8 = False  # True: every Linear in the ViT's and the LLM's blocks multiplies in float8 while training
#   (vision.Float8Linear: scaled per tensor, activations and weights e4m3, gradients e5m2), on the float8 tensor cores
#   of an H100/H200 (compute capability 8.9 or more); evaluation and answers stay in dtype. Not Molmo2's precision,
#   and slower as built: 182 ms a full-preset step against 171 on an H100 (BENCHMARKS.md "Float8 matmuls")
float8_rowwise = False  # with float8: one scale a row, all e4m3, the weight's gradient in bf16 (vision.
#   Float8RowwiseMatmul): each cast in one pass, no transposed copies; 179 ms a step on the H100, 19 of them the bias
#   gradients, since folded into the weight gradient's matmul (untimed)
log_every = 1
wandb_project = ""  # also log to this Weights & Biases project (pip install wandb; wandb login)
eval_every = 100  # validation loss on the val split
eval_batches = 4
eval_answers = 0  # at each validation also answer this many counting and pointing questions of the val split,
#   greedily, and score them as eval.py does (answers.png: accuracy against steps); one process or DDP
save_every = 100  # steps between resumable checkpoints (0: none, only the exported final model)
seed = 1337
resume = True  # continue from out_dir/ckpt.pt if it exists
config = configure(globals())
# ------------------------------------------------------------------------------------------------------------


def validation_questions(model, processor):
    """The first eval_answers counting and pointing questions of the mixture's val records that the model has
    words for (eval.py's items)."""
    import eval as evaluation
    names = [name for _, names in data_mixture.values() for name in names]
    items = evaluation.evaluation_items(names, data_dir, "val", tasks=("counting", "pointing"),
                                        max_examples=eval_answers)
    return evaluation.known_items(model, processor, items, prefix_mode, log=d.print)[:eval_answers]


def answer_scores(model, processor, items):
    """{counting_accuracy, pointing_f1} of greedy answers to items, generated by the first process alone (items
    are its; the others hold none): every rank calls this and waits at its barrier, since a rank that went on to
    the validation loss would meet the first one's barrier with its all-reduce and both would wait for ever
    (under FSDP no rank holds the whole model, so it is skipped there). In the weights' own dtype, as eval.py
    generates, so the numbers are eval.py's for the same weights."""
    import eval as evaluation
    if parallel == "fsdp" and d.world_size > 1:
        return None
    scores = None
    if d.is_master and items:
        was_training = model.training
        model.eval()
        with torch.no_grad():  # eagerly, as the whole validation runs (the training loop)
            rows = evaluation.evaluate(model, processor, items, batch_size=64, style_prefixes=prefix_mode,
                                       log=lambda *_: None)
        model.train(was_training)
        scores = evaluation.headline(rows)
    d.barrier()
    return scores


if not (isinstance(batch_echo, int) and batch_echo >= 1):
    raise SystemExit(f"train_joint: batch_echo={batch_echo!r}: the steps each batch trains, a whole number >= 1")
if token_loss and (compile or parallel == "fsdp"):
    raise SystemExit("train_joint: token_loss trains a head on the connector's output through a forward hook: not with "
                     "compile=True (one graph) or parallel='fsdp' (compile_blocks and DDP are fine)")
if join_rows and length_groups:
    raise SystemExit("train_joint: join_rows makes each batch one row of its own length, length_groups batches of like "
                     "rows: choose one")
if key_blocks and compile:
    raise SystemExit("train_joint: key_blocks reads the mask on the host, a graph break in compile=True's one graph: "
                     "use compile_blocks=True with it")
if compile and compile_blocks:
    raise SystemExit("train_joint: compile=True and compile_blocks=True: choose one (the whole model as one graph, "
                     "or each block alone)")
d = Dist(device)
if compile_blocks is None:  # the default: on where it was measured to pay, one process on a GPU
    compile_blocks = d.device.type == "cuda" and d.world_size == 1 and not compile
    if d.device.type == "cuda":
        why = "one process on a GPU" if compile_blocks else "compile=True" if compile else "several processes"
        d.print(f"compile_blocks: {'on' if compile_blocks else 'off'} by default ({why}); --compile_blocks=True or "
                f"False to choose")
budget = StepBudget(max_minutes, max_steps, d)  # max_minutes counts from here
loader_workers = d.resolve_loader_workers(loader_workers)
d.set_up_host(loader_workers)
start = lineage(init_from, model_preset, vit_from)  # where its LLM and ViT started: picks the recipe
fill_recipe(globals(), config, *default_recipe(start), print_fn=d.print)
seed_everything(seed)  # the same initial weights on every rank (FSDP shards each rank's own copy)
ckpt_path = os.path.join(out_dir, "ckpt.pt")
model = build_model(init_from, model_preset, resid_dropout, response_dropout, vit_from=vit_from,
                    vocab=vocab, data_dir=data_dir, mixture=data_mixture, projector_norm=projector_norm,
                    position_bins=position_bins, workers=loader_workers).to(d.device)
# before the optimizer, which takes the head as the connector's
token_attribute_loss = TokenAttributeLoss(model, token_attributes, token_weights) if token_loss else None
seed_everything(seed + d.rank)  # dropout differs between ranks
model.llm.gradient_checkpointing = model.vit.gradient_checkpointing = activation_checkpointing
model.llm.key_blocks = key_blocks
if float8:
    if d.device.type == "cuda" and torch.cuda.get_device_capability(d.device) < (8, 9):
        raise SystemExit(f"train_joint: float8=True: {torch.cuda.get_device_name(d.device)} has no float8 tensor "
                         f"cores (compute capability 8.9 or more: an L4, H100, H200)")
    cpu_note = " (on a CPU only slower: its float8 matmul is for checking, not speed)" if d.device.type == "cpu" else ""
    n_float8 = float8_linears(*model.vit.layers, *model.llm.layers, rowwise=float8_rowwise)
    d.print(f"float8: the blocks' {n_float8} Linears multiply in float8{', scaled a row at a time' * float8_rowwise}"
            f"{cpu_note}")
elif float8_rowwise:
    raise SystemExit("train_joint: float8_rowwise=True says how to scale float8=True's matmuls: set both")
lrs = {"connector": lr_connector, "vit": lr_vit, "llm": lr_llm}
warmups = {"connector": warmup_connector, "vit": warmup_vit, "llm": warmup_llm}
freeze_untrained_parts(model, lrs)  # before DDP lists what wants gradients
train_model = wrap_model(model, d, parallel, getattr(torch, dtype),
                         find_unused=d.world_size > 1 and mixture_has_text_only(data_dir, data_mixture))
autocast = step_autocast(d.device, dtype, cpu_autocast, print_fn=d.print)
optimizer = build_optimizer(model, lrs, warmups, weight_decay=weight_decay, muon_lr=muon_lr,
                            muon_dtype=autocast_dtype(autocast))
if compile:
    ready_for_compile()
    train_model = torch.compile(train_model)
elif compile_blocks:
    if d.device.type == "cpu" and not cpp_compiler():
        d.print("compile_blocks: this machine has no C++ compiler ($CXX or g++), which torch.compile needs "
                "on a CPU: the blocks run eagerly")
    else:
        compile_each_block(model)
if vit_feature_cache and d.device.type != "cpu":  # there the crops' keys would be read back to the host every step
    d.print(f"vit_feature_cache={vit_feature_cache!r}: for a CPU; on {d.device.type} the ViT runs every step")
elif vit_feature_cache:
    if lrs["vit"] or compile:
        raise SystemExit(f"vit_feature_cache={vit_feature_cache!r}: for a frozen ViT (lr_vit 0), the model not "
                         f"compiled whole (here: lr_vit {lrs['vit']}, compile {compile})")
    model.vit.feature_cache = FeatureCache(int(vit_feature_cache * 2**30))


def fixed_shape_losses(batch):
    """A padded batch on the device -> the step's loss parts, for the graph: the loss is divided by its own weight
    there (one micro-batch on one process: that is the step's whole weight)."""
    progress.image_features = None  # a batch without images leaves it so
    with model.fixed_shape_batches():
        loss_sum, wce = model(**model_inputs(batch), targets=batch["targets"], loss_weights=batch["loss_weights"],
                              z_loss=z_loss, response_mask=batch["targets"] >= 0,
                              target_positions=batch["target_positions"])
    parts = {"loss_sum": loss_sum, "weighted_ce": wce, "weight": batch["loss_weights"].sum()}
    if progress.image_features is not None:  # what the connector made (Progress's hook): a replay runs no hook
        parts["image_features"] = progress.image_features
    return parts


graph_off = ("several processes" if d.world_size > 1 else "grad_accum > 1" if grad_accum > 1 else
             "compile=True" if compile else "token_loss" if token_loss else "length_groups" if length_groups else
             "key_blocks" if key_blocks else "join_rows" if join_rows else None)
graphed = None
if d.device.type == "cuda" and cuda_graph and graph_off is None:
    graphed = GraphedStep(model, lambda batch: batch_to(batch, d.device), lambda p: p["loss_sum"] / p["weight"],
                          grad_clip, getattr(torch, dtype), max_graphs=16, print_fn=d.print, forward=fixed_shape_losses)
    if model.config.token_ids is not None:
        model.kept_tables(d.device)  # made now: copied from a Python list, it would wait on the GPU inside the step
if d.device.type == "cuda":
    d.print(f"cuda_graph: {'on' if graphed else 'off' if not cuda_graph else f'off ({graph_off})'}")

loader_args = dict(data_dir=data_dir, mixture=data_mixture, batch_size=batch_size, max_seq_len=max_seq_len,
                   max_crops=max_crops, max_row_crops=max_row_crops, max_video_frames=max_video_frames,
                   crop_size=model.config.vit.image_size, patch_size=model.config.vit.patch_size,
                   overlap_margins=overlap_margins, prefix_mode=prefix_mode,
                   weighting=loss_weighting, seed=seed, styles=styles, join_rows=join_rows)
loader = TrainLoader(split="train", rank=d.rank, world_size=d.world_size, grad_accum=grad_accum,
                     workers=loader_workers, fixed_shapes=graphed is not None,
                     token_attributes=token_attributes if token_loss else (), length_groups=length_groups,
                     **loader_args)
if d.device.type == "cuda":  # the host makes the next batches while the GPU computes (on a CPU it has no spare core)
    loader = StepsAhead(loader, pin_device=d.device, process=batch_process)
answer_items = validation_questions(model, loader.processor) if eval_answers and d.is_master else []
start_step = resume_run(ckpt_path, train_model, optimizer, loader, d) if resume else 0
progress = Progress(d, out_dir, max_steps, model, log_every, wandb_project, config)
d.print(f"parameters: vit {model.num_params('vit') / 1e6:.1f}M, connector {model.num_params('connector') / 1e6:.1f}M, "
        f"llm {model.num_params('llm') / 1e6:.1f}M ({model.config.llm.vocab_size:,} token rows) | "
        f"{d.world_size} process(es) on {d.device.type} | "
        f"global batch {batch_size * grad_accum * d.world_size} rows of {max_seq_len} tokens")

profiler = StepProfiler(profile, out_dir, d, start_step, max_steps)
for step in range(start_step, max_steps):
    if step >= max_steps:  # max_minutes cut the run short (below)
        break
    profiler.step(step)
    set_learning_rates(optimizer, step, max_steps, lr_decay_frac)
    rng_before = rng_state()  # before this step's dropout draws, in case the step must be redone
    if step % batch_echo == 0 or step == start_step:  # a run resumed within an echo draws its batches again
        data_state = loader.state_dict()  # before this step's batches
        micro_batches = loader.next_step()
    # the divisor of this step's loss: every loss token's weight, on every rank
    weight_total = d.all_reduce_sum(sum(mb["loss_weights"].sum() for mb in micro_batches).to(d.device))
    weighted_ce = torch.zeros((), device=d.device)
    token_parts = []
    if graphed is not None:  # one micro-batch: forward, backward and clipping in one replay
        parts, grad_norm = graphed.step(micro_batches[0])
        weighted_ce = parts["weighted_ce"]
        if "image_features" in parts:  # for Progress's statistics, without the padding windows' (the last ones)
            features = parts["image_features"]
            progress.image_features = features[:len(features) - int(micro_batches[0]["media_padding"][1])]
    for i, mb in enumerate(micro_batches if graphed is None else []):
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
            objective = loss_sum / weight_total * d.world_size
            if token_attribute_loss is not None:  # a mean over this micro-batch's tokens: one share of the step's
                token_part = token_attribute_loss(mb) / len(micro_batches)
                objective = objective + token_loss * token_part * d.world_size
                token_parts.append(token_part.detach())
            objective.backward()
        weighted_ce += wce
    if graphed is None:
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    grad_norm = whole(grad_norm).item()  # under FSDP the norm is a DTensor
    loss = (d.all_reduce_sum(weighted_ce) / weight_total).item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        stop_nonfinite(step, loss, grad_norm, micro_batches, ckpt_path, train_model, optimizer, d, data_state, config,
                       rng_before)
    optimizer.step()
    if graphed is None:  # a graph's gradients stay where it captured them, zeroed by the next replay
        optimizer.zero_grad(set_to_none=True)
    other_losses = {"token": float(sum(token_parts))} if token_parts else None  # this rank's: a look, not a mean
    progress.step(step, loss, optimizer, micro_batches, grad_norm, other_losses)
    done = step + 1
    max_steps = progress.max_steps = budget.fit(done, start_step, progress.step_times, max_steps)  # max_minutes
    if eval_every and (done % eval_every == 0 or done == max_steps):
        # compiled blocks validate eagerly: answering with a KV cache, each new cache position would compile a graph
        # of its own, and the loss in eval mode would compile them again for a few batches
        with torch.compiler.set_stance("force_eager") if compile_blocks else nullcontext():
            answers = answer_scores(model, loader.processor, answer_items) if eval_answers else None
            val = evaluate_loss(train_model, d, "val", eval_batches, autocast, **loader_args)
        progress.val(step, val, answers)
    if save_every and (done % save_every == 0 or done == max_steps):
        # within an echo the state before its batches, so that a resumed run draws them again
        save_checkpoint(ckpt_path, train_model, optimizer, done, d,
                        loader.state_dict() if done % batch_echo == 0 else data_state, config)

# -- the end: export, pictures, summary ------------------------------------------------------------------------
vit_cache, model.vit.feature_cache = model.vit.feature_cache, None
final_dir = os.path.join(out_dir, "final")
if token_attribute_loss is not None:  # the head trains the tokens; the exported model is the plain one
    token_attribute_loss.take_off(optimizer)
export_final(train_model, model, optimizer, d, final_dir, loader.processor, start)
if d.is_master:
    print(progress.summary(loader, final_dir, ckpt_path))
    if vit_cache is not None:
        met = vit_cache.hits / max(1, vit_cache.hits + vit_cache.misses)
        print(f"vit_feature_cache: {len(vit_cache.store):,} crops' features kept ({vit_cache.bytes / 2**30:.2f} GiB); "
              f"{met:.0%} of the crops the ViT was given were met before and skipped it")
    if graphed is not None:
        print(f"cuda_graph: {graphed.replays} steps replayed as CUDA graphs of {len(graphed.graphs)} batch layouts, "
              f"{graphed.eager_steps} eagerly")
d.close()
