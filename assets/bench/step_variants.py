"""The full preset's graphed train step several ways, on one GPU, in one process (BENCHMARKS.md "The output head's
softmax compiled" and "Linears that read one input as one matmul; the clipping in AdamW"): tools/bench.py's batch
(4 photos, 4,509 tokens), each block compiled, the step as a CUDA graph with fresh gradients; ms a step
(tools/bench.py's measure), MFU, and a profile of each (with the GPU's busy time by kind) in out/step_variants/.
The variants, by name:

    before      the output head's softmax eager in chunks of 1,024 rows (as before 2026-12-06)
    committed   the step as committed
    unstacked   each Linear its own matmul, as before 2026-12-06's stacking (vision.linears)
    copies      the step run on bf16 copies of the weights, cast down at its start and the gradients cast up into
                float32 at its end (the precision FSDP's MixedPrecisionPolicy gives; a subclass of
                training.GraphedStep here, not in the trainers)
    clip_adamw  the clipping's scale not applied to the gradients in the graph but divided out inside fused AdamW
                (its grad_scale, which torch's GradScaler uses): one pass over the 1B gradients fewer
    cublaslt    every matmul through cuBLASLt (torch.backends.cuda.preferred_blas_library), whose heuristics pick
                other kernels than cuBLAS's for some shapes; the rest as committed
    coordesc    the blocks compiled with inductor's coordinate_descent_tuning: each of its own (Triton) kernels,
                the norms and elementwise ones, timed over block sizes around its heuristic's (about a minute and a
                half more compiling, not max-autotune's many; max-autotune turns it on too)
    autotune    the blocks compiled with mode="max-autotune-no-cudagraphs": inductor times its own matmul kernels
                against cuBLAS's and may fuse an elementwise epilogue into them (compiles for minutes)
    mix64       the blocks compiled with inductor's mix-order reductions (a norm's backward computing its weight's
    mix256 ...  gradient's partial sums beside its input gradient) over 64, 256, ... rows a partial sum, not the 128
                that model.ready_for_compile sets: the partial sums' last reduction, an aten sum over dim 0 of
                (rows / split) x width, is longer or shorter
    nomix       the blocks compiled without mix-order reductions (config.triton.mix_order_reduction off)
    mixheuristic  each mix-order reduction's split as inductor's heuristic picks it by the SM count (16 rows at the
                ViT's 14,580; before 2026-12-06's fifty-second session)
    mixtune     each split timed at compile time around the heuristic's (mix_order_reduction_autotune_split_size,
                which coordinate_descent_tuning turns on too)
    levers      copies, clip_adamw and coordesc at once: the step with every lever measured here that keeps its
                gradients right (none is in the trainers), what this step would be with all of them
    all         levers, threeparts and vitbf16 at once: the step with every lever measured here, the bound on
                what they reach together (threeparts holds for one-example rows only, vitbf16 is not transformers'
                precision)
    vitbf16     the ViT's residual stream in bf16 under autocast (its embeddings cast down before the first block,
                so each block adds its attention and MLP outputs to a bf16 stream and its LayerNorms read half the
                bytes), not transformers' float32 stream: what the step's memory-bound passes over the ViT's
                14,580 tokens would give back (Megatron-LM keeps a bf16 residual stream under --bf16 unless
                --fp32-residual-connection is set; transformers' SigLIP adds an fp32 position embedding, so its
                stream stays fp32 under autocast)
    float8      every Linear in the blocks (the ViT's and the LLM's) a vision.Float8Linear, as train_joint.py's
                float8 makes them: one scale a tensor from its values, activations and weights e4m3, gradients e5m2,
                all three matmuls on the float8 tensor cores (twice the bf16 peak)
    float8rows  float8 scaled a row at a time (train_joint.py's float8_rowwise, vision.Float8RowwiseMatmul): each
                cast in one pass with its row's scale, all e4m3, the weight's gradient in bf16
    all8        all, with float8rows: every lever measured here at once
    float8delayed  float8 as above with each scale a constant where float8 computes it from the tensor it scales: the
                speed "delayed" scaling (each scale from earlier steps' largest magnitudes, Transformer Engine's
                way) could reach. Each largest magnitude is still computed, as delayed scaling must for its history,
                and fed into the scale the matmul reads (plus 0 times it), so that the compiler keeps it but no cast
                waits for it. Its numbers are wrong (values past e4m3's range clamped, small gradients lost), its
                time is the bound: if it is not well under bf16's, delayed scaling is not worth building.
                Name it last: the variants step one model in turn, and its wrong numbers may leave that
                model's weights not finite for those after it
    float8vit   the ViT's blocks' Linears alone in float8: its 14,580 tokens make larger matmuls than the LLM's 4,512,
                which leaves a float8 matmul less to win against its scaling passes
    spanrows    the LLM's attention without Molmo2's dense mask, where the batch allows it (each row one example
    threeparts  whose vision tokens are one span [s, e), the same in every row: the bench's rows): is_causal
                attention and the span's rows again over the keys before e (spanrows), or the three calls over
                only the work the mask leaves (threeparts; the rows after e through a mask of their own).
                train_attention.py's span_attention and three_parts, planned once on the host from the batch's mask
    NAME_mk     NAME with inductor's multi-kernel reductions (config.triton.multi_kernel): a reduction over a
                row is compiled persistent (the whole row in registers, one read) up to 16,384 wide, not 1,024, as
                well as looped, and the faster of the two is timed at its first call and kept. By inductor's
                heuristic the ViT's LayerNorms (1,152 wide) and float8's row amaxes over the ViT's rows (1,152 to
                4,304 wide) and the LLM's down projection's input (3,072) loop today: each row read twice, once
                for the statistic and once to use it (untimed on a GPU as of 2026-12-08)

    python assets/bench/step_variants.py                          # before, committed, copies, clip_adamw
    python assets/bench/step_variants.py committed autotune
    python assets/bench/step_variants.py committed committed_mk float8rows float8rows_mk
    python assets/bench/step_variants.py committed float8 float8rows float8delayed
"""

