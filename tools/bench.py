"""
How fast nanoMolmo2 trains and generates on one GPU, side by side with transformers' Molmo2 on the same
weights and inputs, in one process; prints markdown tables with the ratios (BENCHMARKS.md, issue 16).

    python tools/bench.py                                          # the full preset on one GPU, every section
    python tools/bench.py --sections="generate" --hf=False         # our generation alone
    python tools/bench.py --model_preset=tiny --device=cpu --steps=1 --warmup=0 --caption_tokens=20   # seconds
    python tools/bench.py --profile=True                           # + torch.profiler tables in out_dir
    torchrun --nproc_per_node=4 tools/bench.py --sections="train" --parallel=fsdp --activation_checkpointing=True

Sections (--sections, comma-separated):
- train: one optimizer step (bf16 autocast, fused AdamW) on the issue's batch: `batch_images` photos of
  640x480 (5 crops each at max_crops=4) with a long caption each, one example per row. Rows: transformers'
  Molmo2 in train mode (its loss over logits at every position) and our model alone (Molmo2's loss through the
  fused head), from the same weights (our save_pretrained -> transformers' from_pretrained). Then the real
  trainer, in a second table: train_joint.py itself, run as a subprocess for warmup + steps steps on a synthetic
  world that prepare_data.py writes to a temporary folder (`trainer_images` records; `trainer_batch_size` rows of
  `trainer_seq_len` tokens a step; no dropout, nothing saved on the way), its step times and tokens read from its
  log.jsonl (data loading, the host-to-device copy, clipping, logging all included), against our model alone on
  the same batches (training.TrainLoader with train_joint.py's arguments and seed, already on the device).
  Medians over the timed steps. One process only. --compile_blocks and --cuda_graph add rows: the blocks compiled,
  and the step replayed as a CUDA graph, here also both at once (train_joint.py's switches of those names, which
  the trainer takes one at a time: the two together are measured here only). With --compile_blocks the trainer's
  table runs compiled on both sides (train_joint.py --compile_blocks=True against the model with its blocks
  compiled).
- generate: prefill and decode of one photo's prompt at batch 1 and 16, `new_tokens` tokens forced (no stop):
  transformers' generate, ours with every step run eagerly (static=False), ours through model.DecodeStep
  (static=True: fixed shapes, a CUDA graph on CUDA), and the same compiled (compile=True: the prefill's LLM
  blocks too, Qwen3.compiled_blocks). Weights in the model dtype, no autocast. Prefill = until the first new
  token; decode = from there to the last, per token (timed at each token, after a device sync); each the median of
  generate_calls calls.
- scaling: our training step on one row of one image of 1, 9 or 25 crops, one video of 16, 64 or 128
  frames, or a packed row of 2k, 8k or 16k tokens (photo examples), with --activation_checkpointing.
Under torchrun (several processes) only `train` runs, without transformers: each GPU trains its own batch
through training.wrap_model (--parallel, --activation_checkpointing); rank 0 prints per-GPU throughput.

FLOPs (Molmo2.training_flops, matmuls only, forward + backward = 3 x forward): per LLM token 6 x the LLM's
matmul weights (the output head only at loss positions) + 12 x layers x heads x head_dim x row length
(attention); per ViT patch 6 x the ViT's matmul weights + 12 x layers x heads x head_dim x patches per crop;
per pooled token 6 x the connector's weights; every part trains here (a frozen part counts less: see
training_flops). MFU = FLOPs / step time / PEAK_FLOPS, the dense bf16 peak of an
H100/H200 (989 TFLOP/s). transformers' step is credited with the same FLOPs (it does more: logits everywhere).
"""

import gzip
import json
import os
import shutil
import subprocess
import sys
import statistics
import tempfile
import time
from contextlib import nullcontext

# tools/ sits one level below the repository root, where model.py, data.py and training.py live: make them
# importable however this script is started (python tools/bench.py, torchrun tools/bench.py)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import model as nano  # noqa: E402
from configurator import configure  # noqa: E402
from training import (MODEL_INPUTS, Dist, GraphedStep, TrainLoader, batch_to, build_optimizer,  # noqa: E402
                      pad_media, profile_report, wrap_model)

PEAK_FLOPS = 989e12  # dense bf16 tensor-core FLOP/s of an H100 / H200 SXM
PATHS = ("eager", "static", "compiled")  # our decode paths (generate's static and compile switches)
TRAINER_MIXTURE = {"image": (0.7, ["synth_image"]), "multi_image": (0.1, ["synth_multi"]),
                   "video": (0.2, ["synth_video"])}  # train_joint.py's run: the synthetic world

