"""
The SigLIP2 vision transformer, as Molmo2 runs it.

Design choices:
- The input is already cut into patches: (num_crops, num_patches, patch_size * patch_size * 3), each
  patch flattened as (ph, pw, c), exactly as Molmo2's image and video processors emit it. The patch
  embedding is therefore a Linear; SigLIP2's Conv2d weight converts to it by a permute.
- No CLS token; one learned position embedding per patch of the fixed crop grid (27x27 at 378 px),
  added to every crop. No interpolation: every crop has the same size.
- Pre-norm blocks: LayerNorm -> multi-head attention with biases -> residual, LayerNorm -> gelu-tanh
  MLP -> residual. Attention via F.scaled_dot_product_attention, full (non-causal); `attend` runs it in float32 on
  a CPU given bf16, where its kernels are slower in bf16.
- Only the encoder: SigLIP2's post_layernorm and attention-pooling head are never used by Molmo2.
- `forward(patches, layers)` returns the outputs of the requested blocks and never runs the blocks after
  the deepest one asked for. Molmo2 reads blocks 24 and 18 of the 27 and keeps only 25 (see model.py).
  A frozen ViT on a CPU can keep what it gave each crop (`FeatureCache`, train_joint.py's vit_feature_cache).
- Parameter names follow transformers' Molmo2 vision tower, so that checkpoint layout maps by prefix (the
  name maps at the end of this file); model.py's checkpoint section reads and writes the files (`load_siglip`:
  the HF `SiglipVisionModel` / `SiglipModel` layout). This file imports nothing of the project's.
- Stage 1 (train_vision.py) trains the ViT alone through `VisionPretrainer`: a head on its pooled tokens, a
  small text tower of the ViT's own blocks, SigLIP's sigmoid loss and a localisation loss (train_vision.py's
  docstring says why). Only the ViT is kept.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class SigLIP2Config:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27  # as pretrained; Molmo2Config trims it to the deepest layer it reads
    num_attention_heads: int = 16
    head_dim: int = 72
    patch_size: int = 14
    image_size: int = 378  # crop side in pixels; 27x27 patches at 378
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels

    @classmethod
    def preset(cls, name: str) -> "SigLIP2Config":
        if name not in SIGLIP2_PRESETS:
            raise ValueError(f"unknown SigLIP2 preset {name!r}; known: {sorted(SIGLIP2_PRESETS)}")
        return replace(SIGLIP2_PRESETS[name])


SIGLIP2_PRESETS = {
    # google/siglip2-so400m-patch14-384 run at 378 px (27x27 patches, the same 729 position embeddings)
    "siglip2-so400m-14-378": SigLIP2Config(),
    # for tests and CPU runs: 56 px crops of 4x4 patches
    "tiny": SigLIP2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                          head_dim=8, image_size=56),
    "small": SigLIP2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                           head_dim=32, image_size=112),
}


def cpu_autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype CPU autocast casts to, where x is on a CPU and autocast is on there; else None."""
    return torch.get_autocast_dtype("cpu") if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") else None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, **kwargs), except on a CPU in bf16 or float16, given so or under
    autocast (which would cast float32 inputs down): there it runs in float32 and returns the low dtype. PyTorch's CPU
    attention kernels gain nothing from bf16 (a CPU's bf16 matrix instructions do not reach them) and took up to 4x
    longer in it than in float32 at this project's shapes, most of a bf16 step (BENCHMARKS.md "Attention in float32
    under CPU autocast"). One exception, where CPU_MATH_BF16 is on: bf16 attention that will be differentiated
    eagerly, with no mask and not causal (stage 1's ViT crops: short, so the math backend's whole score matrix is
    small), goes to math_bf16 below. GPUs are left as they are."""
    if q.device.type == "cpu":
        low = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else cpu_autocast_dtype(q)
        if (low == torch.bfloat16 and CPU_MATH_BF16 and kwargs.get("attn_mask") is None and not kwargs.get("is_causal")
                and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
                and not torch.compiler.is_compiling()):
            return math_bf16(q, k, v, **kwargs)
        if low is not None:
            with torch.autocast("cpu", enabled=False):
                return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(low)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


# attend's one exception: on a 2-core CPU with AVX512-BF16 (no AMX) the float32 flash kernel took ~21 ms a layer
# forward and backward at stage 1's crops (160 x 4 heads x 64 x 32), ~16 of them in its backward, where the math
# backend's batched bf16 products took ~14; stage 1's step 11-14% shorter, and after the recipe's 600 steps its
# ViT named 0.82 of the kinds against 0.84 (BENCHMARKS.md "Stage 1's attention in bf16"). False: float32 always
CPU_MATH_BF16 = True


def math_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention's math backend (SDPBackend.MATH: q @ k^T, softmax, @ v, and their autograd) on
    bf16 q, k, v, its products and softmax kept in bf16: by default that backend computes bf16 inputs in float32, which
    is no faster than the flash kernel. The products accumulate in float32 inside each matmul; the scores and the
    probabilities are rounded to bf16 between them. The global switch (torch.backends.cuda's, though it governs CPUs
    too) is set for this call alone and put back."""
    allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)  # read in the forward; the backward replays it
    try:
        with torch.autocast("cpu", enabled=False), sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(*(t.to(torch.bfloat16) for t in (q, k, v)), **kwargs)
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(allowed)