import functools
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, ROOT)
NAMES = sys.argv[1:] or ["before", "committed", "copies", "clip_adamw"]
sys.argv = sys.argv[:1]  # train_attention reads its own knobs from the command line when imported: none here
from train_attention import rows_after, span_attention, three_parts  # noqa: E402

sys.argv += ["--hf=False", "--trainer=False", "--out_dir=out/step_variants", "--profile=True"]  # bench's knobs, read
#   when it is imported

import bench  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import model as nano  # noqa: E402
import vision  # noqa: E402
from training import GraphedStep, build_optimizer  # noqa: E402

SPLITS = {"spanrows": span_attention, "threeparts": three_parts}


def clip_or_scale(step, grads):
    """The step's gradient norm; clips `grads` to step.grad_clip, or with step.clip_in_adamw leaves them and keeps the
    clipping's scale, max(1, norm / grad_clip), in step.scale: fused AdamW divides each gradient by its grad_scale as
    it reads it (optimizer.grad_scale = step.scale), one pass over the gradients fewer."""
    if not step.clip_in_adamw:
        return torch.nn.utils.clip_grad_norm_(grads, step.grad_clip)
    norm = torch.nn.utils.get_total_norm(grads)
    step.scale = ((norm + 1e-6) / step.grad_clip).clamp(min=1.0)  # 1 / clip_grad_norm_'s clamped coefficient
    return norm