# -- knobs (override with --key=value) ------------------------------------------------------------------------
sections = "train,generate,scaling"  # comma-separated: train, generate, scaling
model_preset = "nanomolmo2"  # nanomolmo2 (Qwen3-0.6B + SigLIP2 so400m) | small | tiny; random weights
device = "auto"  # auto | cuda | cpu
dtype = "bfloat16"  # autocast dtype for training, weight dtype for generation (float32 on CPU)
hf = True  # side by side with transformers' Molmo2 (transformers >= 5.23)
steps = 10  # timed steps per measurement
warmup = 3  # untimed steps first
batch_images = 4  # train: photos, one per row
caption_tokens = 360  # about this many caption tokens per photo (train) and per scaling example
trainer = True  # train, one process: also time the real trainer (train_joint.py) against the model alone
trainer_images = 256  # train: single-image records of the synthetic world that train_joint.py trains on
trainer_batch_size = 8  # train: train_joint.py's rows a step
trainer_seq_len = 1024  # train: train_joint.py's tokens a row
new_tokens = 128  # generate: tokens forced per prompt
generate_calls = 3  # generate: clocked calls per path and batch size, their medians in the table (one call's prefill
#   moved 28.2 -> 43.0 ms between two machines at batch 1, BENCHMARKS.md "The prefill compiled")
decode_batches = (1, 16)
decode_paths = ("eager", "static", "compiled")  # generate: ours step by step; DecodeStep's CUDA graph; the same
#   after torch.compile (compiles once per batch size and cache length: ~0.5-1 min each, untimed)
compile = False  # train: also time torch.compile(model) alone
compile_blocks = False  # train: also time the model alone with each block compiled (model.compile_each_block), last
cuda_graph = False  # train, on a GPU: also time the step (forward, backward, clipping) replayed as a CUDA graph
#   (training.GraphedStep on the batch padded by training.pad_media, as train_joint.py's cuda_graph runs it), after
#   compile_blocks when that is on: the host then launches one graph a step instead of ~2,000 kernels
graph_fresh_grads = False  # train, with cuda_graph: also time the graph whose backward writes the gradients whole
#   into memory of its own (GraphedStep's fresh_grads), not zeroed and added into each step
graph_all_positions = False  # train, with cuda_graph: also time the graph that takes the loss at every position of
#   the padded rows, not only at those pad_media lists (list_targets, as train_joint.py's graph takes it)
scaling_crops = (1, 9, 25)  # crops of the one image of a row
scaling_frames = (16, 64, 128)  # frames of the one video of a row
scaling_rows = (2048, 8192, 16384)  # tokens of a packed row of photo examples
activation_checkpointing = False  # scaling and train's model-alone step: recompute each block in backward
parallel = "ddp"  # several GPUs (torchrun): ddp | fsdp
max_memory_gib = 0.0  # > 0: each process may allocate at most this much of its GPU (37.3 = a 40 GB card's 40e9 bytes):
#   torch.cuda.set_per_process_memory_fraction, so a run on a bigger card shows what fits the smaller one
profile = False  # also write torch.profiler tables of the top kernels (train steps, prefills, decode steps) to out_dir,
#   each headed by the GPU's busy time by kind (training.kernel_kinds: matmul, attention, optimizer, norms, ...)
profile_trace = False  # with profile: each profile's timeline too, out_dir/profile_<name>.json.gz (ui.perfetto.dev)
out_dir = "out/bench"
seed = 0
config = configure(globals())
# ------------------------------------------------------------------------------------------------------------


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(fn, dev, n_steps=None, n_warmup=None):
    """fn() timed over n_steps after n_warmup untimed calls -> (seconds per call, peak GiB or None)."""
    for _ in range(warmup if n_warmup is None else n_warmup):
        fn()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    n = steps if n_steps is None else n_steps
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync(dev)
    seconds = (time.perf_counter() - start) / n
    return seconds, (torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None)


