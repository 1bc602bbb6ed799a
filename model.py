"""
The language model, written out by hand: Qwen3, and (further down) Molmo2, which joins vision.py's ViT and
connector.py's adapter to it.

Qwen3 design choices (all as in the released Qwen3 checkpoints):
- pre-norm decoder blocks, RMSNorm computed in float32, no biases anywhere
- grouped-query attention (16 query heads share 8 key/value heads in 0.6B) with a per-head RMSNorm on q
  and k (over head_dim, before RoPE), run through F.scaled_dot_product_attention
- rotary position embeddings, half-split ("rotate_half") layout, theta from the config
- SwiGLU MLP: down(silu(gate(x)) * up(x))
- tied input/output embeddings for the small models
Module names equal the Hugging Face names (minus the leading "model."), so loading a checkpoint is a
rename table a reader can check at a glance.

Masks: `attn_mask=None` means plain causal attention and never builds a T x T mask (SDPA's is_causal).
An explicit boolean `attn_mask` (B, 1, T, S), True = may attend, is how Molmo2 expresses bidirectional
vision tokens, packed examples and message trees.
"""

import json
import math
import os
import struct
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------------
# Checkpoint files: safetensors by hand (8-byte header length, JSON header, raw little-endian bytes),
# so the runtime needs no extra package.
# ---------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def load_safetensors(path):
    """Read a .safetensors file -> {name: tensor} (CPU tensors viewing one buffer)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"checkpoint '{path}': too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"checkpoint '{path}': unreadable safetensors header ({e})") from None
        buf = bytearray(f.read())
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"checkpoint '{path}': tensor {name} has unsupported dtype {info['dtype']}")
        dtype = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        if end > len(buf):
            raise ValueError(f"checkpoint '{path}': tensor {name} runs past the end of the file (truncated?)")
        if end == begin:
            t = torch.empty(0, dtype=dtype)
        else:
            t = torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=begin).view(dtype)
        tensors[name] = t.reshape(info["shape"])
    return tensors


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as .safetensors, atomically (a crash never leaves a half-written file)."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = metadata or {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
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
            "small": Qwen3Config(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=64),
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
    same position `pos`; rows of different lengths are left-padded and masked by the caller."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.pos = 0  # tokens written so far
        self.max_len = max_len

    def update(self, layer, k, v):
        """Write k, v (B, n_kv, T, hd) at pos; return all keys/values so far (B, n_kv, pos+T, hd)."""
        T = k.size(2)
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens > max_len {self.max_len}")
        self.k[layer][:, :, self.pos:self.pos + T] = k
        self.v[layer][:, :, self.pos:self.pos + T] = v
        return self.k[layer][:, :, :self.pos + T], self.v[layer][:, :, :self.pos + T]


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
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
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, past+T, hd)
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        elif past == 0 or T == 1:
            # no cache (or an empty one): causal; one new token after a cache: it may see everything cached
            y = F.scaled_dot_product_attention(q, k, v, is_causal=(T > 1), enable_gqa=True)
        else:
            # a chunk of T new tokens after `past` cached ones (SDPA's is_causal would align top-left)
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def residual_dropout(branch, keep_prob):
    """Dropout with a per-token keep probability keep_prob (B, T, 1), or None for none."""
    if keep_prob is None:
        return branch
    return branch * torch.bernoulli(keep_prob.expand_as(branch)) / keep_prob


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
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
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward (saves activation memory)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def run_layers(self, x, position_ids=None, attn_mask=None, kv_cache=None, response_mask=None):
        """Input embeddings x (B, T, C) -> final-normed hidden states (B, T, C).
        response_mask (B, T) bool marks the tokens that get `response_dropout` instead of `resid_dropout`."""
        B, T, _ = x.shape
        if position_ids is None:
            start = kv_cache.pos if kv_cache is not None else 0
            position_ids = torch.arange(start, start + T, device=x.device).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        keep_prob = None
        c = self.config
        if self.training and (c.resid_dropout > 0 or c.response_dropout > 0):
            keep_prob = torch.full((B, T, 1), 1.0 - c.resid_dropout, device=x.device, dtype=x.dtype)
            if response_mask is not None:
                keep_prob[response_mask] = 1.0 - c.response_dropout
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                # the dropout draw is recomputed too: checkpoint restores the RNG state (preserve_rng_state)
                x = checkpoint(block, x, cos, sin, attn_mask, kv_cache, keep_prob, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_mask, kv_cache, keep_prob)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.norm(x)

    def lm_logits(self, h):
        """(..., C) -> (..., vocab). Call it only where logits are needed: at 152k entries per position it
        dominates the cost of small models."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight)

    def forward(self, input_ids, position_ids=None, attn_mask=None, kv_cache=None):
        """input_ids (B, T) -> logits (B, T, vocab)."""
        return self.lm_logits(self.run_layers(self.embed_tokens(input_ids), position_ids, attn_mask, kv_cache))

    def make_kv_cache(self, batch_size, max_len, device=None, dtype=None):
        w = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, device or w.device, dtype or w.dtype)

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
        with torch.device("meta"):
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
# Generation: batched prompts of different lengths (left-padded), a preallocated KV cache, greedy or
# temperature / top-k / top-p sampling, stop tokens, streaming through a callback.
# ---------------------------------------------------------------------------


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next ids (B,). temperature 0 = greedy."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def padded_positions_and_mask(attention_mask):
    """attention_mask (B, S) 1 = real token, left padding = 0 -> position_ids (B, S) counting real tokens
    from 0, and the key-padding part of a mask, (B, 1, 1, S) bool."""
    attention_mask = attention_mask.bool()
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return position_ids, attention_mask[:, None, None, :]


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, attention_mask=None, temperature=0.0, top_k=None, top_p=None,
             stop_ids=(151645, 151643), on_token=None, generator=None, **prefill_inputs):
    """Generate up to max_new_tokens after the (left-padded) prompts input_ids (B, T).

    `model(input_ids, position_ids=, attn_mask=, kv_cache=, **prefill_inputs)` must return logits; extra
    inputs (pixels for Molmo2) go to the prefill only. Rows that produced a stop id are finished and keep
    emitting padding. `on_token(step, ids (B,))` is called as tokens come (streaming).
    Returns the new tokens (B, n) with stop ids kept and padding (stop_ids[0]) after them."""
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    kv_cache = model.make_kv_cache(B, T + max_new_tokens)
    position_ids, key_mask = padded_positions_and_mask(attention_mask)
    if attention_mask.all():
        attn_mask = None  # plain causal
    else:
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        attn_mask = causal[None, None] & key_mask  # (B, 1, T, T)
        attn_mask = attn_mask | torch.eye(T, dtype=torch.bool, device=device)  # padding rows see themselves
    logits = model(input_ids, position_ids=position_ids, attn_mask=attn_mask, kv_cache=kv_cache, **prefill_inputs)
    next_pos = position_ids[:, -1:] + 1  # (B, 1)
    key_valid = attention_mask.bool()
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    pad_id = stop_ids[0] if len(stop_ids) else 0
    out = []
    for step in range(max_new_tokens):
        next_ids = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
        next_ids = torch.where(finished, pad_id, next_ids)
        out.append(next_ids)
        if on_token is not None:
            on_token(step, next_ids)
        finished |= torch.isin(next_ids, stop)
        if finished.all() or step == max_new_tokens - 1:
            break
        key_valid = torch.cat([key_valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        step_mask = None if key_valid.all() else key_valid[:, None, None, :]  # (B, 1, 1, S)
        logits = model(next_ids[:, None], position_ids=next_pos, attn_mask=step_mask, kv_cache=kv_cache)
        next_pos = next_pos + 1
    return torch.stack(out, dim=1)
