"""
The language model, written out by hand: Qwen3, and (further down) Molmo2, which joins vision.py's ViT and
connector.py's adapter to it. In this order: Qwen3, the training loss at the output head, Molmo2, generation,
and at the end checkpoint I/O (safetensors files, the hub, SigLIP2's files, the name maps of both layouts).

Qwen3 design choices (all as in the released Qwen3 checkpoints):
- pre-norm decoder blocks, RMSNorm computed in float32, no biases anywhere
- grouped-query attention (16 query heads share 8 key/value heads in 0.6B) with a per-head RMSNorm on q
  and k (over head_dim, before RoPE), run through F.scaled_dot_product_attention (vision.attend: in float32 on a
  CPU when given bf16, where its kernels are slower in bf16)
- rotary position embeddings, half-split ("rotate_half") layout, theta from the config
- SwiGLU MLP: down(silu(gate(x)) * up(x))
- tied input/output embeddings for the small models
Module names equal the Hugging Face names (minus the leading "model."), so loading a checkpoint is a
rename table a reader can check at a glance.

Masks: `attn_mask=None` means plain causal attention and never builds a T x T mask (SDPA's is_causal).
An explicit boolean `attn_mask` (B, 1, T, S), True = may attend, is how Molmo2 expresses bidirectional
vision tokens, packed examples and message trees. A 2-D `attention_mask` (B, S), 1 = token, 0 = padding
(transformers' convention, used for left-padded prompts in generation), gives causal attention over the
real tokens (`causal_padding_mask`); S counts the cached keys too.
"""

import contextlib
import json
import mmap
import os
import struct
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from connector import Connector, ConnectorConfig, token_centres
from data import VISION_TOKEN_IDS  # the tokens the processor marks as vision tokens
from vision import (SigLIP2, SigLIP2Config, attend, cast_once, linears, siglip_config_from_hf, siglip_config_to_hf,
                    siglip_state_dict_from_hf, siglip_state_dict_to_hf, take_rows)

_READY_FOR_COMPILE = False


def ready_for_compile():
    """Set what torch.compile needs for this project's models; call it before compiling one (the stage scripts'
    compile switch, generate(compile=True) and tools/bench.py do). Not done at import: it imports torch._dynamo,
    ~2 s of every script's start on a 2-core machine, and most runs never compile.
    - The connector keeps the pooling windows that hold a patch, a count read from the data: torch.compile traces
      it as a size known only at run time instead of breaking the graph there.
    - Molmo2.loss_at_targets runs eagerly: selecting the loss positions has a data-dependent shape, and on torch
      2.11 dynamo fails tracing the fused head's autograd Function (linear_cross_entropy) at all.
    - On a GPU, a norm's backward sums its weight's gradient over the rows in one kernel with its input's gradient
      (inductor's mix-order reduction), each program a split of rows, then sums the programs' partial rows. Its
      heuristic splits by SM count, 16 rows at the full ViT's 14,580: 912 partial rows to a slow last sum. 128 rows,
      the heuristic's own cap (what it picks from ~135,000 rows up), took 2.2 ms off the full preset's step on an H100
      and 1.9 on an H200; inductor's timing of the splits at compile time 0.6-1.9 ms; 256 rows 59 ms more (BENCHMARKS.md
      "The norms' partial sums")."""
    global _READY_FOR_COMPILE
    if not _READY_FOR_COMPILE:
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        triton_options = torch._inductor.config.triton  # Triton's kernels (a GPU's) only: a CPU's are C++
        if hasattr(triton_options, "mix_order_reduction_split_size"):  # torch >= 2.11
            triton_options.mix_order_reduction_split_size = 128
        Molmo2.loss_at_targets = torch.compiler.disable(Molmo2.loss_at_targets)
        _READY_FOR_COMPILE = True


def compile_each_block(model, **compile_kwargs):
    """torch.compile each transformer block of a Molmo2 (the LLM's and the ViT's) in place, and nothing else: regional
    compilation. All blocks of a kind run one forward whose weights are the graph's inputs, so dynamo traces one LLM
    block and one ViT block and every other block reuses their code; the whole model as one graph traces all 55 of
    the full preset's blocks. The full preset's joint step on an H200: 12-15 s to compile, then 0.30 s a step, where
    the one graph took 153 s and then 0.32-0.53 s, and the eager step 0.63 s (BENCHMARKS.md "The full recipe's joint
    step compiled"). What runs between the blocks (embeddings, connector, loss) stays eager. Generation with a KV
    cache should run the blocks eagerly (torch.compiler.set_stance("force_eager"), as train_joint.py's answers do):
    each new cache position would be a new graph (generate(compile=True) compiles its prefill's blocks its own way,
    Qwen3.compiled_blocks)."""
    ready_for_compile()
    for block in (*model.llm.layers, *model.vit.layers):
        block.compile(**compile_kwargs)

# ---------------------------------------------------------------------------
# Qwen3
# ---------------------------------------------------------------------------


@dataclass
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    resid_dropout: float = 0.0  # dropout on each block's residual branches (training only)
    response_dropout: float = 0.0  # the same, but for response tokens (Molmo2 pretrain: 0 and 0.1)

    @staticmethod
    def preset(name):
        presets = {
            # the language model of nanoMolmo2 (and the hub's Qwen/Qwen3-0.6B)
            "qwen3-0.6b": Qwen3Config(),
            "qwen3-1.7b": Qwen3Config(hidden_size=2048, intermediate_size=6144, num_attention_heads=16,
                                      num_key_value_heads=8),
            "qwen3-4b": Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                    num_attention_heads=32, rope_theta=5e6),
            # small models trained from scratch on CPU and in tests
            # (at 128 wide, the 151,936-row output head still costs 39 MFLOP per loss token: the CPU budget)
            "small": Qwen3Config(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=32),
            "tiny": Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        }
        if name not in presets:
            raise ValueError(f"unknown Qwen3 preset {name!r}; known: {sorted(presets)}")
        return presets[name]

    @staticmethod
    def from_hf(hf):
        """Qwen3Config from an HF config.json dict (transformers 4.x 'rope_theta' or 5.x 'rope_parameters')."""
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope type {rope['rope_type']!r} is not supported (only default RoPE)")
        theta = rope.get("rope_theta", hf.get("rope_theta", 1e6))
        names = {f.name for f in fields(Qwen3Config)} - {"rope_theta", "resid_dropout", "response_dropout"}
        kwargs = {k: hf[k] for k in names if k in hf}
        if "head_dim" not in hf:
            kwargs["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
        return Qwen3Config(rope_theta=float(theta), **kwargs)

    def to_hf(self):
        cfg = {k: v for k, v in asdict(self).items() if k not in ("rope_theta", "resid_dropout", "response_dropout")}
        cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu",
                   attention_bias=False, attention_dropout=0.0, torch_dtype="float32",
                   rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                   bos_token_id=151643, eos_token_id=151645)
        return cfg


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    """cos, sin (B, T, head_dim) for integer positions (B, T); computed in float32 like the reference."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, nh, T, hd); the first half of hd pairs with the second half."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys and values for every layer: (B, n_kv, max_len, hd) each. All rows write at the
    same position `pos`; rows of different lengths are left-padded and masked by the caller. Each layer's
    attention reads and writes its own part (layer(i))."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.pos = 0  # tokens written so far
        self.max_len = max_len
        self.write_index = None  # (1,) long on the device: fixed-shape writes (DecodeStep); None = at pos

    def layer(self, i):
        """Layer i's part, an object of its own: a block compiled by torch.compile then reads no layer index, so one
        graph serves all layers (Qwen3.compiled_blocks); reading self.k[i], it would compile one graph a layer."""
        return LayerKV(self.k[i], self.v[i], self.pos, self.write_index)

    def keep_rows(self, rows):
        """Drop the other rows (finished sequences): rows is a (B,) bool mask or an index tensor."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


class LayerKV:
    """One layer's keys and values (B, n_kv, max_len, hd) in a KVCache, with the cache's pos and write_index."""

    def __init__(self, k, v, pos, write_index):
        self.k, self.v, self.pos, self.write_index = k, v, pos, write_index

    def update(self, k, v):
        """Write k, v (B, n_kv, T, hd) at pos; return all keys/values so far (B, n_kv, pos+T, hd). With a
        write_index: write one token there and return every slot (B, n_kv, max_len, hd), the same shapes at
        every step (a CUDA graph replays them); the caller masks the slots not written yet."""
        if self.write_index is not None:
            self.k.index_copy_(2, self.write_index, k)
            self.v.index_copy_(2, self.write_index, v)
            return self.k, self.v
        T = k.size(2)
        if self.pos + T > self.k.size(2):
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens > max_len {self.k.size(2)}")
        self.k[:, :, self.pos:self.pos + T] = k
        self.v[:, :, self.pos:self.pos + T] = v
        return self.k[:, :, :self.pos + T], self.v[:, :, :self.pos + T]