def guarded(what, fn, dev):
    """fn() or None when it runs out of memory (or fails): one row of the table says so, the rest run on."""
    try:
        return fn()
    except Exception as e:  # an OOM at 128 frames must not cost the other rows
        print(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return None


def table(title, header, rows):
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


# -- inputs ----------------------------------------------------------------------------------------------------


def photo(rng, width=640, height=480):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def caption(rng, n_words):
    words = "the a red blue green small large cube ball cone sits left right of near above below and".split()
    return " ".join(rng.choice(words, n_words))


def overlap_margins(cfg):
    return (4, 4) if cfg.vit.image_size >= 378 else (1, 1)


def processor_for(cfg, max_crops=4):
    return data.Molmo2Processor(crop_size=cfg.vit.image_size, max_crops=max_crops, patch_size=cfg.vit.patch_size,
                                overlap_margins=overlap_margins(cfg))


def photo_examples(cfg, n, rng):
    """n examples of one 640x480 photo and a long caption each (data.format_example: what the trainer packs)."""
    processor = processor_for(cfg)
    examples = []
    for _ in range(n):
        record = {"images": [photo(rng)], "annotations": [{"style": "long_caption", "messages": [
            {"role": "user", "content": "Describe this image in detail."},
            {"role": "assistant", "content": caption(rng, caption_tokens)}]}]}
        examples.append(data.format_example(record, processor))
    return examples


def synthetic_example(cfg, n_crops, video, rng):
    """One example of n_crops crops (or video frames) of random pixels, pooled as Molmo2 pools them (2x2 for
    images, 3x3 for frames), then caption_tokens random text tokens with loss."""
    n = cfg.vit.image_size // cfg.vit.patch_size
    n_patches = n * n
    windows, tokens_h, tokens_w = data.pool_windows(np.arange(n_patches).reshape(n, n), *((3, 3) if video else (2, 2)))
    windows = torch.from_numpy(windows).long()
    pooling = torch.cat([torch.where(windows >= 0, windows + c * n_patches, -1) for c in range(n_crops)])
    per_crop = [data.FRAME_START_ID] + [data.IMAGE_PATCH_ID] * (tokens_h * tokens_w) + [data.FRAME_END_ID]
    vision_ids = per_crop * n_crops
    text = torch.from_numpy(rng.integers(0, 150_000, caption_tokens + 1))
    input_ids = torch.cat([torch.tensor(vision_ids), text[:-1]])
    T, V = len(input_ids), len(vision_ids)
    targets = torch.cat([torch.full((V,), -1), text[1:]])
    pixels = torch.randn(n_crops, n_patches, cfg.vit.patch_dim)
    media = ({"pixel_values_videos": pixels, "video_token_pooling": pooling,
              "video_grids": torch.tensor([[n_crops, tokens_h, tokens_w]])} if video else
             {"pixel_values": pixels, "image_token_pooling": pooling, "image_num_crops": torch.tensor([n_crops]),
              # (low rows, low cols, high rows, high cols): one crop's tokens, then the other crops' side by side
              "image_grids": torch.tensor([[tokens_h, tokens_w, tokens_h, tokens_w * (n_crops - 1)]])})
    return data.Example(input_ids=input_ids, targets=targets, loss_weights=(targets >= 0).float() / caption_tokens,
                        position_ids=torch.arange(T), branch_ids=(torch.arange(T) >= V).long(),
                        is_vision=torch.isin(input_ids, torch.tensor(data.VISION_TOKEN_IDS)), **media)


def to_device(batch, dev):
    return {k: v.to(dev) for k, v in batch.items()}


def hf_inputs(batch):
    """Our collated batch -> transformers' Molmo2 inputs: the 2-D padding mask (its own mask rules: causal,
    vision tokens bidirectional), labels at the input positions (it shifts them itself)."""
    inputs = {k: batch[k] for k in ("input_ids", "mm_token_type_ids", "pixel_values", "image_token_pooling",
                                    "image_grids", "image_num_crops") if k in batch}
    inputs["attention_mask"] = (batch["example_ids"] >= 0).long()
    inputs["labels"] = torch.where(batch["targets"] >= 0, batch["input_ids"], -100)
    return inputs


# -- models ----------------------------------------------------------------------------------------------------


def build_ours(dev):
    torch.manual_seed(seed)
    return nano.Molmo2(nano.Molmo2Config.preset(model_preset)).to(dev)


def load_hf(path, dev, weight_dtype):
    from transformers import Molmo2ForConditionalGeneration
    return Molmo2ForConditionalGeneration.from_pretrained(path, dtype=weight_dtype, attn_implementation="sdpa").to(dev)


def optimizer_for(params, dev):
    return torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-6, fused=dev.type == "cuda")