def cast_once(x: torch.Tensor) -> torch.Tensor:
    """x in the CPU autocast's dtype where that is on, else x itself: for an input that several Linears read. Autocast
    casts a Linear's input on each call (it caches the weights' casts, not the activations'), so q, k and v would cast
    one LayerNorm output three times, and backward add three float32 gradients; cast once, that is one cast each way.
    Float32 runs (and GPUs, where the casts are cheap) are untouched."""
    low = cpu_autocast_dtype(x)
    return x if low is None else x.to(low)


def linears(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """x through several Linears that all read it -> their outputs. On a GPU while gradients are on, one matmul
    against their weights (and biases) stacked, its output split: the ViT's q, k and v are three 1,152-wide matmuls
    over 14,580 tokens that cuBLAS runs well under its speed on one 3,456-wide one, forward and backward alike, and the
    LLM's q, k, v and gate, up likewise (BENCHMARKS.md "Linears that read one input as one matmul"). The stacking is
    a copy of the weights each call, paid for by a training step's thousands of tokens; generation reads each weight
    once a token and would pay it every token, so it keeps one matmul each. So does a CPU, where the demo's small
    model gained nothing measurable from stacking, and whose float32 arithmetic thus stays transformers' bit for bit."""
    if not stacks_linears(x):
        return tuple(layer(x) for layer in layers)
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    matmul = layers[0].float8_matmul() if isinstance(layers[0], Float8Linear) else F.linear
    y = matmul(x, torch.cat([layer.weight for layer in layers]), bias)
    return y.split([layer.out_features for layer in layers], dim=-1)


def stacks_linears(x: torch.Tensor) -> bool:
    """Whether linears stacks the weights for input x: on a GPU, gradients on (a test replaces it to run the stacked
    path on a CPU, a benchmark to time the GPU without it)."""
    return x.is_cuda and torch.is_grad_enabled()


# -- float8 matmuls (train_joint.py --float8=True) ------------------------------------------------------------------
# An H100/H200 multiplies float8 at twice its bf16 rate. A float8 number has 3 mantissa bits (e4m3: activations and
# weights) or 2 (e5m2: gradients, which need the range more than the precision), and a range of ~2^17 or ~2^31, so
# each tensor is scaled first: one scale per tensor, mapping its largest magnitude onto the format's largest value,
# computed on the device from this step's values ("dynamic tensorwise" scaling). The matmul then multiplies the
# scales back in as it accumulates in float32.
FLOAT8_LARGEST = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def to_float8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """t -> (t * s in dtype, 1 / s), s = dtype's largest value / t's largest magnitude (a float32 scalar on t's
    device: no sync, so a CUDA graph can hold it)."""
    # Each row's largest first, then theirs (the same value): on an H100 inductor ran the amax of a whole tensor, fused
    # into the gelu backward that made it, at 0.66 ms for a 14,580 x 4,304 gradient, ~5x its bytes' time; a reduction
    # along rows it spreads like a norm's: 0.20 ms, the step 183 ms against 214 (BENCHMARKS.md "Float8 matmuls").
    return scaled_into(t, t.detach().abs().amax(dim=-1).amax(), dtype)


def scaled_into(t: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """t times s in dtype and 1 / s, s = dtype's largest value / amax (t's largest magnitude, one for all of t or one
    a row), clamped so that rounding cannot step past the format's largest value."""
    largest = FLOAT8_LARGEST[dtype]
    scale = largest / amax.float().clamp(min=1e-12)
    return (t.float() * scale).clamp(-largest, largest).to(dtype), scale.reciprocal()


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear's output takes for input x: autocast's where autocast is on for x's device, else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def column_major(t: torch.Tensor) -> torch.Tensor:
    """t's values laid out column by column: torch._scaled_mm reads its second operand that way."""
    return t.t().contiguous().t()


def rows_padded(t: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    """t (R, C) with zero rows added up to a multiple of `multiple` (float8 matmuls need their shared dimension so).
    Float8Matmul pads before casting to float8: torch.cat of float8 tensors fails under a compiled block's autocast
    (torch 2.14 on a CPU), and zero rows leave a tensor's largest magnitude, so its scale, as it was."""
    extra = -t.shape[0] % multiple
    if extra == 0:
        return t
    return torch.cat([t, t.new_zeros(extra, t.shape[1])])


@torch.library.custom_op("nanomolmo2::bias_gradient", mutates_args=())
def bias_gradient(g: torch.Tensor) -> torch.Tensor:
    """The bias's gradient: g (tokens, out) summed over its tokens in float32, as an operator torch.compile cannot
    see into. Inside a compiled float8 backward, g.sum(0) sits beside the row reduction that scales g, and inductor
    fuses the two into one mix-order reduction whose every program keeps a whole row of column sums: at the ViT's
    4,304-wide rows that took 5.3 ms a call on an H100. As a matmul by a row of ones, cuBLAS's gemv took 19 ms a step,
    and as a column of ones kept beside x for the weight gradient's matmul the step took 9 ms more again (the wider
    x's copies and slower scaling kernels). Here it is ATen's own column sum, one read of g (BENCHMARKS.md "Float8
    matmuls")."""
    return g.sum(0, dtype=torch.float32)


@bias_gradient.register_fake
def _(g):
    return g.new_empty(g.shape[1], dtype=torch.float32)


class Float8Matmul(torch.autograd.Function):
    """y = x @ weight.T + bias with all three of the training step's matmuls in float8: forward x (e4m3) by the
    weight (e4m3); backward the output's gradient (e5m2) by the weight for x's gradient, and by x for the weight's
    (its shared dimension, the tokens, padded to a multiple of 16 before the casts; the padded rows' products are
    dropped). The weight's gradient comes out float32. Backward keeps x in float8, half of what a bf16 Linear keeps.
    The output is in autocast's dtype where autocast is on (as nn.Linear's would be), else in x's."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        xq, x_scale = to_float8(rows_padded(x2), torch.float8_e4m3fn)
        wq, w_scale = to_float8(weight, torch.float8_e4m3fn)
        out_dtype = matmul_dtype(x)
        fused_bias = bias is not None and out_dtype != torch.float32  # a GPU adds a bias in the matmul in 16 bits only
        y = torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype,
                             bias=bias.to(out_dtype) if fused_bias else None, use_fast_accum=True)[:len(x2)]
        if bias is not None and not fused_bias:
            y = y + bias
        ctx.save_for_backward(xq, x_scale, wq, w_scale)
        ctx.x_shape, ctx.has_bias, ctx.out_dtype = x.shape, bias is not None, out_dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        xq, x_scale, wq, w_scale = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gq, g_scale = to_float8(rows_padded(g), torch.float8_e5m2)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._scaled_mm(gq, column_major(wq), scale_a=g_scale, scale_b=w_scale,
                                      out_dtype=ctx.out_dtype)[:len(g)].view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # (out, tokens) by (tokens, in); the zero rows added to both add nothing
            grad_w = torch._scaled_mm(gq.t().contiguous(), column_major(xq), scale_a=g_scale, scale_b=x_scale,
                                      out_dtype=torch.float32)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = bias_gradient(g)
        return grad_x, grad_w, grad_b


def to_float8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t (R, C) -> (each row times its own s in e4m3, the (R, 1) float32 column of 1 / s), s = e4m3's largest value /
    the row's largest magnitude. A row's scale needs only that row, so one kernel can find it and cast the row in the
    same pass (a tensor's one scale needs a pass over all of it before any element is cast)."""
    return scaled_into(t, t.detach().abs().amax(dim=-1, keepdim=True), torch.float8_e4m3fn)


class Float8RowwiseMatmul(torch.autograd.Function):
    """y = x @ weight.T + bias, the float8 scaled a row at a time (train_joint.py --float8_rowwise=True), all in e4m3:
    forward each token's row of x by each output's row of the weight, backward each token's row of the output's
    gradient by each input's column of the weight for x's gradient. The weight's gradient stays a bf16 matmul (as
    nn.Linear's under autocast) of the gradient and x, kept in autocast's dtype: in float8 its operands would need
    scales along the tokens and a transposed copy each, the passes that made Float8Matmul's step slower. The bias's
    gradient is bias_gradient's (which says why not a sum here)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        out_dtype = matmul_dtype(x)
        xq, x_scale = to_float8_rows(x2)
        wq, w_scale = to_float8_rows(weight)
        fused_bias = bias is not None and out_dtype == torch.bfloat16  # a row-scaled matmul writes bf16 only
        y = torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=torch.bfloat16,
                             bias=bias.to(torch.bfloat16) if fused_bias else None, use_fast_accum=True).to(out_dtype)
        if bias is not None and not fused_bias:
            y = y + bias
        ctx.save_for_backward(x2.to(out_dtype), weight)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x_kept, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            gq, g_scale = to_float8_rows(g)
            wtq, wt_scale = to_float8_rows(weight.t().contiguous())  # a row each input, so that .t() is column-major
            grad_x = torch._scaled_mm(gq, wtq.t(), scale_a=g_scale, scale_b=wt_scale.t(), out_dtype=torch.bfloat16
                                      ).to(x_kept.dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = g.t().to(x_kept.dtype) @ x_kept
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = bias_gradient(g)
        return grad_x, grad_w, grad_b


class Float8Linear(nn.Linear):
    """nn.Linear (the same parameters and state dict) whose matmuls run in float8 while gradients are on
    (Float8Matmul, or Float8RowwiseMatmul where rowwise); without them (evaluation, generation) it is nn.Linear
    exactly. float8_linears makes one."""

    rowwise = False

    def float8_matmul(self):
        return (Float8RowwiseMatmul if self.rowwise else Float8Matmul).apply

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.float8_matmul()(x, self.weight, self.bias)
        return super().forward(x)


def float8_linears(*modules: nn.Module, rowwise: bool = False) -> int:
    """Every nn.Linear inside modules becomes a Float8Linear in place (its class changed, its parameters kept), scaled
    a row at a time if rowwise; returns how many. The trainers pass the transformer blocks, where nearly all of the
    step's matmuls are."""
    n = 0
    for module in modules:
        for m in module.modules():
            if type(m) is nn.Linear:
                m.__class__ = Float8Linear
                m.rowwise = rowwise
                n += 1
    return n


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for an integer index into x's first dimension: (*index.shape, *x.shape[1:]). Through index_select,
    whose backward adds each row's gradient into place (index_add_), where x[index]'s backward sorts the indices
    first (a sort-based index_put_): an H100 runs the joint step's three such gathers 1.2-2.6x faster forward and
    backward, the gradients equal bit for bit where at most one nonzero gradient reaches a row, as at each place used
    (`python assets/bench/gather_backward.py`; BENCHMARKS.md "The step's gathers through index_select")."""
    return x.index_select(0, index.flatten()).view(*index.shape, *x.shape[1:])


class SelfAttention(nn.Module):
    def __init__(self, config: SigLIP2Config):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        inner = config.num_attention_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner)
        self.k_proj = nn.Linear(config.hidden_size, inner)
        self.v_proj = nn.Linear(config.hidden_size, inner)
        self.o_proj = nn.Linear(inner, config.hidden_size)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, P, C); attn_mask (N, 1, 1, P) bool, True = attend (train_vision.py's text tower pads its
        captions; crops never need one)."""
        N, P, _ = x.shape
        x = cast_once(x)
        q, k, v = (t.view(N, P, self.num_heads, self.head_dim).transpose(1, 2)  # (N, nh, P, hs) each
                   for t in linears(x, self.q_proj, self.k_proj, self.v_proj))
        y = attend(q, k, v, attn_mask=attn_mask)  # (N, nh, P, hs)
        return self.o_proj(y.transpose(1, 2).reshape(N, P, -1))  # (N, P, C)


class MLP(nn.Module):
    def __init__(self, config: SigLIP2Config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: SigLIP2Config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SelfAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), attn_mask)
        return x + self.mlp(self.layer_norm2(x))


class SigLIP2(nn.Module):
    def __init__(self, config: SigLIP2Config):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Linear(config.patch_dim, config.hidden_size)
        self.positional_embedding = nn.Parameter(torch.zeros(config.num_patches, config.hidden_size))
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False  # recompute each block in backward (saves activation memory)
        self.feature_cache = None  # a FeatureCache: a frozen ViT's features of crops met before (train_joint.py)
        self.init_weights()

    def init_weights(self):
        """A fresh ViT (tests, from-scratch runs); pretrained runs load SigLIP2 over it."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.positional_embedding, std=0.02)

    def init_big_vision(self):
        """Redraw the weights as big_vision's ViT (SigLIP's own code) draws them: Xavier-uniform matrices in the
        blocks, a LeCun-normal patch embedding (a normal truncated at 2 std, rescaled to variance 1 / fan_in, as flax
        draws it), position embeddings of std 1 / sqrt(width). Its queries and keys start ~4x larger than at
        init_weights' std 0.02 (width 128), so attention is less uniform at the start: alone, the small preset's ViT
        then told a 15-px shape's kind better after 500 steps in 2 of 3 seeds (assets/bench/kind_sanity.py)."""
        for module in self.layers.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        std = self.config.patch_dim ** -0.5 / 0.87962566103423978  # the std of a unit normal truncated at +-2
        nn.init.trunc_normal_(self.patch_embedding.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.patch_embedding.bias)
        nn.init.normal_(self.positional_embedding, std=self.config.hidden_size ** -0.5)
        return self

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (N, P, patch_dim), any dtype (the video processor may hand over uint8) -> (N, P, C)."""
        if patches.dim() != 3 or patches.shape[1:] != (self.config.num_patches, self.config.patch_dim):
            raise ValueError(f"vision input: expected crops of shape (N, {self.config.num_patches}, "
                             f"{self.config.patch_dim}), got {tuple(patches.shape)}")
        x = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))  # (N, P, C)
        return x + self.positional_embedding  # (N, P, C)

    def forward(self, patches: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """patches (N, P, patch_dim) -> [output of block i for i in layers], each (N, P, C); blocks are
        0-based (block i's output is transformers' hidden_states[i + 1])."""
        for i in layers:
            if not 0 <= i < len(self.layers):
                raise ValueError(f"vision layers {list(layers)}: block {i} is not among the {len(self.layers)} built")
        if self.feature_cache is not None:
            return self.feature_cache.features(self, patches, layers)
        return self.encode(patches, layers)

    def encode(self, patches: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """forward's work, without its checks or cache."""
        x = self.embed(patches)
        if not torch.compiler.is_compiling():  # blocks compiled alone (model.compile_each_block) trace the crop count
            torch._dynamo.maybe_mark_dynamic(x, 0)  # as a size from the first batch, not again at the next count
        wanted = {}
        for i, block in enumerate(self.layers[: max(layers) + 1]):
            if self.gradient_checkpointing and self.training and x.requires_grad:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in layers:
                wanted[i] = x
        return [wanted[i] for i in layers]


class FeatureCache:
    """What a frozen ViT gave each crop, kept by the crop's values, so that a crop met again skips the ViT: the CPU
    demo's joint stage, whose ViT does not learn, meets each of its 5,000 training images 2-4 times, and its ViT
    forward is ~9% of a step. For CPU tensors, and a ViT that does not learn (`features` refuses one that does). A
    crop's key is a 64-bit hash of its bytes, with the layers and the autocast dtype: among 100,000 different crops
    two share a key with odds of ~3e-10. Features are kept as the ViT gave them until max_bytes are held, then no
    more are kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.store = {}  # key -> (one (P, C) tensor per layer asked for)
        self.hits = self.misses = 0

    def features(self, vit: "SigLIP2", patches: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        if patches.device.type != "cpu":
            raise ValueError("FeatureCache: crops on the GPU (their keys would be read back to the host every step)")
        if torch.is_grad_enabled() and any(p.requires_grad for p in vit.parameters()):
            raise ValueError("FeatureCache: the ViT learns (a parameter requires grad), so its features change")
        salt = (tuple(layers), patches.dtype, cpu_autocast_dtype(patches))
        rows = patches.detach().reshape(len(patches), -1).contiguous().view(torch.uint8).numpy()
        keys = [hash((salt, row.tobytes())) for row in rows]
        missing = [i for i, key in enumerate(keys) if key not in self.store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            computed = vit.encode(patches[torch.tensor(missing, device=patches.device)], layers)
            for j, i in enumerate(missing):
                fresh[keys[i]] = tuple(t[j].clone() for t in computed)
                size = sum(t.numel() * t.element_size() for t in fresh[keys[i]])
                if keys[i] not in self.store and self.bytes + size <= self.max_bytes:
                    self.store[keys[i]] = fresh[keys[i]]
                    self.bytes += size
        per_crop = [self.store[key] if key in self.store else fresh[key] for key in keys]
        return [torch.stack([crop[j] for crop in per_crop]) for j in range(len(layers))]


# ---------------------------------------------------------------------------
# Stage 1 (train_vision.py): a head on the ViT's pooled tokens, a small text tower, and the two losses
# ---------------------------------------------------------------------------


def window_means(vit_features, pooling):
    """The features stage 1 reads for each pooled token: vit_features, one (N, P, C) tensor per block the connector
    reads, concatenated; pooling (M, K) indices into the N * P patches (-1 = none) -> (M, D), the mean of each window
    (an all-padding window gives zeros). On a CPU each block's windows are gathered and summed in one
    F.embedding_bag, each patch weighted 1 / (its window's patches): at the CPU demo's stage-1 shapes (1,664 windows
    of 4 a step, two blocks of 128) 2.2-3.2 ms forward and backward on 2 cores, against 6.5-10.1 ms for
    gathered_window_means (assets/bench/window_means.py; BENCHMARKS.md "Each record to one rank"). On a GPU the
    gathered tensor: there the step is captured as a CUDA graph (train_vision.py cuda_graph), and embedding_bag's
    backward there has not been checked for host syncs."""
    if pooling.device.type != "cpu":
        return gathered_window_means(vit_features, pooling)
    valid = pooling >= 0
    weights = (valid / valid.sum(1, keepdim=True).clamp(min=1)).to(vit_features[0].dtype)  # (M, K), 0 at padding
    index = pooling.clamp(min=0)
    return torch.cat([F.embedding_bag(index, f.reshape(-1, f.shape[-1]), per_sample_weights=weights, mode="sum")
                      for f in vit_features], dim=-1)  # (M, D)


def gathered_window_means(vit_features, pooling):
    """window_means with the windows gathered as one (M, K, D) tensor, masked, summed and divided."""
    features = torch.cat(vit_features, dim=-1)  # (N, P, D)
    features = features.reshape(-1, features.shape[-1])  # (N * P, D)
    valid = (pooling >= 0)[..., None].to(features.dtype)  # (M, K, 1)
    windows = take_rows(features, pooling.clamp(min=0)) * valid  # (M, K, D)
    return windows.sum(1) / valid.sum(1).clamp(min=1)  # (M, D)


def sigmoid_loss(image_emb, text_emb, log_temperature, bias, positives):
    """SigLIP's loss. image_emb (B, E), text_emb (B, E) unit vectors; positives (B, B) bool (the diagonal, and
    any pair whose captions are the same text). -> sum over all B x B pairs of -log sigmoid(+-logit), / B."""
    logits = image_emb @ text_emb.T * log_temperature.exp() + bias  # (B, B)
    signs = positives.to(logits.dtype) * 2 - 1  # +1 for a matching pair, -1 otherwise
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


def masked_l1(predicted, target, holds):
    """The L1 distance summed over the rows where holds (M,) is 1, over their number: what indexing the rows out
    would give, but computed on every row and masked, so the step never waits for the GPU to say how many rows hold
    (a boolean index does; a step that waits cannot be a CUDA graph, training.GraphedStep)."""
    return ((predicted - target).abs().sum(-1) * holds).sum() / holds.sum().clamp(min=1)


def rounded_text_shape(n_texts, n_tokens, max_len):
    """-> (n_texts, n_tokens) rounded up to multiples of 64 texts and 8 tokens (at most max_len): the shapes TextTower
    pads its texts to on a GPU, so that a few shapes recur."""
    return n_texts + -n_texts % 64, min(n_tokens + -n_tokens % 8, max_len)


class TextTower(nn.Module):
    """Qwen3 token ids -> one embedding per text: token + position embeddings, bidirectional ViT-style blocks over
    the real tokens, a final LayerNorm, the mean over the real tokens, a Linear."""

    def __init__(self, vit_config, n_layers, max_len, embed_dim, vocab_rows):
        super().__init__()
        width = vit_config.hidden_size
        self.vocab_rows = vocab_rows
        self.token_embedding = nn.Embedding(vocab_rows, width)  # id % rows: hashed, a few ids share a row
        self.position_embedding = nn.Parameter(torch.zeros(max_len, width))
        self.layers = nn.ModuleList([Block(vit_config) for _ in range(n_layers)])
        self.final_layer_norm = nn.LayerNorm(width, eps=vit_config.layer_norm_eps)
        self.head = nn.Linear(width, embed_dim)

    def forward(self, ids, lengths, round_shapes=None):
        """ids (T, L) long, padded; lengths (T,) -> (T, E) unit vectors. round_shapes (None: on a GPU) first pads T
        up to a multiple of 64 texts and L to one of 8 tokens, and drops the extra texts after: each batch has its
        own number of labels, and on a GPU the attention's cuDNN kernels build a plan for every new shape, ~70 ms
        forward and ~80 ms backward (BENCHMARKS.md "Where a GPU step's time goes"). Every text is computed alone
        (attention within it), so the padding changes no real text's math."""
        T = ids.shape[0]
        if ids.is_cuda if round_shapes is None else round_shapes:
            rows, width = rounded_text_shape(T, ids.shape[1], self.position_embedding.shape[0])
            ids = F.pad(ids, (0, width - ids.shape[1], 0, rows - T))
            lengths = F.pad(lengths, (0, rows - T), value=1)  # one token each: no all-masked row
        L = ids.shape[1]
        real = torch.arange(L, device=ids.device)[None, :] < lengths[:, None]  # (T, L)
        x = self.token_embedding(ids % self.vocab_rows) + self.position_embedding[:L]  # (T, L, C)
        for block in self.layers:
            x = block(x, real[:, None, None, :])  # (T, L, C): padding is never attended to
        x = self.final_layer_norm(x)
        pooled = (x * real[..., None]).sum(1) / lengths[:, None].clamp(min=1)  # (T, C)
        return F.normalize(self.head(pooled[:T]).float(), dim=-1)  # (T, E)


def scene_loss(logits, targets, weights, balanced):
    """Cross-entropy of each attribute's class per token: logits, one (M, n_values + 1) tensor per attribute (class
    0: no shape's centre in the token's cell); targets (M, n_attributes), -1 where the image has no scene; weights,
    one per attribute. Summed over attributes, averaged over the tokens whose image has a scene; balanced: the
    average over the tokens that hold a centre plus the average over those that hold none (the ~9x more empty
    tokens would otherwise teach "nothing here" first)."""
    if not balanced:
        known = (targets[:, 0] >= 0).sum().clamp(min=1)  # a micro-batch without scenes adds 0 and keeps the graph
        return sum(w * F.cross_entropy(x, targets[:, a], ignore_index=-1, reduction="sum")
                   for a, (w, x) in enumerate(zip(weights, logits))) / known
    holds, empty = (targets[:, 0] > 0).float(), (targets[:, 0] == 0).float()  # (M,) each; -1 is in neither
    total = 0.0
    for a, (w, x) in enumerate(zip(weights, logits)):
        ce = F.cross_entropy(x, targets[:, a].clamp(min=0), reduction="none")  # (M,)
        total = total + w * ((ce * holds).sum() / holds.sum().clamp(min=1)
                             + (ce * empty).sum() / empty.sum().clamp(min=1))
    return total


class VisionPretrainer(nn.Module):
    """The ViT and what stage 1 trains on top of it. forward(batch) -> {loss name: scalar}."""

    def __init__(self, vit, vit_layers, text_layers, text_max_len, embed_dim, use_sigmoid, use_loc,
                 text_vocab_rows=16384, use_position=False, scene_classes=(), scene_balanced=False,
                 scene_weights=None):
        super().__init__()
        self.vit, self.vit_layers = vit, tuple(vit_layers)
        width = vit.config.hidden_size * len(self.vit_layers)
        self.token_head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim * 2), nn.GELU(),
                                        nn.Linear(embed_dim * 2, embed_dim))
        self.text = TextTower(vit.config, text_layers, text_max_len, embed_dim, text_vocab_rows)
        self.use_sigmoid, self.use_loc = use_sigmoid, use_loc
        if use_sigmoid:  # SigLIP's start: t = log 10, b = -10 (the paper's, for its many negatives per positive)
            self.image_proj = nn.Linear(embed_dim, embed_dim)
            # (1,), not 0-dim: fully_shard takes no 0-dim parameter
            self.log_temperature = nn.Parameter(torch.full((1,), math.log(10.0)))
            self.bias = nn.Parameter(torch.full((1,), -10.0))
        if use_loc:  # a few positive tokens per label among dozens: start near that prior
            self.offset_head = nn.Linear(embed_dim, 2)
            self.loc_log_scale = nn.Parameter(torch.full((1,), math.log(10.0)))
            self.loc_bias = nn.Parameter(torch.full((1,), -3.0))
        self.position_head = nn.Linear(embed_dim, 2) if use_loc and use_position else None
        # scene_classes: per attribute of the synthetic world (kind, colour), its number of values plus one for
        # "no shape's centre here"; () = off. One softmax per attribute: a token must say *which* kind it holds,
        # where the label loss lets it sit near "circles" and "squares" alike
        self.scene_classes = tuple(scene_classes)
        self.scene_head = nn.Linear(embed_dim, sum(self.scene_classes)) if self.scene_classes else None
        # balanced: the tokens that hold a centre weigh as much, together, as those that hold none (about one in ten
        # holds one): the few that must say *which* kind are not outvoted by the many that say "none"
        self.scene_balanced = scene_balanced
        # each attribute's weight in the scene loss (None: 1 each)
        self.scene_weights = tuple(scene_weights or [1.0] * len(self.scene_classes))
        if len(self.scene_weights) != len(self.scene_classes):
            raise ValueError(f"scene_weights {self.scene_weights}: one per attribute of {self.scene_classes}")
        self.init_new()

    def init_new(self):
        """Everything but the ViT (which keeps its own init or pretrained weights)."""
        for module in [self.token_head, self.text] + ([self.image_proj] if self.use_sigmoid else []) + \
                ([self.offset_head] if self.use_loc else []) + \
                ([self.position_head] if self.position_head is not None else []) + \
                ([self.scene_head] if self.scene_head is not None else []):
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=m.in_features ** -0.5)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.text.position_embedding, std=0.02)

    def pooled_features(self, patches, pooling):
        """patches (N, P, patch_dim), pooling (M, K) indices into the N * P patches (-1 = none) -> (M, width): each
        token's window of patches averaged, the chosen blocks side by side; what token_head reads (LayerNorm first,
        so the heads cannot see how large these grow, and train_vision.py's validation reports it)."""
        return window_means(self.vit(patches, list(self.vit_layers)), pooling)

    def token_embeddings(self, patches, pooling):
        """patches (N, P, patch_dim), pooling (M, K) -> (M, E)."""
        return self.token_head(self.pooled_features(patches, pooling))  # (M, E)

    def blocks(self):
        """The transformer blocks that FSDP shards one by one (training.wrap_model): the ViT's and the text tower's."""
        return list(self.vit.layers) + list(self.text.layers)

    def forward(self, batch):
        return self.losses(self.token_embeddings(batch["patches"], batch["pooling"]), batch)

    def losses(self, tokens, batch):
        """tokens (M, E) from token_embeddings -> {loss name: scalar} for the objectives that are on."""
        losses = {}
        if self.use_sigmoid:
            losses["sigmoid"] = self.caption_loss(tokens, batch)
        if self.use_loc:
            losses["loc"], losses["offset"] = self.loc_loss(tokens, batch)
            if self.position_head is not None:
                losses["position"] = self.position_loss(tokens, batch)
        if self.scene_head is not None:
            losses["scene"] = self.scene_loss(tokens, batch)
        return losses

    def scene_logits(self, tokens):
        """tokens (M, E) -> one (M, n_values + 1) logit tensor per attribute (class 0: no shape's centre here)."""
        return torch.split(self.scene_head(tokens).float(), self.scene_classes, dim=-1)

    def scene_loss(self, tokens, batch):
        """The module's scene_loss (above) of this head's logits against batch["scene_targets"]."""
        return scene_loss(self.scene_logits(tokens), batch["scene_targets"], self.scene_weights, self.scene_balanced)

    def caption_loss(self, tokens, batch):
        captioned = batch["caption_image"]  # (B',) the images that have a caption
        n_images = int(batch["token_image"].max()) + 1
        per_image = torch.zeros(n_images, tokens.shape[1], device=tokens.device, dtype=tokens.dtype)
        per_image.index_add_(0, batch["token_image"], tokens)  # (n_images, E)
        per_image = per_image / torch.bincount(batch["token_image"], minlength=n_images)[:, None].to(tokens.dtype)
        image_emb = F.normalize(self.image_proj(per_image[captioned]).float(), dim=-1)  # (B', E)
        if len(captioned) == 0:  # nothing to compare; keep every weight in the graph (DDP)
            stand_in = self.text(*self.one_token(tokens))  # the tower runs on every rank (FSDP gathers its blocks)
            return 0.0 * (image_emb.sum() + self.log_temperature + self.bias + stand_in.sum()).sum()
        text_emb = self.text(batch["caption_ids"], batch["caption_lengths"])  # (B', E)
        return sigmoid_loss(image_emb, text_emb, self.log_temperature, self.bias, batch["caption_same"])

    @staticmethod
    def one_token(like):
        """A stand-in text of one token id 0: (ids (1, 1), lengths (1,))."""
        ids = torch.zeros(1, 1, dtype=torch.long, device=like.device)
        return ids, torch.ones(1, dtype=torch.long, device=like.device)

    def loc_logits(self, tokens, batch):
        """-> (M, n_labels) logits: does token m hold a point of label j (only meaningful where the token's
        image is the label's)."""
        label_emb = self.text(batch["label_ids"], batch["label_lengths"])  # (n_labels, E)
        return F.normalize(tokens.float(), dim=-1) @ label_emb.T * self.loc_log_scale.exp() + self.loc_bias

    def read_out(self, tokens, batch, threshold=0.5):
        """Counts and points straight off the localisation head, no LLM: for each label of the batch (in
        batch["label_image"] order), the high-res view's tokens of its image whose probability passes the threshold,
        each one point, its cell's corner plus the predicted offset -> [(n, 2) numpy array in [0, 1]] per label."""
        probs = torch.sigmoid(self.loc_logits(tokens, batch)).float().cpu()  # (M, n_labels)
        offsets = torch.sigmoid(self.offset_head(tokens).float()).cpu()  # (M, 2)
        token_image, high_res, cells = (batch[k].cpu() for k in ("token_image", "high_res", "cells"))
        points = []
        for j, i in enumerate(batch["label_image"].tolist()):
            if i < 0:  # a stand-in label (training.collate_vision's round_labels): nothing to read
                continue
            keep = (token_image == i) & high_res & (probs[:, j] > threshold)  # (M,)
            points.append((cells[keep, :2] + offsets[keep] * (cells[keep, 2:] - cells[keep, :2])).numpy())
        return points

    def loc_loss(self, tokens, batch):
        if batch["label_ids"].shape[0] == 0:  # no pointed labels in this micro-batch; keep the graph whole (DDP)
            stand_in = self.text(*self.one_token(tokens))  # the tower runs on every rank (FSDP gathers its blocks)
            zero = 0.0 * (tokens.sum() + self.offset_head.weight.sum() + self.offset_head.bias.sum()
                          + self.loc_log_scale + self.loc_bias + stand_in.sum()).sum()
            return zero, zero
        logits = self.loc_logits(tokens, batch)  # (M, n_labels)
        same_image = batch["token_image"][:, None] == batch["label_image"][None, :]  # (M, n_labels)
        bce = F.binary_cross_entropy_with_logits(logits, batch["loc_targets"], reduction="none")
        loc = (bce * same_image).sum() / same_image.sum()
        # where a token holds a point: its position in the token's cell, each coordinate in [0, 1]
        holds = (batch["offset_targets"][:, 0] >= 0).float()  # (M,)
        predicted = torch.sigmoid(self.offset_head(tokens).float())  # (M, 2)
        return loc, masked_l1(predicted, batch["offset_targets"], holds)

    def position_loss(self, tokens, batch):
        """The global view's tokens that hold a point say where it is in the whole image (x, y in [0, 1]): the
        global crop is the whole image, so its tokens can know this from the ViT's position embeddings, and it is
        what the LLM will have to write as coordinates. (The offset loss asks only for the place in the cell.)"""
        holds = ((batch["offset_targets"][:, 0] >= 0) & ~batch["high_res"]).float()  # (M,)
        cells = batch["cells"]  # (M, 4) each token's cell in the image
        target = cells[:, :2] + batch["offset_targets"].clamp(min=0) * (cells[:, 2:] - cells[:, :2])  # (M, 2)
        predicted = torch.sigmoid(self.position_head(tokens).float())  # (M, 2)
        return masked_l1(predicted, target, holds)