class CopiesStep(GraphedStep):
    """GraphedStep whose step runs on bf16 copies of the weights: cast down once at the step's start, the gradients
    cast up into each float32 parameter's .grad at its end (fixed buffers, overwritten), clipped there."""

    clip_in_adamw = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.copies = [p.detach().to(torch.bfloat16).requires_grad_() for _, p in self.named]
        by_id = {id(p): c for (_, p), c in zip(self.named, self.copies)}
        self.slots = [(m, n, by_id[id(p)]) for m in self.model.modules() for n, p in m._parameters.items()
                      if p is not None and id(p) in by_id]  # every module that holds a parameter (tied ones too)
        for _, p in self.named:
            p.grad = torch.zeros_like(p)

    def _run(self, batch, zero=True):
        params = [p for _, p in self.named]
        with torch.no_grad():
            torch._foreach_copy_(self.copies, params)
        grads = [c.grad for c in self.copies if c.grad is not None]
        if grads and zero:
            torch._foreach_zero_(grads)
        saved = [(m, n, m._parameters[n]) for m, n, _ in self.slots]
        for m, n, c in self.slots:
            m._parameters[n] = c
        try:
            with torch.autocast("cuda", dtype=self.dtype, cache_enabled=False):
                losses = self.forward(self.prepare(batch))
                loss = self.loss_of(losses)
            loss.backward()
        finally:
            for m, n, p in saved:
                m._parameters[n] = p
        torch._foreach_copy_([p.grad for p in params], [c.grad for c in self.copies])
        return {k: v.detach() for k, v in losses.items()}, clip_or_scale(self, [p.grad for p in params])


class ClipInAdamWStep(GraphedStep):
    """GraphedStep that leaves the gradients unclipped, their clipping's scale in self.scale (clip_or_scale)."""

    clip_in_adamw = True

    def _run(self, batch, zero=True):
        with torch.autocast("cuda", dtype=self.dtype, cache_enabled=False):
            losses = self.forward(self.prepare(batch))
            loss = self.loss_of(losses)
        loss.backward()
        return {k: v.detach() for k, v in losses.items()}, clip_or_scale(self, [p.grad for _, p in self.named])


class LeversStep(CopiesStep):
    """CopiesStep with its clipping in AdamW."""

    clip_in_adamw = True


def vision_rows(mask, example_ids):
    """The span [s, e) where a batch's (B, 1, T, T) mask is Molmo2's over one contiguous span of vision tokens shared by
    every row (causal, except that the span's rows see every key before e), or None. Padding queries (example_ids
    -1) are left out: they carry no loss, and no real query sees them (they end a row)."""
    B, _, T, _ = mask.shape
    real = example_ids >= 0  # (B, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    rows = ((mask[:, 0] != causal) & real[:, :, None]).any(2).any(0).nonzero().flatten()  # queries not causal
    if len(rows) == 0 or len(rows) != int(rows[-1] - rows[0] + 1):
        return None
    s, e = int(rows[0]), int(rows[-1]) + 2  # the span's last row is causal already (it sees keys up to itself)
    want = causal.clone()
    want[s:e, :e] = True
    return (s, e) if bool(((mask[:, 0] == want) | ~real[:, :, None]).all()) else None


class VisionRows(nano.KeyBlocks):
    """The LLM attention's mask as one vision span [s, e) (vision_rows), attended by `split`: a KeyBlocks only so that
    model.Attention hands it q, k and v (its attend), as it does the key blocks' plan."""

    def __init__(self, span, split):
        self.span, self.split = span, split

    def attend(self, q, k, v):
        return self.split(q, k, v, self.span, enable_gqa=True)


def attend_by_span(model, cpu_batch, split):
    """model's LLM given VisionRows(split) in place of the batch's dense mask; undone by the returned function."""
    span = vision_rows(cpu_batch["attn_mask"], cpu_batch["example_ids"])
    if span is None:
        raise ValueError("the batch's mask is not one shared vision span")
    print(f"the LLM's mask as the vision span {span}", flush=True)
    if split is three_parts:  # the rows after the span through their own mask, made once here, not in every layer
        T = cpu_batch["attn_mask"].shape[-1]
        split = functools.partial(three_parts, after=rows_after(T, T, span[1], next(model.parameters()).device))
    llm, plan = model.llm, VisionRows(span, split)
    run_layers = llm.run_layers

    def with_span(x, position_ids=None, attn_mask=None, kv_cache=None, **kwargs):
        return run_layers(x, position_ids, plan if attn_mask is not None and kv_cache is None else attn_mask,
                          kv_cache, **kwargs)
    llm.run_layers = with_span
    return lambda: delattr(llm, "run_layers")