def ours_step(train_model, optimizer, batch, autocast):
    with autocast:
        loss, _ = train_model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, targets=batch["targets"],
                              loss_weights=batch["loss_weights"], z_loss=1e-4, response_mask=batch["targets"] >= 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def graphed_step(model, optimizer, cpu_batch, dev, fresh_grads=False, all_positions=False):
    """() -> one optimizer step whose forward, backward and clipping (to norm 1.0, as train_joint.py's default) replay
    as a CUDA graph (training.GraphedStep): the batch padded by pad_media and the model in fixed_shape_batches(), as
    train_joint.py's cuda_graph runs it. The first call captures; a step the graph cannot hold says why and runs
    eagerly. all_positions: the loss at every position of the rows, not at pad_media's target_positions."""
    padded = to_device(pad_media(cpu_batch, list_targets=not all_positions), dev)  # on the device already, as the
    #   other rows' batch: no copy timed

    def losses(b):
        with model.fixed_shape_batches():
            loss_sum, _ = model(**{k: b[k] for k in MODEL_INPUTS if k in b}, targets=b["targets"],
                                loss_weights=b["loss_weights"], z_loss=1e-4, response_mask=b["targets"] >= 0,
                                target_positions=b.get("target_positions"))
        return {"loss_sum": loss_sum}

    optimizer.zero_grad(set_to_none=True)  # the graph's first (eager) run makes the gradients it then zeroes in place
    graphed = GraphedStep(model, lambda b: b, lambda parts: parts["loss_sum"], 1.0, getattr(torch, dtype),
                          forward=losses, fresh_grads=fresh_grads)

    def step():
        graphed.step(padded)
        optimizer.step()  # outside the graph, as in train_joint.py; never zero_grad(set_to_none=True) after it
    step.graphed, step.batch = graphed, padded  # for benchmarks that look inside the step
    return step


