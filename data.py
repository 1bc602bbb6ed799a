"""
Everything between raw inputs and the model's tensors.

1. The Qwen3 tokenizer, on tiktoken: Qwen's byte-level BPE ranks (shipped in assets/, checked by
   sha256), Qwen's pre-tokenizer regex, NFC normalisation, Qwen3's special tokens at 151643..151668 and
   Molmo2's vision tokens at 151936..151945.
2. Images and video -> pixels, pooling indices and token strings (Molmo2's processor).
3. Training data: records, points, the mixture, dataset readers, the synthetic world.
4. Training examples: formatting, loss weights, message trees, packing, collation.
"""

import hashlib
import os
import unicodedata

import tiktoken

# ---------------------------------------------------------------------------
# 1. Tokenizer
# ---------------------------------------------------------------------------

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
QWEN_RANKS_PATH = os.path.join(ASSETS_DIR, "qwen.tiktoken")
# sha256 of the 151,643 Qwen BPE ranks (the vocabulary shared by Qwen2, Qwen2.5 and Qwen3)
QWEN_RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
QWEN_NUM_RANKS = 151643

# Qwen's pre-tokenizer: like GPT-4's, but digits are split one by one (\p{N}, not \p{N}{1,3}).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3's added tokens, in id order from 151643.
QWEN3_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
]
# Molmo2's tokens: the first of the 128 extra embeddings beyond Qwen3's 151,936-row table.
MOLMO2_SPECIAL_TOKENS = [
    "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>", "<|image|>", "<im_low>",
    "<frame_start>", "<frame_end>", "<|video|>",
]
MOLMO2_FIRST_ID = 151936
SPECIAL_TOKENS = {tok: QWEN_NUM_RANKS + i for i, tok in enumerate(QWEN3_SPECIAL_TOKENS)}
SPECIAL_TOKENS.update({tok: MOLMO2_FIRST_ID + i for i, tok in enumerate(MOLMO2_SPECIAL_TOKENS)})

ENDOFTEXT_ID = SPECIAL_TOKENS["<|endoftext|>"]  # 151643
IM_START_ID = SPECIAL_TOKENS["<|im_start|>"]  # 151644: chat turn start
IM_END_ID = SPECIAL_TOKENS["<|im_end|>"]  # 151645: chat turn end, also Molmo2's BOS for Qwen
IMAGE_START_ID = SPECIAL_TOKENS["<im_start>"]  # 151936
IMAGE_END_ID = SPECIAL_TOKENS["<im_end>"]  # 151937
IMAGE_PATCH_ID = SPECIAL_TOKENS["<im_patch>"]  # 151938
IMAGE_COL_ID = SPECIAL_TOKENS["<im_col>"]  # 151939
IMAGE_LOW_RES_START_ID = SPECIAL_TOKENS["<low_res_im_start>"]  # 151940
IMAGE_PLACEHOLDER_ID = SPECIAL_TOKENS["<|image|>"]  # 151941
IMAGE_LOW_ID = SPECIAL_TOKENS["<im_low>"]  # 151942
FRAME_START_ID = SPECIAL_TOKENS["<frame_start>"]  # 151943
FRAME_END_ID = SPECIAL_TOKENS["<frame_end>"]  # 151944
VIDEO_PLACEHOLDER_ID = SPECIAL_TOKENS["<|video|>"]  # 151945


def load_qwen_ranks(path=QWEN_RANKS_PATH, sha256=QWEN_RANKS_SHA256):
    """Read a tiktoken rank file ('base64(token) rank' per line) after checking its checksum."""
    with open(path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ValueError(f"tokenizer ranks '{path}': sha256 {digest}, expected {sha256} (corrupt or wrong file)")
    import base64
    ranks = {}
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line:
            continue
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != QWEN_NUM_RANKS:
        raise ValueError(f"tokenizer ranks '{path}': {len(ranks)} tokens, expected {QWEN_NUM_RANKS}")
    return ranks


class Tokenizer:
    """The Qwen3 tokenizer (+ Molmo2's tokens) on tiktoken. Same ids as transformers' Qwen2Tokenizer."""

    def __init__(self, ranks_path=QWEN_RANKS_PATH):
        self.enc = tiktoken.Encoding(
            name="qwen3",
            pat_str=QWEN_PATTERN,
            mergeable_ranks=load_qwen_ranks(ranks_path),
            special_tokens=SPECIAL_TOKENS,
        )
        self.special_tokens = dict(SPECIAL_TOKENS)
        self._special_ids = set(SPECIAL_TOKENS.values())
        self.eos_id = IM_END_ID  # chat models end their turn with <|im_end|>
        self.bos_id = IM_END_ID  # Qwen has no BOS; Molmo2 puts <|im_end|> first
        self.pad_id = ENDOFTEXT_ID

    @property
    def vocab_size(self):  # ids in use (the embedding table is larger: 151936 + 128)
        return self.enc.n_vocab

    def encode(self, text, allow_special=True):
        """text -> ids. Special-token strings in `text` become their ids unless allow_special=False,
        in which case they are encoded as plain text."""
        text = unicodedata.normalize("NFC", text)
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids, skip_special=False):
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i < QWEN_NUM_RANKS]
        # ids beyond the named tokens (the unnamed extra embeddings) have no text
        ids = [i for i in ids if i < QWEN_NUM_RANKS or i in self._special_ids]
        return self.enc.decode(ids, errors="replace")

    def id_to_token(self, i):
        return self.enc.decode_single_token_bytes(i).decode("utf-8", errors="replace")

    def chat(self, messages, add_generation_prompt=True):
        """Qwen's chat template for plain turns -> string.
        messages: [{"role": "user"|"assistant"|"system", "content": str}, ...]"""
        parts = []
        for m in messages:
            if m["role"] not in ("user", "assistant", "system"):
                raise ValueError(f"chat message role {m['role']!r}: expected user, assistant or system")
            parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)


_TOKENIZER = None


def get_tokenizer():
    """The process-wide tokenizer (building the tiktoken encoding takes about a second)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = Tokenizer()
    return _TOKENIZER


# ---------------------------------------------------------------------------
# 2. Images and video -> pixels, pooling indices, tokens
# ---------------------------------------------------------------------------


# (end of section 2)


# ---------------------------------------------------------------------------
# 3. Training data: records, formatting, points, packing, mixture, synthetic world
# ---------------------------------------------------------------------------


# (end of section 3)


# ---------------------------------------------------------------------------
# 4. Training examples: formatting, loss weights, message trees, packing, collation
# ---------------------------------------------------------------------------


# (end of section 4)