class KeyBlocks:
    """A boolean attention mask (B, 1, T, S), True = may attend, cut for attention over the keys that matter. SDPA
    given a dense mask computes every query against every key, though Molmo2's training rows let a query see few:
    a row's prefix (its image tokens) and its own question's branch, never another example or another branch. Here the
    T queries go in chunks of `rows`, and each chunk is given only the key blocks (of `cols` keys each) that some query
    of it may see in some row of the batch, the same blocks for the whole batch. The chunks go in `groups` by how many
    blocks they need, each group padded to the most any of its chunks needs with blocks those cannot see (one SDPA call
    a group). Nothing is approximated: a block left out is masked for every query of the chunk, so the softmax and its
    gradient are the dense ones, summed in another order. The CPU demo's rows (one example, 7 branches, T 448) keep
    ~0.45 of the dense scores (BENCHMARKS.md "Attention over the key blocks, and the rows joined").
    plan() reads the mask on the host (one sync): for CPU training, not for CUDA graphs."""

    GROUPS = 3  # plan()'s groups of chunks: each more is one more SDPA call a layer

    def __init__(self, groups, order):
        # groups: [(chunk indices (n,), their key indices (n, K) int64, their mask (B * n, 1, rows, K) bool)];
        # order (chunks,): where each chunk's output sits in the groups' outputs laid end to end
        self.groups, self.order = groups, order

    @staticmethod
    def split(counts, groups, least=2):
        """counts: the blocks each chunk needs, ascending -> [(start, end)], `groups` runs of at least `least`
        chunks each (fewer runs where there are too few chunks) whose padded total, the sum of (end - start) *
        counts[end - 1], is least. (A run of one chunk would be a shape torch.compile specialises on, another graph.)"""
        C = len(counts)
        least = min(least, C)  # a single chunk is a run of one
        groups = max(1, min(groups, C // least))
        # best[g][e]: (least padded total, its runs) for the first e chunks in g runs
        best = [{0: (0, [])}] + [{} for _ in range(groups)]
        for g in range(1, groups + 1):
            for e in range(g * least, C + 1):
                best[g][e] = min((best[g - 1][s][0] + (e - s) * counts[e - 1], best[g - 1][s][1] + [(s, e)])
                                 for s in range(0, e - least + 1) if s in best[g - 1])
        return best[groups][C][1]

    @classmethod
    def plan(cls, mask, rows=64, cols=32, most=0.75, groups=None):
        """-> KeyBlocks, or None where T or S is not a multiple of the sizes or a chunk needs more than `most` of
        the keys (the dense kernel is then as fast)."""
        B, _, T, S = mask.shape
        if mask.dtype != torch.bool or mask.shape[1] != 1 or T % rows or S % cols:
            return None
        # the chunk's rows first (an OR over 64 rows of contiguous keys), then each block's 32 keys: the other order
        # reduced over the short inner dimension first, 2.4x slower (6.2 ms against 2.6 on a joined row of 2,752)
        need = mask.view(B, T // rows, rows, S // cols, cols).any(2).any(-1).any(0)  # (chunks, key blocks)
        counts = need.sum(1)
        if int(counts.max()) * cols > most * S:
            return None
        by_need = torch.sort(counts, stable=True).indices  # the chunks, fewest blocks first
        sorted_counts = counts[by_need].tolist()
        # each chunk's blocks in key order, the ones it needs first: stable sort on "not needed"
        blocks = torch.sort((~need).to(torch.uint8), dim=1, stable=True).indices  # (chunks, key blocks)
        chunks = mask.view(B, T // rows, rows, S)
        made = []
        for start, end in cls.split(sorted_counts, groups or cls.GROUPS):
            idx, n = by_need[start:end], sorted_counts[end - 1]
            keys = (blocks[idx, :n, None] * cols + torch.arange(cols, device=mask.device)).flatten(1)  # (len, K)
            sub = chunks[:, idx].gather(3, keys[None, :, None, :].expand(B, -1, rows, -1))  # (B, len, rows, K)
            made.append((idx, keys, sub.flatten(0, 1)[:, None].clone()))  # a tensor of its own: no view's
            #   base for the compiled blocks to guard on
        order = torch.argsort(by_need)
        if not torch.compiler.is_compiling():  # the compiled blocks (compile_each_block) take these sizes as dynamic
            # from the first step on, where each would cost a recompile (~12 s on a 2-core CPU) the first time it
            # changed: each group's chunks, keys and mask, and the chunk count (T / rows, as T in run_layers)
            for group in made:
                for t, dims in zip(group, ((0,), (0, 1), (0, 3))):
                    for dim in dims:
                        torch._dynamo.maybe_mark_dynamic(t, dim)
            torch._dynamo.maybe_mark_dynamic(order, 0)
        return cls(made, order)

    @property
    def keys_per_chunk(self):
        """How many keys a chunk of queries is given, on average over the chunks (padding included)."""
        return sum(keys.numel() for _, keys, _ in self.groups) / len(self.order)

    def attend(self, q, k, v):
        """q (B, nh, T, hd), k and v (B, nkv, S, hd) -> (B, nh, T, hd), as attend(q, k, v, attn_mask=mask)."""
        B, nh, T, hd = q.shape
        rows = T // len(self.order)
        q = q.view(B, nh, len(self.order), rows, hd).transpose(1, 2)  # (B, chunks, nh, rows, hd)
        out = []
        for idx, keys, mask in self.groups:
            k_g, v_g = (t[:, :, keys].transpose(1, 2).flatten(0, 1) for t in (k, v))  # (B * n, nkv, K, hd)
            y = attend(q[:, idx].flatten(0, 1), k_g, v_g, attn_mask=mask, enable_gqa=True)  # (B * n, nh, rows, hd)
            out.append(y.view(B, len(idx), nh, rows, hd))
        y = torch.cat(out, 1)[:, self.order]  # (B, chunks, nh, rows, hd), in chunk order again
        return y.transpose(1, 2).reshape(B, nh, T, hd)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        C = config.hidden_size
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None):
        B, T, _ = x.shape
        x = cast_once(x)
        q, k, v = linears(x, self.q_proj, self.k_proj, self.v_proj)
        q = self.q_norm(q.view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(k.view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if kv_cache is not None:
            past = kv_cache.pos  # kv_cache: this layer's LayerKV
            k, v = kv_cache.update(k, v)  # (B, nkv, past+T, hd)
        if kv_cache is not None and kv_cache.write_index is not None:
            # one token against every cache slot, attn_mask (B, 1, 1, max_len) marking the real keys: the query
            # heads sharing a key/value head become that head's queries, so no kernel copies the cache per group
            groups = self.n_head // self.n_kv_head
            q = q.reshape(B, self.n_kv_head, groups, self.head_dim)
            if torch.compiler.is_compiling() and B == 1:  # DecodeStep's compiled step at batch 1 (see DecodeStep)
                y = one_token_attention(q, k, v, attn_mask)  # (B, nkv, groups, hd)
            else:
                y = attend(q, k, v, attn_mask=attn_mask)  # (B, nkv, groups, hd)
            y = y.reshape(B, self.n_head, T, self.head_dim)  # (B, nh, 1, hd)
        elif isinstance(attn_mask, KeyBlocks):
            y = attn_mask.attend(q, k, v)
        elif attn_mask is not None:
            y = attend(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        elif past == 0 or T == 1:
            # no cache (or an empty one): causal; one new token after a cache: it may see everything cached
            y = attend(q, k, v, is_causal=(T > 1), enable_gqa=True)
        else:
            # a chunk of T new tokens after `past` cached ones (SDPA's is_causal would align top-left)
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = attend(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)


def one_token_attention(q, k, v, key_mask):
    """Decoding's attention written out, for torch.compile: q (B, h, g, d), the g query heads that share each of the h
    key/value heads; k, v (B, h, L, d) the whole cache; key_mask (B, 1, 1, L) bool, True = a real key -> (B, h, g, d),
    what F.scaled_dot_product_attention gives, in float32 inside. Compiled, it becomes a few reductions over the cache
    that spread across the GPU; SDPA's kernel (cuDNN's, picked for the mask; by our reading it splits its work by head,
    8 at batch 1) took 21.6 us a layer on an H200 against ~16 for these (BENCHMARKS.md "Decoding at batch 1 as fused
    reductions"). Used at batch 1 only, where it was measured; eagerly it would hold a (B, h, g, L, d) product."""
    scores = (q.float()[:, :, :, None, :] * k.float()[:, :, None, :, :]).sum(-1) * q.shape[-1] ** -0.5  # (B,h,g,L)
    weights = scores.masked_fill(~key_mask, float("-inf")).softmax(-1)
    return (weights[..., None] * v.float()[:, :, None]).sum(-2).to(q.dtype)  # (B, h, g, d)


def causal_padding_mask(attention_mask, T):
    """attention_mask (B, S) 1 = token, 0 = padding, over all S keys (the cached ones, then the T new ones)
    -> (B, 1, T, S) bool, True = may attend: causal, padding keys masked, and every query sees itself (a
    padding query would otherwise see no key at all: a NaN softmax)."""
    S = attention_mask.shape[1]
    if S < T:
        raise ValueError(f"attention_mask: {S} columns for {T} new tokens (it must also cover the cached ones)")
    device = attention_mask.device
    query_pos = torch.arange(S - T, S, device=device)[:, None]  # (T, 1): where the new tokens sit
    key_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    mask = (key_pos <= query_pos) & attention_mask.bool()[:, None, :]  # (B, T, S)
    return (mask | (key_pos == query_pos))[:, None]  # (B, 1, T, S)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = linears(cast_once(x), self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


def residual_dropout(branch, keep_prob):
    """Dropout with a per-token keep probability keep_prob (B, T, 1), or None for none."""
    if keep_prob is None:
        return branch
    return branch * torch.bernoulli(keep_prob.expand_as(branch)) / keep_prob


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None, keep_prob=None):
        x = x + residual_dropout(self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache), keep_prob)
        x = x + residual_dropout(self.mlp(self.post_attention_layernorm(x)), keep_prob)
        return x


class Qwen3(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward (saves activation memory)
        self.compiled_block = None  # Block.forward through torch.compile, within compiled_blocks() only
        self.key_blocks = False  # masked attention over the key blocks each query chunk can see (KeyBlocks)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def run_layers(self, x, position_ids=None, attn_mask=None, kv_cache=None, response_mask=None,
                   attention_mask=None):
        """Input embeddings x (B, T, C) -> final-normed hidden states (B, T, C).
        response_mask (B, T) bool marks the tokens that get `response_dropout` instead of `resid_dropout`.
        attention_mask (B, cached + T) 1 = token, 0 = padding is used when attn_mask is None."""
        B, T, _ = x.shape
        if attn_mask is None and attention_mask is not None and not bool(attention_mask.all()):
            attn_mask = causal_padding_mask(attention_mask, T)  # (B, 1, T, S)
        if position_ids is None:
            start = kv_cache.pos if kv_cache is not None else 0
            position_ids = torch.arange(start, start + T, device=x.device).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        if self.key_blocks and kv_cache is None and attn_mask is not None:
            attn_mask = KeyBlocks.plan(attn_mask) or attn_mask  # the same mask where cutting gains nothing
            if not torch.compiler.is_compiling():  # rows of any length (join_rows): compiled blocks take T as dynamic
                for t in (x, cos, sin):  # from the first step, not after recompiling at the first new length (~22 s
                    torch._dynamo.maybe_mark_dynamic(t, 1)  # on a 2-core CPU with a cold cache)
        keep_prob = None
        c = self.config
        if self.training and (c.resid_dropout > 0 or c.response_dropout > 0):
            keep_prob = torch.full((B, T, 1), 1.0 - c.resid_dropout, device=x.device, dtype=x.dtype)
            if response_mask is not None:  # where(), not a masked assignment: no host sync (CUDA graphs)
                keep_prob = torch.where(response_mask[..., None], 1.0 - c.response_dropout, keep_prob)
        for i, block in enumerate(self.layers):
            layer_kv = None if kv_cache is None else kv_cache.layer(i)
            if self.gradient_checkpointing and self.training:
                # the dropout draw is recomputed too: checkpoint restores the RNG state (preserve_rng_state)
                x = checkpoint(block, x, cos, sin, attn_mask, layer_kv, keep_prob, use_reentrant=False)
            elif self.compiled_block is not None:
                x = self.compiled_block(block, x, cos, sin, attn_mask, layer_kv, keep_prob)
            else:
                x = block(x, cos, sin, attn_mask, layer_kv, keep_prob)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.norm(x)

    @contextlib.contextmanager
    def compiled_blocks(self, **compile_kwargs):
        """Within it run_layers calls each block's forward through torch.compile: regional compilation, as
        compile_each_block, one graph for all blocks (their weights and their LayerKV are its inputs), and it is
        undone on leaving. generate(compile=True) prefills so: eagerly a prefill is ~2,200 small kernels, and at batch 1
        the host launching them is its time. Outside it the blocks run eagerly: step by step decoding would compile a
        graph for each new cache position (DecodeStep compiles its own fixed-shape step)."""
        ready_for_compile()
        self.compiled_block = torch.compile(Block.forward, **compile_kwargs)
        try:
            yield
        finally:
            self.compiled_block = None

    def output_weight(self):
        """The output head's (vocab, C) matrix: the input embedding when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def lm_logits(self, h):
        """(..., C) -> (..., vocab). Call it only where logits are needed: at 152k entries per position it
        dominates the cost of small models."""
        return F.linear(h, self.output_weight())

    def forward(self, input_ids, position_ids=None, attn_mask=None, kv_cache=None, attention_mask=None,
                logits_positions=None):
        """input_ids (B, T) -> logits (B, T, vocab), or (N, vocab) at the N True places of logits_positions
        (B, T) bool. Masks as in run_layers."""
        h = self.run_layers(self.embed_tokens(input_ids), position_ids, attn_mask, kv_cache,
                            attention_mask=attention_mask)  # (B, T, C)
        if logits_positions is not None:
            h = h[logits_positions]  # (N, C)
        return self.lm_logits(h)

    def make_kv_cache(self, batch_size, max_len, device=None, dtype=None):
        w = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, device or w.device, dtype or w.dtype)

    def decode_step(self, ids, position_ids, attn_mask, kv_cache):
        """One generated token per row, ids (B, 1) -> logits (B, vocab); no host sync (see DecodeStep)."""
        h = self.run_layers(self.embed_tokens(ids), position_ids, attn_mask, kv_cache)  # (B, 1, C)
        return self.lm_logits(h[:, -1])

    # -- bookkeeping ----------------------------------------------------------------------------------

    def num_params(self, exclude_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward = 3 x forward): 6 per weight of every matmul the token
        goes through (the embedding lookup is not a matmul; the output head is), plus attention's two
        seq_len-long matmuls per layer: 2 * 2 * nh * hd * seq_len forward, times 3."""
        c = self.config
        matmul_weights = self.num_params(exclude_embedding=True) - self._norm_params()
        if self.lm_head is None:  # tied: the head reuses the embedding as a matmul
            matmul_weights += self.embed_tokens.weight.numel()
        attention = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len
        return 6 * matmul_weights + attention

    def _norm_params(self):
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, RMSNorm))

    # -- checkpoints ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir, dtype=torch.float32):
        """Load an HF Qwen3ForCausalLM checkpoint (local directory or hub id such as 'Qwen/Qwen3-0.6B')."""
        ckpt_dir = resolve_checkpoint(name_or_dir)
        with open(os.path.join(ckpt_dir, "config.json")) as f:
            hf_config = json.load(f)
        if hf_config.get("model_type") != "qwen3":
            raise ValueError(f"checkpoint '{name_or_dir}': model_type {hf_config.get('model_type')!r}, expected 'qwen3'")
        config = Qwen3Config.from_hf(hf_config)
        with weights_not_drawn():
            model = cls(config)
        model.to_empty(device="cpu")
        state = {k.removeprefix("model."): v for k, v in load_checkpoint_tensors(ckpt_dir).items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
        load_state_strict(model, state, name_or_dir)
        return model.to(dtype)

    def save_pretrained(self, out_dir):
        """Write config.json + model.safetensors in the HF Qwen3ForCausalLM format."""
        os.makedirs(out_dir, exist_ok=True)
        state = {("model." + k if not k.startswith("lm_head.") else k): v for k, v in self.state_dict().items()}
        save_safetensors(state, os.path.join(out_dir, "model.safetensors"))
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(self.config.to_hf(), f, indent=2)


# ---------------------------------------------------------------------------
# The training loss at the output head, fused: Molmo2's objective per loss token is
#     weight * (cross-entropy + z_loss * logsumexp(logits)^2)
# over the 151,936-entry vocabulary. Written plainly (logits, F.cross_entropy, logsumexp) it keeps an
# (N, vocab) float32 tensor and several same-sized temporaries alive for backward: 3 GB at 5k loss tokens,
# and on CPU the elementwise passes over them cost as much as the matmul. Here the logits of a chunk of rows
# are made, turned into their gradient in place (softmax scaled, minus the target), and used for both
# gradients at once; backward only scales what forward computed. On a GPU the softmax step of a large
# vocabulary is compiled (softmax_grad_for), so no float32 copy of the logits is made at all.
# ---------------------------------------------------------------------------


def head_softmax_grad(logits, targets, token_weights, z_loss):
    """One chunk of the fused head: logits (n, V) as the matmul made them, targets (n,), token_weights (n,) float32 ->
    (logsumexp (n,), CE (n,), the gradient of token_weights * (CE + z_loss * logsumexp^2) by the logits (n, V) in
    the logits' dtype), in float32 inside. Eagerly each step is a pass over (n, V) float32 values; compiled (on a
    GPU: softmax_grad_for) they fuse into two passes over the bf16 logits, and no float32 (n, V) tensor is made."""
    x = logits.float()
    lse = x.logsumexp(dim=-1)  # (n,)
    rows = torch.arange(len(targets), device=logits.device)
    ce = lse - x[rows, targets]  # (n,)
    # d/dlogits of w * (lse - logit_t + z * lse^2) = w * (1 + 2 z lse) * softmax - w * onehot(t)
    grad = x.sub_(lse[:, None]).exp_().mul_((token_weights * (1 + 2 * z_loss * lse))[:, None])  # in place
    grad[rows, targets] -= token_weights
    return lse, ce, grad.to(logits.dtype)


COMPILED_HEAD_MIN_ROWS = 16384  # output-head rows from which softmax_grad_for compiles
_compiled_softmax_grad = None


def compiles_head_softmax(vocab_rows, on_gpu):
    """Whether softmax_grad_for compiles the softmax of a head of vocab_rows rows (loss_chunk_rows sizes its chunks
    by it)."""
    return on_gpu and vocab_rows >= COMPILED_HEAD_MIN_ROWS


def softmax_grad_for(logits):
    """head_softmax_grad, compiled for a CUDA chunk of a large vocabulary (Qwen3's 151,936 rows: the eager passes
    over its float32 logits cost the full preset's graphed step 5.8 ms of 182 on an H100, BENCHMARKS.md "The output
    head's softmax compiled"), eager otherwise: a CPU's runs stay as they were to the bit, and a kept vocabulary of a
    few hundred rows has little to fuse and would pay the compile (~10 s) at every run's start."""
    global _compiled_softmax_grad
    if not compiles_head_softmax(logits.shape[1], logits.is_cuda):
        return head_softmax_grad
    if _compiled_softmax_grad is None:
        _compiled_softmax_grad = torch.compile(head_softmax_grad, dynamic=True)  # one graph for any chunk's rows
    return _compiled_softmax_grad


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, token_weights, z_loss, chunk_size):
        """h (N, C), weight (V, C), targets (N,), token_weights (N,) -> (sum of weighted loss, sum of weighted
        CE); gradients of the first are computed now, chunk by chunk."""
        grad_h = torch.empty_like(h)
        grad_weight = None
        w_mm = weight.to(h.dtype)  # under autocast h is bf16: matmuls in bf16, softmax in float32
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        ce = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            hc, t, w = h[rows], targets[rows], token_weights[rows].float()
            logits = hc @ w_mm.t()  # (n, V)
            lse, ce_rows, grad = softmax_grad_for(logits)(logits, t, w, z_loss)
            loss += (w * (ce_rows + z_loss * lse.pow(2))).sum()
            ce += (w * ce_rows).sum()
            grad_h[rows] = grad @ w_mm  # (n, C)
            if ctx.needs_input_grad[1]:  # a frozen head (the align stage) skips a third of the work
                part = (grad.t() @ hc).float()  # (V, C); the first chunk's is the sum so far (0 + x is x)
                grad_weight = part if grad_weight is None else grad_weight.add_(part)
        if grad_weight is None and ctx.needs_input_grad[1]:  # no rows
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(grad_h, grad_weight)  # None for a frozen head (the align stage)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    def backward(ctx, grad_loss, grad_ce):
        grad_h, grad_weight = ctx.saved_tensors
        grad_weight = None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_h * grad_loss.to(grad_h.dtype), grad_weight, None, None, None, None


def loss_chunk_rows(vocab_rows, on_gpu):
    """linear_cross_entropy's default rows a chunk (its docstring says why)."""
    if not on_gpu:
        return 1024
    values = 2**28 if compiles_head_softmax(vocab_rows, on_gpu) else 2**24  # compiled: no float32 (n, V) made
    return max(1024, values // vocab_rows)


def linear_cross_entropy(h, weight, targets, token_weights, z_loss=0.0, chunk_size=None):
    """Sum over rows of token_weights * (CE(h @ weight^T, targets) + z_loss * logsumexp^2), and the weighted
    CE sum alone (for logging, no gradient). h (N, C); weight (V, C), the output head. Its chunks are matmuls and
    head_softmax_grad each; a compiled Molmo2 runs it eagerly (ready_for_compile; on torch 2.11 tracing it fails on
    an assertion), with the softmax compiled apart on a GPU (softmax_grad_for).
    chunk_size: rows a chunk; None = 1,024, or on a GPU as many as keep a chunk's logits near 2^24 values (2^28
    where the softmax is compiled: 1 GB of bf16 logits and gradient, 1,766 rows of Qwen3's vocabulary). Each
    chunk is a few dozen small ops the host launches: with a kept vocabulary of ~500 rows a GPU demo step had ~19
    chunks, 16 ms of host time in a step of ~100 (BENCHMARKS.md "Where a GPU step's time goes"); the CPU keeps
    1,024, so its runs stay as they were to the last bit."""
    if chunk_size is None:
        chunk_size = loss_chunk_rows(weight.shape[0], h.is_cuda)
    return LinearCrossEntropy.apply(h, weight, targets, token_weights, z_loss, chunk_size)


# ---------------------------------------------------------------------------
# Molmo2: SigLIP2 -> connector -> Qwen3
# ---------------------------------------------------------------------------
# Design choices:
# - The three parts are `model.vit` (vision.SigLIP2), `model.connector` (connector.Connector) and
#   `model.llm` (Qwen3); Molmo2's 128 extra token embeddings (ids 151936..152063) are `model.new_embedding`,
#   kept apart from Qwen3's table so each part can get its own learning rate or be frozen. Logits cover
#   only the base vocabulary: the extra tokens are never predicted.
# - Kept tokens (`config.token_ids`, for small models trained from scratch): the LLM's table holds rows for
#   these Qwen3 ids only, in order. Inputs and targets stay Qwen3 ids and are mapped to rows inside `embed`
#   and the loss; logits come back over all 151,936 ids, -inf where no row is kept, so generation and
#   decoding never see the rows. The softmax runs over the kept rows: at 128 wide, the full head is 39 MFLOP
#   per loss token, about three quarters of a CPU step of the demo. transformers cannot run such a
#   checkpoint (it does not know the row map); every full-vocabulary model is unaffected.
# - Pooled vision features are *added* to the embeddings of the `<im_patch>` tokens, in order: the k-th
#   pooled window of the batch goes to the k-th `<im_patch>` of the batch (row-major).
# - Attention mask rules (`vision_attention_mask`): causal, except that every vision token of an example
#   attends to every other vision token of that example, later ones included; a text token never sees a
#   later token. Vision tokens are those with mm_token_type_ids == 1 (the processor marks `<im_patch>`,
#   `<im_col>`, the image/frame start and end tokens), or, without mm_token_type_ids, tokens whose id is
#   one of those (transformers is purely causal then). Padding keys (attention_mask == 0) are masked.
#   An explicit `attn_mask` (B, 1, T, S) replaces all of this: packing and message trees build their own.
#   With a KV cache that already holds tokens (decoding) the new tokens are text: causal, padding keys
#   masked by attention_mask (B, cached + T) when given.
# - Checkpoints: `from_pretrained` reads transformers' native Molmo2 layout and the released hub layout
#   (allenai/Molmo2-4B, -8B: Molmo2's own names, fused qkv and up/gate, split embedding tables);
#   `save_pretrained` writes the native layout, which `Molmo2ForConditionalGeneration` loads.

QWEN3_VOCAB_SIZE = 151936  # the base vocabulary; Molmo2's extra tokens follow it


@dataclass
class Molmo2Config:
    llm: Qwen3Config
    vit: SigLIP2Config
    connector: ConnectorConfig
    additional_vocab_size: int = 128
    image_patch_id: int = 151938  # <im_patch>: where pooled features are added
    vision_token_ids: tuple = VISION_TOKEN_IDS
    token_ids: tuple | None = None  # the Qwen3 ids the LLM keeps rows for (increasing); None = all 151,936

    def __post_init__(self):
        if self.token_ids is not None:
            ids = tuple(int(i) for i in self.token_ids)
            if not ids or ids[0] < 0 or ids[-1] >= QWEN3_VOCAB_SIZE or any(a >= b for a, b in zip(ids, ids[1:])):
                raise ValueError("token_ids: expected increasing Qwen3 ids in [0, 151936)")
            if len(ids) != self.llm.vocab_size:
                raise ValueError(f"token_ids: {len(ids)} kept tokens, but the LLM has {self.llm.vocab_size} rows "
                                 "(use Molmo2Config.keep_tokens)")
            self.token_ids = ids
        # vit_layers may count from the end of the ViT as pretrained (Molmo2: -3, -9 of SigLIP2's 27); resolve
        # them to block indices and drop the blocks after the deepest one read (Molmo2 keeps 25 of 27)
        depth = self.vit.num_hidden_layers
        if not all(-depth <= i < depth for i in self.connector.vit_layers):
            raise ValueError(f"vit_layers {self.connector.vit_layers}: not blocks of a {depth}-layer ViT")
        layers = tuple(i % depth for i in self.connector.vit_layers)
        self.connector = replace(self.connector, vit_layers=layers)
        self.vit = replace(self.vit, num_hidden_layers=max(layers) + 1)
        widths = (self.connector.vit_hidden_size, self.connector.llm_hidden_size)
        if widths != (self.vit.hidden_size, self.llm.hidden_size):
            raise ValueError(f"connector widths {self.connector.vit_hidden_size} -> {self.connector.llm_hidden_size} "
                             f"do not join a ViT of {self.vit.hidden_size} and an LLM of {self.llm.hidden_size}")

    def keep_tokens(self, token_ids) -> "Molmo2Config":
        """This config with an LLM table of rows for these Qwen3 ids only (see the design notes above)."""
        ids = tuple(sorted(set(int(i) for i in token_ids)))
        return replace(self, llm=replace(self.llm, vocab_size=len(ids)), token_ids=ids)

    @property
    def base_vocab_size(self) -> int:
        """Where Molmo2's extra token ids start: after the full Qwen3 vocabulary, kept rows or not."""
        return self.llm.vocab_size if self.token_ids is None else QWEN3_VOCAB_SIZE

    @classmethod
    def join(cls, llm: Qwen3Config, vit: SigLIP2Config, vit_layers=(-3, -9)) -> "Molmo2Config":
        """Molmo2's connector for this LLM and ViT: pooling attention shaped like the ViT's, a projector as
        wide as the LLM's MLP."""
        connector = ConnectorConfig(vit_layers=tuple(vit_layers), vit_hidden_size=vit.hidden_size,
                                    hidden_size=vit.hidden_size, num_attention_heads=vit.num_attention_heads,
                                    head_dim=vit.head_dim, intermediate_size=llm.intermediate_size,
                                    llm_hidden_size=llm.hidden_size)
        return cls(llm=replace(llm), vit=replace(vit), connector=connector)

    @classmethod
    def preset(cls, name: str) -> "Molmo2Config":
        if name == "nanomolmo2":  # Qwen3-0.6B + SigLIP2 so400m/14 at 378 px, blocks 24 and 18 (25 kept)
            return cls.join(Qwen3Config.preset("qwen3-0.6b"), SigLIP2Config.preset("siglip2-so400m-14-378"))
        if name == "tiny":  # tests: 56 px crops, blocks 2 and 0 of a 4-block ViT (3 kept)
            return cls.join(Qwen3Config.preset("tiny"), SigLIP2Config.preset("tiny"), vit_layers=(-2, -4))
        if name == "small":  # CPU runs: 112 px crops, blocks 4 and 2 of a 6-block ViT (5 kept)
            return cls.join(Qwen3Config.preset("small"), SigLIP2Config.preset("small"), vit_layers=(-2, -4))
        raise ValueError(f"unknown Molmo2 preset {name!r}; known: ['nanomolmo2', 'small', 'tiny']")


class Molmo2(nn.Module):
    def __init__(self, config: Molmo2Config, llm: Qwen3 | None = None, vit: SigLIP2 | None = None):
        """A fresh Molmo2, or one around an already built (pretrained) LLM and ViT (see from_parts)."""
        super().__init__()
        self.config = config
        self.vit = vit if vit is not None else SigLIP2(config.vit)
        self.connector = Connector(config.connector)
        self.llm = llm if llm is not None else Qwen3(config.llm)
        # drawn as torch.randn(...) * 0.02 would draw it (the same numbers), through nn.init so that a model built to
        # be loaded (weights_not_drawn) skips it
        self.new_embedding = nn.Parameter(
            nn.init.normal_(torch.empty(config.additional_vocab_size, config.llm.hidden_size), std=0.02))
        self._kept = {}  # kept-token lookup tables by device (config.token_ids; not part of the state)
        self.fixed_shapes = False  # True only within fixed_shape_batches()

    @classmethod
    def from_parts(cls, llm: Qwen3, vit: SigLIP2, vit_layers=(-3, -9)) -> "Molmo2":
        """A pretrained Qwen3 and SigLIP2 joined by a fresh connector: the start of the align stage.
        The ViT loses the blocks after the deepest one in vit_layers."""
        config = Molmo2Config.join(llm.config, vit.config, vit_layers)
        del vit.layers[config.vit.num_hidden_layers:]
        vit.config = config.vit
        return cls(config, llm=llm, vit=vit)

    # -- batches padded to fixed shapes (training.pad_media): what a CUDA graph of the training step needs -----

    @contextlib.contextmanager
    def fixed_shape_batches(self):
        """Within it the batches come padded to a few fixed shapes (training.pad_media; train_joint.py's
        cuda_graph): crops, pooling windows and grids have padding entries after the real ones, whose features
        are computed and never gathered (add_vision_features takes the k-th feature for the k-th <im_patch>). A
        graph's step cannot wait on the GPU, so the checks that read counts back to the host are left out, the
        connector keeps every window (pad_media's windows are never empty), and the loss is taken at the
        positions pad_media listed (target_positions, padded to a few counts), or without them at every
        position, with weight 0 where there is no target, instead of selecting the positions on the GPU."""
        self.fixed_shapes = True
        try:
            yield
        finally:
            self.fixed_shapes = False

    def host_checks(self) -> bool:
        """Whether to run the checks that read counts back to the host: not under torch.compile (each would break
        its graph) nor for fixed-shape batches (fixed_shape_batches)."""
        return not (torch.compiler.is_compiling() or self.fixed_shapes)

    # -- inputs --------------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids over the base vocabulary plus the 128 extra -> (B, T, C)."""
        base = self.config.base_vocab_size
        if self.host_checks() and (
                input_ids.min() < 0 or input_ids.max() >= base + self.config.additional_vocab_size):
            raise ValueError(f"input_ids: ids must lie in [0, {base + self.config.additional_vocab_size}), "
                             f"got [{int(input_ids.min())}, {int(input_ids.max())}]")
        if self.config.token_ids is not None:
            input_ids = self.kept_rows(input_ids)
        vocab = self.config.llm.vocab_size
        is_new = input_ids >= vocab  # (B, T)
        base = self.llm.embed_tokens(input_ids.clamp(max=vocab - 1))  # (B, T, C)
        new = F.embedding((input_ids - vocab).clamp(min=0), self.new_embedding)  # (B, T, C)
        return torch.where(is_new[..., None], new, base)

    # -- kept tokens: a small model from scratch holds LLM rows for some Qwen3 ids only (config.token_ids; not
    # Molmo2's, see the design notes above). embed, the loss and full_vocab map through these ---------------

    def kept_tables(self, device):
        """(row of every id, -1 = none; the kept Qwen3 ids) for config.token_ids, built once per device."""
        if device not in self._kept:
            kept = torch.tensor(self.config.token_ids, dtype=torch.long, device=device)
            extra = self.config.additional_vocab_size
            table = torch.full((QWEN3_VOCAB_SIZE + extra,), -1, dtype=torch.long, device=device)
            table[kept] = torch.arange(len(kept), device=device)
            table[QWEN3_VOCAB_SIZE:] = len(kept) + torch.arange(extra, device=device)  # the extra tokens follow
            self._kept[device] = (table, kept)
        return self._kept[device]

    def kept_rows(self, ids: torch.Tensor, what="input_ids") -> torch.Tensor:
        """Qwen3 ids (and the extra ids after them) -> rows of this model's kept-token table; an id with no
        row raises, naming it (when host_checks(): the check reads back to the host)."""
        rows = self.kept_tables(ids.device)[0][ids]
        if self.host_checks() and bool((rows < 0).any()):
            missing = ids[rows < 0].unique()[:8].tolist()
            raise ValueError(f"{what}: token ids {missing} are not among this model's {len(self.config.token_ids)} "
                             "kept tokens (config.token_ids: the tokens of the data it was built for)")
        return rows

    def full_vocab(self, logits):
        """Logits over the LLM's rows (..., vocab) -> over all Qwen3 ids (..., 151936): -inf where no row is kept."""
        if self.config.token_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], QWEN3_VOCAB_SIZE), float("-inf"))
        return full.index_copy_(-1, self.kept_tables(logits.device)[1], logits)

    # -- vision ---------------------------------------------------------------------------------------

    def vision_features(self, crops: torch.Tensor, pooled_patches_idx: torch.Tensor) -> torch.Tensor:
        """crops (N, P, patch_dim) (or (B, N, P, patch_dim)) and pooling windows (M, K) -> (M', C), one
        LLM-width vector per window that has a patch."""
        crops = crops.reshape(-1, *crops.shape[-2:])  # (N, P, patch_dim)
        return self.connector(self.vit(crops, self.config.connector.vit_layers), pooled_patches_idx,
                              fixed_shapes=self.fixed_shapes)

    def vision_attention_mask(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None = None,
                              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, 1, T, T) bool, True = may attend: causal, vision tokens bidirectional among
        themselves, padding keys masked. See the rules at the top of this section."""
        B, T = input_ids.shape
        if mm_token_type_ids is not None:
            is_vision = mm_token_type_ids == 1  # (B, T)
        else:
            is_vision = torch.isin(input_ids, torch.tensor(self.config.vision_token_ids, device=input_ids.device))
        causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()  # (T, T)
        mask = causal | (is_vision[:, :, None] & is_vision[:, None, :])  # (B, T, T)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, :]  # (B, T, T): padding keys
            # a left-padded query would see no key at all (NaN softmax): let every token see itself
            mask = mask | torch.eye(T, dtype=torch.bool, device=input_ids.device)
        return mask[:, None]  # (B, 1, T, T)

    # -- forward -------------------------------------------------------------------------------------

    def hidden_states(self, input_ids, pixel_values=None, image_token_pooling=None, image_grids=None,
                      image_num_crops=None, pixel_values_videos=None, video_token_pooling=None, video_grids=None,
                      attention_mask=None, mm_token_type_ids=None, position_ids=None, attn_mask=None, kv_cache=None,
                      response_mask=None):
        """The LLM's final-normed hidden states (B, T, C). Arguments as in forward. Under torch.compile and for
        fixed-shape batches the checks that read counts back to the host are skipped (host_checks)."""
        checks = self.host_checks()
        x = self.embed(input_ids)  # (B, T, C)
        if pixel_values is not None and pixel_values_videos is not None:
            raise ValueError("pixel_values and pixel_values_videos: pass a mixed batch's crops and frames together "
                             "as pixel_values, with 2x2 windows padded to 9 slots with -1 (as transformers, "
                             "the two streams are not merged)")
        if pixel_values is not None:
            crops = pixel_values.reshape(-1, *pixel_values.shape[-2:])  # (N, P, patch_dim)
            if image_token_pooling is None:
                raise ValueError("pixel_values given without image_token_pooling")
            if image_num_crops is not None and checks and int(image_num_crops.sum()) != crops.shape[0]:
                raise ValueError(f"image_num_crops: {int(image_num_crops.sum())} crops in all, but pixel_values "
                                 f"holds {crops.shape[0]}")
            # per image: low-res rows x cols + high-res rows x cols tokens
            num_tokens = None
            if image_grids is not None and checks:
                num_tokens = int((image_grids[:, :2].prod(-1) + image_grids[:, 2:].prod(-1)).sum())
            features = self.place(self.vision_features(crops, image_token_pooling), image_grids, "image")  # (M, C)
            x = self.add_vision_features(x, input_ids, features, num_tokens, "image")
        if pixel_values_videos is not None:
            if video_token_pooling is None:
                raise ValueError("pixel_values_videos given without video_token_pooling")
            # per video: frames x rows x cols tokens
            num_tokens = None if video_grids is None or not checks else int(video_grids.prod(-1).sum())
            features = self.place(self.vision_features(pixel_values_videos, video_token_pooling), video_grids,
                                  "video")  # (M, C)
            x = self.add_vision_features(x, input_ids, features, num_tokens, "video")
        if attn_mask is None and (kv_cache is None or kv_cache.pos == 0):
            attn_mask = self.vision_attention_mask(input_ids, mm_token_type_ids, attention_mask)
        # after cached tokens (decoding) the new tokens are text: causal over the keys attention_mask keeps
        return self.llm.run_layers(x, position_ids=position_ids, attn_mask=attn_mask, kv_cache=kv_cache,
                                   response_mask=response_mask, attention_mask=attention_mask)

    def place(self, features, grids, kind):
        """With the connector's position_bins (a from-scratch switch; connector.py): add each token's place in its
        image, which the grids give. Without it, the features as they are."""
        if not self.config.connector.position_bins:
            return features
        if grids is None:
            raise ValueError(f"{kind}_grids: this model embeds where each {kind} token sits (position_bins), "
                             "which the grids give")
        return features + self.connector.positions(token_centres(grids, features.shape[0])).to(features.dtype)

    def add_vision_features(self, x, input_ids, features, num_tokens, kind):
        """Add pooled features (M, C) to the embeddings x (B, T, C) at the <im_patch> tokens, in order;
        num_tokens is M as the grids count it (None: not given)."""
        is_patch = input_ids == self.config.image_patch_id  # (B, T)
        if self.host_checks():
            num_patches = int(is_patch.sum())
            if num_patches != features.shape[0] or (num_tokens is not None and num_tokens != num_patches):
                raise ValueError(f"{kind} inputs: {features.shape[0]} pooled features"
                                 + ("" if num_tokens is None else f" ({kind}_grids: {num_tokens})")
                                 + f" for {num_patches} <im_patch> tokens in input_ids")
        if features.shape[0] == 0:
            return x
        # the k-th <im_patch> of the batch (row-major) takes features[k]: a gather of static shape, where
        # indexing by torch.nonzero(is_patch) would have a data-dependent one (a torch.compile graph break)
        k = (is_patch.flatten().cumsum(0) - 1).clamp(min=0).view_as(is_patch)  # (B, T)
        return torch.where(is_patch[..., None], x + take_rows(features.to(x.dtype), k), x)  # (B, T, C)

    def forward(self, input_ids, pixel_values=None, image_token_pooling=None, image_grids=None,
                image_num_crops=None, pixel_values_videos=None, video_token_pooling=None, video_grids=None,
                attention_mask=None, mm_token_type_ids=None, position_ids=None, attn_mask=None,
                logits_positions=None, kv_cache=None, response_mask=None, targets=None, loss_weights=None,
                z_loss=0.0, target_positions=None):
        """Logits over the base vocabulary: (B, T, vocab), or (N, vocab) at the N True places of
        logits_positions (B, T) bool (full-vocabulary logits everywhere dominate the cost of a step).
        With targets (B, T) (-1 = no loss) and loss_weights (B, T): Molmo2's training loss instead, as
        (sum of weight * (CE + z_loss * logsumexp^2), sum of weight * CE) over the positions with a target,
        through the fused head (linear_cross_entropy): no logits are kept. target_positions (K,): within
        fixed_shape_batches, those positions of the flattened (B * T) rows, -1 = padding (training.pad_media).

        Takes what transformers' Molmo2Processor returns, under its names: input_ids (B, T); pixel_values
        (N, P, patch_dim), the crops of all images of the batch; image_token_pooling (M, 4) indices into
        their N * P patches (-1 = padding); image_grids (I, 4) and image_num_crops (I,) per image, used to
        check the rest; the same for a video (pixel_values_videos, video_token_pooling (M, 9), video_grids
        (V, 3)); attention_mask (B, T) 1 = token, 0 = padding ((B, cached + T) when decoding);
        mm_token_type_ids (B, T) 1 = vision token. position_ids (B, T) default 0..T-1; attn_mask (B, 1, T, S)
        bool replaces the built mask; response_mask (B, T) bool: the tokens that get Qwen3's response_dropout
        (training)."""
        h = self.hidden_states(input_ids, pixel_values, image_token_pooling, image_grids, image_num_crops,
                               pixel_values_videos, video_token_pooling, video_grids, attention_mask,
                               mm_token_type_ids, position_ids, attn_mask, kv_cache, response_mask)  # (B, T, C)
        if targets is not None:
            return self.loss_at_targets(h, targets, loss_weights, z_loss, target_positions)
        if logits_positions is not None:
            h = h[logits_positions]  # (N, C)
        return self.full_vocab(self.llm.lm_logits(h))

    def loss_at_targets(self, h, targets, loss_weights, z_loss, target_positions=None):
        """h (B, T, C), targets and loss_weights (B, T) -> linear_cross_entropy at the positions with a target
        (eagerly under torch.compile: ready_for_compile)."""
        has_target = targets >= 0  # (B, T)
        if self.fixed_shapes:  # no shape that depends on the data: weight 0 where there is no target
            h, targets, has_target, loss_weights = (t.flatten(0, 1) for t in (h, targets, has_target, loss_weights))
            if target_positions is not None:  # the positions pad_media listed on the host, padded with -1: the
                #   head and softmax over 151,936 logits then run on ~those rows, not on every padded position
                at = target_positions.clamp(min=0)
                h, targets, loss_weights = take_rows(h, at), targets[at], loss_weights[at]
                has_target = has_target[at] & (target_positions >= 0)
            rows = targets.clamp(min=0)
            rows = rows if self.config.token_ids is None else self.kept_rows(rows, "targets").clamp(min=0)
            weights = torch.where(has_target, loss_weights, 0.0)
            return linear_cross_entropy(h, self.llm.output_weight(), rows, weights, z_loss)
        at = has_target.flatten().nonzero().squeeze(1)  # (N,) the positions with a target: one host sync
        targets, loss_weights = targets.flatten()[at], loss_weights.flatten()[at]
        if self.config.token_ids is not None:
            targets = self.kept_rows(targets, "targets")
        return linear_cross_entropy(take_rows(h.flatten(0, 1), at), self.llm.output_weight(), targets, loss_weights,
                                    z_loss)

    def make_kv_cache(self, batch_size, max_len, device=None, dtype=None):
        return self.llm.make_kv_cache(batch_size, max_len, device, dtype)

    def decode_step(self, ids, position_ids, attn_mask, kv_cache):
        """One generated token per row, ids (B, 1) -> logits (B, 151936); no host sync (see DecodeStep).
        Generated ids are base-vocabulary text (logits never cover the extra tokens): no range check."""
        rows = ids if self.config.token_ids is None else self.kept_tables(ids.device)[0][ids]
        h = self.llm.run_layers(self.llm.embed_tokens(rows), position_ids, attn_mask, kv_cache)  # (B, 1, C)
        return self.full_vocab(self.llm.lm_logits(h[:, -1]))

    # -- training hooks ------------------------------------------------------------------------------

    def param_parts(self) -> dict:
        """{part: parameters} for per-part learning rates and freezing; the 128 new token embeddings train
        with the connector (both are new in Molmo2)."""
        return {"connector": list(self.connector.parameters()) + [self.new_embedding],
                "vit": list(self.vit.parameters()), "llm": list(self.llm.parameters())}

    def blocks(self) -> list:
        """The transformer blocks, ViT then LLM: FSDP shards them one by one."""
        return list(self.vit.layers) + list(self.llm.layers)

    def num_params(self, part=None) -> int:
        parts = self.param_parts()
        return sum(p.numel() for name in ([part] if part else parts) for p in parts[name])

    def training_flops(self, batch) -> float:
        """Matmul FLOPs of one training step on a collated batch: the LLM on every token (logits only at the loss
        positions), the ViT on every crop, the connector on every pooled token. A weight costs 2 FLOPs a token
        forward, 2 more for its gradient where its part trains, and 2 more for the gradient of the activations
        where its part or one before it (ViT -> connector -> LLM) trains: 6 (the usual 3 x forward) when all train;
        a frozen ViT 2, its backward never runs; a frozen LLM under a training connector 4. Attention's own
        matmuls: 2 a forward, 4 more wherever gradients flow through them."""
        c = self.config
        trains = {part: any(p.requires_grad for p in params) for part, params in self.param_parts().items()}
        weight, attention, flowing = {}, {}, False
        for part in ("vit", "connector", "llm"):  # the order the activations take
            flowing = flowing or trains[part]
            weight[part] = (2 + 2 * trains[part] + 2 * flowing) / 6  # of the 3 x forward counts below
            attention[part] = (2 + 4 * flowing) / 6
        B, T = batch["input_ids"].shape
        llm_attention = 12 * c.llm.num_hidden_layers * c.llm.num_attention_heads * c.llm.head_dim * T
        head = 6 * c.llm.hidden_size * c.llm.vocab_size  # per token: paid only at the loss positions
        llm_weights = self.llm.flops_per_token(T) - llm_attention - head
        n_loss = int((batch["targets"] >= 0).sum())
        flops = weight["llm"] * (llm_weights * B * T + head * n_loss) + attention["llm"] * llm_attention * B * T
        pixels = [batch[k] for k in ("pixel_values", "pixel_values_videos") if k in batch]
        if pixels:
            pad_crops, pad_windows = batch.get("media_padding", (0, 0))  # training.pad_media's: not counted
            n_crops = sum(p.shape[0] for p in pixels) - int(pad_crops)
            v = c.vit
            vit_block = 4 * v.hidden_size * v.num_attention_heads * v.head_dim + 2 * v.hidden_size * v.intermediate_size
            vit_weights = 6 * (v.patch_dim * v.hidden_size + v.num_hidden_layers * vit_block)
            vit_attention = 12 * v.num_hidden_layers * v.num_attention_heads * v.head_dim * v.num_patches
            n_pooled = sum(batch[k].shape[0] for k in ("image_token_pooling", "video_token_pooling") if k in batch)
            n_pooled -= int(pad_windows)
            flops += (weight["vit"] * vit_weights + attention["vit"] * vit_attention) * n_crops * v.num_patches
            flops += weight["connector"] * 6 * sum(p.numel() for p in self.connector.parameters()) * n_pooled
        return flops

    # -- checkpoints ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir: str, dtype=torch.float32) -> "Molmo2":
        """A Molmo2 checkpoint (hub id or local dir) in transformers' native layout or the released one
        (allenai/Molmo2-4B, -8B), with a Qwen3 LLM of any size."""
        path = resolve_checkpoint(name_or_dir)
        with open(os.path.join(path, "config.json")) as f:
            hf_config = json.load(f)
        config = molmo2_config_from_hf(hf_config, name_or_dir)
        tensors = load_checkpoint_tensors(path)
        if any(k.startswith("model.transformer.") for k in tensors):
            tensors = molmo2_released_to_native(tensors, config)
        with weights_not_drawn():
            model = cls(config)
        model.to_empty(device="cpu")
        load_state_strict(model, molmo2_native_to_ours(tensors, config), name_or_dir)
        return model.to(dtype)

    def save_pretrained(self, out_dir: str):
        """Write transformers' native Molmo2 layout (config.json + model.safetensors)."""
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            config = molmo2_config_to_hf(self.config)
            config["dtype"] = str(self.new_embedding.dtype).removeprefix("torch.")
            json.dump(config, f, indent=2)
        tensors = molmo2_ours_to_native(self.state_dict(), self.config)
        save_safetensors(tensors, os.path.join(out_dir, "model.safetensors"))