def hf_step(hf_model, optimizer, inputs, autocast):
    with autocast:
        loss = hf_model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def write_profile(fn, dev, name, calls=3):
    """torch.profiler over `calls` calls of fn (after one untimed) -> out_dir/profile_<name>.txt: the summary line of
    training.profile_report (wall time against GPU-busy time, kernels, syncs), then its table of the ops."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    fn()  # untimed: a first call may plan, tune or allocate
    sync(dev)
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(dev)
        wall = (time.perf_counter() - start) / calls
    summary, table = profile_report(prof.key_averages(), calls, wall, dev.type == "cuda", unit="call")
    # the name may be a label in words: spaces become _, and quotes, commas and the like go, so that the file's name
    # survives a shell and the copies that leave out odd names
    name = "".join(c for c in name.replace(" ", "_") if c.isalnum() or c == "_")
    line = f"{name}: {summary}"
    path = os.path.join(out_dir, f"profile_{name}.txt")
    with open(path, "w") as f:
        f.write(line + "\n\n" + table)
    if profile_trace:  # gzipped: a compiled train step's three calls are tens of MB of JSON
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(raw)
            with open(raw, "rb") as f, gzip.open(os.path.join(out_dir, f"profile_{name}.json.gz"), "wb") as g:
                shutil.copyfileobj(f, g)
    print(f"profile: {line} | {path}", flush=True)


# -- sections --------------------------------------------------------------------------------------------------


def train_row(what, seconds_peak, batch, flops, n_images, baseline=None):
    if seconds_peak is None:
        return [what, "failed", "-", "-", "-", "-", "-"]
    seconds, peak = seconds_peak
    tokens = int((batch["example_ids"] >= 0).sum())
    ratio = f"{baseline / seconds:.2f}x" if baseline else "-"
    return [what, f"{seconds * 1e3:.1f}", f"{tokens / seconds:,.0f}", f"{n_images / seconds:.1f}",
            f"{flops / seconds / PEAK_FLOPS:.1%}", fmt(peak, ".1f"), ratio]


def section_train(d, autocast):
    dev = d.device
    cfg = nano.Molmo2Config.preset(model_preset)
    rng = np.random.default_rng(seed + d.rank)
    cpu_batch = data.collate([[ex] for ex in photo_examples(cfg, batch_images, rng)])
    batch = to_device(cpu_batch, dev)
    model = build_ours(dev)
    flops = model.training_flops(batch)
    rows, hf_seconds = [], None
    if hf and d.world_size == 1:
        with tempfile.TemporaryDirectory() as path:
            model.save_pretrained(path)
            model.cpu()  # one model on the GPU at a time: the peaks are each model's own
            hf_model = load_hf(path, dev, torch.float32).train()
        opt = optimizer_for(hf_model.parameters(), dev)
        inputs = hf_inputs(batch)
        result = guarded("transformers train step",
                         lambda: measure(lambda: hf_step(hf_model, opt, inputs, autocast), dev), dev)
        hf_seconds = result[0] if result else None
        rows.append(train_row("transformers Molmo2, train mode", result, batch, flops, batch_images, hf_seconds))
        del hf_model, opt, inputs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        model.to(dev)
    model.train()
    model.llm.gradient_checkpointing = model.vit.gradient_checkpointing = activation_checkpointing
    train_model = wrap_model(model, d, parallel)
    optimizer = build_optimizer(model, {"connector": 1e-5, "vit": 1e-5, "llm": 1e-5}, {})
    where = f", {parallel} x {d.world_size}" if d.world_size > 1 else ""
    result = guarded("model alone",
                     lambda: measure(lambda: ours_step(train_model, optimizer, batch, autocast), dev), dev)
    rows.append(train_row(f"nanoMolmo2 model alone{where}", result, batch, flops, batch_images, hf_seconds))

    def compiled_row(what, step, first_label="compiling"):
        """A compiled (or captured) step's row, its first call (the one that compiles or captures) timed apart and
        named in the label. Its peak memory is the larger of the first call's and the timed calls': a CUDA graph
        allocates its activations once, while capturing, and its replays allocate nothing new."""
        def first_then_measure():
            sync(dev)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            start = time.perf_counter()
            step()
            sync(dev)
            first = time.perf_counter() - start
            first_peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
            seconds, peak = measure(step, dev, n_warmup=max(warmup, 2) - 1)
            return first, (seconds, max(peak, first_peak) if peak is not None else None)
        first, result = guarded(what, first_then_measure, dev) or (None, None)
        label = f" (first step, {first_label}: {first:.0f} s)" if first is not None else ""
        rows.append(train_row(f"nanoMolmo2 model alone, {what}{where}{label}", result, batch, flops,
                              batch_images, hf_seconds))

    if compile:
        nano.ready_for_compile()
        compiled = torch.compile(train_model)
        compiled_row("torch.compile", lambda: ours_step(compiled, optimizer, batch, autocast))
    if profile and d.is_master:
        write_profile(lambda: ours_step(train_model, optimizer, batch, autocast), dev, "train")
    trainer_report = None
    if compile_blocks:  # last: it compiles the model's blocks in place
        nano.compile_each_block(model)
        compiled_row("each block compiled", lambda: ours_step(train_model, optimizer, batch, autocast))
        if profile and d.is_master:
            write_profile(lambda: ours_step(train_model, optimizer, batch, autocast), dev, "train_compiled_blocks")
    if d.world_size == 1 and trainer:  # with compile_blocks both sides compiled: train_joint.py gets the switch
        trainer_report = guarded("train_joint.py", lambda: trainer_table(cfg, model, train_model, optimizer, dev,
                                                                         autocast), dev) or ""
    if cuda_graph and dev.type == "cuda" and d.world_size == 1:
        variants = [("", "train_cuda_graph", {}, True),
                    (", its gradients fresh each replay", "train_cuda_graph_fresh", {"fresh_grads": True},
                     graph_fresh_grads),
                    (", the loss at every position", "train_cuda_graph_all_positions", {"all_positions": True},
                     graph_all_positions)]
        for label, profile_name, how, on in variants:
            if not on:
                continue
            step = graphed_step(model, optimizer, cpu_batch, dev, **how)
            compiled_row(("each block compiled, " if compile_blocks else "") + "the step as a CUDA graph" + label,
                         step, "capturing")
            if profile and d.is_master:
                write_profile(step, dev, profile_name)
            del step  # its graph and the graph's memory go before the next variant is captured
    tokens = int((cpu_batch["example_ids"] >= 0).sum())
    title = (f"Training step: {batch_images} photos 640x480 ({int(cpu_batch['image_num_crops'].sum())} crops), "
             f"{tokens:,} tokens{' per GPU' if d.world_size > 1 else ''}, {model_preset}"
             + (", activation checkpointing" if activation_checkpointing else ""))
    header = ["step", "ms", "tokens/s" + (" per GPU" if d.world_size > 1 else ""), "images/s", "MFU", "peak GiB",
              "vs transformers"]
    report = table(title, header, rows)
    if trainer_report is not None:
        report += "\n" + trainer_report
    return report


def trainer_knobs(cfg, data_dir):
    """train_joint.py's knobs for the bench's run, which are also TrainLoader's arguments below (as train_joint.py
    passes them): the same values make the same batches."""
    return dict(data_dir=data_dir, data_mixture=TRAINER_MIXTURE, batch_size=trainer_batch_size,
                max_seq_len=trainer_seq_len, max_crops=4, max_row_crops=16, max_video_frames=8,
                overlap_margins=overlap_margins(cfg), prefix_mode="sft", loss_weighting="sft", seed=seed, styles=None)


def run_trainer(knobs, dev, out):
    """Run train_joint.py (warmup + steps steps, nothing saved on the way, no dropout) -> [(step seconds, tokens)]
    of its timed steps, from its log.jsonl."""
    args = [f"--{k}={v!r}" for k, v in knobs.items()] + [
        f"--model_preset={model_preset}", f"--device={dev.type}", f"--dtype={dtype}", f"--out_dir={out}",
        f"--max_steps={warmup + steps}", "--eval_every=0", "--save_every=0", "--log_every=1", "--resid_dropout=0.0",
        "--resume=False", f"--activation_checkpointing={activation_checkpointing}",  # as the model-alone rows
        f"--compile_blocks={compile_blocks}"]
    result = subprocess.run([sys.executable, "train_joint.py", *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        last = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "no message")
        raise RuntimeError(f"train_joint.py exited with {result.returncode}: {last} (its arguments: {' '.join(args)})"
                           f"\n{result.stderr[-2000:]}")  # the error first: a failed row prints one line
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["step_s"], round(r["tokens_per_s"] * r["step_s"])) for r in records
            if "step_s" in r and r["step"] >= warmup]


def trainer_table(cfg, model, train_model, optimizer, dev, autocast):
    """The real trainer against our model alone: train_joint.py run as a user runs it (its data loader, logging and
    all) on a small synthetic world, and our model's step alone on the same batches (TrainLoader with
    train_joint.py's arguments), each already on the device; medians over the timed steps."""
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        subprocess.run([sys.executable, "prepare_data.py", "--dataset=synthetic", f"--out={data_dir}",
                        f"--train_images={trainer_images}"], cwd=ROOT, check=True, capture_output=True)
        knobs = trainer_knobs(cfg, data_dir)
        if dev.type == "cuda":  # this process's cached blocks back to the card: the trainer is another process, and
            #   beside the rows above (up to ~40 GiB cached) an 80 GB card may not hold it
            torch.cuda.empty_cache()
        trainer = run_trainer(knobs, dev, os.path.join(tmp, "run"))
        loader = TrainLoader(data_dir=data_dir, mixture=knobs["data_mixture"], split="train",
                             batch_size=knobs["batch_size"], max_seq_len=knobs["max_seq_len"],
                             max_crops=knobs["max_crops"], max_row_crops=knobs["max_row_crops"],
                             max_video_frames=knobs["max_video_frames"], crop_size=cfg.vit.image_size,
                             patch_size=cfg.vit.patch_size, overlap_margins=knobs["overlap_margins"],
                             prefix_mode=knobs["prefix_mode"], weighting=knobs["loss_weighting"], seed=knobs["seed"],
                             styles=knobs["styles"], rank=0, world_size=1, grad_accum=1, workers=0)
        batches = [batch_to(loader.next_step()[0], dev) for _ in range(warmup + steps)]
    alone = []
    for i, batch in enumerate(batches):
        sync(dev)
        start = time.perf_counter()
        ours_step(train_model, optimizer, batch, autocast)
        sync(dev)
        if i >= warmup:
            alone.append((time.perf_counter() - start, int((batch["example_ids"] >= 0).sum())))
    flops = [model.training_flops(batch) for batch in batches[warmup:]]
    if [n for _, n in alone] != [n for _, n in trainer]:
        raise RuntimeError(f"the batches differ from train_joint.py's: tokens {[n for _, n in alone]} here, "
                           f"{[n for _, n in trainer]} there")

    def row(what, timed, baseline=None):
        seconds = float(np.median([t for t, _ in timed]))
        tok_s = float(np.median([n / t for t, n in timed]))
        mfu = float(np.median([f / t for (t, _), f in zip(timed, flops)])) / PEAK_FLOPS
        return [what, f"{seconds * 1e3:.1f}", f"{tok_s:,.0f}", f"{mfu:.1%}",
                f"{tok_s / baseline:.2f}x" if baseline else "1.00x"], tok_s

    alone_row, alone_tok_s = row("model alone, the same batches on the device", alone)
    trainer_row, _ = row("train_joint.py, data included", trainer, alone_tok_s)
    title = (f"The trainer: train_joint.py on the synthetic world, {trainer_batch_size} rows of {trainer_seq_len} "
             f"tokens a step, {model_preset}, medians of {len(alone)} steps after {warmup}")
    return table(title, ["step", "median ms", "tokens/s", "MFU", "vs model alone"], [alone_row, trainer_row])