def siglip_config_from_hf(hf: dict) -> SigLIP2Config:
    """HF SiglipVisionConfig dict -> ours. Missing keys take transformers' SiglipVisionConfig defaults
    (config.json files written by transformers leave defaults out)."""
    hidden = hf.get("hidden_size", 768)
    heads = hf.get("num_attention_heads", 12)
    patch = hf.get("patch_size", 16)
    if hf.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"SigLIP config: hidden_act {hf['hidden_act']!r} unsupported (gelu_pytorch_tanh only)")
    # SigLIP2 so400m/14 "384" has 27x27 positions (its conv drops the last 6 px); Molmo2 feeds exactly
    # 27 * 14 = 378 px, so the crop size is the position grid times the patch size.
    grid = hf.get("image_size", 224) // patch
    return SigLIP2Config(
        hidden_size=hidden,
        intermediate_size=hf.get("intermediate_size", 3072),
        num_hidden_layers=hf.get("num_hidden_layers", 12),
        num_attention_heads=heads,
        head_dim=hidden // heads,
        patch_size=patch,
        image_size=grid * patch,
        num_channels=hf.get("num_channels", 3),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
    )


def siglip_state_dict_from_hf(tensors: dict, config: SigLIP2Config) -> dict:
    """HF SigLIP tensors -> our SigLIP2 state dict (blocks past config.num_hidden_layers, the text tower,
    post_layernorm and head are dropped)."""
    # SiglipModel and older SiglipVisionModel files prefix the vision tower with "vision_model."
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""
    renames = [("embeddings.position_embedding.weight", "positional_embedding"),
               ("encoder.layers.", "layers."), (".self_attn.out_proj.", ".self_attn.o_proj.")]
    ours = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue  # text tower, logit scale
        key = key[len(prefix):]
        if key.startswith(("post_layernorm.", "head.")) or key.endswith("position_ids"):
            continue  # unused by Molmo2; old files also store the position_ids buffer
        if key == "embeddings.patch_embedding.weight":
            # Conv2d (C, c, ph, pw) -> Linear over patches flattened as (ph, pw, c)
            ours["patch_embedding.weight"] = value.permute(0, 2, 3, 1).reshape(value.shape[0], -1)
            continue
        if key == "embeddings.patch_embedding.bias":
            ours["patch_embedding.bias"] = value
            continue
        for old, new in renames:
            key = key.replace(old, new)
        if key.startswith("layers.") and int(key.split(".")[1]) >= config.num_hidden_layers:
            continue
        ours[key] = value
    if "positional_embedding" in ours and ours["positional_embedding"].shape[0] != config.num_patches:
        raise ValueError(f"SigLIP checkpoint: {ours['positional_embedding'].shape[0]} position embeddings, "
                         f"expected {config.num_patches} ({int(math.sqrt(config.num_patches))}^2)")
    return ours


