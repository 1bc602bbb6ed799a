"""
The connector: ViT patch features -> one LLM embedding per pooling window.

Design choices:
- Features of several ViT blocks are concatenated on the channel axis, in the order asked for
  (Molmo2: blocks 24 then 18 of SigLIP2, 2 x 1152 = 2304 channels).
- Pooling is "attention_meanq": each output token owns a window of patch indices (2x2 for images, 3x3 for
  video frames, built by the processor). The query is the mean of the window's valid patches, keys and
  values are the window's patches, and one multi-head attention (biases on q/k/v/o) reduces the window
  to one vector. Index -1 marks a padding slot: it is masked out of the mean and of the attention.
- Indices point into the patches of all crops of the batch, flattened in order: crop c, patch p is
  index c * patches_per_crop + p. A window whose slots are all -1 produces no token (as in transformers).
- The pooling attention runs in float32 whatever the model dtype (Molmo2's `float32_attention`).
- Projector: SwiGLU without biases, down(silu(gate(x)) * up(x)), pooled width -> LLM intermediate -> LLM width.
- `projector_norm` (off in Molmo2, and for every loaded Molmo2 checkpoint): an RMSNorm after the projector, a
  switch for models trained from scratch. Nothing else bounds the image tokens' scale: through the SwiGLU
  product it can grow 10^3-10^5 times past the text embeddings' ("norm discrepancy", Li et al. 2025,
  arXiv 2512.08374). Its gain starts at the text embeddings' init scale, so image and text tokens enter the
  LLM alike.
- `position_bins` (0 in Molmo2, and for every loaded Molmo2 checkpoint): a learned embedding of where each pooled
  token sits in its image (its centre's x and y, each cut into position_bins bins; two tables, added after the
  projector), a switch for models trained from scratch. In Molmo2 the LLM finds a token's place from the token
  layout alone (rows of the high-res view end in <im_col>, the low-res view has none), which a pretrained LLM
  learns from millions of pointing examples; a small LLM from scratch did not within the demo's minutes: most
  of its wrong points landed far from every shape (BENCHMARKS.md "Where the points land"). The tables start
  at 0, so a fresh model's image tokens are the connector's alone.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vision import linears, take_rows


@dataclass
class ConnectorConfig:
    vit_layers: tuple = (24, 18)  # 0-based ViT blocks, concatenated in this order
    vit_hidden_size: int = 1152
    hidden_size: int = 1152  # width of a pooled token (pooling attention output)
    num_attention_heads: int = 16
    head_dim: int = 72
    intermediate_size: int = 3072  # projector hidden width (Molmo2 uses the LLM's intermediate size)
    llm_hidden_size: int = 1024
    projector_norm: bool = False  # RMSNorm after the projector (not Molmo2's; a from-scratch switch, see above)
    position_bins: int = 0  # learned x and y embeddings of a token's place in its image (not Molmo2's; see above)


def one_query_attention(q, k, v, valid):
    """One query a window over its K keys, in float32, written out: q (M, 1, nh, hs), k and v (M, K, nh, hs) in any
    dtype, valid (M, K) bool with at least one True a row -> (M, nh, hs) float32. What F.scaled_dot_product_attention
    computes, but SDPA's fused kernels work on blocks of 64 or more queries, so with one query a window most of their
    work is padding: on an H200, 16 ms of a 200-ms prefill of 16 images, where these few ops read k and v once
    (BENCHMARKS.md "The pooling attention written out")."""
    scores = (q.float() * k.float()).sum(-1) * q.shape[-1] ** -0.5  # (M, K, nh)
    scores = scores.masked_fill(~valid[:, :, None], float("-inf"))
    return (scores.softmax(1)[..., None] * v.float()).sum(1)  # (M, nh, hs)


class PoolingAttention(nn.Module):
    """Multi-head attention of one query (the window mean) over the window's patches."""

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        in_dim = config.vit_hidden_size * len(config.vit_layers)
        inner = config.num_attention_heads * config.head_dim
        self.q_proj = nn.Linear(in_dim, inner)
        self.k_proj = nn.Linear(in_dim, inner)
        self.v_proj = nn.Linear(in_dim, inner)
        self.o_proj = nn.Linear(inner, config.hidden_size)

    def forward(self, windows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """windows (M, K, D) patch features with padding slots zeroed, valid (M, K) bool -> (M, hidden)."""
        M, K, _ = windows.shape
        num_valid = valid.sum(-1, keepdim=True).to(windows.dtype)  # (M, 1), >= 1 for every window here
        query = windows.sum(1, keepdim=True) / num_valid[:, :, None]  # (M, 1, D): mean of the valid patches
        q = self.q_proj(query).view(M, 1, self.num_heads, self.head_dim)  # (M, 1, nh, hs)
        k = self.k_proj(windows).view(M, K, self.num_heads, self.head_dim)  # (M, K, nh, hs)
        v = self.v_proj(windows).view(M, K, self.num_heads, self.head_dim)  # (M, K, nh, hs)
        # One query over at most 9 keys, in float32 as Molmo2 does (the projections stay in the model dtype).
        if k.dtype == torch.float32:  # a float32 model: SDPA, the kernel transformers' adapter runs (the parity
            #   tests: tests/test_connector.py, tests/test_molmo2.py)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=valid[:, None, None, :]).squeeze(2)  # (M, nh, hs)
        else:  # bf16 (GPU training, generation): written out, many times faster (one_query_attention says why)
            y = one_query_attention(q, k, v, valid)  # (M, nh, hs)
        y = y.to(windows.dtype).reshape(M, -1)  # (M, nh * hs)
        return self.o_proj(y)  # (M, hidden)


class SwiGLU(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(in_dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(in_dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linears(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class Connector(nn.Module):
    def __init__(self, config: ConnectorConfig):
        super().__init__()
        self.config = config
        self.pooling = PoolingAttention(config)
        self.projector = SwiGLU(config.hidden_size, config.intermediate_size, config.llm_hidden_size)
        self.norm = nn.RMSNorm(config.llm_hidden_size, eps=1e-6) if config.projector_norm else None
        # A new connector starts with every layer keeping its input's scale (std 1/sqrt(fan_in)). Molmo2 uses a
        # flat std of 0.02, which works on a pretrained SigLIP2's large features; on a ViT trained from scratch
        # it shrinks the features ~1000x (0.02 * sqrt(fan_in) per layer, squared by the SwiGLU product): the
        # LLM then never sees the image (the loss does not move when the pixels are shuffled) and never learns to.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features ** -0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.norm is not None:  # the scale of a fresh LLM's text embeddings (std 0.02): see the notes above
            nn.init.constant_(self.norm.weight, 0.02)
        self.position_x = self.position_y = None
        if config.position_bins:
            self.position_x = nn.Embedding(config.position_bins, config.llm_hidden_size)
            self.position_y = nn.Embedding(config.position_bins, config.llm_hidden_size)
            nn.init.zeros_(self.position_x.weight)
            nn.init.zeros_(self.position_y.weight)

    def forward(self, vit_features: list[torch.Tensor], pooled_patches_idx: torch.Tensor,
                fixed_shapes: bool = False) -> torch.Tensor:
        """vit_features: one (N, P, C) tensor per entry of config.vit_layers, N crops of P patches;
        pooled_patches_idx (M, K) long, indices into the N * P patches, -1 = padding
        -> (M', llm_hidden), one row per window with at least one valid index, in order. fixed_shapes (a batch
        padded by training.pad_media, whose windows are never empty): every window kept, no host check."""
        features = torch.cat(vit_features, dim=-1)  # (N, P, D)
        features = features.reshape(-1, features.shape[-1])  # (N * P, D)
        pooled_patches_idx = pooled_patches_idx.to(device=features.device, dtype=torch.long)
        # a check read back to the host: left out of a compiled graph and of fixed-shape batches
        if not (torch.compiler.is_compiling() or fixed_shapes):
            if pooled_patches_idx.numel() and pooled_patches_idx.max() >= features.shape[0]:
                raise ValueError(f"pooled_patches_idx: index {int(pooled_patches_idx.max())} out of range for "
                                 f"{features.shape[0]} patches")
        if not fixed_shapes:  # the kept windows' count is a shape read from the data
            # drop all-padding windows up front: they produce no token and would make a fully masked softmax
            pooled_patches_idx = pooled_patches_idx[(pooled_patches_idx >= 0).any(-1)]  # (M', K)
        valid = pooled_patches_idx >= 0  # (M', K)
        windows = take_rows(features, pooled_patches_idx.clamp(min=0))  # (M', K, D)
        windows = windows * valid[..., None].to(features.dtype)
        tokens = self.projector(self.pooling(windows, valid))  # (M', llm_hidden)
        return tokens if self.norm is None else self.norm(tokens)

    def positions(self, xy: torch.Tensor) -> torch.Tensor:
        """xy (M, 2) token centres in [0, 1] (token_centres) -> (M, llm_hidden), the embedding of their bins."""
        bins = (xy * self.config.position_bins).long().clamp(0, self.config.position_bins - 1)  # (M, 2)
        return self.position_x(bins[:, 0]) + self.position_y(bins[:, 1])


def token_centres(grids: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Where each pooled token of a batch sits in its image, in the order the features come: grids (I, 4) of images
    (low_h, low_w, high_h, high_w: the low-res view's tokens, then the high-res view's, each row-major) or (V, 3) of
    videos (frames, h, w: every frame row-major) -> (n_tokens, 2) centres (x, y) in [0, 1]. Each view's pooled
    grid is taken to cover its whole image, as the processor resizes the image onto it. n_tokens, the number of
    features, sizes the result, so nothing is read back to the host."""
    grids = grids.to(torch.long)
    if grids.shape[-1] == 4:  # two views an image, one frame each
        h, w = grids[:, 0::2].reshape(-1), grids[:, 1::2].reshape(-1)  # (2I,)
        frames = torch.ones_like(h)
    else:  # one view a video, all its frames alike
        frames, h, w = grids.unbind(-1)
    counts = frames * h * w  # tokens per view
    view = torch.repeat_interleave(torch.arange(len(counts), device=grids.device), counts, output_size=n_tokens)
    starts = counts.cumsum(0) - counts
    k = (torch.arange(n_tokens, device=grids.device) - starts[view]) % (h * w)[view]  # place within its frame
    row, col = k // w[view], k % w[view]
    return torch.stack([(col + 0.5) / w[view], (row + 0.5) / h[view]], -1)  # (n_tokens, 2)