class Clock:
    """The time each new token comes (after a device sync): our generate's on_token(step, ids), and
    transformers' streamer, whose put() first receives the prompt (skipped) and then each new token."""

    def __init__(self, dev, skip_first=False):
        self.dev, self.skip, self.times = dev, skip_first, []

    def __call__(self, *args):
        sync(self.dev)
        if self.skip:
            self.skip = False
        else:
            self.times.append(time.perf_counter())

    put = __call__

    def end(self):
        pass


def time_generate(run, dev, streamer=False, warm_tokens=2):
    """run(n, clock) generates n tokens, reporting each to clock (None: to nothing) -> (prefill seconds, decode
    seconds per token, the same as a caller without a clock sees it): prefill until the first new token, decode the
    rest, the medians of generate_calls calls after a warm-up of warm_tokens. The clock syncs the device at every
    token, which the decoding itself need not do; the third value times a whole call without it, less the prefill."""
    run(warm_tokens, Clock(dev, streamer))
    prefills, per_token = [], []
    for _ in range(generate_calls):
        sync(dev)
        clock, start = Clock(dev, streamer), time.perf_counter()
        run(new_tokens, clock)
        if len(clock.times) != new_tokens:
            raise RuntimeError(f"{len(clock.times)} tokens timed, expected {new_tokens}")
        prefills.append(clock.times[0] - start)
        per_token.append((clock.times[-1] - clock.times[0]) / (new_tokens - 1))
    prefill = statistics.median(prefills)
    sync(dev)
    start = time.perf_counter()
    run(new_tokens, None)
    sync(dev)
    whole = time.perf_counter() - start
    return prefill, statistics.median(per_token), (whole - prefill) / (new_tokens - 1)