def vit_stream_in(dtype, model):
    """model's ViT with its residual stream cast to dtype where autocast is on; undone by the returned function."""
    vit = model.vit
    embed = vit.embed

    def embed_down(patches):
        x = embed(patches)
        return x.to(dtype) if torch.is_autocast_enabled(x.device.type) else x
    vit.embed = embed_down
    return lambda: delattr(vit, "embed")


def float8_blocks(model, llm=True, rowwise=False):
    """Every Linear in model's blocks (the ViT's alone if not llm) a vision.Float8Linear (train_joint.py's float8),
    scaled a row at a time if rowwise; undone by the returned function. The blocks must be compiled after it."""
    blocks = [*model.vit.layers, *(model.llm.layers if llm else [])]
    print(f"float8: {vision.float8_linears(*blocks, rowwise=rowwise)} Linears", flush=True)

    def undo():
        for m in model.modules():
            if type(m) is vision.Float8Linear:
                m.__class__ = torch.nn.Linear
                m.__dict__.pop("rowwise", None)
    return undo


def float8_delayed():
    """vision.to_float8 with its scale a constant and the tensor's largest magnitude computed beside the cast, not
    before it (float8delayed); undone by the returned function."""
    to_float8 = vision.to_float8

    def constant_scale(t, dtype):
        amax = t.detach().abs().amax(dim=-1).amax()  # what delayed scaling would keep for the next steps' scales
        # float8's own cast, its amax standing in for the history's: the format's largest value, so the scale is 1
        q, inverse_scale = vision.scaled_into(t, torch.full((), vision.FLOAT8_LARGEST[dtype], device=t.device), dtype)
        return q, inverse_scale + 0 * amax.float()  # tied to this step's amax, so that it is computed

    vision.to_float8 = constant_scale
    return lambda: setattr(vision, "to_float8", to_float8)