# ---------------------------------------------------------------------------
# Generation: batched prompts of different lengths (left-padded), a preallocated KV cache, greedy or
# temperature / top-k / top-p sampling, stop tokens, streaming through a callback.
# - The model builds its own prefill mask from the 2-D attention_mask (Molmo2: bidirectional among vision
#   tokens; Qwen3: causal), positions count real tokens only, so a left-padded prompt gets exactly the
#   positions and attention it would get alone.
# - Each new token is text: it attends to every real cached token and itself.
# - On CUDA each one-token step runs at fixed shapes, replayed as a CUDA graph (DecodeStep): a 0.6B model's
#   step is otherwise launch-bound. Eagerly (CPU, or static=False) a row that has stopped leaves the batch and
#   the KV cache, so short answers cost nothing while long ones finish.
# - Logits are computed for the last position only (at 152k entries per position they would dominate).
# ---------------------------------------------------------------------------


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next ids (B,). temperature 0 = greedy; top_k keeps the k largest logits, top_p the
    smallest set of most likely tokens whose probabilities reach p (the most likely one always stays)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # mass before a token already reaches p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def padded_position_ids(attention_mask):
    """attention_mask (B, S) 1 = real token, 0 = padding -> position_ids (B, S) counting real tokens from 0
    (0 on padding), as transformers' generate derives them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class DecodeStep:
    """The one-token step of generation at fixed shapes, so that a CUDA graph can replay it. Every row stays in
    the batch to the end (finished ones are ignored), the new tokens go into preallocated buffers, the KV cache
    is written at a device-side index (KVCache.write_index) and read whole under a key mask (B, 1, 1, max_len).
    On CUDA the step is captured once as a graph (after one eager warm-up run, where lazy initialisations
    happen) and replayed: one launch a token instead of ~1,000 kernel launches (a 0.6B model's decode step is
    launch-bound: 55 ms a token on an H200 eagerly, against a 0.3 ms memory-bandwidth floor). compile: the step
    goes through torch.compile first, which fuses its ~1,400 small kernels (norms, RoPE, casts) into a few
    hundred; it compiles again for each new batch size and cache length."""

    def __init__(self, model, kv_cache, attention_mask, cuda_graph, compile=False):
        B, T = attention_mask.shape
        device = attention_mask.device
        self.kv_cache, self.cuda_graph, self.graph = kv_cache, cuda_graph, None
        if compile:
            ready_for_compile()
        # At batch 1, coordinate_descent_tuning also makes inductor write each one-row matmul as a Triton reduction
        # fused with the norms and activations around it (on a GPU), and the attention is written out
        # (one_token_attention): on an H200 1.82 ms a token against 2.75 with cuBLAS's and cuDNN's kernels. At
        # batch 16 the tuning measured 4,546-4,562 new tokens/s against 5,286 without it (another machine), so
        # larger batches compile as before (BENCHMARKS.md "Decoding at batch 1 as fused reductions")
        options = {"coordinate_descent_tuning": True} if B == 1 else None
        self.step = (torch.compile(model.decode_step, fullgraph=True, dynamic=False, options=options) if compile
                     else model.decode_step)
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        # (B, 1, 1, max_len): the prompt's real tokens; each new token's slot is opened as it is written
        self.key_mask = F.pad(attention_mask.bool(), (0, kv_cache.max_len - T))[:, None, None]
        kv_cache.write_index = torch.zeros(1, dtype=torch.long, device=device)

    def run(self):
        # the step writes at write_index and reads no pos, but torch.compile guards on the attribute's value: each
        # run sees pos 0, or a step run every token (compile without a CUDA graph, on a CPU) would recompile every
        # token until dynamo's recompile limit stops it
        pos, self.kv_cache.pos = self.kv_cache.pos, 0
        logits = self.step(self.ids, self.position_ids, self.key_mask, self.kv_cache)  # (B, V)
        self.kv_cache.pos = pos  # (run_layers moved it on)
        return logits

    def __call__(self, ids, position_ids):
        """ids, position_ids (B,) of the newest tokens -> logits (B, V) for the next ones."""
        slot = self.kv_cache.pos
        self.ids.copy_(ids[:, None])
        self.position_ids.copy_(position_ids[:, None])
        self.key_mask[..., slot] = True
        self.kv_cache.write_index.fill_(slot)
        if not self.cuda_graph:
            logits = self.run()
        else:
            if self.graph is None:
                side = torch.cuda.Stream()  # warm-up off the default stream, as torch.cuda.graphs asks
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self.run()  # writes this step's keys and values: the replay writes the same ones
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.logits = self.run()  # (B, V), a buffer each replay overwrites
            self.graph.replay()
            logits = self.logits
        self.kv_cache.pos = slot + 1
        return logits


STOP_CHECK_EVERY = 8  # static decoding reads "has every row stopped?" back every this many tokens (see generate)


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, attention_mask=None, temperature=0.0, top_k=None, top_p=None,
             stop_ids=(151645, 151643), on_token=None, generator=None, static=None, compile=False, **prefill_inputs):
    """Generate up to max_new_tokens after the left-padded prompts input_ids (B, T).

    `model(input_ids, position_ids=, attention_mask=, kv_cache=, logits_positions=, **prefill_inputs)` must
    return logits at logits_positions; extra inputs (pixels, mm_token_type_ids for Molmo2) go to the prefill
    only. attention_mask (B, T): 1 = token, 0 = left padding (default all ones). A row that produced a stop
    id is finished, and its output is padded with stop_ids[0]. `on_token(step, ids (B,))` is called as tokens
    come (streaming). Returns the new tokens (B, n), n <= max_new_tokens (fewer when every row stopped).
    static: decode through DecodeStep (fixed shapes, replayed as a CUDA graph on CUDA outside autocast;
    default on CUDA): finished rows stay in the batch, and whether all have stopped is read back every
    STOP_CHECK_EVERY tokens (every token with on_token); else finished rows leave the batch and the KV cache,
    and each step runs eagerly at its own shapes. Greedy tokens are the same either way; sampled ones draw
    the random numbers in another order. compile: the prefill's LLM blocks (Qwen3.compiled_blocks) and the static
    step (see DecodeStep) through torch.compile."""
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    if not bool(attention_mask[:, -1].all()):
        rows = torch.nonzero(attention_mask[:, -1] == 0).flatten().tolist()
        raise ValueError(f"attention_mask: rows {rows} end in padding; prompts must be left-padded")
    attention_mask = attention_mask.long()
    kv_cache = model.make_kv_cache(B, T + max_new_tokens)
    position_ids = padded_position_ids(attention_mask)  # (B, T)
    last = torch.zeros(B, T, dtype=torch.bool, device=device)
    last[:, -1] = True
    llm = model.llm if isinstance(model, Molmo2) else model
    with llm.compiled_blocks() if compile else contextlib.nullcontext():
        logits = model(input_ids, position_ids=position_ids, attention_mask=attention_mask, kv_cache=kv_cache,
                       logits_positions=last, **prefill_inputs)  # (B, V)
    next_pos = position_ids[:, -1] + 1  # (B,)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    pad = stop_ids[0] if len(stop_ids) else 0
    out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    if static is None:
        static = device.type == "cuda"
    if static:  # a CUDA graph captured under autocast would read weight casts that autocast frees afterwards
        graph = device.type == "cuda" and not torch.is_autocast_enabled("cuda")
        decode = DecodeStep(model, kv_cache, attention_mask, graph, compile)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
    active = torch.arange(B, device=device)  # the rows still generating, in the order the cache holds them
    n_steps = 0
    for step in range(max_new_tokens):
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)  # (A,)
        n_steps = step + 1
        if static:
            out[:, step] = next_ids.masked_fill(finished, pad)
            finished |= torch.isin(next_ids, stop)
            # reading the flag back makes the host wait for the device; between reads it queues the next steps
            # (graph replays) while the device still runs the last ones. A step past the end only writes padding
            check = on_token is not None or step % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1
            all_done = check and bool(finished.all())
        else:
            out[active, step] = next_ids
            running = ~torch.isin(next_ids, stop)  # (A,)
            if not running.all():  # finished rows leave the batch
                active, next_ids, next_pos = active[running], next_ids[running], next_pos[running]
                attention_mask = attention_mask[running]
                kv_cache.keep_rows(running)
            all_done = len(active) == 0
        if on_token is not None:
            on_token(step, out[:, step])
        if all_done or step == max_new_tokens - 1:
            break
        if static:
            logits = decode(next_ids, next_pos)  # (B, V)
        else:
            one = torch.ones(len(active), 1, dtype=torch.long, device=device)
            attention_mask = torch.cat([attention_mask, one], dim=1)  # (A, S): the new token is real
            logits = model(next_ids[:, None], position_ids=next_pos[:, None], attention_mask=attention_mask,
                           kv_cache=kv_cache, logits_positions=one.bool())  # (A, V)
        next_pos = next_pos + 1
    if static and len(stop_ids):  # end where the last row stopped, as if the flag had been read every step
        is_stop = torch.isin(out[:, :n_steps], stop)  # (B, n): a finished row holds stop ids from its stop on
        if bool(is_stop.any(1).all()):
            n_steps = int(is_stop.int().argmax(1).max()) + 1
    return out[:, :n_steps]

# ---------------------------------------------------------------------------
# Checkpoint I/O: safetensors by hand (8-byte header length, JSON header, raw little-endian bytes),
# so the runtime needs no extra package; the hub; SigLIP2's files; then the name maps
# ---------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def load_safetensors(path):
    """Read a .safetensors file -> {name: tensor}: CPU tensors viewing one copy-on-write map of the file, so its pages
    are read once, as the tensors are first used, and writing to a tensor never reaches the file. The full preset's
    4.6 GB checkpoint loads into its model in 2.3 s on this project's 2-core machine, where one read() into a buffer
    and its copy took 17-19 s (BENCHMARKS.md "A script's start")."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"checkpoint '{path}': too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"checkpoint '{path}': unreadable safetensors header ({e})") from None
        start, size = 8 + header_len, os.fstat(f.fileno()).st_size
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > start else None
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"checkpoint '{path}': tensor {name} has unsupported dtype {info['dtype']}")
        dtype = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        if start + end > size:
            raise ValueError(f"checkpoint '{path}': tensor {name} runs past the end of the file (truncated?)")
        if end == begin:
            t = torch.empty(0, dtype=dtype)
        else:
            t = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=start + begin).view(dtype)
        tensors[name] = t.reshape(info["shape"])
    return tensors


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as .safetensors, atomically (a crash never leaves a half-written file). The header needs
    only shapes and dtypes; each tensor's bytes then go to the file from its own CPU copy, one tensor at a time."""
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = metadata or {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)