def section_generate(dev, weight_dtype):
    cfg = nano.Molmo2Config.preset(model_preset)
    model = build_ours(dev).to(weight_dtype).eval()
    processor = processor_for(cfg)
    image = photo(np.random.default_rng(seed))
    prompt = "<|image|><|im_start|>user\nDescribe this image.<|im_end|>\n<|im_start|>assistant\n"
    hf_model = None
    if hf:
        with tempfile.TemporaryDirectory() as path:
            model.save_pretrained(path)
            hf_model = load_hf(path, dev, weight_dtype).eval()
    rows = []
    for B in decode_batches:
        inputs = {k: v.to(dev, weight_dtype) if v.is_floating_point() else v.to(dev)
                  for k, v in processor(text=[prompt] * B, images=[image] * B).items()}
        ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")

        def ours(path):
            return lambda n, clock: nano.generate(model, ids, n, attention_mask=mask, stop_ids=(), on_token=clock,
                                                  static=path != "eager", compile=path == "compiled", **inputs)

        # warmed up at the timed length: a new cache length compiles the compiled path again, and gives every path's
        # prefill attention keys of other strides (cuDNN's plans are made per stride: the eager prefill timed 30-45 ms
        # slower after a warm-up of 2 tokens, BENCHMARKS.md "The prefill compiled")
        results = {path: guarded(f"ours {path}", lambda: time_generate(ours(path), dev, warm_tokens=new_tokens), dev)
                   for path in decode_paths}
        if hf_model is not None:
            def theirs(n, clock):
                return hf_model.generate(input_ids=ids, attention_mask=mask, **inputs, max_new_tokens=n,
                                         min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=151643,
                                         streamer=clock)
            results["hf"] = guarded("transformers generate", lambda: time_generate(theirs, dev, streamer=True), dev)
        if profile:  # the prefill alone (one new token), ours eager (and compiled) and transformers', at each batch
            write_profile(lambda: ours("eager")(1, None), dev, f"prefill_b{B}_ours")
            if "compiled" in decode_paths:
                write_profile(lambda: ours("compiled")(1, None), dev, f"prefill_b{B}_ours_compiled")
            if hf_model is not None:
                write_profile(lambda: theirs(1, None), dev, f"prefill_b{B}_transformers")
        if profile and B == decode_batches[0]:
            for path in decode_paths:  # the compiled step is warm at new_tokens only (a cache length compiles)
                n = new_tokens if path == "compiled" else min(16, new_tokens)
                write_profile(lambda: ours(path)(n, None), dev, f"generate_{path}")
        prefill = {k: None if v is None else v[0] * 1e3 for k, v in results.items()}
        per_token = {k: None if v is None else v[1] * 1e3 for k, v in results.items()}
        tok_s = {k: None if v is None else B / v[1] for k, v in results.items()}
        unclocked = {k: None if v is None else v[2] * 1e3 for k, v in results.items()}
        best = min((p for p in decode_paths if per_token[p] is not None), key=per_token.get, default=None)

        def row(what, values, spec, higher_is_better):
            a, b = values.get(best), values.get("hf")
            ratio = "-" if a is None or b is None else f"{(a / b if higher_is_better else b / a):.2f}x"
            return [what, fmt(values.get("hf"), spec)] + [fmt(values.get(p), spec) for p in PATHS] + [ratio]

        T = ids.shape[1]
        rows.append(row(f"prefill, batch {B} ({T} tokens), ms", prefill, ".1f", False))
        rows.append(row(f"decode, batch {B}, ms/token", per_token, ".2f", False))
        rows.append(row(f"decode, batch {B}, new tokens/s", tok_s, ",.0f", True))
        rows.append(row(f"decode, batch {B}, ms/token, no per-token sync", unclocked, ".2f", False))
    header = ["generation", "transformers"] + [f"nanoMolmo2 {p}" for p in PATHS] + ["fastest vs transformers"]
    title = f"Generation: one photo 640x480 per prompt, {new_tokens} tokens forced, {weight_dtype}, {model_preset}"
    return table(title, header, rows)