def main():
    os.makedirs(bench.out_dir, exist_ok=True)
    dev = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    cfg = nano.Molmo2Config.preset("nanomolmo2")
    cpu_batch = data.collate([[ex] for ex in bench.photo_examples(cfg, 4, np.random.default_rng(0))])
    model = bench.build_ours(dev).train()
    flops = model.training_flops(bench.to_device(cpu_batch, dev))
    nano.compile_each_block(model)
    compiled_for, chunk_rows = nano.softmax_grad_for, nano.loss_chunk_rows
    stacks = vision.stacks_linears
    variants = {"before": ("head as before, fp32 weights, fresh", GraphedStep, True, True),
                "committed": ("fp32 weights, fresh", GraphedStep, True, False),
                "unstacked": ("each Linear its own matmul, fresh", GraphedStep, True, False),
                "copies": ("bf16 copies", CopiesStep, False, False),
                "clip_adamw": ("clipping in AdamW, fresh", ClipInAdamWStep, True, False),
                "cublaslt": ("cuBLASLt preferred, fresh", GraphedStep, True, False),
                "coordesc": ("coordinate descent tuned, fresh", GraphedStep, True, False),
                "autotune": ("blocks max-autotuned, fresh", GraphedStep, True, False),
                "levers": ("bf16 copies, clipping in AdamW, coordinate descent tuned", LeversStep, False, False),
                "nomix": ("no mix-order reductions, fresh", GraphedStep, True, False),
                "mixheuristic": ("mix-order split by its heuristic, fresh", GraphedStep, True, False),
                "mixtune": ("mix-order split tuned, fresh", GraphedStep, True, False),
                "spanrows": ("the LLM's mask as is_causal and the span's rows again, fresh", GraphedStep, True, False),
                "threeparts": ("the LLM's mask as three parts, fresh", GraphedStep, True, False),
                "vitbf16": ("the ViT's residual stream in bf16, fresh", GraphedStep, True, False),
                "all": ("levers, three parts and the ViT's stream in bf16", LeversStep, False, False),
                "float8": ("the blocks' Linears in float8, fresh", GraphedStep, True, False),
                "float8rows": ("the blocks' Linears in float8 scaled by rows, fresh", GraphedStep, True, False),
                "float8vit": ("the ViT's blocks' Linears in float8, fresh", GraphedStep, True, False),
                "float8delayed": ("the blocks' Linears in float8, each scale a constant (delayed scaling's bound), "
                                  "fresh", GraphedStep, True, False),
                "all8": ("levers, three parts, the ViT's stream in bf16, float8 by rows", LeversStep, False, False)}
    compiled = ({}, True, False)  # how the blocks are compiled now: (torch.compile's keywords, Linears stacked,
    #   which float8 variant or False)
    how = {"autotune": {"mode": "max-autotune-no-cudagraphs"},
           "coordesc": {"options": {"coordinate_descent_tuning": True}},
           "levers": {"options": {"coordinate_descent_tuning": True}},
           "all": {"options": {"coordinate_descent_tuning": True}},
           "all8": {"options": {"coordinate_descent_tuning": True}},
           "nomix": {"options": {"triton.mix_order_reduction": False}},
           "mixheuristic": {"options": {"triton.mix_order_reduction_split_size": None}},
           "mixtune": {"options": {"triton.mix_order_reduction_split_size": None,
                                   "triton.mix_order_reduction_autotune_split_size": True}}}
    for full in NAMES:
        name, kernels = full.removesuffix("_mk"), full.endswith("_mk")  # the variant, and the reductions as multi
        #   kernels (the "_mk" suffix)
        if name.startswith("mix") and name[3:].isdigit():  # mix64, mix128, ...: the split, rows a partial sum
            variants[name] = (f"mix-order split {name[3:]}, fresh", GraphedStep, True, False)
            how[name] = {"options": {"triton.mix_order_reduction_split_size": int(name[3:])}}
        label, cls, fresh, before = variants[name]
        options = how.get(name, {})
        if kernels:
            label += ", reductions persistent up to 16,384 wide where timed faster (multi-kernel)"
            options = {**options, "options": {**options.get("options", {}), "triton.multi_kernel": 1}}
        undos = []  # what the variant patched into the model, undone after it whatever happens
        try:
            float8 = name.startswith("float8") or name == "all8"
            wanted = (options, name != "unstacked", float8 and name)
            if float8:
                undos.append(float8_blocks(model, llm=name != "float8vit", rowwise=name in ("float8rows", "all8")))
            if name == "float8delayed":
                undos.append(float8_delayed())
            if wanted != compiled:  # the next step compiles the blocks anew: its "first" time says how long
                torch._dynamo.reset()
                vision.stacks_linears = stacks if wanted[1] else (lambda x: False)
                nano.compile_each_block(model, **wanted[0])
                compiled = wanted
            torch.backends.cuda.preferred_blas_library("cublaslt" if name == "cublaslt" else "cublas")
            nano.softmax_grad_for = (lambda logits: nano.head_softmax_grad) if before else compiled_for
            nano.loss_chunk_rows = (lambda rows, on_gpu: 1024) if before else chunk_rows
            bench.GraphedStep = cls
            if name in SPLITS or name in ("all", "all8"):
                undos.append(attend_by_span(model, cpu_batch, SPLITS.get(name, three_parts)))
            if name in ("vitbf16", "all", "all8"):
                undos.append(vit_stream_in(torch.bfloat16, model))
            optimizer = build_optimizer(model, {"connector": 1e-5, "vit": 1e-5, "llm": 1e-5}, {})
            step = bench.graphed_step(model, optimizer, cpu_batch, dev, fresh_grads=fresh)
            if getattr(cls, "clip_in_adamw", False):
                step()  # captures: the scale is one of the graph's outputs from then on
                optimizer.grad_scale = step.graphed.scale
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            seconds, peak = bench.measure(step, dev)
            print(f"step, graphed, {label}: {seconds * 1e3:.1f} ms, MFU {flops / seconds / bench.PEAK_FLOPS:.1%}, "
                  f"peak {peak:.1f} GiB, first {first:.0f} s", flush=True)
            bench.write_profile(step, dev, "step " + label)
            del step, optimizer
            torch.cuda.empty_cache()
        except Exception:
            traceback.print_exc()
        finally:
            for undo in undos:
                undo()


if __name__ == "__main__":
    main()