def siglip_config_to_hf(config: SigLIP2Config) -> dict:
    """Ours -> config.json of a transformers SiglipVisionModel (the inverse of siglip_config_from_hf)."""
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        raise ValueError(f"SigLIP layout: heads x head_dim ({config.num_attention_heads} x {config.head_dim}) must "
                         f"equal hidden_size {config.hidden_size}")
    return {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
            "patch_size": config.patch_size, "image_size": config.image_size, "num_channels": config.num_channels,
            "layer_norm_eps": config.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh", "attention_dropout": 0.0,
            "vision_use_head": False}


def siglip_state_dict_to_hf(state: dict, config: SigLIP2Config) -> dict:
    """Our SigLIP2 state dict -> SiglipVisionModel tensors (the inverse of siglip_state_dict_from_hf)."""
    tensors = {}
    for key, value in state.items():
        if key == "patch_embedding.weight":  # Linear over (ph, pw, c) -> Conv2d (C, c, ph, pw)
            p, c = config.patch_size, config.num_channels
            value = value.reshape(value.shape[0], p, p, c).permute(0, 3, 1, 2)
            key = "embeddings.patch_embedding.weight"
        elif key == "patch_embedding.bias":
            key = "embeddings.patch_embedding.bias"
        elif key == "positional_embedding":
            key = "embeddings.position_embedding.weight"
        else:
            key = key.replace("layers.", "encoder.layers.", 1).replace(".self_attn.o_proj.", ".self_attn.out_proj.")
        tensors["vision_model." + key] = value.detach().contiguous()
    reference = state["positional_embedding"]
    tensors["vision_model.post_layernorm.weight"] = torch.ones(config.hidden_size, dtype=reference.dtype)
    tensors["vision_model.post_layernorm.bias"] = torch.zeros(config.hidden_size, dtype=reference.dtype)
    return tensors