def resolve_checkpoint(name_or_dir):
    """A local directory as is; otherwise a hub id (e.g. 'Qwen/Qwen3-0.6B') downloaded via huggingface_hub."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if os.path.exists(name_or_dir):
        raise ValueError(f"checkpoint '{name_or_dir}': expected a directory with config.json, got a file")
    if name_or_dir.count("/") != 1:
        raise FileNotFoundError(f"checkpoint '{name_or_dir}': no such directory, and not a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name_or_dir, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.py"])
    except Exception as e:
        raise RuntimeError(f"checkpoint '{name_or_dir}': not a local directory and could not be downloaded "
                           f"from the Hugging Face Hub ({type(e).__name__}: {e})") from None


def load_checkpoint_tensors(ckpt_dir):
    """All tensors of an HF checkpoint directory: model.safetensors or a sharded index."""
    single = os.path.join(ckpt_dir, "model.safetensors")
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_safetensors(single)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(load_safetensors(os.path.join(ckpt_dir, shard)))
        return tensors
    raise FileNotFoundError(f"checkpoint '{ckpt_dir}': no model.safetensors or model.safetensors.index.json")


@contextlib.contextmanager
def weights_not_drawn():
    """Build modules here for weights about to be loaded: on the meta device (no memory), and without drawing
    their initial values. Drawing them would be work thrown away, and PyTorch's random draws on meta tensors
    (normal_, randn) import torch._dynamo, ~2 s of sample.py's start on a 2-core machine. The two init functions
    our modules and nn.Embedding draw with are no-ops inside (as transformers' no_init_weights does)."""
    drawn = torch.nn.init.normal_, torch.nn.init.trunc_normal_
    torch.nn.init.normal_ = torch.nn.init.trunc_normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.nn.init.normal_, torch.nn.init.trunc_normal_ = drawn


def load_state_strict(module, state, source):
    """Copy `state` into `module`, naming every missing or unexpected tensor and every shape mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if wrong_shape:
        problems.append(f"wrong shapes {wrong_shape}")
    if problems:
        raise ValueError(f"checkpoint '{source}': " + "; ".join(problems))
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k])


def load_siglip(name_or_dir: str, num_layers: int | None = None, dtype=torch.float32) -> SigLIP2:
    """SigLIP2 from a hub id or a local dir in HF `SiglipVisionModel` or `SiglipModel` layout
    (e.g. google/siglip2-so400m-patch14-384). `num_layers` keeps only the first blocks."""
    path = resolve_checkpoint(name_or_dir)
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    hf = hf.get("vision_config", hf)  # SiglipModel nests the vision tower's config
    config = siglip_config_from_hf(hf)
    if num_layers is not None:
        if not 0 < num_layers <= config.num_hidden_layers:
            raise ValueError(f"{name_or_dir}: num_layers={num_layers}, the checkpoint has {config.num_hidden_layers}")
        config.num_hidden_layers = num_layers
    with weights_not_drawn():
        vit = SigLIP2(config)
    vit.to_empty(device="cpu")
    state = siglip_state_dict_from_hf(load_checkpoint_tensors(path), config)
    load_state_strict(vit, state, name_or_dir)
    return vit.to(dtype)


def save_siglip(vit: SigLIP2, out_dir: str):
    """Write a ViT as transformers' `SiglipVisionModel` (config.json + model.safetensors): the layout that
    `load_siglip`, `train_align.py --vit_from=` and transformers all read. It has no attention-pooling
    head, and its post_layernorm is a fresh one (gain 1, bias 0; ours has none): Molmo2 reads the block outputs,
    transformers' hidden_states, which come before it, so its last_hidden_state is not one of them."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(siglip_config_to_hf(vit.config), f, indent=2)
    save_safetensors(siglip_state_dict_to_hf(vit.state_dict(), vit.config), os.path.join(out_dir, "model.safetensors"))


# Our parameter names -> transformers' native Molmo2 names, by prefix. The Qwen3 and ViT blocks already
# carry transformers' names inside; the extra embeddings are rows 151936.. of the native embed_tokens.
MOLMO2_NATIVE_PREFIXES = [
    ("vit.", "model.vision_tower."),
    ("connector.pooling.", "model.multi_modal_projector.image_pooling_2d."),
    ("connector.projector.", "model.multi_modal_projector.image_projector."),
    ("connector.norm.", "model.multi_modal_projector.projector_norm."),  # ours alone (projector_norm)
    ("connector.position_", "model.multi_modal_projector.position_"),  # ours alone (position_bins)
    ("llm.lm_head.", "lm_head."),
    ("llm.", "model.language_model."),
]


def molmo2_ours_to_native(state: dict, config: Molmo2Config) -> dict:
    native = {}
    for key, value in state.items():
        if key == "new_embedding":
            continue
        for ours, theirs in MOLMO2_NATIVE_PREFIXES:
            if key.startswith(ours):
                native[theirs + key[len(ours):]] = value
                break
    embed = native["model.language_model.embed_tokens.weight"]
    native["model.language_model.embed_tokens.weight"] = torch.cat([embed, state["new_embedding"]])
    if "lm_head.weight" not in native:  # tied Qwen3 (0.6B): transformers' Molmo2 always has its own head
        native["lm_head.weight"] = embed
    return {k: v.contiguous() for k, v in native.items()}


def molmo2_native_to_ours(native: dict, config: Molmo2Config) -> dict:
    state = {}
    for key, value in native.items():
        if key.startswith("model.vision_tower.layers.") and int(key.split(".")[3]) >= config.vit.num_hidden_layers:
            continue  # blocks after the deepest one the connector reads
        if key == "model.language_model.embed_tokens.weight":
            state["llm.embed_tokens.weight"] = value[: config.llm.vocab_size]
            state["new_embedding"] = value[config.llm.vocab_size:]
            continue
        if key == "lm_head.weight" and config.llm.tie_word_embeddings:
            continue  # a copy of the tied embedding (written so transformers can load it)
        for ours, theirs in MOLMO2_NATIVE_PREFIXES:
            if key.startswith(theirs):
                state[ours + key[len(theirs):]] = value
                break
        else:
            raise ValueError(f"Molmo2 checkpoint: unexpected tensor {key!r}")
    return state


# The released checkpoints' names (Molmo2's own code) -> transformers' native names, applied in order
# after the fused tensors are split (same renames as transformers' conversion_mapping for "molmo2").
MOLMO2_RELEASED_RENAMES = [
    ("model.transformer.blocks.", "model.language_model.layers."),
    ("model.transformer.ln_f.", "model.language_model.norm."),
    (".attn_norm.", ".input_layernorm."),
    (".ff_norm.", ".post_attention_layernorm."),
    (".self_attn.attn_out.", ".self_attn.o_proj."),
    (".mlp.ff_out.", ".mlp.down_proj."),
    ("model.vision_backbone.image_vit.transformer.resblocks.", "model.vision_tower.layers."),
    ("model.vision_backbone.image_vit.", "model.vision_tower."),
    (".attention.wq.", ".self_attn.q_proj."),
    (".attention.wk.", ".self_attn.k_proj."),
    (".attention.wv.", ".self_attn.v_proj."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".attention_norm.", ".layer_norm1."),
    (".ffn_norm.", ".layer_norm2."),
    (".feed_forward.w1.", ".mlp.fc1."),
    (".feed_forward.w2.", ".mlp.fc2."),
    ("model.vision_backbone.image_pooling_2d.wq.", "model.multi_modal_projector.image_pooling_2d.q_proj."),
    ("model.vision_backbone.image_pooling_2d.wk.", "model.multi_modal_projector.image_pooling_2d.k_proj."),
    ("model.vision_backbone.image_pooling_2d.wv.", "model.multi_modal_projector.image_pooling_2d.v_proj."),
    ("model.vision_backbone.image_pooling_2d.wo.", "model.multi_modal_projector.image_pooling_2d.o_proj."),
    ("model.vision_backbone.image_projector.w1.", "model.multi_modal_projector.image_projector.gate_proj."),
    ("model.vision_backbone.image_projector.w2.", "model.multi_modal_projector.image_projector.down_proj."),
    ("model.vision_backbone.image_projector.w3.", "model.multi_modal_projector.image_projector.up_proj."),
]


def molmo2_released_to_native(released: dict, config: Molmo2Config) -> dict:
    llm = config.llm
    q_rows, kv_rows = llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim
    native = {}
    for key, value in released.items():
        if key == "model.transformer.wte.embedding":
            new_rows = released["model.transformer.wte.new_embedding"]
            native["model.language_model.embed_tokens.weight"] = torch.cat([value, new_rows])
            continue
        if key == "model.transformer.wte.new_embedding":
            continue
        if key.endswith(".self_attn.att_proj.weight"):  # fused q, k, v rows
            q, k, v = value.split([q_rows, kv_rows, kv_rows])
            fused = {"q_proj": q, "k_proj": k, "v_proj": v}
        elif key.endswith(".mlp.ff_proj.weight"):  # fused up then gate rows
            up, gate = value.chunk(2)
            fused = {"up_proj": up, "gate_proj": gate}
        else:
            fused = None
        if fused is not None:
            stem = key.rsplit(".", 2)[0]  # ...blocks.N.self_attn / ...blocks.N.mlp
            for name, part in fused.items():
                native.update(rename_released({f"{stem}.{name}.weight": part}))
        else:
            native.update(rename_released({key: value}))
    return native


def rename_released(tensors: dict) -> dict:
    renamed = {}
    for key, value in tensors.items():
        for old, new in MOLMO2_RELEASED_RENAMES:
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def molmo2_config_from_hf(hf: dict, source: str) -> Molmo2Config:
    """config.json of transformers' Molmo2 (vision_config / adapter_config / text_config) or of the released
    checkpoints (vit_config, vit_layers, image_default_input_size, ...) -> Molmo2Config."""
    text, adapter = hf["text_config"], hf["adapter_config"]
    vision = hf.get("vision_config") or hf["vit_config"]
    unsupported = {"qk_norm_type": (text.get("qk_norm_type", "qwen3"), "qwen3"),
                   "norm_after": (text.get("norm_after", False), False),
                   "attention bias": (text.get("attention_bias", text.get("qkv_bias", False)), False),
                   "rope scaling": ("scaled" if text.get("rope_scaling") else "default", "default")}
    for what, (got, want) in unsupported.items():
        if got != want:
            raise ValueError(f"{source}: text_config {what} = {got!r}; only Qwen3 LLMs ({want!r}) are supported")
    # released configs name the norm epsilon layer_norm_eps; Molmo2's head is untied unless we wrote it
    llm = Qwen3Config.from_hf({"rms_norm_eps": text.get("layer_norm_eps", 1e-6), "tie_word_embeddings": False, **text})
    image_size = vision.get("image_size", vision.get("image_default_input_size", [378, 378]))
    if vision.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh" or image_size[0] != image_size[1]:
        raise ValueError(f"{source}: vision config {vision} is not a SigLIP2 on square crops")
    vit = SigLIP2Config(
        hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
        num_hidden_layers=vision["num_hidden_layers"], num_attention_heads=vision["num_attention_heads"],
        head_dim=vision["head_dim"], patch_size=vision.get("patch_size", vision.get("image_patch_size", 14)),
        image_size=image_size[0], layer_norm_eps=vision.get("layer_norm_eps", 1e-6))
    connector = ConnectorConfig(
        vit_layers=tuple(adapter.get("vision_feature_layer", adapter.get("vit_layers", [24, 18]))),
        vit_hidden_size=vit.hidden_size, hidden_size=adapter["hidden_size"],
        num_attention_heads=adapter["num_attention_heads"], head_dim=adapter["head_dim"],
        intermediate_size=adapter["intermediate_size"], llm_hidden_size=adapter["text_hidden_size"],
        projector_norm=bool(adapter.get("projector_norm", False)),  # ours alone writes these two (from-scratch
        position_bins=int(adapter.get("position_bins", 0)))  # switches)
    token_ids = hf.get("token_ids")  # written by save_pretrained for a model with kept tokens
    return Molmo2Config(llm=llm, vit=vit, connector=connector,
                        additional_vocab_size=text.get("additional_vocab_size", 128),
                        image_patch_id=hf.get("image_patch_id", 151938),
                        token_ids=None if token_ids is None else tuple(token_ids))


def molmo2_config_to_hf(config: Molmo2Config) -> dict:
    """Molmo2Config -> config.json for transformers' Molmo2ForConditionalGeneration."""
    llm, vit, connector = config.llm, config.vit, config.connector
    kept = {} if config.token_ids is None else {"token_ids": list(config.token_ids)}  # ours alone reads it
    return {
        **kept,
        "architectures": ["Molmo2ForConditionalGeneration"],
        "model_type": "molmo2",
        "image_patch_id": config.image_patch_id,
        "tie_word_embeddings": False,  # transformers' Molmo2 head is never tied; see text_config
        "text_config": {
            "model_type": "molmo2_text", "vocab_size": llm.vocab_size,
            "additional_vocab_size": config.additional_vocab_size, "hidden_size": llm.hidden_size,
            "intermediate_size": llm.intermediate_size, "num_hidden_layers": llm.num_hidden_layers,
            "num_attention_heads": llm.num_attention_heads, "num_key_value_heads": llm.num_key_value_heads,
            "head_dim": llm.head_dim, "rms_norm_eps": llm.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": llm.rope_theta},
            "max_position_embeddings": llm.max_position_embeddings, "qk_norm_type": "qwen3",
            "attention_bias": False, "norm_after": False, "hidden_act": "silu",
            # transformers ignores this (its head is always a separate tensor, written below); we read it
            # back to re-tie Qwen3-0.6B's head
            "tie_word_embeddings": llm.tie_word_embeddings,
        },
        "vision_config": {
            "model_type": "molmo2_vision", "hidden_size": vit.hidden_size,
            "intermediate_size": vit.intermediate_size, "num_hidden_layers": vit.num_hidden_layers,
            "num_attention_heads": vit.num_attention_heads, "num_key_value_heads": vit.num_attention_heads,
            "head_dim": vit.head_dim, "patch_size": vit.patch_size, "image_size": [vit.image_size, vit.image_size],
            "num_position_embeddings": vit.num_patches, "layer_norm_eps": vit.layer_norm_eps,
            "hidden_act": "gelu_pytorch_tanh", "attention_bias": True,
        },
        "adapter_config": {
            "model_type": "molmo2_adapter", "vision_feature_layer": list(connector.vit_layers),
            "hidden_size": connector.hidden_size, "num_attention_heads": connector.num_attention_heads,
            "num_key_value_heads": connector.num_attention_heads, "head_dim": connector.head_dim,
            "intermediate_size": connector.intermediate_size, "text_hidden_size": connector.llm_hidden_size,
            "hidden_act": "silu", "attention_bias": True, "mlp_bias": False,
            # not Molmo2's: written only when on, so a Molmo2 config stays exactly transformers'
            **({"projector_norm": True} if connector.projector_norm else {}),
            **({"position_bins": connector.position_bins} if connector.position_bins else {}),
        },
    }
