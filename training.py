"""
What the stage scripts (train_vision.py, train_align.py, train_joint.py) share, so that each of them reads as
its loop: devices and torchrun, DDP / FSDP2 wrapping, per-part optimizer groups and schedules, atomic
checkpoints and the dump of a non-finite step, the progress line and its extras (log.jsonl, TensorBoard, W&B,
PNGs), the model to start from, and the loaders (the mixture -> micro-batches, with forked worker processes).

Design choices:
- One process per GPU under torchrun (RANK / LOCAL_RANK / WORLD_SIZE), or a single process on CPU / one GPU.
  NCCL on GPUs, gloo on CPU, so multi-process runs can be tested on a laptop.
- FSDP2 (`fully_shard`) per transformer block (the model's blocks(): the ViT's and the LLM's, in stage 1 the
  ViT's and the text tower's), then the root, with bf16 parameters and float32 gradient reduction; DDP
  otherwise. On CPU everything is float32.
- Checkpoints hold everything a resumed run needs to continue the same trajectory (model, optimizer,
  step, data-loader state of every rank, RNG states) and are written to a temporary name, then renamed.
"""

import collections
import copy
import functools
import gc
import itertools
import json
import math
import os
import pickle
import random
import struct
import sys
import time
import traceback
import uuid
import weakref
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------
# Devices and processes
# ---------------------------------------------------------------------------


def usable_cores():
    """The cores this process may run on (its affinity: taskset, a container's cpuset), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def keep_freed_memory():
    """glibc's malloc hands large freed blocks back to the kernel (blocks above its mmap threshold, which it raises
    to at most 32 MB, and the free top of its heap past the trim threshold), and the next step's tensors of the same
    sizes are then mapped afresh: every page faulted in and zeroed again. On this project's 2-core CPU (a virtual
    machine) a page touched afresh costs ~5-17 us, and the CPU demo's joint step faulted ~3,000-6,000 pages a step
    (BENCHMARKS.md "Memory kept for the next step"). Blocks up to 256 MB from the heap, and no trimming: the process
    keeps its peak memory (which it reaches at every step anyway) and reuses it. -> whether glibc took the settings
    (False off Linux or on another C library: nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    return bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)) and bool(mallopt(M_MMAP_THRESHOLD, 256 * 2 ** 20))