def section_scaling(dev, autocast):
    cfg = nano.Molmo2Config.preset(model_preset)
    rng = np.random.default_rng(seed)
    model = build_ours(dev).train()
    model.llm.gradient_checkpointing = model.vit.gradient_checkpointing = activation_checkpointing
    optimizer = build_optimizer(model, {"connector": 1e-5, "vit": 1e-5, "llm": 1e-5}, {})
    # (what, a function making the row's examples, pad_to)
    cases = [(f"image of {n} crops", lambda n=n: [synthetic_example(cfg, n, False, rng)], None) for n in scaling_crops]
    cases += [(f"video of {n} frames", lambda n=n: [synthetic_example(cfg, n, True, rng)], None)
              for n in scaling_frames]
    example = photo_examples(cfg, 1, rng)[0]
    cases += [(f"packed row of {L:,} tokens", lambda L=L: [example] * max(1, L // len(example)), L)
              for L in scaling_rows]
    rows = []
    for what, make_row, pad_to in cases:
        batch = to_device(data.collate([make_row()], pad_to=pad_to), dev)
        tokens = int((batch["example_ids"] >= 0).sum())
        crops = sum(batch[k].shape[0] for k in ("pixel_values", "pixel_values_videos") if k in batch)
        result = guarded(what, lambda: measure(lambda: ours_step(model, optimizer, batch, autocast), dev,
                                               n_steps=max(1, steps // 3), n_warmup=min(warmup, 1)), dev)
        if result is None:
            rows.append([what, f"{tokens:,}", crops, "out of memory / failed", "-", "-", "-"])
        else:
            seconds, peak = result
            rows.append([what, f"{tokens:,}", crops, f"{seconds * 1e3:.0f}", f"{tokens / seconds:,.0f}",
                         f"{model.training_flops(batch) / seconds / PEAK_FLOPS:.1%}", fmt(peak, ".1f")])
    header = ["one row of", "tokens", "crops", "ms/step", "tokens/s", "MFU", "peak GiB"]
    title = (f"Scaling on one device: one row a step, {model_preset}, "
             f"activation checkpointing {activation_checkpointing}")
    return table(title, header, rows)


def main():
    d = Dist(device)
    os.makedirs(out_dir, exist_ok=True)
    dev = d.device
    weight_dtype = getattr(torch, dtype) if dev.type == "cuda" else torch.float32
    autocast = torch.autocast("cuda", dtype=weight_dtype) if dev.type == "cuda" else nullcontext()
    chosen = [s.strip() for s in sections.split(",") if s.strip()]
    unknown = set(chosen) - {"train", "generate", "scaling"}
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; expected train, generate, scaling")
    if set(decode_paths) - set(PATHS):
        raise SystemExit(f"--decode_paths: unknown {sorted(set(decode_paths) - set(PATHS))}; expected some of {PATHS}")
    if d.world_size > 1:
        chosen = [s for s in chosen if s == "train"]  # the other sections measure one device
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    if max_memory_gib > 0 and dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, max_memory_gib * 2**30 / total), dev)
        card += f" (capped at {max_memory_gib:g} GiB a process)"
    d.print(f"# tools/bench.py on {card} x {d.world_size}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    report = []
    for name in chosen:
        part = {"train": lambda: section_train(d, autocast), "generate": lambda: section_generate(dev, weight_dtype),
                "scaling": lambda: section_scaling(dev, autocast)}[name]()
        d.print(part)
        report.append(part)
        if d.is_master:  # after each section: a run cut short keeps what it measured
            with open(os.path.join(out_dir, "bench.md"), "w") as f:
                f.write("\n".join(report))
    d.close()


if __name__ == "__main__":
    main()