class Dist:
    """Where this process runs: rank, world size, device, and whether it is the one that prints."""

    def __init__(self, device="auto"):
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # processes on this machine
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        self.device = torch.device(device)
        self.is_master = self.rank == 0
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def set_up_host(self, loader_workers=0):
        """On a GPU, this process only collates batches and launches kernels. Its CPU ops (cat, copies) spread
        over every core fight the loader workers and the other ranks for them, and a thread team waiting on a
        busy core stalls: on a shared 16-core H200 machine, steps got 10x slower, and on 2 cores a 64-image
        torch.cat took 0.5 s instead of 5 ms while two workers ran (BENCHMARKS.md). OMP_NUM_THREADS, when set,
        wins. CPU runs keep every core: there the arithmetic is this process's, and they keep the memory they
        free (keep_freed_memory)."""
        if self.device.type == "cuda" and "OMP_NUM_THREADS" not in os.environ:
            share = (os.cpu_count() or 1) // max(1, self.local_world_size * (1 + loader_workers))
            torch.set_num_threads(max(1, min(4, share)))
        elif self.device.type == "cpu":
            keep_freed_memory()

    def resolve_loader_workers(self, requested):
        """A stage's loader_workers knob -> the number of worker processes: -1 (auto) on a GPU is every core of this
        process's share but two (the training thread and the one collating the next batches), so the GPU never
        waits on the CPU work of making examples (in this process it stalled steps 2-10x; a small model's step
        of 128 examples needs ~0.5 s of it, BENCHMARKS.md); 0 on a CPU run, where the workers would take cores
        from the arithmetic, and off Linux (workers are forked)."""
        if requested >= 0:
            return requested
        if self.device.type != "cuda" or not sys.platform.startswith("linux"):
            return 0
        return max(1, usable_cores() // self.local_world_size - 2)

    def all_reduce_sum(self, x):
        if self.world_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def all_gather_objects(self, obj):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def close(self):
        if dist.is_initialized():
            # every rank tears its process group down together: a rank that tore gloo's down while rank 0 was still
            # drawing its pictures aborted at exit once in a full test run (not reproduced in 32 runs since)
            dist.barrier()
            dist.destroy_process_group()

    def print(self, *args, **kwargs):
        if self.is_master:
            print(*args, **kwargs, flush=True)


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The CPU's feature flags as the kernel lists them (Linux); an empty set where there is no such file."""
    try:
        with open(cpuinfo) as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def cpu_has_bf16_matmul(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX), from the kernel's flags (Linux; False
    elsewhere). With them a bf16 matmul runs several times faster than a float32 one (this project's 2-core CI
    machine: 850-960 against 190-210 GFLOP/s at the demo LLM's MLP shapes); without them bf16 is emulated and slower."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags(cpuinfo))


def cpu_has_amx(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU has AMX's bf16 tiles: with AVX512-BF16 alone a 2-core CPU multiplied the demo's bf16
    products at 290-410 GFLOP/s, with AMX at ~2,400 (BENCHMARKS.md "A smaller world for the CPU demo")."""
    return "amx_bf16" in cpu_flags(cpuinfo)


def cpp_compiler():
    """The C++ compiler torch.compile builds its CPU code with on Linux ($CXX, else g++), or None where the machine
    has none (a slim container): compiling on a CPU would then fail at the first step."""
    import shutil
    return shutil.which(os.environ.get("CXX") or "g++")


def step_autocast(device, dtype, cpu_autocast="off", print_fn=print):
    """The training step's autocast context: to dtype on a GPU; on a CPU only with cpu_autocast "on", or "auto"
    where the CPU has bf16 matrix instructions (and dtype is bfloat16); else none: float32. The weights, their
    gradients and AdamW stay float32 either way."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    if cpu_autocast not in ("off", "on", "auto"):
        raise ValueError(f"cpu_autocast={cpu_autocast!r}: expected 'off', 'on' or 'auto'")
    on = cpu_autocast == "on" or (cpu_autocast == "auto" and dtype == "bfloat16" and cpu_has_bf16_matmul())
    if cpu_autocast == "auto":
        print_fn(f"cpu_autocast='auto': {'bfloat16, this CPU has bf16 matrix instructions' if on else 'float32'}")
    return torch.autocast("cpu", dtype=getattr(torch, dtype)) if on else nullcontext()


def autocast_dtype(autocast):
    """The dtype a step under step_autocast's context multiplies in: its autocast's, or float32 without one."""
    return autocast.fast_dtype if isinstance(autocast, torch.autocast) else torch.float32


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def mixture_has_text_only(data_dir, mixture):
    """Whether a dataset of the mixture holds text-only records (judged by its first record): a micro-batch of them
    leaves the ViT and the connector without gradients, which DDP must be told to expect."""
    import data
    for _, names in mixture.values():
        for name in names:
            path = os.path.join(data_dir, name, "train.jsonl")
            if os.path.isfile(path):
                records = data.RecordFile(path, load_media=False)
                if len(records) and not ({"image", "video"} & set(records.read(0))):
                    return True
    return False


def wrap_model(model, d, parallel="ddp", dtype=torch.bfloat16, find_unused=False):
    """DDP or FSDP2 across the processes of `d`; the model unchanged in a single process.
    `model.blocks()` lists the transformer blocks (ViT and LLM) that FSDP shards one by one. find_unused: DDP
    checks every step for parameters without gradient (text-only batches: mixture_has_text_only); frozen
    parts need no such check, DDP skips them."""
    if d.world_size == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if d.device.type == "cuda" else None
        kwargs = {"mp_policy": mp} if mp is not None else {}
        for block in model.blocks():
            fully_shard(block, **kwargs)  # each block's parameters gathered just before it runs
        fully_shard(model, **kwargs)
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                   find_unused_parameters=find_unused)
    raise ValueError(f"parallel={parallel!r}: expected 'ddp' or 'fsdp'")


# ---------------------------------------------------------------------------
# Optimizer: one group per part, each with its own learning rate and warmup
# ---------------------------------------------------------------------------

PARTS = ("connector", "vit", "llm")


def orthogonalised(G, steps=5, dtype=torch.float32):
    """Muon's direction for a 2-D update G, or for each matrix of a stack G (n, rows, cols): roughly its nearest
    semi-orthogonal matrix (every singular value moved toward 1, the singular vectors kept), by five steps of a
    quintic Newton-Schulz iteration in dtype. Its coefficients are tuned to pull small singular values up fast
    rather than to converge exactly: the values end spread around 1 (tests/test_training.py holds them within
    0.6-1.25), not at 1, so the iteration needs no more precision than bf16's: MuonAdamW runs it in the dtype the
    step's own matmuls run in (bf16 under autocast, on a GPU or a CPU with bf16 matrix instructions), float32
    elsewhere, as a CPU without those instructions multiplies bf16 ~100x slower. On the CPU demo's joint stage the
    bf16 iteration took 15.6 ms a step against 28.8 (BENCHMARKS.md "Stage 1's share on a half-speed CPU; Muon's
    iteration in bf16").
    Each step is two fused multiply-adds (addmm's beta and alpha), and a stack goes through them at once: on the CPU
    demo's 37 matrices, stacked by shape, 16 ms a step against 27 ms one at a time (BENCHMARKS.md "Muon's matrices
    stacked")."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # every singular value now <= 1, where it converges
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide side: X @ X.T is then the smaller square
        X = X.mT
    mul_add = torch.baddbmm if X.dim() == 3 else torch.addmm
    for _ in range(steps):
        A = X @ X.mT
        X = mul_add(X, mul_add(A, A, A, beta=b, alpha=c), X, beta=a)  # each singular value s -> a s + b s^3 + c s^5
    return X.mT if tall else X


def is_shard(t):
    """Whether t is FSDP's shard of a tensor (a DTensor). Asked of the module only once something has loaded it
    (fully_shard does): torch.distributed.tensor takes ~0.5 s to import, and every script would pay it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def whole(t):
    """t itself, or the whole tensor of an FSDP shard (one all-gather, so every process must call this for the
    same tensors in the same order, as MuonAdamW.step does)."""
    return t.full_tensor() if is_shard(t) else t


def laid_out_as(t, like):
    """A whole tensor t laid out as `like` is: itself for a plain tensor, this process's shard of it for FSDP's
    (every process holds the same t, so each takes its rows where FSDP put them, without communicating)."""
    if not is_shard(like):
        return t
    from torch.distributed.tensor import DTensor, Replicate
    mesh = like.device_mesh
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(mesh, like.placements)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the param groups marked muon=True, AdamW (torch.optim.AdamW's update, written out) on the others, so
    that one optimizer, one state_dict and one learning-rate schedule hold both. Muon's step for a matrix W with
    gradient G: momentum B = 0.95 B + G, the Nesterov look-ahead G + 0.95 B orthogonalised, W -= lr *
    sqrt(max(1, rows / cols)) * that (its decoupled weight decay as AdamW's). Every direction of the matrix moves
    by about the same amount, where Adam's step follows the gradient's few large directions: on the CPU demo's
    joint stage it pointed at F1 0.38 against AdamW's 0.21 with the same steps (BENCHMARKS.md "Muon in the CPU
    demo's joint stage"). The matrices of one shape, of every Muon group, are orthogonalised as one stack (a
    transformer's blocks repeat their shapes). Under FSDP each process holds a shard of each matrix (a DTensor): the
    momentum and the look-ahead are elementwise and stay on the shards, each look-ahead is gathered whole for the
    iteration, which needs the whole matrix, and each process keeps its own rows of the direction."""

    def __init__(self, groups, betas=(0.9, 0.95), eps=1e-6, momentum=0.95, matmul_dtype=torch.float32):
        super().__init__(groups, dict(betas=betas, eps=eps, muon=False, momentum=momentum, weight_decay=0.0))
        self.matmul_dtype = matmul_dtype  # orthogonalised's: the training step's (autocast_dtype)

    def orthogonalise(self, stacks):
        """orthogonalised() of each (n, rows, cols) stack. Under several processes (DDP: each holds the same
        gradients, and so the same stacks) each orthogonalises its own share of every stack, ceil(n / processes)
        matrices, and one all-gather hands everyone the rest: in the CPU demo's joint stage as two one-core processes
        the optimizer step took 23.6-23.7 ms against 31.7-32.8, the whole step 241.5 against 245.1-245.8 ms
        (BENCHMARKS.md "Each record to one rank"). A matrix's direction does not depend on the stack it is computed
        in (each is its own batched product), so the weights are those of one process, bit for bit."""
        import torch.distributed as dist
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world == 1 or not stacks:  # none: no Muon matrix has a gradient this step, on every process alike
            return [orthogonalised(stack, dtype=self.matmul_dtype) for stack in stacks]
        rank, shares = dist.get_rank(), [-(-len(stack) // world) for stack in stacks]
        mine = []  # this process's directions, each stack's share padded to its full length, flat
        for stack, share in zip(stacks, shares):
            part = stack[rank * share:(rank + 1) * share]
            out = stack.new_zeros((share, *stack.shape[1:]), dtype=self.matmul_dtype)
            if len(part):
                out[:len(part)] = orthogonalised(part, dtype=self.matmul_dtype)
            mine.append(out.reshape(-1))
        mine = torch.cat(mine)
        everyone = mine.new_empty(world, mine.numel())
        dist.all_gather(list(everyone.unbind(0)), mine)  # into everyone's rows
        directions, at = [], 0
        for stack, share in zip(stacks, shares):
            size = share * stack[0].numel()
            parts = everyone[:, at:at + size].reshape(world * share, *stack.shape[1:])
            directions.append(parts[:len(stack)])
            at += size
        return directions

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every group. closure (torch.optim's API) re-evaluates the loss first and its loss is returned:
        torch.distributed.checkpoint calls step(closure=None) at lr 0 to make a fresh optimizer's state before it
        loads a checkpoint's (training.load_checkpoint), so a resumed run needs the argument."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Each pass below goes over a group's (or a shape's) tensors at once (torch._foreach_*: a few kernels for many
        # tensors on a GPU, the same ops tensor by tensor on a CPU, so a CPU's results are those of the per-tensor
        # loop bit for bit): tensor by tensor, the full preset's step was ~2,000 small launches, 56.8 ms with its GPU
        # busy 44.0; this way 43.0 ms, busy 42.1 (one H100; BENCHMARKS.md "The full recipe's joint stage by Muon")
        by_shape = collections.defaultdict(list)  # every Muon group's matrices by shape: (p, its lr, momentum)
        for g in self.param_groups:
            lr, wd = g["lr"], g["weight_decay"]
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            if wd:  # decoupled weight decay (a multiply by 1 would be a pass for nothing)
                torch._foreach_mul_(params, 1 - lr * wd)
            if g["muon"]:
                for p in params:
                    by_shape[p.shape].append((p, lr, g["momentum"]))
                continue
            b1, b2 = g["betas"]
            for p in params:
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
            grads = [p.grad for p in params]
            avgs = [self.state[p]["exp_avg"] for p in params]
            squares = [self.state[p]["exp_avg_sq"] for p in params]
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_mul_(avgs, b1)
            torch._foreach_add_(avgs, grads, alpha=1 - b1)
            torch._foreach_mul_(squares, b2)
            torch._foreach_addcmul_(squares, grads, grads, value=1 - b2)
            denom = torch._foreach_div(squares, [1 - b2 ** n for n in steps])
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, g["eps"])
            torch._foreach_addcdiv_(params, avgs, denom, [-lr / (1 - b1 ** n) for n in steps])
        stacks = []
        for same in by_shape.values():
            ps = [p for p, _, _ in same]
            for p in ps:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs, grads = [self.state[p]["momentum_buffer"] for p in ps], [p.grad for p in ps]
            momenta = [m for _, _, m in same]
            if len(set(momenta)) == 1:
                torch._foreach_mul_(bufs, momenta[0])
                torch._foreach_add_(bufs, grads)
                looks = torch._foreach_add(grads, bufs, alpha=momenta[0])
            else:  # groups of one shape with different momenta: each its own
                looks = []
                for buf, grad, m in zip(bufs, grads, momenta):
                    buf.mul_(m).add_(grad)
                    looks.append(grad.add(buf, alpha=m))
            stacks.append(torch.stack([whole(look) for look in looks]))
        for (shape, same), directions in zip(by_shape.items(), self.orthogonalise(stacks)):
            # one cast for the stack, not one a matrix, laid out as the weights are (a tall matrix's came transposed)
            directions = directions.to(same[0][0].dtype, memory_format=torch.contiguous_format).unbind(0)
            by_lr = collections.defaultdict(lambda: ([], []))
            for (p, lr, _), direction in zip(same, directions):
                by_lr[lr][0].append(p)
                by_lr[lr][1].append(laid_out_as(direction, p))
            for lr, (ps, ds) in by_lr.items():
                torch._foreach_add_(ps, ds, alpha=-lr * max(1.0, shape[0] / shape[1]) ** 0.5)
        return loss


def freeze_untrained_parts(model, lr):
    """Each part with lr 0 (or none) -> requires_grad False, the others True. Called before wrap_model: DDP lists
    the parameters that want gradients when it wraps, and waits every step for each one it listed, so a part frozen
    after wrapping (a stage's frozen ViT or LLM) stopped a several-process run at its second step."""
    for part, params in model.param_parts().items():
        for p in params:
            p.requires_grad_(lr.get(part, 0.0) > 0)


def build_optimizer(model, lr, warmup, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.0, fused=None, muon_lr=0.0,
                    muon_dtype=torch.float32):
    """AdamW with a group per part that trains. lr / warmup: {part: value}; a part with lr 0 is frozen.
    Molmo2 counts the 128 new token embeddings as part of the connector. With weight_decay > 0 (from-scratch
    recipes; Molmo2 uses 0) each part's norm gains, biases and embedding tables go into a second group without
    decay: pulling them toward 0 shrinks every token's scale for no gain (issue 15: decay on everything slowed
    the demo's learning after step 750).
    muon_lr > 0 (from scratch; not Molmo2's): the 2-D matrices of the LLM and the connector, all but the token
    tables, go to Muon at this peak rate, with their part's warmup and schedule (MuonAdamW, its iteration in
    muon_dtype); the rest stays AdamW."""
    tables = [model.llm.embed_tokens.weight, model.new_embedding, model.vit.positional_embedding]
    tables += [t.weight for t in (model.connector.position_x, model.connector.position_y) if t is not None]
    plain = {id(p) for p in tables}
    freeze_untrained_parts(model, lr)
    groups = []
    for part, params in model.param_parts().items():
        if not lr.get(part, 0.0) > 0:
            continue
        split = {"decay": params, "no_decay": []}
        if weight_decay > 0:
            split = {"decay": [p for p in params if p.dim() >= 2 and id(p) not in plain],
                     "no_decay": [p for p in params if p.dim() < 2 or id(p) in plain]}
        for kind, members in split.items():
            if members:
                groups.append({"name": part, "params": members, "lr": lr[part], "peak_lr": lr[part],
                               "warmup": warmup.get(part, 0), "weight_decay": weight_decay if kind == "decay" else 0.0})
    if not groups:
        raise ValueError(f"no part has a learning rate > 0: {lr}")
    if muon_lr > 0:
        return MuonAdamW(muon_groups(groups, model, muon_lr), betas=betas, eps=eps, matmul_dtype=muon_dtype)
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


def muon_groups(groups, model, muon_lr):
    """build_optimizer's groups with the LLM's and the connector's 2-D matrices split off into groups named
    '<part> muon' at peak rate muon_lr. The token tables stay with AdamW (a row moves only when its token occurs);
    the connector's position tables (position_bins), small and seen by every image, go to Muon with the rest."""
    tables = {id(model.llm.embed_tokens.weight), id(model.new_embedding)}
    out = []
    for g in groups:
        is_muon = [g["name"] in ("llm", "connector") and p.dim() == 2 and id(p) not in tables for p in g["params"]]
        mats = [p for p, m in zip(g["params"], is_muon) if m]
        rest = [p for p, m in zip(g["params"], is_muon) if not m]
        if mats:
            out.append({**g, "name": f"{g['name']} muon", "params": mats, "muon": True, "lr": muon_lr,
                        "peak_lr": muon_lr})
        if rest:
            out.append({**g, "params": rest})
    return out


def lr_at(step, peak, warmup, max_steps, final_frac=0.1, decay_frac=1.0):
    """Linear warmup from 0 to peak over `warmup` steps, then cosine down to final_frac * peak at max_steps.
    decay_frac < 1: the peak holds until the last decay_frac of the steps after the warmup, and the cosine runs over
    those alone (warmup-stable-decay: more of a short run at the peak rate)."""
    if not 0 < decay_frac <= 1:
        raise ValueError(f"lr_decay_frac={decay_frac!r}: the share of the steps the cosine decays over, in (0, 1]")
    if step < warmup:
        return peak * step / warmup
    if step >= max_steps:
        return peak * final_frac
    decay_steps = max(1, round(decay_frac * (max_steps - warmup)))
    progress = max(0, step - (max_steps - decay_steps)) / decay_steps
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_learning_rates(optimizer, step, max_steps, decay_frac=1.0):
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step, g["peak_lr"], g["warmup"], max_steps, decay_frac=decay_frac)


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def full_state_dicts(model, optimizer):
    """Model and optimizer state as plain full tensors on CPU, also under FSDP (gathered to every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=opts)


def save_checkpoint(path, model, optimizer, step, d, data_state, config, extra=None, rng=None):
    """Every rank takes part (FSDP gathers); rank 0 writes path.tmp, then renames it over path.
    rng: this rank's rng_state() to store (default: now), e.g. taken before a step that failed."""
    model_sd, optim_sd = full_state_dicts(model, optimizer)
    data_states = d.all_gather_objects(data_state)
    rngs = d.all_gather_objects(rng if rng is not None else rng_state())
    if d.is_master:
        ckpt = {"model": model_sd, "optimizer": optim_sd, "step": step, "data": data_states, "rng": rngs,
                "config": config, "world_size": d.world_size, **(extra or {})}
        tmp = path + ".tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, path)  # a crash before this line leaves the previous checkpoint intact
    d.barrier()


def stop_nonfinite(step, loss, grad_norm, micro_batches, ckpt_path, train_model, optimizer, d, data_state, config,
                   rng):
    """A step whose loss or gradient norm is not finite applies no update: this rank's micro-batches go to
    nonfinite_step<step>_rank<rank>.pt beside the checkpoint, the state before the step (data_state, rng: taken
    before its batches and random draws) to the checkpoint, so a resumed run redoes the step; then the run stops."""
    optimizer.zero_grad(set_to_none=True)
    batch_path = os.path.join(os.path.dirname(ckpt_path), f"nonfinite_step{step}_rank{d.rank}.pt")
    torch.save(micro_batches, batch_path)
    save_checkpoint(ckpt_path, train_model, optimizer, step, d, data_state, config, rng=rng)
    raise SystemExit(f"step {step}: loss {loss}, grad norm {grad_norm}: not finite; the batch is in {batch_path}; "
                     f"the state before this step is in {ckpt_path}")


def resume_run(path, model, optimizer, loader, d):
    """Continue a run from its checkpoint, if it has one: model, optimizer, this rank's RNG and data-loader state.
    Returns the step to start at (0 when there is no checkpoint)."""
    if not os.path.exists(path):
        return 0
    ckpt = load_checkpoint(path, model, optimizer, d)
    loader.load_state_dict(ckpt["data"][d.rank])
    d.print(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"]


def load_checkpoint(path, model, optimizer, d):
    """Restore model, optimizer and this rank's RNG; returns the checkpoint dict (step, data states...)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt["world_size"] != d.world_size:
        raise ValueError(f"checkpoint '{path}' was written by {ckpt['world_size']} processes, this run has "
                         f"{d.world_size}: the data-loader states would not line up")
    set_state_dict(model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    set_rng_state(ckpt["rng"][d.rank])
    return ckpt


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------


def image_feature_stats(features):
    """The connector's output, one row per image token as the LLM receives it -> (std, mean cosine between two
    different tokens), or None for fewer than two tokens. A mean cosine near 1 means every image token points the
    same way: after the LLM's first RMSNorm they all look alike and the pictures carry no information. Training
    from scratch drifts there within tens of steps (one shared direction grows until it swamps the content;
    BENCHMARKS.md, 'Does the model learn to see?'), so the progress line shows both numbers."""
    f = features.detach().float().reshape(-1, features.shape[-1])
    n = f.shape[0]
    if n < 2:
        return None
    unit = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    total = unit.sum(0)
    mean_cos = (total @ total - n) / (n * (n - 1))  # |sum u|^2 = n + sum of cos over ordered pairs i != j
    return f.std().item(), mean_cos.item()


def eta_seconds(step_times, steps_left):
    """The median of this run's recent step times (seconds) x the steps left: the first step pays for start-up, a
    step that validates or saves is slower than the rest, and a resumed run did not take the earlier ones."""
    recent = sorted(step_times[1:][-21:] or step_times)
    return recent[len(recent) // 2] * steps_left


BUDGET_PROBE_STEPS = 20  # a run with max_minutes fits its length to the minutes after this many steps, and again
#   after every this many more (the machine's speed may drift: on the 2-core machine a fit made from the first 20 steps
#   ran 15% over once its later steps slowed)


def mean_step_seconds(step_times):
    """What a step costs when fitting a run to its minutes: the median of its last 50 step times (the machine's
    speed now; the first step, start-up, left out), plus the extra seconds of its slow steps so far (over twice that
    median: a step's time includes any validation or save before it) spread over all its steps, since those recur at
    their interval. Why not the mean of the last 50: one 3.8 s validation among 0.21 s steps then weighs as if every
    50th step validated, and the CPU demo's fitted end jumped from step 2,777 to 2,340 and back 20 steps later,
    bending the learning rates' cosine with it (BENCHMARKS.md "Stage 1's peak held")."""
    times = step_times[1:] or step_times
    recent = sorted(times[-50:])
    typical = recent[len(recent) // 2]
    return typical + sum(t - typical for t in times if t > 2 * typical) / len(times)


def steps_within(max_minutes, seconds_so_far, step_times, done, max_steps):
    """The steps a run with max_minutes can take: done + as many more as fit the minutes left at mean_step_seconds,
    at most max_steps and at least done."""
    fit = done + int((max_minutes * 60 - seconds_so_far) / mean_step_seconds(step_times))
    return max(done, min(max_steps, fit))


class StepBudget:
    """The `max_minutes` knob of train_vision.py and train_joint.py: a run that ends its steps within max_minutes of
    when this was made (the script's start), whatever the machine. fit() after each step returns the run's
    max_steps: as it is, except every BUDGET_PROBE_STEPS steps, when it becomes what fits the minutes left
    (steps_within, never past the planned max_steps; on several ranks the smallest, so that all stop together). The
    learning rates follow: their cosine decays to the current end. Why: a recipe's steps are counted on one machine,
    and another CPU may run them 3-4 times slower (BENCHMARKS.md "The CPU demo in 15 minutes on a slower CPU"); its
    minutes, not its steps, are what a demo promises."""

    def __init__(self, max_minutes, planned_steps, d):
        self.max_minutes, self.planned, self.d = max_minutes, planned_steps, d
        self.started, self.said = time.time(), False

    def fit(self, done, first_step, step_times, max_steps):
        taken = done - first_step
        if not (self.max_minutes > 0 and taken >= BUDGET_PROBE_STEPS and taken % BUDGET_PROBE_STEPS == 0):
            return max_steps
        fitted = steps_within(self.max_minutes, time.time() - self.started, step_times, done, self.planned)
        if self.d.world_size > 1:
            t = torch.tensor([fitted], device=self.d.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            fitted = int(t.item())
        per_step = mean_step_seconds(step_times)
        m = f"max_minutes={self.max_minutes:g}"
        if not self.said:
            whole = (time.time() - self.started + per_step * (self.planned - done)) / 60
            self.d.print(f"{m}: all {self.planned:,} steps fit (~{whole:.1f} min at {per_step:.2f} s a step)"
                         if fitted == self.planned else
                         f"{m}: {self.planned:,} steps would take ~{whole:.1f} min here ({per_step:.2f} s a step); "
                         f"{fitted:,} fit, so the run ends at step {fitted:,}, its learning rates decaying to there "
                         f"(fitted again every {BUDGET_PROBE_STEPS} steps; max_minutes=0: every step)")
            self.said = True
        elif abs(fitted - max_steps) > 0.02 * max_steps:
            self.d.print(f"{m}: at {per_step:.2f} s a step the run now ends at step {fitted:,} (was {max_steps:,})")
        return fitted


def logged_steps(log_path):
    """out_dir/log.jsonl -> ({step: train record}, {step: validation record}) in step order, over the whole log
    (the steps before a resume too); a step logged twice (redone after a resume) counts by its last line. A
    train record has a 'loss', a validation record 'val_...' keys only."""
    train, val = {}, {}
    if os.path.exists(log_path):
        with open(log_path) as f:
            for record in map(json.loads, filter(str.strip, f)):
                if "loss" in record:
                    train[record["step"]] = record
                elif any(k.startswith("val_") for k in record):
                    val[record["step"]] = record
    return dict(sorted(train.items())), dict(sorted(val.items()))


ANSWER_METRICS = ("counting_accuracy", "pointing_f1")  # what train_joint's eval_answers scores (eval.headline)


def gpu_kernels(averages):
    """The kernels among torch.profiler's key_averages(): the device timeline's events that are not user ranges."""
    return [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]


def device_busy(averages, n_steps):
    """torch.profiler's key_averages() over n_steps steps -> (ms a step the GPU was busy, kernels a step). Kernels are
    the leaves of the device timeline, so their own times add up to its busy time; a small model pays host time for
    each kernel it launches, so their number says as much as their time."""
    kernels = gpu_kernels(averages)
    return (sum(e.self_device_time_total for e in kernels) / (1e3 * n_steps),  # us over n steps -> ms a step
            sum(e.count for e in kernels) / n_steps)


KERNEL_KINDS = (  # (kind, words of a kernel's name), the first match wins: cuDNN's attention runs small kernels of
    #   its own (convert_dq, dot_do_o) beside the flash ones; inductor names a fused kernel by the ops in it
    ("attention", ("sdpa", "fmha", "flash", "attention", "cudnn::fusion")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "splitkreduce")),
    ("optimizer, clipping, zeroing", ("multi_tensor_apply", "lpnorm")),
    ("norms", ("layer_norm", "rsqrt")),
    ("activations", ("gelu", "silu")),
    ("sums (bias gradients, loss)", ("reduce_kernel", "red_fused_sum", "softmax", "nll_loss")),
    ("copies and casts", ("direct_copy", "copy_kernel", "fillfunctor", "catarray")),
)
COPY_OPS = {"to", "copy", "view", "t", "unsafe", "clone", "permute", "transpose", "expand", "cat", "slice"}  # a
#   fused kernel made of these alone moves data: a cast, a transpose, a concatenation


def kernel_kind(name):
    """A GPU kernel's name -> its kind in KERNEL_KINDS, or "other elementwise"."""
    name = name.lower()
    kind = next((k for k, words in KERNEL_KINDS if any(w in name for w in words)), None)
    if kind is None and name.startswith("triton_") and "_fused_" in name:
        ops = name.split("_fused_", 1)[1].rsplit("_", 1)[0]  # "triton_poi_fused__to_copy_t_7" -> "_to_copy_t"
        kind = "copies and casts" if set(filter(None, ops.split("_"))) <= COPY_OPS else None
    return kind or "other elementwise"


def kernel_kinds(averages, n_steps):
    """torch.profiler's key_averages() over n_steps steps -> [(kind, ms a step, kernels a step)] of the GPU's busy
    time by kernel_kind, largest first: what a step spends on its arithmetic (matmul, attention) against the
    memory-bound rest."""
    kinds = {}
    for e in gpu_kernels(averages):
        kind = kernel_kind(e.key)
        ms, n = kinds.get(kind, (0.0, 0.0))
        kinds[kind] = (ms + e.self_device_time_total / (1e3 * n_steps), n + e.count / n_steps)
    return sorted(((k, ms, n) for k, (ms, n) in kinds.items()), key=lambda kind: -kind[1])


def profile_report(averages, n_calls, wall, cuda, unit="step"):
    """torch.profiler's key_averages() over n_calls calls of wall seconds each -> (a summary: a call's wall time against
    the time the GPU was busy in it, its kernels and its host-device syncs; the ops' table by their own device time,
    host time on a CPU). A GPU busy for a small share of its call waits on the host. Used by StepProfiler and
    tools/bench.py."""
    table = averages.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40,
                           max_name_column_width=70)
    line = f"{wall * 1e3:.1f} ms a {unit}"
    if cuda:
        busy, n_kernels = device_busy(averages, n_calls)
        syncs = sum(e.count for e in averages if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
        line += (f", the GPU busy {busy:.1f} ms of it ({busy / (wall * 1e3):.0%}), {n_kernels:,.0f} kernels and "
                 f"{syncs / n_calls:.0f} host-device syncs a {unit}")
        kinds = "\n".join(f"  {kind:<30} {ms:8.2f} ms {n:8,.0f} kernels"
                           for kind, ms, n in kernel_kinds(averages, n_calls))
        table = f"The GPU's busy time by kind, a {unit}:\n{kinds}\n\n{table}"
    return line, table


class StepProfiler:
    """torch.profiler over n_steps steps of a training loop (the trainers' `profile` knob), 10 steps after the run's
    first (those compile, fill the loader and warm up). Where a step's time goes, for speed work: on the master
    process it writes out_dir/profile.txt (the ops by their own device time on a GPU, host time on a CPU) and
    out_dir/profile_trace.json (chrome://tracing, ui.perfetto.dev), and prints a step's wall time against the time
    the GPU was busy in it: a GPU busy for a small share of its step waits on the host."""

    def __init__(self, n_steps, out_dir, d, first_step=0, max_steps=None, warm=10):
        self.n, self.out_dir, self.d, self.start = n_steps, out_dir, d, first_step + warm
        if n_steps and max_steps is not None and max_steps < self.start + n_steps:
            raise SystemExit(f"profile={n_steps}: it records steps {self.start}-{self.start + n_steps - 1}, so this "
                             f"run needs max_steps >= {self.start + n_steps} (it has {max_steps})")
        self.prof = self.t0 = None

    def step(self, step):
        """Call at the top of every step (step: the loop's step number)."""
        if not self.n or not self.d.is_master:
            return
        if step == self.start:
            from torch.profiler import ProfilerActivity, profile
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.d.device.type == "cuda" else [])
            self._sync()
            self.prof, self.t0 = profile(activities=activities), time.perf_counter()
            self.prof.__enter__()
        elif step == self.start + self.n and self.prof is not None:
            self.stop()

    def stop(self):
        self._sync()
        wall = (time.perf_counter() - self.t0) / self.n
        self.prof.__exit__(None, None, None)
        trace = os.path.join(self.out_dir, "profile_trace.json")
        os.makedirs(self.out_dir, exist_ok=True)
        self.prof.export_chrome_trace(trace)
        averages, self.prof = self.prof.key_averages(), None
        summary, table = profile_report(averages, self.n, wall, self.d.device.type == "cuda")
        with open(os.path.join(self.out_dir, "profile.txt"), "w") as f:
            f.write(table)
        line = f"profile: steps {self.start}-{self.start + self.n - 1}, {summary}"
        print(f"{line} | ops: {os.path.join(self.out_dir, 'profile.txt')} | trace: {trace}", flush=True)

    def _sync(self):
        if self.d.device.type == "cuda":
            torch.cuda.synchronize(self.d.device)


class Progress:
    """A line per step (loss, per-part learning rates, tokens/s, MFU on GPU, the image features' std and mean
    cosine, ETA), the same numbers appended to out_dir/log.jsonl (a resumed run appends its steps after the earlier
    ones: a step's last line is the one that counts), TensorBoard when the tensorboard package is installed, Weights &
    Biases when wandb_project is set, and the curves as PNGs."""

    PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16

    def __init__(self, d, out_dir, max_steps, model, log_every=1, wandb_project="", config=None):
        self.d, self.out_dir, self.max_steps, self.log_every = d, out_dir, max_steps, log_every
        self.model = model
        self.curves = {"train": [], "val": []}
        self.step_times = []  # seconds, this run's steps
        self.t_start = self.t_last = time.time()
        self.tb = None
        self.peak = None
        self.log_path = os.path.join(out_dir, "log.jsonl")
        # the last image features the connector produced (this rank's last micro-batch), for image_feature_stats
        self.image_features = None
        model.connector.register_forward_hook(lambda module, args, out: setattr(self, "image_features", out.detach()))
        if d.device.type == "cuda":
            name = torch.cuda.get_device_name(d.device)
            self.peak = next((v for k, v in self.PEAK_FLOPS.items() if k in name), None)
        if d.is_master:
            os.makedirs(out_dir, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:
                pass  # TensorBoard is optional
        self.wandb = self._start_wandb(wandb_project, config) if wandb_project and d.is_master else None

    def _start_wandb(self, project, config):
        """Weights & Biases, when the user asks for it (wandb_project) and has set it up. The run's id is kept in
        out_dir/wandb_id, so a resumed run goes on logging into the same W&B run."""
        try:
            import wandb
        except ImportError:
            raise SystemExit(f"wandb_project={project!r}, but the wandb package is not installed: "
                             f"pip install wandb && wandb login, or leave wandb_project empty") from None
        id_path = os.path.join(self.out_dir, "wandb_id")
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_path, "w") as f:
                f.write(run_id + "\n")
        wandb.init(project=project, name=os.path.basename(os.path.normpath(self.out_dir)), id=run_id,
                   resume="allow", dir=self.out_dir, config=config)
        return wandb

    def step(self, step, loss, optimizer, micro_batches, grad_norm=None, parts=None):
        """parts: {name: value} of other losses beside the answers' (train_joint's token_loss), logged with it."""
        now = time.time()
        dt, self.t_last = now - self.t_last, now
        self.curves["train"].append((step, loss))
        features, self.image_features = self.image_features, None
        self.step_times.append(dt)  # every rank's: StepBudget.fit prices its steps on each (max_minutes)
        if not self.d.is_master:
            return
        image_stats = image_feature_stats(features) if features is not None else None
        tokens = sum(int((mb["example_ids"] >= 0).sum()) for mb in micro_batches) * self.d.world_size  # no padding
        tok_s = tokens / max(dt, 1e-9)
        lrs = " ".join(f"{name} {lr:.2e}" for name, lr in {g["name"]: g["lr"] for g in optimizer.param_groups}.items())
        line = f"step {step:5d}/{self.max_steps} | loss {loss:.4f}"
        if parts:
            line += " (" + " ".join(f"{name} {value:.4f}" for name, value in parts.items()) + ")"
        line += f" | lr {lrs} | {tok_s:,.0f} tok/s"
        if grad_norm is not None:
            line += f" | grad {grad_norm:.2f}"
        if self.peak:  # this rank's batches stand for every rank's
            flops = sum(self.model.training_flops(mb) for mb in micro_batches)
            line += f" | MFU {100 * flops / dt / self.peak:.1f}%"
        if image_stats:
            line += f" | image std {image_stats[0]:.3g} cos {image_stats[1]:.3f}"
        done = step + 1
        line += f" | {dt * 1000:.0f} ms | ETA {eta_seconds(self.step_times, self.max_steps - done) / 60:.1f} min"
        if step % self.log_every == 0 or done == self.max_steps:
            print(line, flush=True)
        self.log({"step": step, "loss": loss, **(parts or {}),
                  "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
                  "grad_norm": grad_norm, "tokens_per_s": tok_s, "step_s": dt,
                  **({"image_feature_std": image_stats[0], "image_feature_cos": image_stats[1]} if image_stats else {})})
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/tokens_per_s", tok_s, step)
            for name, lr in {g["name"]: g["lr"] for g in optimizer.param_groups}.items():
                self.tb.add_scalar(f"lr/{name}", lr, step)
            if image_stats:
                self.tb.add_scalar("image_features/std", image_stats[0], step)
                self.tb.add_scalar("image_features/mean_cos", image_stats[1], step)

    def val(self, step, losses, answers=None):
        """losses: (val loss, val loss with the batch's crops shuffled); answers: {metric: value} scored on
        generated answers (train_joint's eval_answers), or None."""
        loss, shuffled = losses
        self.curves["val"].append((step, loss))
        line = (f"step {step:5d} | val loss {loss:.4f} | with the crops shuffled {shuffled:.4f} "
                f"(the gap is what the images are worth)")
        answers = {k: v for k, v in (answers or {}).items() if v is not None}
        if answers:
            line += " | answers: " + ", ".join(f"{k} {v:.3f}" for k, v in answers.items())
        self.d.print(line)
        if self.d.is_master:
            self.log({"step": step, "val_loss": loss, "val_loss_crops_shuffled": shuffled,
                      **{f"val_{k}": v for k, v in answers.items()}})
        if self.tb is not None:
            self.tb.add_scalar("val/loss", loss, step)
            for k, v in answers.items():
                self.tb.add_scalar(f"val/{k}", v, step)

    def log(self, record):
        """Append one JSON line; floats are written exactly (repr), so runs can be compared bit for bit. The same
        numbers go to W&B when it is on (learning rates as lr/<part>)."""
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if k not in ("step", "lr") and v is not None}
            flat.update({f"lr/{part}": lr for part, lr in record.get("lr", {}).items()})
            self.wandb.log(flat, step=record["step"])

    def plot(self, name="loss.png"):
        """The loss curves as a PNG, and beside it image_features.png: the mean cosine between the image tokens the
        LLM received, step by step (near 1: they all look alike). None when this run took no step (e.g. it resumed
        a finished run)."""
        if not self.d.is_master or not any(self.curves.values()):
            return None
        curves, image_cos, answers = self.logged_curves()  # the other pictures: from the log, like the loss
        path = os.path.join(self.out_dir, name)
        plot_curves(curves, path)
        if image_cos:
            plot_curves({"mean cosine between image tokens": image_cos},
                        os.path.join(self.out_dir, "image_features.png"), title="image features (1 = all alike)",
                        ylabel="mean cosine")
        if answers:
            plot_curves(answers, os.path.join(self.out_dir, "answers.png"),
                        title="answers to validation questions, generated", ylabel="score")
        return path

    def logged_curves(self):
        """({'train': [(step, loss)], 'val': [...]}, [(step, image cosine)], {metric: [(step, score)]}) from the
        whole of log.jsonl: the steps before a resume too, and a step logged twice (redone after a resume) by its
        last line."""
        train, val = logged_steps(self.log_path)
        curves = {name: [(step, r[key]) for step, r in records.items()]
                  for name, records, key in (("train", train, "loss"), ("val", val, "val_loss")) if records}
        cos = [(step, r["image_feature_cos"]) for step, r in train.items() if "image_feature_cos" in r]
        answers = {key: [(step, r[f"val_{key}"]) for step, r in val.items() if f"val_{key}" in r]
                   for key in ANSWER_METRICS}
        return curves, cos, {k: v for k, v in answers.items() if v}

    def summary(self, loader, final_dir, ckpt_path):
        """The end-of-run report: steps, time, losses, peak GPU memory, skipped data, where things are."""
        train, val = self.curves["train"], self.curves["val"]
        line = f"done: {len(train)} steps in {(time.time() - self.t_start) / 60:.1f} min"
        if train:
            line += f" | train loss {train[0][1]:.3f} -> {train[-1][1]:.3f}"
        if val:
            line += f" | val loss {val[-1][1]:.3f}"
        if self.d.device.type == "cuda":
            line += f" | peak memory {torch.cuda.max_memory_allocated(self.d.device) / 2**30:.1f} GiB"
        curve = self.plot()
        if self.wandb is not None:
            self.wandb.finish()
        return "\n".join([line, loader.summary(),
                          f"model: {final_dir} | loss curve: {curve} | log: {self.log_path} | checkpoint: {ckpt_path}"])


def plot_vision_run(out_dir):
    """Stage 1's pictures from its whole log (train_vision.py): loss.png, and readout.png, counting and pointing
    read off the localisation head at each validation (and, with the scene loss, how often its head names the kind
    and the colour of a held shape)."""
    train, val = logged_steps(os.path.join(out_dir, "log.jsonl"))  # none at max_steps=0
    readout = {name: [(step, r[key]) for step, r in val.items() if key in r]
               for key, name in (("val_count_acc", "counting accuracy"), ("val_point_f1", "pointing F1"),
                                 ("val_kind_acc", "scene head: kind"), ("val_colour_acc", "scene head: colour"))}
    if train:
        plot_curves({"train loss": [(step, r["loss"]) for step, r in train.items()]},
                    os.path.join(out_dir, "loss.png"), title="stage 1 loss")
    if any(readout.values()):
        plot_curves({name: points for name, points in readout.items() if points}, os.path.join(out_dir, "readout.png"),
                    title="stage 1 read-out on val images", ylabel="accuracy / F1")


PLOT_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # matplotlib's tab10


def _nice_ticks(low, high, target=6):
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high <= low:  # one value: centre it
        pad = 0.1 * abs(low) or 1.0
        low, high = low - pad, high + pad
    raw_step = (high - low) / target
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _tick_labels(ticks):
    """Tick labels with as many digits as the tick spacing needs: plain decimals for ordinary ranges,
    scientific notation for very small or very large values."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    largest = max(abs(t) for t in ticks) or 1.0
    step_exponent = math.floor(math.log10(step))
    if 1e-3 <= largest < 1e5:
        return [f"{t:.{max(0, -step_exponent)}f}" for t in ticks]
    digits = max(0, math.floor(math.log10(largest)) - step_exponent)
    return [f"{t:.{digits}e}" if t else "0" for t in ticks]


def plot_curves(curves, path, title="loss", xlabel="step", ylabel="loss", size=(800, 480)):
    """A line chart PNG of {name: [(step, value), ...]} (e.g. {'train': [...], 'val': [...]}), with axes,
    round ticks, gridlines, axis labels, a title and a legend. Non-finite values are skipped."""
    series = {name: sorted((float(s), float(v)) for s, v in points if math.isfinite(float(v)))
              for name, points in curves.items()}
    series = {name: points for name, points in series.items() if points}
    if not series:
        raise ValueError(f"curves: no finite (step, value) points in {list(curves)}")
    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    from sample import _font  # the drawing helpers' font; sample.py is not needed until a picture is drawn
    font, title_font = _font(13), _font(17)
    all_points = [p for points in series.values() for p in points]
    x_ticks = _nice_ticks(min(s for s, _ in all_points), max(s for s, _ in all_points))
    y_ticks = _nice_ticks(min(v for _, v in all_points), max(v for _, v in all_points))
    y_labels = _tick_labels(y_ticks)
    left = 22 + max(draw.textlength(label, font=font) for label in y_labels) + 10
    right, top, bottom = width - 20, 40, height - 50

    def to_xy(step, value):
        x = left + (step - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (right - left)
        y = bottom - (value - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (bottom - top)
        return x, y

    for value, label in zip(y_ticks, y_labels):
        _, y = to_xy(x_ticks[0], value)
        draw.line((left, y, right, y), fill=(228, 228, 228))
        draw.line((left - 5, y, left, y), fill=(0, 0, 0))
        draw.text((left - 8, y), label, fill=(0, 0, 0), font=font, anchor="rm")
    for value, label in zip(x_ticks, _tick_labels(x_ticks)):
        x, _ = to_xy(value, y_ticks[0])
        draw.line((x, top, x, bottom), fill=(228, 228, 228))
        draw.line((x, bottom, x, bottom + 5), fill=(0, 0, 0))
        draw.text((x, bottom + 8), label, fill=(0, 0, 0), font=font, anchor="ma")
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    drawn = []  # every point's place, for the legend to cover as few as it can
    for index, (name, points) in enumerate(series.items()):
        color = PLOT_COLORS[index % len(PLOT_COLORS)]
        xys = [to_xy(s, v) for s, v in points]
        drawn += xys
        if len(xys) > 1:
            draw.line(xys, fill=color, width=2, joint="curve")
        if len(xys) <= 50:  # few points (a validation curve): mark each one
            for x, y in xys:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
    draw.text(((left + right) / 2, 12), title, fill=(0, 0, 0), font=title_font, anchor="ma")
    draw.text(((left + right) / 2, height - 8), xlabel, fill=(0, 0, 0), font=font, anchor="md")
    label_image = Image.new("RGB", (int(draw.textlength(ylabel, font=font)) + 4, 18), (255, 255, 255))
    ImageDraw.Draw(label_image).text((2, 2), ylabel, fill=(0, 0, 0), font=font)
    label_image = label_image.rotate(90, expand=True)
    image.paste(label_image, (4, int((top + bottom) / 2 - label_image.height / 2)))
    legend_width = max(draw.textlength(name, font=font) for name in series) + 40
    legend_height = 20 * len(series) + 6
    # the corner whose box covers the fewest points (top right first: loss curves fall away from it)
    corners = [(right - legend_width - 8, top + 8), (right - legend_width - 8, bottom - legend_height - 8),
               (left + 8, top + 8), (left + 8, bottom - legend_height - 8)]
    lx, ly = min(corners, key=lambda c: sum(c[0] - 4 <= x <= c[0] + legend_width + 4 and
                                            c[1] - 4 <= y <= c[1] + legend_height + 4 for x, y in drawn))
    draw.rectangle((lx, ly, lx + legend_width, ly + legend_height), fill=(255, 255, 255), outline=(120, 120, 120))
    for index, name in enumerate(series):
        y = ly + 13 + 20 * index
        draw.line((lx + 8, y, lx + 28, y), fill=PLOT_COLORS[index % len(PLOT_COLORS)], width=3)
        draw.text((lx + 34, y), name, fill=(0, 0, 0), font=font, anchor="lm")
    image.save(path)
    return path


# ---------------------------------------------------------------------------
# The model to train
# ---------------------------------------------------------------------------


# Molmo2's SFT settings: for parts that are already trained (a Molmo2 checkpoint, or a pretrained Qwen3 + SigLIP2).
MOLMO2_SFT_RECIPE = dict(lr_connector=5e-6, lr_vit=5e-6, lr_llm=1e-5, warmup_connector=200, warmup_vit=200,
                         warmup_llm=200, weight_decay=0.0)


def lineage(init_from, model_preset="small", vit_from="", llm_from=""):
    """Where a run's LLM and ViT started: {'llm': 'scratch' or a checkpoint, 'vit': ..., 'preset': ...}. Written
    beside the exported model (final/lineage.json), so a later stage knows that a model it continues has an LLM
    trained from scratch, whatever stages came between."""
    if init_from == "scratch":
        return {"llm": "scratch", "vit": vit_from or "scratch", "preset": model_preset}
    if init_from == "parts":
        return {"llm": llm_from, "vit": vit_from, "preset": None}
    path = os.path.join(init_from, "final", LINEAGE_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {"llm": init_from, "vit": init_from, "preset": None}  # a released or converted checkpoint


LINEAGE_FILE = "lineage.json"


def default_recipe(start):
    """The joint stage's learning rates, warmups and weight decay for a run's lineage (where its LLM and ViT
    started) -> (why, {knob: value}). A pretrained LLM: Molmo2's SFT recipe. An LLM from scratch: rates 100-200x
    higher, weight decay 0.1 on matrices; with a trained ViT (stage 1's) the ViT learns 10x more gently than the
    rest, which keeps what stage 1 taught it (BENCHMARKS.md, 'Stage 1': counting 0.47 after 1,600 steps of the
    small preset, where a random ViT never looked). The full preset's from-scratch rates are the ones its first
    GPU runs used: not yet measured with a stage-1 ViT."""
    if start["llm"] != "scratch":
        return f"for a pretrained LLM ({start['llm']}): Molmo2's SFT recipe", dict(MOLMO2_SFT_RECIPE)
    full = start.get("preset") == "nanomolmo2"
    llm = 3e-4 if full else 1e-3
    trained_vit = start["vit"] != "scratch"
    vit = (3e-5 if trained_vit else 3e-4) if full else (llm / 10 if trained_vit else llm)
    recipe = dict(lr_connector=1e-3, lr_vit=vit, lr_llm=llm, warmup_connector=100, warmup_vit=100, warmup_llm=100,
                  weight_decay=0.1)
    if trained_vit:
        return (f"for an LLM from scratch around the trained ViT of {start['vit']}: the scratch recipe, the ViT "
                "gently"), recipe
    return ("for an LLM and a ViT from scratch: the scratch recipe. Such runs have not learned to look at their "
            "images (BENCHMARKS.md): run train_vision.py first and pass --vit_from=out/vision"), recipe


def fill_recipe(knobs, config, why, recipe, print_fn=print):
    """Set each knob of the recipe that the user left at None, in the script's namespace and in its logged config,
    and say what was chosen and why."""
    chosen = {k: v for k, v in recipe.items() if knobs[k] is None}
    knobs.update(chosen)
    config.update(chosen)
    if chosen:
        print_fn(f"recipe {why}: " + ", ".join(f"{k}={v:g}" for k, v in chosen.items())
                 + " (set any of them to override)")


def vit_checkpoint_dir(name_or_dir):
    """Where a ViT checkpoint is: a stage-1 out_dir (train_vision.py) holds it in final/; anything else (a
    SiglipVisionModel / SiglipModel dir or hub id) as is."""
    final = os.path.join(name_or_dir, "final")
    return final if os.path.isfile(os.path.join(final, "config.json")) else name_or_dir


def load_vit(vit_from, vit_config, any_image_size=False):
    """A pretrained ViT (stage 1's out_dir or any SigLIP checkpoint) for a model whose ViT is vit_config: blocks
    after the ones vit_config keeps are dropped, and any other difference is an error that names both.
    any_image_size: the checkpoint's crop size may differ from vit_config's (a model from scratch takes it)."""
    from model import load_siglip
    vit = load_siglip(vit_checkpoint_dir(vit_from))
    if any_image_size:
        vit_config = replace(vit_config, image_size=vit.config.image_size)
    if vit.config.num_hidden_layers < vit_config.num_hidden_layers:
        raise ValueError(f"vit_from={vit_from!r}: {vit.config.num_hidden_layers} blocks, the model reads block "
                         f"{vit_config.num_hidden_layers - 1}")
    del vit.layers[vit_config.num_hidden_layers:]
    vit.config.num_hidden_layers = vit_config.num_hidden_layers
    if vit.config != vit_config:
        raise ValueError(f"vit_from={vit_from!r}: its ViT {vit.config} is not the model's {vit_config}")
    return vit


def build_model(init_from, model_preset="small", resid_dropout=0.0, response_dropout=0.0, llm_from="", vit_from="",
                vocab="full", data_dir=None, mixture=None, projector_norm=False, position_bins=0, workers=0):
    """scratch: a fresh Molmo2 of model_preset, whose ViT is loaded from vit_from when it is set (stage 1's
    out_dir, or any SigLIP checkpoint of the preset's shape at any crop size, which the model takes); parts: a
    pretrained Qwen3 (llm_from) and SigLIP2 (vit_from) with a fresh connector (the real align stage's start); a
    directory holding final/ (a previous stage's out_dir); or any Molmo2 checkpoint, native or released layout,
    local or on the hub.
    vocab: 'full', or 'data' for scratch: the LLM keeps rows only for the tokens of the mixture's records in
    data_dir (Molmo2Config.keep_tokens), its records scanned by `workers` forked processes. A checkpoint keeps
    the vocabulary it was trained with.
    projector_norm: a new model's connector ends in an RMSNorm (connector.py; not Molmo2's); a checkpoint keeps
    its own connector, so asking for it there is an error. position_bins: likewise, a new model's connector embeds
    where each image token sits (connector.py; not Molmo2's)."""
    from model import Molmo2, Molmo2Config, Qwen3, load_siglip
    if vocab not in ("full", "data"):
        raise ValueError(f"vocab={vocab!r}: expected 'full' or 'data'")
    if init_from == "scratch":
        config = Molmo2Config.preset(model_preset)
        config = replace(config, connector=replace(config.connector, projector_norm=projector_norm,
                                                   position_bins=position_bins))
        if vocab == "data":
            import data
            try:
                config = config.keep_tokens(data.record_token_ids(data_dir, mixture, workers=workers))
            except FileNotFoundError as e:  # no data yet: the message says how to make it
                raise SystemExit(str(e)) from None
        vit = load_vit(vit_from, config.vit, any_image_size=True) if vit_from else None
        if vit is not None:  # stage 1 may have drawn it at another crop size (train_vision.py's vit_image_size)
            config = replace(config, vit=vit.config)
        model = Molmo2(config, vit=vit)
    elif init_from == "parts":
        if vocab == "data":
            raise ValueError("vocab='data' is for models from scratch: a pretrained Qwen3 keeps its whole vocabulary")
        if not (llm_from and vit_from):
            raise ValueError("init_from='parts' needs llm_from and vit_from (e.g. --llm_from=Qwen/Qwen3-0.6B "
                             "--vit_from=google/siglip2-so400m-patch14-384)")
        if projector_norm or position_bins:
            raise ValueError("projector_norm and position_bins are switches for models from scratch: a pretrained "
                             "Qwen3 and SigLIP2 train with Molmo2's own connector")
        vit = load_siglip(vit_checkpoint_dir(vit_from))
        model = Molmo2.from_parts(Qwen3.from_pretrained(llm_from), vit)
    elif os.path.isdir(os.path.join(init_from, "final")):
        model = Molmo2.from_pretrained(os.path.join(init_from, "final"))
    else:
        model = Molmo2.from_pretrained(init_from)
    if init_from not in ("scratch", "parts") and projector_norm and not model.config.connector.projector_norm:
        raise ValueError(f"projector_norm=True: the checkpoint {init_from} has no norm after its projector, and a "
                         "checkpoint keeps its own connector (the switch is for models from scratch)")
    bins = model.config.connector.position_bins
    if init_from not in ("scratch", "parts") and position_bins and position_bins != bins:
        raise ValueError(f"position_bins={position_bins}: the checkpoint {init_from} has {bins}, and a checkpoint "
                         "keeps its own connector (the switch is for models from scratch; leave it at 0 to keep the "
                         "checkpoint's)")
    model.llm.config.resid_dropout = resid_dropout
    model.llm.config.response_dropout = response_dropout
    return model


# ---------------------------------------------------------------------------
# Data: the mixture -> formatted examples -> packed rows -> batches, one stream per rank, resumable
# ---------------------------------------------------------------------------

MODEL_INPUTS = ("input_ids", "position_ids", "attn_mask", "mm_token_type_ids", "pixel_values", "image_token_pooling",
                "image_grids", "image_num_crops", "pixel_values_videos", "video_token_pooling", "video_grids")


def batch_to(batch, device):
    """A TrainLoader batch -> the model's, on the device: tensors copied without waiting, uint8 pixels back to the
    processor's floats and the attention mask made from the ids there (both cheaper on a GPU than on the host)."""
    import data
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    for name in ("pixel_values", "pixel_values_videos"):
        if name in batch and batch[name].dtype == torch.uint8:
            batch[name] = from_uint8(batch[name])
    if "attn_mask" not in batch:
        batch["attn_mask"] = data.batch_attention_mask(batch["example_ids"], batch["branch_ids"],
                                                       batch["mm_token_type_ids"])
    return batch


def padded_size(n, steps=4):
    """n rounded up to the next of a few sizes: multiples of 1/steps of the power of two at or below n (steps=4:
    ..., 40, 48, 56, 64, 80, 96, 112, 128, 160, ...), so the sizes a run meets stay few and each wastes < 1/steps."""
    if n <= steps:
        return n
    step = 2 ** (n.bit_length() - 1) // steps
    return -(-n // step) * step


def pad_media(batch, steps=4, list_targets=False, crops=None):
    """A collated batch -> the same batch with its media padded to a few fixed sizes (padded_size), for a CUDA graph
    of the training step (train_joint.py's cuda_graph): crops of zeros; pooling windows [0, -1, ...] (one valid
    index, so never empty); one more grid row (and crop count) that owns the padding windows and crops, then grid
    rows of zeros (no tokens). The features of the padding come after every real one and no <im_patch> token takes
    them (Molmo2.add_vision_features; the model runs it within Molmo2.fixed_shape_batches()). The rows were already
    padded to max_seq_len. `media_padding`: (padding crops, padding windows), which training_flops leaves out.
    list_targets: also `target_positions`, the positions of the flattened rows that have a target, then -1 up to a
    padded count, so that the loss of a graph runs on those rows and not on every position (a third of them in
    tools/bench.py's batch of captions: its graphed step 173.6 ms against 188.9 on an H200, BENCHMARKS.md "The
    graph's loss at the listed targets alone"). TrainLoader's fixed_shapes batches list them: the count varies from
    batch to batch, so it adds layouts, each a graph of its own (1,000 of the GPU demo's batches met 10 against 6
    from their media alone), and the small preset's graphed step with compiled blocks (its whole vocabulary) went from
    125 to 53 ms on an H200.
    crops: {pixels key: its real crop count} for streams whose crops were already written padded to
    padded_size(count), the padding zeros (TrainLoader: concat_pooled's out), so they are not copied again."""
    batch = dict(batch)
    if list_targets and "targets" in batch:
        at = (batch["targets"] >= 0).flatten().nonzero().squeeze(1)
        n = max(len(at), 1)  # a batch without targets still gets a position (-1: no loss)
        batch["target_positions"] = torch.cat([at, at.new_full((padded_size(n, steps) - len(at),), -1)])
    padding = torch.zeros(2, dtype=torch.long)
    streams = (("pixel_values", "image_token_pooling", "image_grids", "image_num_crops"),
               ("pixel_values_videos", "video_token_pooling", "video_grids", None))
    for pixels, pooling, grids, crop_counts in streams:
        if pixels not in batch:
            continue
        written = (crops or {}).get(pixels)  # the real crops of a stream written padded, else None
        n_crops, n_windows = batch[pixels].shape[0] if written is None else written, batch[pooling].shape[0]
        pad_crops, pad_windows = padded_size(n_crops, steps) - n_crops, padded_size(n_windows, steps) - n_windows
        padding += torch.tensor([pad_crops, pad_windows])
        if written is None:
            batch[pixels] = torch.cat([batch[pixels], batch[pixels].new_zeros(pad_crops, *batch[pixels].shape[1:])])
        elif batch[pixels].shape[0] != n_crops + pad_crops:
            raise ValueError(f"pad_media: {pixels} has {batch[pixels].shape[0]} rows, not {written} crops padded to "
                             f"{n_crops + pad_crops}")
        windows = batch[pooling].new_full((pad_windows, batch[pooling].shape[1]), -1)
        windows[:, 0] = 0
        batch[pooling] = torch.cat([batch[pooling], windows])
        if grids in batch:  # images (I, 4): low h, low w, high h, high w; videos (V, 3): frames, h, w
            n = batch[grids].shape[0]
            extra = batch[grids].new_zeros(padded_size(n + 1, steps) - n, batch[grids].shape[1])
            extra[0] = torch.tensor([1, pad_windows, 0, 0] if extra.shape[1] == 4 else [1, 1, pad_windows])
            batch[grids] = torch.cat([batch[grids], extra])
            if crop_counts in batch:
                counts = batch[crop_counts].new_zeros(len(extra))
                counts[0] = pad_crops
                batch[crop_counts] = torch.cat([batch[crop_counts], counts])
    batch["media_padding"] = padding
    return batch


MEDIA_COUNTS = ("pixel_values", "image_token_pooling", "image_grids", "image_num_crops", "pixel_values_videos",
                "video_token_pooling", "video_grids")  # first dimension: crops, tokens or images of the whole batch


def model_inputs(batch, compiled=False):
    """The entries of a collated batch that Molmo2's forward takes (not its targets, weights or example ids).
    compiled: the media's first dimension (MEDIA_COUNTS) is marked dynamic for torch.compile, which then traces one
    graph for every image count, where it would trace a static graph first and recompile at the next count (rows
    are padded to max_seq_len, so nothing else changes from batch to batch; TrainLoader's length_groups change the
    length, which one recompile makes dynamic). Dynamo still specialises a size of 1."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if compiled:
        for key in MEDIA_COUNTS:
            if key in inputs:
                torch._dynamo.maybe_mark_dynamic(inputs[key], 0)
    return inputs


def merge_media_streams(batch, rows, crops_out=None):
    """A batch holding images and videos -> one stream of crops and frames, in token order, image windows
    padded to the 9 slots of video windows (-1 = padding): the model reads <im_patch> tokens in order, and
    images and videos share the ViT and connector (pooling with padding slots is the same computation).
    crops_out: as data.collate's, for the one stream."""
    import data
    parts, poolings = [], []
    for ex in (ex for row in rows for ex in row):
        for pixels, pooling in ((ex.pixel_values, ex.image_token_pooling), (ex.pixel_values_videos, ex.video_token_pooling)):
            if pixels is not None:
                parts.append(pixels)
                poolings.append(F.pad(pooling.long(), (0, 9 - pooling.shape[1]), value=-1))  # (n_tokens, 9)
    for key in ("pixel_values_videos", "video_token_pooling", "video_grids", "image_grids", "image_num_crops"):
        batch.pop(key, None)
    batch["pixel_values"], batch["image_token_pooling"] = data.concat_pooled(parts, poolings, out=crops_out)
    return batch


def shared_array(*shape):
    """A zeroed uint8 array of anonymous shared memory: made before a fork, the processes on both sides read and write
    the same bytes, and no file in /dev/shm is needed (or left behind). Its pages take memory once written."""
    import mmap
    return np.frombuffer(mmap.mmap(-1, int(np.prod(shape))), dtype=np.uint8).reshape(shape)


def crop_bytes(processor):
    """The bytes of one of a loader's crops: its patches' uint8 levels (levels_processor)."""
    return (processor.crop_size // processor.patch_size) ** 2 * processor.patch_size ** 2 * 3


def pixel_slots(processor, *counts):
    """Shared memory for a loader's worker processes to write their examples' pixels into: a uint8 array of shape
    (*counts, bytes of max_crops + 1 of the processor's crops), a slot each, made before the workers are forked, so
    they write where the loader reads."""
    return shared_array(*counts, (processor.max_crops + 1) * crop_bytes(processor))


class StepBuffer:
    """One step's share of StepsAhead's shared memory, handed out front to back: TrainLoader.crop_buffer in the
    batch process, where each micro-batch's crops are written (in one copy, padded) for the training process to read,
    instead of being sent through the socket. nbytes -> a uint8 tensor over the next nbytes, or None where they do not
    fit (the crops are then made as without it, and sent)."""

    ALIGN = 64  # each buffer starts at a multiple of 64 bytes: any dtype's view of it is aligned

    def __init__(self, region):
        self.region, self.used = region, 0

    def __call__(self, nbytes):
        start = -(-self.used // self.ALIGN) * self.ALIGN
        if start + nbytes > len(self.region):
            return None
        self.used = start + nbytes
        return torch.from_numpy(self.region[start:start + nbytes])


class ForkedWorkers:
    """A loader's worker processes (self.workers of them; Linux), made on first use: forked from this process,
    so each has the loader's files, processor and settings without pickling them. A ProcessPoolExecutor, not a
    multiprocessing.Pool: the Pool's worker-handler thread wakes whenever a result waits in its pipe, and with
    examples of megabytes it spun ~30,000 times a second on this 2-core machine, holding the GIL the training and
    batch threads need (BENCHMARKS.md "The GPU trainer: batches made off the training thread"); the executor's
    thread sleeps until it can read a result. But for each result it wakes, registers every worker's pipe with a
    selector, polls and unpickles, holding the GIL: in a GPU demo's joint step it woke ~87 times, for ~50 ms of
    Python under cProfile beside the step's ~100 (BENCHMARKS.md "Where a GPU step's time goes"). So the loaders send
    keys in chunks (per_task) and take one result per chunk."""

    workers, pool = 0, None

    def start_workers(self):
        if self.pool is None:
            import atexit
            from concurrent.futures import ProcessPoolExecutor
            import data
            self.pool = ProcessPoolExecutor(self.workers, mp_context=data.fork_context(), initializer=_init_worker,
                                            initargs=(self,))
            atexit.register(self.close)  # stopped before interpreter teardown, even when a run stops early
        return self.pool

    def close(self):
        """Stop the workers: what they were asked to read ahead and have not started is dropped."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


_WORKER_LOADER = None  # in a worker process: the loader it was forked from


def _init_worker(loader):
    global _WORKER_LOADER
    _WORKER_LOADER = loader
    gc.freeze()  # data.fork_context says why
    # one thread: a forked child's first multi-threaded torch op can hang (OpenMP is not fork-safe)
    torch.set_num_threads(1)


class TrainLoader(ForkedWorkers):
    """The micro-batches of one rank: records drawn from the mixture (data.MixtureSampler), formatted
    (data.format_example, deterministic per draw), packed (data.Packer) and collated.

    One stream of draws is dealt by record over world_size * grad_accum shards (_DrawKeys), and micro-batch m of
    rank r packs shard r * grad_accum + m. The examples of a step therefore depend only on the product:
    2 GPUs x 1 micro-batch see exactly what 1 GPU x 2 micro-batches sees (how the FSDP run is checked
    against the single-GPU one). Bad records are skipped and counted in self.report, examples that cannot
    be packed in the packers; state_dict() / load_state_dict() continue the exact same streams.
    workers > 0: worker processes (forked, Linux) read ahead and make the examples while the step runs (see
    _Prefetch). They are for machines with idle cores (a GPU machine: the formatting is most of a small
    model's step there); on a 2-core machine they cost more than they save (BENCHMARKS.md).
    fixed_shapes: each batch's media padded to a few sizes, and the positions with a target listed and padded to a
    few counts (pad_media), for a CUDA graph of the step.
    token_attributes: each batch also holds image_scene_targets, every image token's classes of these attributes
    (image_scene_targets; for train_joint.py's token_loss).
    length_groups > 0: batches of rows of like length, each only as long as its longest row (rounded up to
    LENGTH_STEP), not max_seq_len: a shard packs length_groups batches' rows at once, orders them by length, cuts
    them into batches and hands those out in a seeded random order. Where rows hold one example each and their
    padding is much of a step (the CPU demo: a fifth of its tokens), the step costs that much less; the rows held
    back go into state_dict() as their examples' keys. Not with fixed_shapes (one CUDA graph a shape).
    join_rows: each batch's rows joined end to end into one row, padded only at its end (to a multiple of JOIN_STEP):
    the same examples in the same order, each in its own block of the mask with its positions from 0, so each token's
    loss is what it was (packing), and none of the padding between rows is computed. Where a row holds one example and
    a fifth of it is padding (the CPU demo's), the step computes that much less; with model.KeyBlocks (train_joint.py
    key_blocks) the attention stays as cheap as in separate rows. Not with fixed_shapes or length_groups."""

    LENGTH_STEP = 32  # a grouped batch's length is a multiple of this: few shapes for a compiler to meet
    JOIN_STEP = 64  # a joined row's length is a multiple of this: model.KeyBlocks' chunk of queries
    shared_pixels = True  # the workers hand an image example's pixels over in shared memory (_make_slots)
    crop_buffer = None  # StepsAhead's batch process sets a StepBuffer: where the step's crops are written (_crops_out)

    def __init__(self, data_dir, mixture, split, batch_size, max_seq_len, max_crops, max_row_crops,
                 max_video_frames, crop_size, patch_size, overlap_margins, prefix_mode, weighting, seed, styles=None,
                 rank=0, world_size=1, grad_accum=1, workers=0, fixed_shapes=False, token_attributes=(),
                 length_groups=0, join_rows=False):
        import data
        if not isinstance(length_groups, int) or length_groups < 0:
            raise ValueError(f"length_groups={length_groups!r}: a count of batches (0: off)")
        if length_groups and fixed_shapes:
            raise ValueError("length_groups: batches of varying length, and fixed_shapes asks for few: choose one")
        if join_rows and (fixed_shapes or length_groups):
            raise ValueError("join_rows: one row of the batch's own length, which fixed_shapes and length_groups "
                             "shape their own way: choose one")
        self.data, self.fixed_shapes = data, fixed_shapes
        self.length_groups, self.join_rows = length_groups, join_rows
        self.shards = list(range(rank * grad_accum, (rank + 1) * grad_accum))  # the packers' shards, in order
        self.held = [[] for _ in self.shards]  # per shard: the grouped batches not yet handed out, [[(keys, row)]]
        self.n_groups = [0] * len(self.shards)  # per shard: groups made so far (seeds each group's order)
        self.token_attributes = tuple(token_attributes)  # each image token's scene attributes, for TokenAttributeLoss
        self.styles = None if styles is None else set(styles)  # train on these annotation styles only
        self.n_filtered = 0  # records with no annotation of those styles
        self.batch_size, self.max_seq_len, self.seed = batch_size, max_seq_len, seed
        self.prefix_mode, self.weighting = prefix_mode, weighting
        self.report = data.SkipReport()
        self.processor = data.Molmo2Processor(max_crops=max_crops, max_frames=max_video_frames, crop_size=crop_size,
                                              patch_size=patch_size, overlap_margins=overlap_margins)
        self.example_processor = levels_processor(self.processor)
        n_shards = world_size * grad_accum
        self.files, self.packers = None, []
        self.workers, self.pool = workers, None
        self.slots, self.free_slots = None, []  # the workers' shared pixel slots (_make_slots), those not in use
        for shard in range(rank * grad_accum, (rank + 1) * grad_accum):
            try:
                sampler, files = data.open_mixture(mixture, data_dir, split, seed, rank=0, report=self.report)
            except FileNotFoundError as e:  # no data yet: the message says how to make it
                raise SystemExit(str(e)) from None
            self.files = self.files or files  # the shards read the same files
            keys = _DrawKeys(sampler, shard, n_shards)
            if workers:
                keys = _Prefetch(keys, self, depth=max(16, 4 * batch_size))
            self.packers.append(data.Packer(keys, keys.make if workers else self._example, max_seq_len, max_row_crops))

    def start_workers(self):
        if self.pool is None and self.shared_pixels and self.slots is None:
            self._make_slots()  # before the workers are forked: they write where this process reads
        return super().start_workers()

    def _make_slots(self):
        """Shared memory for the workers' pixels: a slot for each key a shard's read-ahead may hold at once (its
        depth and one task more) and for each example whose pixels are held (from_slot) while it waits to be packed
        (the Packer's lookahead) or its batch is made (~2 a row), each as large as an image of max_crops + 1 crops;
        larger examples (several images, videos) and keys past the free slots come back through the pipes. The
        pixels are most of an example's bytes: one H100 machine's batch process (the GPU demo's joint stage, 64 rows
        of 512 tokens, ~1.6 MB a task) spent ~23 ms a step reading, buffering and unpickling them from the workers'
        pipe, ~2/3 of its step (BENCHMARKS.md "The GPU demo's joint batches through shared memory")."""
        n = sum(packer.items.depth + packer.items.per_task + packer.lookahead + 2 * self.batch_size
                for packer in self.packers if isinstance(packer.items, _Prefetch))
        self.slots, self.free_slots = pixel_slots(self.processor, n), list(range(n))

    def take_slot(self):
        """A free slot's index, or None (the pipe) when every slot is in use."""
        return self.free_slots.pop() if self.free_slots else None

    def step_crop_bytes(self):
        """The most bytes one step's crops take in crop_buffer (StepsAhead's shared memory for them): each
        micro-batch's batch_size rows of at most max_row_crops crops, padded with fixed_shapes; 0 where the rows have
        no bound."""
        row_crops = self.packers[0].max_crops
        if row_crops is None:
            return 0
        n = self.batch_size * row_crops
        rows = padded_size(n) if self.fixed_shapes else n
        return len(self.packers) * (rows * crop_bytes(self.processor) + StepBuffer.ALIGN)

    def _crops_out(self, n, crop_shape, dtype):
        """collate's crops_out: a media stream's n crops, written once where they go: padded to padded_size(n) for a
        CUDA graph (fixed_shapes), so that pad_media need not copy them again, and in the batch process into
        crop_buffer, the memory the training process reads them from, so that they need not go through the socket (a
        GPU demo step's ~14 MB: BENCHMARKS.md "The GPU demo's crops written once"). None (collate's own
        concatenation) where neither applies."""
        rows = padded_size(n) if self.fixed_shapes else n
        buffer = None if self.crop_buffer is None else self.crop_buffer(rows * math.prod(crop_shape) * dtype.itemsize)
        if buffer is not None:
            return buffer.view(dtype).view(rows, *crop_shape)
        return torch.empty((rows, *crop_shape), dtype=dtype) if self.fixed_shapes else None

    def from_slot(self, slot, dtype, shape):
        """The pixels a worker wrote into a slot, read where they are: the batch's copy of them (collate's) is then
        their only one. The slot is free again once nothing holds them (their example, which may wait in its Packer
        across steps, or a batch that took them without a copy): every tensor made from the array returned keeps it
        alive (torch.from_numpy), and its finalizer frees the slot. A copy here took ~1.75 ms a step of the GPU
        demo's batch process on an H100 host, by its profile (BENCHMARKS.md "The GPU demo's crops written once")."""
        n = math.prod(shape) * np.dtype(dtype).itemsize
        pixels = self.slots[slot, :n].view(dtype).reshape(shape)
        weakref.finalize(pixels, self.free_slots.append, slot)
        return pixels

    def _example(self, key):
        name, index, draw = key
        record = self.files[name].get(index)
        if record is None:
            return None  # counted in self.report
        if self.styles is not None:
            record["annotations"] = [a for a in record["annotations"] if a["style"] in self.styles]
            if not record["annotations"]:
                self.n_filtered += 1
                return None
        rng = np.random.default_rng([self.seed, draw])
        try:
            example = self.data.format_example(record, self.example_processor, rng, self.prefix_mode,
                                               self.weighting, self.max_seq_len)
        except self.data.MediaError as e:
            self.report.skip(self.data.BadRecord("undecodable_image", str(e)))
            return None
        if self.token_attributes and example.image_token_pooling is not None:
            example.scene_targets = image_scene_targets(record, example, self.processor, self.token_attributes)
        return example

    def next_step(self):
        """-> [micro-batch] (grad_accum of them), each a collated batch of batch_size rows."""
        return [self._batch(i) for i in range(len(self.packers))]

    def _rows(self, i):
        """The next batch's rows of the i-th packer: as it packs them, or its next length group's batch."""
        packer = self.packers[i]
        if not self.length_groups:
            return [next(packer) for _ in range(self.batch_size)]
        held = self.held[i]
        if not held:
            keyed = [packer.next_keyed() for _ in range(self.length_groups * self.batch_size)]
            keyed.sort(key=lambda kr: sum(len(ex) for ex in kr[1]))  # stable: rows of one length stay in draw order
            batches = [keyed[j:j + self.batch_size] for j in range(0, len(keyed), self.batch_size)]
            order = np.random.default_rng([self.seed, self.shards[i], self.n_groups[i]]).permutation(len(batches))
            held.extend(batches[j] for j in order)
            self.n_groups[i] += 1
        return [row for _, row in held.pop(0)]

    def _batch(self, i):
        rows = self._rows(i)
        pad_to = self.max_seq_len
        if self.join_rows:
            rows = [[ex for row in rows for ex in row]]
            pad_to = -(-sum(len(ex) for ex in rows[0]) // self.JOIN_STEP) * self.JOIN_STEP
        elif self.length_groups:
            step = self.LENGTH_STEP
            pad_to = min(-(-max(sum(len(ex) for ex in row) for row in rows) // step) * step, self.max_seq_len)
        # batch_to makes the mask on the device from the ids; a joined row's comes from collate, example by example:
        #   a (1, L, L) mask from the ids took 26 ms for the CPU demo's L of ~2,900, collate's 2.5
        examples = [ex for row in rows for ex in row]
        crops = {name: sum(getattr(ex, name).shape[0] for ex in examples if getattr(ex, name) is not None)
                 for name in ("pixel_values", "pixel_values_videos")}
        # images and videos together are one stream in the end (merge_media_streams): only that one is written out
        merging = all(any(getattr(ex, name) is not None for ex in examples) for name in crops)
        batch = self.data.collate(rows, pad_to=pad_to, mask=self.join_rows,
                                  crops_out=None if merging else self._crops_out)
        targets = [ex.scene_targets for ex in examples if ex.scene_targets is not None]
        if targets:  # in the order collate concatenates the examples' images
            batch["image_scene_targets"] = torch.cat(targets)
        if merging:
            batch = merge_media_streams(batch, rows, crops_out=self._crops_out)
            crops = {"pixel_values": sum(crops.values())}
        return pad_media(batch, list_targets=True, crops=crops) if self.fixed_shapes else batch

    def summary(self):
        lines = [self.report.summary()]
        if self.n_filtered:
            lines.append(f"records without an annotation of the styles {sorted(self.styles)}: {self.n_filtered}")
        skipped = collections.Counter()
        for packer in self.packers:
            skipped.update(packer.skipped)
        if skipped:
            lines.append("examples not packed: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
        return "\n".join(lines)

    def state_dict(self):
        report = self.report
        return {"packers": [packer.state_dict() for packer in self.packers],  # each holds its sampler's state
                "held": [[[keys for keys, _ in batch] for batch in held] for held in self.held],
                "n_groups": list(self.n_groups),
                "records": {"n_seen": report.n_seen, "counts": dict(report.counts), "first": dict(report.first),
                            "n_filtered": self.n_filtered}}

    def load_state_dict(self, state):
        if len(state["packers"]) != len(self.packers):
            raise ValueError(f"data state for {len(state['packers'])} micro-batches per step, this run has "
                             f"{len(self.packers)} (resume with the same grad_accum)")
        for packer, packer_state in zip(self.packers, state["packers"]):
            packer.load_state_dict(packer_state)
        held = state.get("held", [[] for _ in self.packers])
        if any(held) and not self.length_groups:
            raise ValueError("data state with length groups held back: resume with the same length_groups")
        self.held = [[[(keys, [packer.make_example(key) for key in keys]) for keys in batch] for batch in shard]
                     for packer, shard in zip(self.packers, held)]  # remade from their keys, as the packers' own
        self.n_groups = list(state.get("n_groups", [0] * len(self.packers)))
        # after the packers, which reread their waiting records: those were counted before the checkpoint
        self.report.n_seen = state["records"]["n_seen"]
        self.report.counts = collections.Counter(state["records"]["counts"])
        self.report.first = dict(state["records"]["first"])
        self.n_filtered = state["records"].get("n_filtered", 0)


def _project_frame(error):
    """'file.py:line (function)' of this project's innermost frame in an exception's traceback: what to change."""
    import traceback
    here = os.path.dirname(os.path.abspath(__file__))
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if os.path.dirname(os.path.abspath(f.filename)) == here]
    return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno} ({frames[-1].name})" if frames else "?"


class GraphedStep:
    """A training step's forward, backward and gradient clipping, captured as a CUDA graph once per batch layout and
    replayed after: the `cuda_graph` knob of train_vision.py and train_joint.py. Why: a small model's step is ~1,000
    to ~1,700 small kernels, which the GPU runs in a fraction of the time the host takes to launch them one by one
    (BENCHMARKS.md "Where a GPU step's time goes"); a replay launches them all at once. step(host_batch) -> ({loss
    name: tensor}, the gradients' norm before clipping), the clipped gradients left in each parameter's .grad. The
    optimizer runs outside the graph, after the caller has looked at the loss: a non-finite step can still be refused.

    What a graph needs, and how it gets it:
    - fixed addresses: each batch is copied into the graph's own input tensors; the gradients are made by the first
      (eager) warm-up run, then zeroed in place inside every step and never set to None: the caller must not
      zero_grad(set_to_none=True) them away. fresh_grads=True instead lets the captured backward write each
      gradient into memory of the graph's own (no zeroing, no adding into the old one: ~765 fewer kernels a step of
      the full preset), each graph keeping its own set, which .grad points to after its replay: one more set of
      gradients in memory for each layout captured;
    - fixed shapes: one graph per layout (every tensor's shape and dtype), at most max_graphs; a batch of another
      layout after that runs the same step eagerly (VisionLoader's round_labels and TrainLoader's fixed_shapes keep
      the layouts few);
    - no host sync inside the step (a capture fails on one): the second warm-up run of the first capture goes under
      torch.cuda.set_sync_debug_mode("error") (the first compiles what torch.compile wraps, and a compile syncs); a
      step that syncs, or leaves a parameter without a gradient (AdamW would then move it by its momentum, where
      eagerly it would skip it), runs eagerly from then on, and says why;
    - memory: the graphs' pool keeps a step's activations, and each new layout's warm-up runs eagerly beside it, so
      graphs need up to about twice the eager step's memory. A warm-up that runs out of GPU memory lets every graph
      go (their pool with them) and the run goes on eagerly, saying so, rather than ending there (the full preset's
      joint stage at 64 rows of 512 tokens: a 44.6 GiB pool after the first layout, the eager step 50.3 GiB, on an
      80 GB card).
    The step reads only the batch's tensors. A capture runs the step twice on a side stream first (cuBLAS and cuDNN
    make their plans and workspaces there), then captures it and replays it: the gradients are the replay's. No
    parameter moves before the optimizer's step. The graphs share one memory pool: only one runs at a time, and
    nothing they compute outlives a step but their outputs (and with fresh_grads their gradients, held alive by
    self.graphs, so no other graph's capture takes their memory)."""

    def __init__(self, model, prepare, loss_of, grad_clip, dtype, max_graphs=8, print_fn=print, forward=None,
                 fresh_grads=False):
        self.model, self.prepare, self.loss_of, self.grad_clip = model, prepare, loss_of, grad_clip
        self.fresh_grads = fresh_grads
        self.forward = forward or model  # the prepared batch -> {loss name: tensor}; the model's own by default
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.dtype, self.max_graphs, self.print = dtype, max_graphs, print_fn
        self.graphs, self.pool, self.eager_only = {}, None, False
        self.replays = self.eager_steps = 0

    def _run(self, batch, zero=True):
        """The step itself, eagerly or under capture: a batch of device tensors -> (losses, gradient norm)."""
        grads = [p.grad for _, p in self.named if p.grad is not None]
        if grads and zero:
            torch._foreach_zero_(grads)  # in place: a graph holds their addresses
        with torch.autocast("cuda", dtype=self.dtype, cache_enabled=False):  # no cast cached across replays
            losses = self.forward(self.prepare(batch))
            loss = self.loss_of(losses)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.named], self.grad_clip)
        return {k: v.detach() for k, v in losses.items()}, norm

    def step(self, host_batch):
        tensors = {k: v for k, v in host_batch.items() if torch.is_tensor(v)}
        layout = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(tensors.items()))
        entry = self.graphs.get(layout)
        if entry is None and not self.eager_only and len(self.graphs) < self.max_graphs:
            oom = None
            try:
                entry = self._capture(tensors, layout)
            except torch.OutOfMemoryError as e:  # in a warm-up run: a failed capture itself ends the run (below)
                oom = str(e).splitlines()[0]  # the error goes at the block's end, and with it the warm-up's tensors
            if oom is not None:
                n = len(self.graphs) + 1
                self._let_graphs_go()
                self._eager_from_now(f"warming up to capture batch layout {n} ran out of GPU memory ({oom}); the "
                                     f"graphs and their memory pool are let go")
        if entry is None:
            self.eager_steps += 1
            return self._run({k: v.cuda(non_blocking=True) for k, v in tensors.items()})
        graph, inputs, outputs, grads = entry
        for k, v in inputs.items():
            v.copy_(tensors[k], non_blocking=True)
        graph.replay()
        if grads is not None:  # this graph's own gradients (fresh_grads), whichever graph ran last
            for (_, p), g in zip(self.named, grads):
                p.grad = g
        self.replays += 1
        return outputs

    def _let_graphs_go(self):
        """Drops every captured graph and with them their memory pool, for the eager steps that follow. With
        fresh_grads the gradients lived in that pool: they go too, and the next backward makes its own."""
        self.graphs.clear()
        self.pool = None
        if self.fresh_grads:
            for _, p in self.named:
                p.grad = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the failed warm-up's side stream may still be running
            # cuBLAS keeps a workspace per stream, and the capture's stream got its own inside the pool: held by
            # cuBLAS, not by a graph, it would keep the pool's segments it sits in (~0.5 GiB on an H100) for good
            torch._C._cuda_clearCublasWorkspaces()
            torch.cuda.empty_cache()

    def _eager_from_now(self, why):
        self.eager_only = True
        self.print(f"cuda_graph: the step runs eagerly from here: {why}")

    def _capture(self, tensors, layout):
        inputs = {k: v.cuda(non_blocking=True) for k, v in tensors.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            first = not self.graphs
            self._run(inputs)  # unchecked: torch.compile's blocks compile here, and a compile waits on the GPU
            mode = torch.cuda.get_sync_debug_mode()
            try:
                if first:
                    torch.cuda.set_sync_debug_mode("error")
                self._run(inputs)
            except RuntimeError as e:
                if not first or "synchroniz" not in str(e):
                    raise
                torch.cuda.current_stream().wait_stream(side)
                self._eager_from_now(f"it waits on the GPU ({str(e).splitlines()[0]}, at {_project_frame(e)})")
                return None
            finally:
                torch.cuda.set_sync_debug_mode(mode)
            without = [n for n, p in self.named if p.grad is None]
            if without:
                torch.cuda.current_stream().wait_stream(side)
                self._eager_from_now(f"{len(without)} parameter(s) get no gradient, e.g. {without[:3]}")
                return None
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.fresh_grads:  # the captured backward then allocates them in the graph's pool, written whole each replay
            for _, p in self.named:
                p.grad = None
        try:
            # thread_local: the batch thread may page-lock memory meanwhile, which a global capture would forbid
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                outputs = self._run(inputs, zero=not self.fresh_grads)
        except RuntimeError as e:  # an op that a graph cannot hold: the run cannot go on in this process
            raise RuntimeError(f"cuda_graph: capturing the training step failed; run with --cuda_graph=False "
                               f"({str(e).splitlines()[0]})") from e
        self.pool = graph.pool()
        graph.replay()
        grads = [p.grad for _, p in self.named] if self.fresh_grads else None
        self.graphs[layout] = (graph, inputs, outputs, grads)
        self.print(f"cuda_graph: the step captured for batch layout {len(self.graphs)} of at most {self.max_graphs}")
        return self.graphs[layout]


class StepsAhead:
    """A loader whose next steps' batches are made while this step trains (on a GPU: there the host's share of a
    small model's step, receiving examples from the workers, packing and concatenating them, was most of the step,
    and the GPU waited; BENCHMARKS.md "The GPU trainer: batches made off the training thread"). Same batches in the
    same order as the loader's own next_step(); state_dict() is the state before the next batch this run takes, so a
    checkpoint resumes exactly. What was read ahead is counted in summary() when it was made, not when taken.

    process=False: a background thread of this process runs the loader. But the batch work is Python that holds the
    GIL, and the training thread takes the GIL back after each of its ~1,000 kernel launches a step, so the two
    threads queue for it.
    process=True: a forked process runs the loader (and its own workers) and sends each step's tensors as raw bytes
    through a socket; a thread here receives them straight into the tensors it hands over (recv_into, without the
    GIL), so this process does no batch work in Python at all. The child must not touch CUDA (it never does: the
    loaders are CPU code) and runs torch on one thread (OpenMP is not fork-safe).

    pin_device: a CUDA device; the batches' tensors are then page-locked, so the training thread's
    `.to(device, non_blocking=True)` returns at once and the copy overlaps the GPU's work (from pageable memory that
    copy blocked the host 4-5 ms of a GPU demo step: BENCHMARKS.md "Where a GPU step's time goes"). The thread makes
    the device its current one first: a new thread's is device 0, and page-locking there would give every rank of
    a multi-GPU run a CUDA context on GPU 0."""

    def __init__(self, loader, depth=2, pin_device=None, process=False):
        import queue
        self.loader, self.queue, self.thread, self.head = loader, queue.Queue(depth), None, None
        # the child is forked (Linux); elsewhere the thread
        if pin_device is not None and torch.device(pin_device).index is None:  # "cuda": the current one
            pin_device = torch.device("cuda", torch.cuda.current_device())
        self.stopping, self.pin_device, self.process = False, pin_device, process and sys.platform.startswith("linux")
        self.child, self.sock, self.resume_state, self.child_summary = None, None, None, None
        self.crop_memory = None  # process=True: shared memory the child writes each step's crops into (_start_child)
        self.waits = []  # seconds the training thread waited for each step's batches: is the GPU waiting for data?

    def _run(self):
        if self.pin_device is not None:
            try:
                torch.cuda.set_device(self.pin_device)
            except BaseException as e:  # raised in the training thread, which would otherwise wait for ever
                self.queue.put((None, None, e))
                return
        while not self.stopping:
            if self.process:
                try:
                    item = _receive_step(self.sock, self.pin_device is not None, self.crop_memory)
                except (ConnectionError, OSError, EOFError) as e:
                    if self.stopping:
                        return
                    self.child.join(timeout=5)
                    item = (None, None, RuntimeError(f"the batch process ended without a step (exit code "
                                                     f"{self.child.exitcode}): {e}"), None)
                state, batches, error, summary = item
                if summary is not None:  # a step that failed sends none: the last one made still counts
                    self.child_summary = summary
                item = (state, batches, error)
            else:
                state = self.loader.state_dict()
                try:
                    batches = self.loader.next_step()
                    if self.pin_device is not None:
                        batches = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
                                   for batch in batches]
                    item = (state, batches, None)
                except BaseException as e:  # raised again in the training thread, where next_step() was asked
                    item = (state, None, e)
            self.queue.put(item)
            if item[2] is not None:
                return

    def _start_child(self):
        import atexit
        import socket
        import data
        ours, theirs = socket.socketpair()
        for s in (ours, theirs):  # a step's bytes in few system calls
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        # a region of shared memory for each step the child may make ahead (_batch_process says why that is enough),
        # made before the fork; for loaders that can say how large a step's crops may be (TrainLoader)
        depth = self.queue.maxsize
        step_bytes = self.loader.step_crop_bytes() if hasattr(self.loader, "step_crop_bytes") and depth > 0 else 0
        self.crop_memory = shared_array(depth, step_bytes) if step_bytes else None
        # not a daemon: a daemon process may not start the loader's own workers
        self.child = data.fork_context().Process(
            target=_batch_process, args=(self.loader, theirs, ours, self.resume_state, depth, self.crop_memory),
            name="steps-ahead")
        self.child.start()
        theirs.close()
        self.sock = ours
        atexit.register(self.close)  # before multiprocessing's own exit handler joins the child

    def _peek(self):
        if self.head is None:
            if self.thread is None:
                import threading
                if self.process:
                    self._start_child()
                self.thread = threading.Thread(target=self._run, name="steps-ahead", daemon=True)
                self.thread.start()
            t = time.perf_counter()  # where the loop waits: its first call for a step (state_dict or next_step)
            self.head = self.queue.get()
            self.waits.append(time.perf_counter() - t)
        return self.head

    def next_step(self):
        _, batches, error = self._peek()
        if error is not None:
            raise error
        self.head = None
        if self.process:
            try:
                self.sock.send(b"+")  # the child may make one step more: it stays `depth` steps ahead, as a thread
            except OSError:  # the child is gone: the receiving thread says so at the next step
                pass
        return batches

    def state_dict(self):
        return self._peek()[0]

    def load_state_dict(self, state):
        if self.thread is not None:
            raise RuntimeError("StepsAhead: load_state_dict before the first step, not after the thread started")
        if self.process:  # the child loads it: this process's loader never starts workers of its own
            self.resume_state = state
        else:
            self.loader.load_state_dict(state)

    def summary(self):
        made = self.child_summary if self.child_summary is not None else self.loader.summary()
        if len(self.waits) < 2:
            return made
        later = sorted(self.waits[1:])
        return (made + f"\nbatches made ahead: the first came after {self.waits[0]:.1f} s; the training loop then waited "
                f"{sum(later):.1f} s for the next {len(later)} (median {1000 * later[len(later) // 2]:.1f} ms)")

    def close(self):
        """Stop the thread (after the step it is making), the batch process and the loader's workers."""
        self.stopping = True
        if self.sock is not None:
            import socket
            self.sock.shutdown(socket.SHUT_RDWR)  # the thread's receive and the child's send both end
        if self.thread is not None:
            import queue
            while self.thread.is_alive():
                try:
                    self.queue.get(timeout=0.1)  # unblocks a full queue's put
                except queue.Empty:
                    pass
            self.thread = None
        if self.child is not None:
            self.child.join(timeout=30)
            if self.child.is_alive():
                self.child.terminate()
            self.sock.close()
            self.child, self.sock = None, None
        if hasattr(self.loader, "close"):
            self.loader.close()

    def __getattr__(self, name):  # processor, report, ...: the loader's
        if name == "loader":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


def _batch_process(loader, sock, parents_end, resume_state, depth, crop_memory=None):
    """StepsAhead's child: the loader's steps, each sent as (state before it, batches, error, summary), at most
    `depth` more than the parent has taken (it sends a byte for each).
    crop_memory: (depth, bytes) of shared memory; step m's crops are written into region m % depth (the loader's
    crop_buffer) and the parent copies them out. Region m % depth last held step m - depth, and before making step m
    this process has received m - depth + 1 bytes, one for each step the parent has taken (0 to m - depth), and the
    parent copies a step's crops out before it can take it: so it is done with them."""
    gc.freeze()  # data.fork_context says why
    parents_end.close()
    torch.set_num_threads(1)
    # each step's tensors in the memory the last one freed, not mapped and faulted in afresh; its workers, forked after
    # this, keep theirs too
    keep_freed_memory()
    loader.pool = None  # a forked copy of the parent's executor has no threads here; this process starts its own
    try:
        if resume_state is not None:
            loader.load_state_dict(resume_state)
        for made in itertools.count():
            if made >= depth and not sock.recv(1):  # nothing: the parent closed its end
                return
            state = loader.state_dict()
            if crop_memory is not None:
                loader.crop_buffer = StepBuffer(crop_memory[made % depth])
            try:
                batches, error = loader.next_step(), None
            except BaseException as e:  # sent on and raised in the training thread
                batches, error = None, e
            _send_step(sock, state, batches, error, loader.summary() if error is None else None, crop_memory)
            if error is not None:
                return
    except (ConnectionError, OSError):  # the parent closed its end: it is stopping
        pass
    finally:
        if hasattr(loader, "close"):
            loader.close()


def _send_step(sock, state, batches, error, summary, crop_memory=None):
    """One step through the socket: a pickled header (the state, error, summary and each micro-batch's layout:
    its tensors' dtypes and shapes, its other values), then each tensor's bytes in that order; a tensor already in
    crop_memory is sent as its place there."""
    tensors, layout = [], []
    start = None if crop_memory is None else crop_memory.ctypes.data
    for batch in batches or []:
        entry = {}
        for k, v in batch.items():
            if (start is not None and torch.is_tensor(v) and v.is_contiguous()
                    and start <= v.data_ptr() <= start + crop_memory.nbytes - v.nbytes):
                entry[k] = ("shared", v.dtype, tuple(v.shape), v.data_ptr() - start)
            elif torch.is_tensor(v):
                entry[k] = ("tensor", v.dtype, tuple(v.shape))
                tensors.append(v)
            else:
                entry[k] = ("value", v)
        layout.append(entry)
    try:
        header = pickle.dumps((state, error, summary, layout if batches is not None else None))
    except Exception:  # an error that does not pickle travels as its traceback
        error = RuntimeError("in the batch process:\n" + "".join(traceback.format_exception(error)))
        header = pickle.dumps((state, error, summary, None))
    sock.sendall(struct.pack("<Q", len(header)) + header)
    for t in tensors:
        if t.numel():
            sock.sendall(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _receive_exactly(sock, view):
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("the batch process closed its socket")
        got += n


def _receive_step(sock, pin, crop_memory=None):
    """_send_step's step: tensors made here (page-locked if pin) and filled straight from the socket, or copied
    from their place in crop_memory."""
    size = bytearray(8)
    _receive_exactly(sock, memoryview(size))
    header = bytearray(struct.unpack("<Q", size)[0])
    _receive_exactly(sock, memoryview(header))
    state, error, summary, layout = pickle.loads(header)
    batches = None
    if layout is not None:
        batches = []
        for entry in layout:
            batch = {}
            for k, (kind, *spec) in entry.items():
                if kind == "value":
                    batch[k] = spec[0]
                    continue
                dtype, shape, *at = spec
                t = batch[k] = torch.empty(shape, dtype=dtype, pin_memory=pin)
                if kind == "shared" and t.numel():  # a copy without the GIL, as recv_into's
                    place = crop_memory.reshape(-1)[at[0]:at[0] + t.nbytes]
                    t.reshape(-1).view(torch.uint8).copy_(torch.from_numpy(place))
                elif t.numel():
                    _receive_exactly(sock, memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            batches.append(batch)
    return state, batches, error, summary


def per_task(n_keys, workers, most=8):
    """How many of n_keys drawn keys one worker task makes: about an even share each, at most `most`."""
    return max(1, min(most, -(-n_keys // max(workers, 1))))


def _each(make, keys):
    """In a worker: make(key) for each key of a chunk, in order, sent back as one message (ForkedWorkers says why)."""
    return [make(key) for key in keys]


def _worker_example(key_and_slot):
    """In a worker: the example of a key as numpy arrays (sent back by value through a pipe, much cheaper than
    one shared-memory handle per tensor), or the ExampleTooLong it raised, and what making it counted. Its pixels go
    into its slot of the loader's shared memory where they fit (TrainLoader._make_slots), and the example then
    carries only their dtype and shape."""
    import data
    key, slot = key_and_slot
    loader = _WORKER_LOADER
    report = loader.report  # the one its files count into: zeroed, so what follows is this key's alone
    report.n_seen, report.counts, report.first, loader.n_filtered = 0, collections.Counter(), {}, 0
    example, too_long = None, None
    try:
        example = loader._example(key)
    except data.ExampleTooLong as e:  # the Packer counts it: raised again where make() is called
        too_long = e
    arrays = None if example is None else {name: None if value is None else value.numpy()
                                           for name, value in vars(example).items()}
    pixels = None if arrays is None else arrays["pixel_values"]
    if slot is not None and pixels is not None and pixels.nbytes <= loader.slots.shape[1]:
        loader.slots[slot, :pixels.nbytes] = pixels.reshape(-1).view(np.uint8)
        arrays["pixel_values"] = (pixels.dtype.str, pixels.shape)
    return arrays, too_long, (report.n_seen, dict(report.counts), dict(report.first), loader.n_filtered)


class _Prefetch:
    """A shard's keys, read ahead `depth` draws, with their examples made by the loader's worker processes in
    the meantime. To the Packer it is its items iterator and make_example. Examples are pure functions of
    their keys, and what making one counts (records seen, skipped, filtered) is added to the loader's counts
    when the Packer takes it, in draw order; state_dict() is the sampler's state before the first key the
    Packer has not taken, so a checkpoint never includes the read-ahead. Every example of such a run is made
    in a worker, the ones a resumed Packer remakes too: workers run torch on one thread, and CPU resizing can
    round a few pixels to the next of the 256 levels with another thread count, so a run with workers gives
    exactly what the serial path gives on one thread, and resumes exactly."""

    def __init__(self, keys, loader, depth):
        self.keys, self.loader, self.depth = keys, loader, depth
        # keys a worker task makes: an even share of half the read-ahead (at most 8), so each worker has a task queued
        self.per_task = per_task(depth // 2, loader.workers)
        self.queue = collections.deque()  # (sampler state before the key, key, (pending chunk, place in it), slot)
        self.taken = None  # the entry __next__ handed out, until make() takes its example

    def __iter__(self):
        return self

    def __next__(self):
        pool = self.loader.start_workers()
        while len(self.queue) < max(self.depth, 1):
            drawn = []
            for _ in range(self.per_task):
                state = self.keys.state_dict()
                drawn.append((state, next(self.keys), self.loader.take_slot()))  # the sampler is endless
            chunk = pool.submit(_each, _worker_example, [(key, slot) for _, key, slot in drawn])
            self.queue.extend((state, key, (chunk, i), slot) for i, (state, key, slot) in enumerate(drawn))
        self.taken = self.queue.popleft()
        return self.taken[1]

    def make(self, key):
        if self.taken is not None and self.taken[1] == key:
            (chunk, i), slot, self.taken = self.taken[2], self.taken[3], None
        else:  # a key not read ahead: a resumed Packer remaking its waiting examples
            chunk, i, slot = self.loader.start_workers().submit(_each, _worker_example, [(key, None)]), 0, None
        held = False  # the example's pixels read in their slot: from_slot frees it once they are gone
        try:
            arrays, too_long, (n_seen, counts, first, n_filtered) = chunk.result()[i]
            if arrays is not None and isinstance(arrays["pixel_values"], tuple):
                arrays["pixel_values"], held = self.loader.from_slot(slot, *arrays["pixel_values"]), True
        finally:
            if slot is not None and not held:
                self.loader.free_slots.append(slot)
        self.loader.report.add(n_seen, counts, first)
        self.loader.n_filtered += n_filtered
        if too_long is not None:
            raise too_long
        if arrays is None:
            return None
        import data
        return data.Example(**{name: None if a is None else torch.from_numpy(a) for name, a in arrays.items()})

    def state_dict(self):
        if self.taken is not None:
            return self.taken[0]
        return self.queue[0][0] if self.queue else self.keys.state_dict()

    def load_state_dict(self, state):
        # what was read ahead is dropped (its workers' results are never collected); its slots are free again once
        # its workers are done writing into them
        dropped = [*self.queue, *([self.taken] if self.taken is not None else [])]
        if dropped:
            import concurrent.futures
            concurrent.futures.wait({chunk for _, _, (chunk, _), _ in dropped})
            self.loader.free_slots.extend(slot for *_, slot in dropped if slot is not None)
        self.queue.clear()
        self.taken = None
        self.keys.load_state_dict(state)


class _DrawKeys:
    """The sampler's draws dealt to one shard, as keys (dataset, index, draw number): the draw number seeds
    the example's own randomness, so an example is a pure function of its key. Resumable through the
    sampler's state (every shard runs the whole sampler and keeps the draws dealt to it).
    A draw goes to the shard of its record, index % n_shards (by the draw number, draw % n_shards, in a dataset of
    fewer records than shards, where some shard would have none): every draw still trains exactly one shard, so
    the mixture and its passes over each dataset are the one stream's, and a record met again meets the same
    shard, so a rank's vision.FeatureCache holds the crops its rank meets again. Dealt by the draw number alone,
    two ranks' caches each held half of a crop's meetings: the CPU demo's two processes skipped the ViT for 53% of
    their crops against ~70% in one process (BENCHMARKS.md "Each record to one rank")."""

    def __init__(self, sampler, shard=0, n_shards=1):
        self.sampler, self.shard, self.n_shards = sampler, shard, n_shards
        self.by_draw = {name for name, size in sampler.sizes.items() if size < n_shards}

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            draw = self.sampler.draws
            name, index = next(self.sampler)
            if (draw if name in self.by_draw else index) % self.n_shards == self.shard:
                return name, index, draw

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)


# ---------------------------------------------------------------------------
# Stage 1's data (train_vision.py): records -> crops, pooling windows, captions, pointed labels and their
# per-token targets
# ---------------------------------------------------------------------------

CAPTION_STYLES = ("long_caption", "short_caption", "transcript")


def token_cells(height, width, grid, processor):
    """The cell of every pooled token of one image, as (M, 4) [x0, y0, x1, y1] in [0, 1] of the image, in the
    processor's token order: the global view's tokens, then the stitched high-res grid's. Each view's cells
    tile the image, so a point lies in exactly one cell of each view. Read-only: the cells depend on the image's
    size alone, and a world of one size shares one array (a worker made them for every image, ~15% of its time)."""
    cells = _token_cells(height, width, processor.max_crops, processor.crop_size, processor.patch_size,
                         tuple(processor.overlap_margins), tuple(processor.image_pooling))
    assert len(cells) == grid[0] * grid[1] + grid[2] * grid[3]
    return cells


@functools.lru_cache(maxsize=256)
def _token_cells(height, width, max_crops, crop_size, patch_size, overlap_margins, image_pooling):
    import data
    rows, cols, canvas_h, canvas_w = data.crop_geometry(height, width, max_crops, crop_size, patch_size,
                                                        overlap_margins)
    n, ps = crop_size // patch_size, patch_size
    stride = (n - sum(overlap_margins)) * ps
    r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")  # (n, n) patch row, column
    boxes = [np.stack([c / n, r / n, (c + 1) / n, (r + 1) / n], -1).reshape(-1, 4)]  # the global crop
    for k in range(rows * cols):  # the tiles of the canvas, row-major
        y0, x0 = (k // cols) * stride + r * ps, (k % cols) * stride + c * ps  # (n, n) px on the canvas
        box = [x0 / canvas_w, y0 / canvas_h, (x0 + ps) / canvas_w, (y0 + ps) / canvas_h]
        boxes.append(np.stack(box, -1).reshape(-1, 4))
    boxes = np.concatenate(boxes)  # (n_crops * n * n, 4): every patch's box
    pooling = data._image_pooling(rows, cols, n, overlap_margins, image_pooling)[0]
    slots = boxes[np.maximum(pooling, 0)]  # (M, K, 4)
    valid = (pooling >= 0)[..., None]
    lo = np.where(valid, slots[..., :2], np.inf).min(1)  # (M, 2)
    hi = np.where(valid, slots[..., 2:], -np.inf).max(1)  # (M, 2)
    cells = np.concatenate([lo, hi], -1)  # (M, 4)
    cells.flags.writeable = False
    return cells


def cell_targets(points, cells):
    """points (n, 2) in [0, 1], cells (M, 4) -> (holds (M,) bool, offsets (M, 2) in [0, 1] of the cell, -1 where
    no point). A point on a shared edge belongs to the cell after it (half-open cells), one on the image's far
    edge to the last cell; two points in one cell give the first one's offset."""
    holds = np.zeros(len(cells), dtype=bool)
    offsets = np.full((len(cells), 2), -1.0, dtype=np.float32)
    for x, y in points:
        inside = ((cells[:, 0] <= x) & ((x < cells[:, 2]) | (cells[:, 2] >= 1.0))
                  & (cells[:, 1] <= y) & ((y < cells[:, 3]) | (cells[:, 3] >= 1.0)))
        for m in np.flatnonzero(inside & ~holds):
            x0, y0, x1, y1 = cells[m]
            offsets[m] = ((x - x0) / (x1 - x0), (y - y0) / (y1 - y0))
        holds |= inside
    return holds, offsets


def scene_attributes(digits=False):
    """The synthetic world's attributes that stage 1's scene loss names for each token: {name: its values}.
    digits: also the first digit of the centre's x and of its y as a point writes them (Molmo2's 0-1000 scale, three
    digits: the tenth of the image it lies in). The joint stage's model finds the token that holds a shape long
    before it writes where in the token's cell the shape is; a ViT that names the digit per token hands it over."""
    import prepare_data
    attributes = {"kind": prepare_data.SHAPE_KINDS, "colour": tuple(prepare_data.SHAPE_COLOURS)}
    if digits:
        attributes.update(x_tenths=tuple(range(10)), y_tenths=tuple(range(10)))
    return attributes


def shape_attributes(shape):
    """A scene's shape -> its value of each attribute scene_attributes(digits=True) names."""
    import data
    x, y = data.scaled_point(shape["x"], shape["y"])
    return {**shape, "x_tenths": min(x // 100, 9), "y_tenths": min(y // 100, 9)}  # 1000 (the far edge): the last


def scene_hits(logits, targets, high_res, digits=False):
    """Which tokens the scene head names right: logits, one (M, n_values + 1) tensor per attribute of
    scene_attributes(digits); targets (M, n_attributes); high_res (M,) bool -> {attribute: [bool] * M} and the same
    for each view's tokens alone ('<attribute>_high_res', '<attribute>_low_res'). The low-res view shrinks the whole
    image into one crop, so a small shape there is a patch or less; the LLM can read it off the high-res view."""
    hits = {}
    for a, name in enumerate(scene_attributes(digits)):
        correct = logits[a].argmax(-1) == targets[:, a]
        hits[name] = correct.tolist()
        hits[f"{name}_high_res"], hits[f"{name}_low_res"] = correct[high_res].tolist(), correct[~high_res].tolist()
    return hits


def scene_classes(digits=False):
    """Stage 1's scene head: per attribute, its number of values plus one (no shape's centre in the cell)."""
    return tuple(len(values) + 1 for values in scene_attributes(digits).values())


def scene_targets(scene, cells, digits=False):
    """scene (a synthetic record's), cells (M, 4) -> (M, n_attributes) int64: for each token, each attribute's class
    (1-based, scene_attributes(digits)' order) of the shape whose centre lies in its cell, 0 where no centre does.
    Where two centres share a cell, the shape drawn last names it: it lies on top."""
    attributes = scene_attributes(digits)
    targets = np.zeros((len(cells), len(attributes)), dtype=np.int64)
    for shape in scene["shapes"]:
        holds, _ = cell_targets(np.array([[shape["x"], shape["y"]]]), cells)
        values = shape_attributes(shape) if digits else shape  # the digits' scaling only where they are asked for
        targets[holds] = [options.index(values[name]) + 1 for name, options in attributes.items()]
    return targets


def image_scene_targets(record, example, processor, attributes):
    """A formatted example of a record -> (its image tokens, len(attributes)) int64: for each token, each named
    attribute's class (scene_targets': 1-based, 0 where no shape's centre lies in the token's cell) where the
    record is one image of the synthetic world, -1 everywhere for any other image (nothing is known there). The
    rows come in the order the connector makes the example's image tokens."""
    n_tokens = len(example.image_token_pooling)
    images = record.get("images") or []
    scene = record.get("scene") or {}
    if len(images) != 1 or "shapes" not in scene:
        return torch.full((n_tokens, len(attributes)), -1, dtype=torch.long)
    cells = token_cells(images[0].height, images[0].width, tuple(example.image_grids[0].tolist()), processor)
    columns = [list(scene_attributes(digits=True)).index(name) for name in attributes]
    return torch.from_numpy(scene_targets(scene, cells, digits=True)[:, columns])


class TokenAttributeLoss:
    """The joint stage's token_loss (train_joint.py; a from-scratch switch, not Molmo2's): a linear head on each
    image token as the LLM receives it (the connector's output with its position_bins embedding added) names
    attributes of the shape whose centre the token holds, by stage 1's balanced scene loss (vision.scene_loss).
    Its gradient reaches the connector and the position tables (and the ViT where it learns): what the LLM must
    write about a shape, the first digit of its x and y above all, is then in the token it reads it from, where a
    frozen ViT's features hold it only spread over the token's place and its offset within the cell.
    The head hangs on the connector while training (so the optimizer, DDP and checkpoints take it as the
    connector's) and is taken off before the export: the exported model is the plain one."""

    def __init__(self, model, attributes, weights=()):
        known = scene_attributes(digits=True)
        unknown = [name for name in attributes if name not in known]
        if not attributes or unknown:
            raise ValueError(f"token_attributes={tuple(attributes)}: expected names among {tuple(known)}")
        if weights and len(weights) != len(attributes):
            raise ValueError(f"token_weights={tuple(weights)}: one weight for each of token_attributes="
                             f"{tuple(attributes)}, or () for 1 each")
        self.model = model
        self.weights = [float(w) for w in weights] if weights else [1.0] * len(attributes)
        self.classes = [len(known[name]) + 1 for name in attributes]  # + class 0: no centre here
        head = torch.nn.Linear(model.config.connector.llm_hidden_size, sum(self.classes),
                               device=model.new_embedding.device, dtype=model.new_embedding.dtype)  # as the model
        # from zero: every class alike at the start. The image tokens arrive at std ~10-100 (they are the LLM's
        # inputs, not normalised); a default-initialised head's logits made a loss of ~130 that swamped the answers'
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        model.connector.token_head = head
        self.features = None  # the connector's last output, with its graph
        self.hook = model.connector.register_forward_hook(lambda module, args, out: setattr(self, "features", out))

    def __call__(self, batch):
        """The loss of the last forward's image tokens against batch["image_scene_targets"]."""
        from vision import scene_loss
        features, self.features = self.features, None
        head = self.model.connector.token_head
        if features is None or "image_grids" not in batch or "image_scene_targets" not in batch:
            return 0.0 * sum(p.sum() for p in head.parameters())  # keeps the head in the graph (DDP)
        placed = self.model.place(features, batch["image_grids"], "image")
        logits = torch.split(head(placed).float(), self.classes, dim=-1)
        return scene_loss(logits, batch["image_scene_targets"], self.weights, balanced=True)

    def take_off(self, optimizer):
        """Before the export, when the training is done: the model without the head, and the optimizer without its
        parameters (the full state dicts under DDP name each of the optimizer's parameters by the model's)."""
        head = {id(p) for p in self.model.connector.token_head.parameters()}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in head]
        for p in [p for p in optimizer.state if id(p) in head]:
            del optimizer.state[p]
        self.hook.remove()
        del self.model.connector.token_head


def pointed_labels(record):
    """{label: [(x, y), ...]} from every <points> tag in the record's answers (image 1, normalised coordinates),
    the points of a label merged over annotations without repeats, in first-seen order."""
    import data
    labels = {}
    for annotation in record["annotations"]:
        for message in annotation["messages"]:
            if message["role"] != "assistant":
                continue
            for tag in data.parse_points(message["content"]).tags:
                if tag.kind != "points" or not tag.label:
                    continue
                seen = labels.setdefault(tag.label, [])
                for p in tag.points:
                    if (p.x, p.y) not in seen:
                        seen.append((p.x, p.y))
    return {label: points for label, points in labels.items() if points}


def caption_of(record, draw):
    """One caption of the record (an answer of a caption style), chosen by the draw number, or None."""
    captions = [a["messages"][-1]["content"] for a in record["annotations"] if a["style"] in CAPTION_STYLES]
    return captions[draw % len(captions)] if captions else None


def levels_processor(processor):
    """A copy of a data.Molmo2Processor whose pixels come as their uint8 0..255 levels, before the normalisation
    (the loaders' examples: a quarter of the bytes to send from a worker, concatenate and copy to the GPU, where
    from_uint8 makes the processor's floats from them, bit for bit; and the normalising is not done on the host).
    Its tokenizer encodes each short text once (data.MemoTokenizer): a loader's examples repeat their prompts and the
    chat template's pieces, most of the ~28 texts an example of the GPU demo's world encodes, and on a host with fast
    cores the workers making the examples are what the GPU demo's batches wait for (BENCHMARKS.md "Two batch
    processes, and the workers' texts encoded once")."""
    import data
    levels = copy.copy(processor)
    levels.pixel_levels = True
    levels.tokenizer = data.MemoTokenizer(processor.tokenizer)
    return levels


def to_uint8(patches):
    """Crops in [-1, 1] -> the whole 0..255 values they were made from (the processor rounds after resizing), a
    quarter of the bytes to send from a worker, keep in a batch and copy to the GPU; from_uint8 undoes it exactly."""
    return patches.mul(127.5).add_(127.5).round_().to(torch.uint8)


def from_uint8(patches):
    """The inverse of to_uint8, with the processor's own float32 steps (x - 127.5) / 127.5: bit for bit its output."""
    return patches.float().sub_(127.5).div_(127.5)


class VisionExample:
    """One image's crops and targets (everything a batch needs, on CPU)."""

    def __init__(self, record, draw, processor, text_max_len, use_sigmoid, use_loc, use_scene=False,
                 scene_digits=False):
        tokenizer = processor.tokenizer
        image = record["images"][0]
        vision = processor.image(image)
        self.patches = vision.patches if vision.patches.dtype == torch.uint8 else to_uint8(vision.patches)
        self.pooling = vision.token_pooling
        self.grid = vision.grid
        self.caption = caption_of(record, draw) if use_sigmoid else None
        self.caption_ids = None
        if self.caption is not None:
            self.caption_ids = tokenizer.encode(self.caption, allow_special=False)[:text_max_len]
        self.labels, self.label_ids, self.points = [], [], []
        self.cells = token_cells(image.height, image.width, vision.grid, processor)
        if use_loc:
            for label, points in pointed_labels(record).items():
                self.labels.append(label)
                self.label_ids.append(tokenizer.encode(label, allow_special=False)[:text_max_len])
                self.points.append(np.array(points, dtype=np.float64))
        # each label's (tokens holding a point, their offsets), made here: in a worker, off the GPU trainer's main
        # process, whose batch thread shares the GIL with the thread launching kernels
        self.hits = [cell_targets(points, self.cells) for points in self.points]
        scene = record.get("scene") or {}
        self.scene_targets = None  # (M, n_attributes): with use_scene, for a record of a synthetic image
        if use_scene and "shapes" in scene:
            self.scene_targets = scene_targets(scene, self.cells, scene_digits)  # numpy: crosses a pipe by value

    @property
    def trains(self):
        return self.caption is not None or bool(self.labels) or self.scene_targets is not None


def collate_vision(examples, round_labels=0, scene_digits=False):
    """VisionExamples (their scene targets made with scene_digits, where they have a scene) -> the batch dict
    VisionPretrainer.forward reads (CPU tensors). round_labels > 0 (the text
    tower's max_len): the labels padded with stand-ins (one token 0, of no image: label_image -1, no target) up to
    the text tower's rounded shapes (vision.rounded_text_shape), so that a step's tensors take a few shapes only,
    each a CUDA graph of its own (GraphedStep); the losses ignore the stand-ins."""
    import data
    from vision import rounded_text_shape
    patches, pooling = data.concat_pooled([ex.patches for ex in examples], [ex.pooling for ex in examples])
    n_tokens = torch.tensor([ex.pooling.shape[0] for ex in examples])
    M = int(n_tokens.sum())
    token_start = np.cumsum([0] + n_tokens.tolist())
    captioned = [i for i, ex in enumerate(examples) if ex.caption is not None]
    captions = [examples[i].caption for i in captioned]
    labels = [(i, ids, pts, hits) for i, ex in enumerate(examples)
              for ids, pts, hits in zip(ex.label_ids, ex.points, ex.hits)]
    # the tokens holding each label's points: batch rows, label columns, their offsets, in label order
    label_rows = [token_start[i] + np.flatnonzero(holds) for i, _, _, (holds, _) in labels]
    cols = np.repeat(np.arange(len(labels)), [len(r) for r in label_rows])
    rows = np.concatenate(label_rows) if labels else np.zeros(0, dtype=np.int64)
    offsets = (np.concatenate([cell_offsets[holds] for _, _, _, (holds, cell_offsets) in labels]) if labels
               else np.zeros((0, 2), dtype=np.float32))
    label_width = max([len(ids) for _, ids, _, _ in labels], default=1)
    n_labels, label_width = (rounded_text_shape(len(labels), label_width, round_labels) if round_labels
                             else (len(labels), label_width))
    loc_targets = torch.zeros(M, n_labels)
    loc_targets[rows, cols] = 1.0
    # a token holding points of two labels keeps the later label's offset: the last occurrence of each row
    last = len(rows) - 1 - np.unique(rows[::-1], return_index=True)[1]
    offset_targets = torch.full((M, 2), -1.0)
    offset_targets[rows[last]] = torch.from_numpy(offsets[last]).float()
    batch = {"patches": patches, "pooling": pooling.long(),
             "token_image": torch.repeat_interleave(torch.arange(len(examples)), n_tokens),
             "caption_image": torch.tensor(captioned, dtype=torch.long),
             "caption_same": torch.tensor([[a == b for b in captions] for a in captions],
                                          dtype=torch.bool).reshape(len(captions), len(captions)),
             "label_image": torch.tensor([i for i, _, _, _ in labels] + [-1] * (n_labels - len(labels)),
                                         dtype=torch.long),
             "loc_targets": loc_targets, "offset_targets": offset_targets,
             # for the read-out: every token's cell, whether it is of the high-res view, each label's points
             "cells": torch.from_numpy(np.concatenate([ex.cells for ex in examples])).float(),
             # a token's index within its image against the image's global-view tokens (grid[0] x grid[1])
             "high_res": torch.arange(M) - torch.repeat_interleave(torch.from_numpy(token_start[:-1]), n_tokens)
             >= torch.repeat_interleave(torch.tensor([ex.grid[0] * ex.grid[1] for ex in examples]), n_tokens),
             "label_points": [pts for _, _, pts, _ in labels],
             # -1: the token's image has no scene (its attributes are unknown, not absent)
             "scene_targets": torch.from_numpy(np.concatenate([
                 ex.scene_targets if ex.scene_targets is not None else
                 np.full((ex.pooling.shape[0], len(scene_attributes(scene_digits))), -1) for ex in examples]))}
    texts_by_name = {"caption": [examples[i].caption_ids for i in captioned],
                     "label": [ids for _, ids, _, _ in labels] + [[0]] * (n_labels - len(labels))}
    for name, texts in texts_by_name.items():
        lengths = torch.tensor([len(t) for t in texts], dtype=torch.long)
        width = label_width if name == "label" else max([len(t) for t in texts], default=1)
        ids = np.zeros((len(texts), width), dtype=np.int64)
        for k, t in enumerate(texts):  # numpy: a list into a row without a tensor made for each
            ids[k, :len(t)] = t
        batch[f"{name}_ids"], batch[f"{name}_lengths"] = torch.from_numpy(ids), lengths
    return batch


def vision_batch_to(batch, device):
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    batch["patches"] = from_uint8(batch["patches"])  # on the device: a quarter of the bytes cross
    return batch


def _vision_worker_example(key_and_slot):
    """In a worker: (the example of a key or None, what making it counted). Its pixels go into its slot of the
    loader's shared memory where they fit (VisionLoader.slots; the example then carries only where they are), else
    back by value through the pipe as numpy (tensors would each need a shared-memory handle of their own)."""
    key, (slot_set, slot) = key_and_slot
    loader = _WORKER_LOADER
    report = loader.report
    report.n_seen, report.counts, report.first = 0, collections.Counter(), {}
    loader.not_used = dict.fromkeys(loader.not_used, 0)
    example = loader.example(key)
    if example is not None:
        patches = example.patches.numpy()
        if loader.slots is not None and patches.nbytes <= loader.slots.shape[-1]:
            loader.slots[slot_set, slot, :patches.nbytes] = patches.reshape(-1)
            patches = (slot_set, slot, patches.shape)
        example.patches, example.pooling = patches, example.pooling.numpy()
    return example, (report.n_seen, dict(report.counts), dict(report.first), dict(loader.not_used))


class VisionLoader(ForkedWorkers):
    """Micro-batches of images for one rank, drawn from the mixture like the other stages' (one stream of draws
    dealt over world_size * grad_accum shards, so the examples of a step depend only on their product) and
    resumable through the sampler states. Records that cannot train here are skipped and counted.
    workers > 0: forked worker processes (Linux) make the next step's examples while this step trains. An
    example is a pure function of its key and keys are drawn here in order, so the batches are the serial
    loader's on one thread: a worker runs torch on one, and the CPU's bilinear resize rounds a few pixels to the
    next of the 256 levels on two (31 of 84,672 values, a random 224-px image resized to 168), so the CPU demo's
    stage 1 with a worker trains on other pixels than in one process. state_dict() is the state before the keys
    read ahead."""

    shared_pixels = True  # the workers hand their pixels over in shared memory (_make_slots), else through pipes

    def __init__(self, data_dir, mixture, split, batch_size, processor, text_max_len, use_sigmoid, use_loc, seed,
                 rank=0, world_size=1, grad_accum=1, workers=0, use_scene=False, round_labels=False,
                 scene_digits=False):
        import data
        self.batch_size, self.processor, self.text_max_len = batch_size, processor, text_max_len
        self.example_processor = levels_processor(processor)
        self.round_labels = text_max_len if round_labels else 0  # collate_vision's: for GraphedStep
        self.use_sigmoid, self.use_loc, self.use_scene = use_sigmoid, use_loc, use_scene
        self.scene_digits = scene_digits  # the scene targets also name each centre's first digits (scene_attributes)
        self.report = data.SkipReport()
        self.not_used = {"not a single image": 0, "nothing to learn (no caption, points or scene)": 0}
        self.shards = []
        for shard in range(rank * grad_accum, (rank + 1) * grad_accum):
            try:
                sampler, self.files = data.open_mixture(mixture, data_dir, split, seed, rank=0, report=self.report)
            except FileNotFoundError as e:  # no data yet: the message says how to make it
                raise SystemExit(str(e)) from None
            self.shards.append(_DrawKeys(sampler, shard, world_size * grad_accum))
        self.workers, self.ahead = workers, None  # ahead: (states before, [(keys, result)])
        self.slots, self.slot_set = None, 0  # the workers' shared pixel slots, made before they are forked

    def _make_slots(self):
        """Shared memory for the workers' pixels: two sets (the step being collated, the step being made) of a slot
        per example, each as large as max_crops + 1 crops. The pixels are most of what came back through the
        workers' pipes (128 images of the GPU demo's stage 1: 24 MB a step, pickled, piped and unpickled); on a
        16-core H200 machine StepsAhead's process made those steps in 59.7-64.4 ms with the slots and 65.0-66.1
        without (BENCHMARKS.md "Stage 1's step, made and launched")."""
        self.slots = pixel_slots(self.processor, 2, len(self.shards) * self.batch_size)

    def example(self, key):
        import data
        name, index, draw = key
        record = self.files[name].get(index)
        if record is None:
            return None  # counted in self.report
        if len(record.get("images", [])) != 1:
            self.not_used["not a single image"] += 1
            return None
        try:
            ex = VisionExample(record, draw, self.example_processor, self.text_max_len, self.use_sigmoid, self.use_loc,
                               self.use_scene, self.scene_digits)
        except data.MediaError as e:
            self.report.skip(data.BadRecord("undecodable_image", str(e)))
            return None
        if not ex.trains:
            self.not_used["nothing to learn (no caption, points or scene)"] += 1
            return None
        return ex

    def _count(self, counted):
        n_seen, counts, first, not_used = counted
        self.report.add(n_seen, counts, first)
        for why, n in not_used.items():
            self.not_used[why] += n

    def _read_ahead(self):
        if self.slots is None and self.shared_pixels:
            self._make_slots()
        states = [keys.state_dict() for keys in self.shards]
        started, slot_set = [], self.slot_set
        self.slot_set ^= 1  # the next step's examples go into the other set while this one's are collated
        for s, keys in enumerate(self.shards):
            drawn = [(next(keys), (slot_set, s * self.batch_size + j)) for j in range(self.batch_size)]
            n = per_task(len(drawn), self.workers)  # an even share of the step's keys a task (ForkedWorkers says why)
            started.append((drawn, [self.start_workers().submit(_each, _vision_worker_example, drawn[i:i + n])
                                    for i in range(0, len(drawn), n)]))
        self.ahead = (states, started)

    def _from_worker(self, ex):
        if isinstance(ex.patches, tuple):  # in a shared slot: a view of it, which collating copies out
            slot_set, slot, shape = ex.patches
            ex.patches = torch.from_numpy(self.slots[slot_set, slot, :int(np.prod(shape))]).view(shape)
        else:
            ex.patches = torch.from_numpy(ex.patches)
        ex.pooling = torch.from_numpy(ex.pooling)
        return ex

    def next_step(self):
        """-> [micro-batch] (grad_accum of them), each collated from batch_size images."""
        if self.workers and self.ahead is None:
            self._read_ahead()
        gathered = []
        for s, keys in enumerate(self.shards):
            examples = []
            if self.ahead is not None:
                for ex, counted in (result for chunk in self.ahead[1][s][1] for result in chunk.result()):
                    self._count(counted)
                    if ex is not None:
                        examples.append(self._from_worker(ex))
            misses = 0
            while len(examples) < self.batch_size:  # serially, or to replace the read-ahead's unusable records
                ex = self.example(next(keys))
                if ex is not None:
                    examples.append(ex)
                    misses = 0
                elif (misses := misses + 1) >= 1000:
                    raise RuntimeError(f"stage 1: 1000 records in a row unusable\n{self.summary()}")
            gathered.append(examples)
        self.ahead = None
        if self.workers:
            self._read_ahead()  # the next step's examples, made while this one is collated and trains
        return [collate_vision(examples, self.round_labels, self.scene_digits) for examples in gathered]

    def summary(self):
        lines = [self.report.summary()]
        lines += [f"records not used by this stage ({why}): {n}" for why, n in self.not_used.items() if n]
        return "\n".join(lines)

    def state_dict(self):
        samplers = self.ahead[0] if self.ahead is not None else [keys.state_dict() for keys in self.shards]
        return {"samplers": samplers, "n_seen": self.report.n_seen, "counts": dict(self.report.counts),
                "first": dict(self.report.first), "not_used": dict(self.not_used)}

    def load_state_dict(self, state):
        if len(state["samplers"]) != len(self.shards):
            raise ValueError(f"data state for {len(state['samplers'])} micro-batches per step, this run has "
                             f"{len(self.shards)} (resume with the same grad_accum)")
        if self.ahead is not None:  # what was read ahead is dropped, once its workers no longer write its slots
            for _, chunks in self.ahead[1]:
                for chunk in chunks:
                    chunk.exception()
        self.ahead = None
        for keys, sampler_state in zip(self.shards, state["samplers"]):
            keys.load_state_dict(sampler_state)
        self.report.n_seen, self.report.first = state["n_seen"], dict(state["first"])
        self.report.counts = collections.Counter(state["counts"])
        self.not_used = dict(state["not_used"])


@torch.no_grad()
def evaluate_loss(model, d, split="val", n_batches=4, autocast=None, **loader_args):
    """Mean weighted cross-entropy on the first n_batches batches of a split (the same ones every time), and the
    same with each batch's crops (and frames) rotated by one place: the gap says how much the model uses its images (none:
    the loss does not move when the pictures are scrambled)."""
    loader = TrainLoader(split=split, rank=d.rank, world_size=d.world_size, **loader_args)
    was_training = model.training
    model.eval()
    total, shuffled, weight = (torch.zeros((), device=d.device) for _ in range(3))
    for _ in range(n_batches):
        batch = batch_to(loader.next_step()[0], d.device)
        inputs = model_inputs(batch)
        with autocast or nullcontext():
            total += model(**inputs, targets=batch["targets"], loss_weights=batch["loss_weights"])[1]
            for key in ("pixel_values", "pixel_values_videos"):
                if key in inputs:  # every crop moves one place on: none stays where it was
                    inputs[key] = inputs[key].roll(1, dims=0)
            shuffled += model(**inputs, targets=batch["targets"], loss_weights=batch["loss_weights"])[1]
        weight += batch["loss_weights"].sum()
    model.train(was_training)
    weight = d.all_reduce_sum(weight)
    return (d.all_reduce_sum(total) / weight).item(), (d.all_reduce_sum(shuffled) / weight).item()


def export_final(train_model, model, optimizer, d, final_dir, processor, start=None):
    """Write the trained model with save_pretrained (transformers' Molmo2 layout) and the processor settings
    it was trained with (processor.json, read by sample.py and eval.py). Under DDP/FSDP the full weights are
    gathered and rank 0 writes them from a plain copy of the model."""
    if d.world_size > 1:
        model_sd, _ = full_state_dicts(train_model, optimizer)
        if d.is_master:
            from model import weights_not_drawn
            with weights_not_drawn():
                plain = type(model)(model.config)
            plain.to_empty(device="cpu").load_state_dict(model_sd)
            plain.save_pretrained(final_dir)
        d.barrier()
    elif d.is_master:
        model.save_pretrained(final_dir)
    if d.is_master:
        import data
        data.save_processor_config(final_dir, processor)
        if start is not None:  # where its LLM and ViT started (see lineage)
            with open(os.path.join(final_dir, LINEAGE_FILE), "w") as f:
                json.dump(start, f, indent=2)
