"""
Everything between raw inputs and the model's tensors.

1. The Qwen3 tokenizer, on tiktoken: Qwen's byte-level BPE ranks (shipped in assets/, checked by
   sha256), Qwen's pre-tokenizer regex, NFC normalisation, Qwen3's special tokens at 151643..151668 and
   Molmo2's vision tokens at 151936..151945.
2. Images and video -> pixels, pooling indices and token strings (Molmo2's processor).
3. Training data: records, points, the mixture, dataset readers, the synthetic world.
4. Training examples: formatting, loss weights, message trees, packing, collation.
"""

import collections
import dataclasses
import hashlib
import math
import os
import unicodedata

import numpy as np
import tiktoken
import torch

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
# A record (section 3) becomes one Example: the tokens of its media and its conversations, next-token
# targets, per-token loss weights, positions, and the ids the attention mask is built from. The layout is
# Molmo2's (the released chat template; allenai/molmo2 olmo/preprocessing/text_preprocessor.py):
#
#   <|im_end|> [Image 1] <image tokens> [Image 2] <image tokens> ... [<video tokens>]     shared prefix
#   <|im_start|>user\n{style prefix} {prompt}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>
#   \n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>      annotation 1
#   <|im_start|>user\n ...                                                                annotation 2 ...
#
# - <|im_end|> stands in for Qwen's missing BOS; "Image i" text only when there are several images.
# - The loss is on each answer and the <|im_end|> that closes it. Targets are stored already shifted:
#   targets[t] is the token after input_ids[t] where that token has loss, else -1.
# - Several annotations of one media form a message tree: they share one copy of the prefix, each branch
#   sees the prefix and itself only, and its positions continue from the end of the prefix (every branch
#   starts at the same position). A branch's closing <|im_end|> is only a target, never an input (what
#   would follow it is the next branch), as in Molmo2.
# - Per-token loss weights (Molmo2's MessageWeight): 'none' = 1 (pretraining); 'sqrt' = 2/sqrt(n) for the
#   n loss tokens of a conversation, then / sqrt(branches kept); 'sft' = 'sqrt' except the styles whose rule
#   in section 3's STYLES is flat: grounding (pointing, counting, tracking) 0.2, video captions 0.1.
# - Style prefixes: 'sft' = "{style}:" except demo and multiple-choice styles (Molmo2's demo_or_style_v2);
#   'pretrain' = "{style} {n}:" with n = (answer chars + N(0, 25)) // 15, plain "{style}:" 10% of the time
#   and always for pointing styles (style_and_length_v2); 'none'. Only a conversation's first prompt gets it.
# - Template text is encoded with special tokens, the record's text without (a prompt cannot inject
#   <|im_end|>); each piece is encoded on its own, as Molmo2 does, which at these boundaries (special tokens,
#   "\n") gives the ids the processor gives for the whole string.
# - Where Molmo2's training code and its chat template differ, the template wins: a later user turn starts
#   "\n<|im_start|>user" after the answer's <|im_end|> (training code writes a second <|im_end|> there),
#   and n in 2/sqrt(n) counts each closing <|im_end|> (in trees training code leaves the last one out). A
#   conversation cut at max_len keeps the weight of its full n. Annotations are not shuffled.
# Packing fills rows of max_seq_len tokens (and a crop budget) with whole examples; collation pads rows,
# builds the boolean attention mask block by block from each example's branch and vision ids, and merges the vision tensors under
# transformers' Molmo2 names and batch convention, so both our model and transformers' accept a batch.

STYLE_PREFIX_MODES = ("sft", "pretrain", "none")
LOSS_WEIGHTINGS = ("sft", "sqrt", "none")
# Styles trained without a "{style}:" prefix in SFT: the demo styles (the model's default behaviour) and the
# multiple-choice styles; the list of the released chat template.
UNPREFIXED_SFT_STYLES = frozenset([
    "point_count", "pointing", "cosyn_point", "user_qa", "long_caption", "short_caption", "video_long_caption",
    "video_short_caption", "video_point_track_per_frame", "video_point_track_start_end",
    "video_point_track_all_frames", "video_single_point_track_start_end", "video_transcript",
    "video_clip_caption_start_end", "video_clip_caption_start_end_in_seconds", "video_clip_transcript_start_end",
    "video_clip_transcript_start_end_in_seconds", "video_frame_caption_timestamp",
    "video_frame_caption_timestamp_in_seconds", "correction_qa", "text_sft", "video_point", "video_point_count",
    "video_count", "video_count_point", "multi_image_pointing", "multi_image_counting",
    "multi_image_point_then_count", "multi_image_count_then_point", "demo", "a_okvqa_mc",
    "ai2_diagram_no_letter", "ai2_diagram", "science_qa", "multi_image_mc", "multi_image_mc_exp",
    "mantis_instruct_mc", "video_multiple_choice", "video_multiple_choice_count_without_pointing",
    "video_multiple_choice_multiple_correct", "video_multiple_choice_w_subtitle",
])
PRETRAIN_UNHINTED_STYLES = frozenset(["pointing", "point_count", "cosyn_point"])  # "{style}:", no length
FLAT_LOSS_WEIGHTS = {"grounding": 0.2, "video_caption": 0.1}  # per token, by section 3's STYLES rule


class ExampleTooLong(ValueError):
    """A record whose prefix and first answer token do not fit in max_len."""


def style_prefix(style, answer, mode, rng=None):
    """The text put before a conversation's first prompt ('' for none). `answer` is the conversation's
    last answer (the pretraining length hint counts its characters); rng: a numpy Generator."""
    if mode == "none":
        return ""
    if mode == "sft":
        return "" if style in UNPREFIXED_SFT_STYLES else f"{style}:"
    if mode != "pretrain":
        raise ValueError(f"style_prefixes {mode!r}: expected one of {STYLE_PREFIX_MODES}")
    if style in PRETRAIN_UNHINTED_STYLES:
        return f"{style}:"
    if rng is None:
        raise ValueError("style_prefixes='pretrain' draws a noisy length hint: pass rng (a numpy Generator)")
    if rng.random() > 0.1:
        n = (len(answer) + int(rng.normal(scale=25))) // 15
        return f"{style} {n}:"
    return f"{style}:"


@dataclasses.dataclass
class Example:
    """One record as tokens, ready to pack. Vision tensors use transformers' Molmo2 names; their pooling
    indices count patches from this example's first crop (first frame). Absent media: None."""
    input_ids: torch.Tensor  # (T,) int64
    targets: torch.Tensor  # (T,) int64: the next token where it has loss, else -1
    loss_weights: torch.Tensor  # (T,) float32: 0 where targets is -1
    position_ids: torch.Tensor  # (T,) int64
    branch_ids: torch.Tensor  # (T,) int64: 0 = shared prefix, k = annotation k (1-based)
    is_vision: torch.Tensor  # (T,) bool: image and frame tokens, bidirectional among themselves
    pixel_values: torch.Tensor | None = None  # (n_crops, n_patches, patch_dim)
    image_token_pooling: torch.Tensor | None = None  # (n_image_tokens, 4)
    image_grids: torch.Tensor | None = None  # (n_images, 4)
    image_num_crops: torch.Tensor | None = None  # (n_images,)
    pixel_values_videos: torch.Tensor | None = None  # (n_frames, n_patches, patch_dim)
    video_token_pooling: torch.Tensor | None = None  # (n_video_tokens, 9)
    video_grids: torch.Tensor | None = None  # (1, 3)

    def __len__(self):
        return len(self.input_ids)

    @property
    def n_crops(self):
        """ViT inputs: image crops plus video frames (what the crop budget counts)."""
        return sum(len(x) for x in (self.pixel_values, self.pixel_values_videos) if x is not None)


def _media_prefix(record, processor):
    """BOS + the record's image or video tokens -> (ids, dict of this example's vision tensors)."""
    ids, vision = [IM_END_ID], {}
    images = record.get("images", record.get("image", []))
    images = [images] if isinstance(images, str) else images
    if images:
        inputs = [processor.image(image) for image in images]
        offsets = np.cumsum([0] + [x.patches.shape[0] * x.patches.shape[1] for x in inputs])  # patches before each
        for i, x in enumerate(inputs):
            if len(inputs) > 1:
                ids += processor.tokenizer.encode(f"Image {i + 1}")
            ids += image_token_ids(x.grid)
        vision["pixel_values"] = torch.cat([x.patches for x in inputs])
        vision["image_token_pooling"] = torch.cat(
            [torch.where(x.token_pooling >= 0, x.token_pooling + int(o), -1) for x, o in zip(inputs, offsets)])
        vision["image_grids"] = torch.tensor([x.grid for x in inputs], dtype=torch.long)
        vision["image_num_crops"] = torch.tensor([len(x.patches) for x in inputs], dtype=torch.long)
    if "video_frames" in record:
        # decoded frames with their times (section 3's reader): sampled as Molmo2 trains, first and last frame
        # always, at most max_fps and max_frames
        frames, times = record["video_frames"], record["video_times"]
        span = times[-1] - times[0] if len(times) > 1 else 0.0
        fps = (len(times) - 1) / span if span > 0 else DEFAULT_VIDEO_FPS
        keep = sample_frame_indices(len(frames), fps, processor.max_frames, processor.max_fps, "uniform_last_frame")
        frames = np.stack([np.asarray(frames[i]) for i in keep])  # (T, H, W, 3) uint8
        x = preprocess_video(frames, processor.crop_size, processor.patch_size, processor.video_pooling)
        ids += video_token_ids(x.grid, [times[i] for i in keep], processor.tokenizer)
        vision["pixel_values_videos"] = x.patches
        vision["video_token_pooling"] = x.token_pooling
        vision["video_grids"] = torch.tensor([x.grid], dtype=torch.long)
    elif record.get("video") is not None:
        raise ValueError(f"record {record.get('id', '?')!r}: video {record['video']!r} is not decoded; read "
                         "records with their media (video_frames, video_times)")
    return ids, vision


def _conversation_tokens(messages, prefix, tokenizer):
    """One annotation's messages -> (ids, has_loss): every turn in the chat template, loss on each answer and
    its closing <|im_end|>. The first prompt gets the style prefix."""
    ids, has_loss = [], []

    def add(piece_ids, loss):
        ids.extend(piece_ids)
        has_loss.extend([loss] * len(piece_ids))

    if messages[0]["role"] == "system":
        add([IM_START_ID] + tokenizer.encode("system\n" + messages[0]["content"], allow_special=False)
            + [IM_END_ID] + tokenizer.encode("\n"), False)
        messages = messages[1:]
    for turn in range(0, len(messages), 2):
        prompt, answer = messages[turn]["content"], messages[turn + 1]["content"]
        if turn == 0 and prefix:
            prompt = f"{prefix} {prompt}" if prompt else prefix
        if turn > 0:
            add(tokenizer.encode("\n"), False)  # the previous answer's <|im_end|> is already there
        add([IM_START_ID] + tokenizer.encode("user\n" + prompt, allow_special=False) + [IM_END_ID]
            + tokenizer.encode("\n") + [IM_START_ID] + tokenizer.encode("assistant\n"), False)
        add(tokenizer.encode(answer, allow_special=False) + [IM_END_ID], True)
    return ids, has_loss


def format_example(record, processor=None, rng=None, style_prefixes="sft", loss_weighting="sft", max_len=None):
    """A record (section 3's format: images as paths or decoded, video decoded) -> Example.

    processor: a Molmo2Processor (section 2) holding the tokenizer and the vision settings (crops per image,
    crop size, frames); None = the released settings. style_prefixes: 'sft' | 'pretrain' | 'none';
    loss_weighting: 'sft' | 'sqrt' | 'none' (see above); rng: numpy Generator for the pretraining length
    hint. max_len: keep the annotations that fit, in order, as Molmo2 does (one that does not fit is dropped
    with all after it; the first one is cut at max_len); raises ExampleTooLong if no answer token fits."""
    where = f"record {record.get('id', '?')!r}"
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting {loss_weighting!r}: expected one of {LOSS_WEIGHTINGS}")
    processor = processor or Molmo2Processor()
    tokenizer = processor.tokenizer
    prefix_ids, vision = _media_prefix(record, processor)
    n_prefix = len(prefix_ids)

    branches = []  # (input ids, target ids, style, n loss tokens) per annotation kept
    budget = None if max_len is None else max_len - n_prefix
    for annotation in record["annotations"]:
        style, messages = annotation["style"], annotation["messages"]
        if loss_weighting == "sft" and style not in STYLES:
            raise ValueError(f"{where}: style {style!r} has no loss-weight rule in data.STYLES")
        ids, has_loss = _conversation_tokens(messages, style_prefix(style, messages[-1]["content"], style_prefixes, rng), tokenizer)
        inputs = ids[:-1]
        targets = [t if loss else -1 for t, loss in zip(ids[1:], has_loss[1:])]
        n_loss = sum(has_loss)
        if budget is not None and len(inputs) > budget:
            if branches:
                break  # this annotation and the later ones do not fit
            inputs, targets = inputs[:max(budget, 0)], targets[:max(budget, 0)]
            if all(t < 0 for t in targets):
                raise ExampleTooLong(f"{where}: {n_prefix} prefix tokens leave no room for an answer in max_len {max_len}")
        branches.append((inputs, targets, style, n_loss))
        if budget is not None:
            budget -= len(inputs)

    input_ids, target_ids, weights, positions, branch_ids = list(prefix_ids), [-1] * n_prefix, [0.0] * n_prefix, list(range(n_prefix)), [0] * n_prefix
    for k, (inputs, targets, style, n_loss) in enumerate(branches, 1):
        if loss_weighting == "none":
            w = 1.0
        elif loss_weighting == "sft" and STYLES[style] in FLAT_LOSS_WEIGHTS:
            w = FLAT_LOSS_WEIGHTS[STYLES[style]]
        else:
            w = 2 / math.sqrt(n_loss) / math.sqrt(len(branches))
        input_ids += inputs
        target_ids += targets
        weights += [w if t >= 0 else 0.0 for t in targets]
        positions += range(n_prefix, n_prefix + len(inputs))
        branch_ids += [k] * len(inputs)
    input_ids = torch.tensor(input_ids, dtype=torch.long)
    return Example(
        input_ids=input_ids,
        targets=torch.tensor(target_ids, dtype=torch.long),
        loss_weights=torch.tensor(weights, dtype=torch.float32),
        position_ids=torch.tensor(positions, dtype=torch.long),
        branch_ids=torch.tensor(branch_ids, dtype=torch.long),
        is_vision=torch.isin(input_ids, torch.tensor(VISION_TOKEN_IDS)),
        **vision,
    )


# --- packing ------------------------------------------------------------------------------------------------


class Packer:
    """Packs examples into rows of at most max_seq_len tokens and max_crops ViT crops, on the fly.

        packer = Packer(sampler, lambda key: format_example(read(key), rng=rng_for(key), max_len=L), L, 16)
        rows = [next(packer) for _ in range(batch_size)]; batch = collate(rows, pad_to=L)

    items: an iterator of small keys (e.g. MixtureSampler's (dataset, index)); make_example(key) must be a
    pure function of the key (seed any randomness from it) returning an Example, or None for a bad record.
    A row takes, in arrival order, the first of up to `lookahead` waiting examples that still fits, until
    none does. Examples that can never fit a row (too many tokens or crops, or ExampleTooLong from
    make_example) and None are skipped and counted in `skipped`, never raised.

    Resume: state_dict() holds the keys still waiting, the skip counts, and items.state_dict() if items
    has one, else the number of keys drawn; load_state_dict() restores items (or, lacking state_dict, skips
    that many keys of a fresh, identical items iterator) and remakes the waiting examples from their keys,
    so the rows that follow are identical."""

    def __init__(self, items, make_example, max_seq_len, max_crops=None, lookahead=8):
        if lookahead < 1:
            raise ValueError(f"lookahead {lookahead}: must be at least 1")
        self.items, self.make_example = iter(items), make_example
        self.max_seq_len, self.max_crops, self.lookahead = max_seq_len, max_crops, lookahead
        self.waiting = []  # [(key, Example)] in arrival order
        self.n_drawn = 0
        self.exhausted = False
        self.skipped = collections.Counter()

    def _fits(self, example, n_tokens, n_crops):
        return (n_tokens + len(example) <= self.max_seq_len
                and (self.max_crops is None or n_crops + example.n_crops <= self.max_crops))

    def _fill(self):
        """Draw keys until `lookahead` examples wait or the items run out."""
        while len(self.waiting) < self.lookahead and not self.exhausted:
            try:
                key = next(self.items)
            except StopIteration:
                self.exhausted = True
                return
            self.n_drawn += 1
            try:
                example = self.make_example(key)
            except ExampleTooLong:
                self.skipped["too_long"] += 1
                continue
            if example is None:
                self.skipped["unusable"] += 1
            elif len(example) > self.max_seq_len:
                self.skipped["too_long"] += 1
            elif not self._fits(example, 0, 0):
                self.skipped["too_many_crops"] += 1
            else:
                self.waiting.append((key, example))

    def __iter__(self):
        return self

    def __next__(self):
        """-> one row: a list of Examples."""
        row, n_tokens, n_crops = [], 0, 0
        while True:
            self._fill()
            i = next((i for i, (_, ex) in enumerate(self.waiting) if self._fits(ex, n_tokens, n_crops)), None)
            if i is None:
                break
            _, example = self.waiting.pop(i)
            row.append(example)
            n_tokens, n_crops = n_tokens + len(example), n_crops + example.n_crops
        if not row:
            raise StopIteration
        return row

    def state_dict(self):
        state = {"waiting": [key for key, _ in self.waiting], "n_drawn": self.n_drawn,
                 "exhausted": self.exhausted, "skipped": dict(self.skipped)}
        if hasattr(self.items, "state_dict"):
            state["items"] = self.items.state_dict()
        return state

    def load_state_dict(self, state):
        if "items" in state:
            self.items.load_state_dict(state["items"])
        else:
            for _ in range(state["n_drawn"] - self.n_drawn):
                next(self.items)
        self.n_drawn, self.exhausted = state["n_drawn"], state["exhausted"]
        self.skipped = collections.Counter(state["skipped"])
        self.waiting = [(key, self.make_example(key)) for key in state["waiting"]]


# --- collation ----------------------------------------------------------------------------------------------


def example_attention_mask(branch_ids, is_vision):
    """Who may attend to whom within one example -> (T, T) bool, True = may attend. branch_ids (T,): 0 = shared
    prefix, k = branch k; is_vision (T,) bool. Causal within the prefix and a query's own branch (never
    another branch); a vision token also sees every vision token of the example, later ones included."""
    T = len(branch_ids)
    mask = branch_ids[:, None] == branch_ids[None, :]  # (T, T) same branch
    mask |= (branch_ids == 0)[None, :]  # the shared prefix is visible to every branch
    mask &= torch.ones(T, T, dtype=torch.bool, device=branch_ids.device).tril()  # causal
    mask |= is_vision[:, None] & is_vision[None, :]  # vision tokens: bidirectional among themselves
    return mask


def collate(rows, pad_to=None):
    """Rows of Examples (from Packer) -> the model's batch, a dict of tensors:

      input_ids (B, L) int64, padded with <|endoftext|>; position_ids (B, L) int64 (0 on padding)
      targets (B, L) int64, -1 = no loss; loss_weights (B, L) float32, 0 = no loss
      example_ids (B, L) int64: the example's index within its row, -1 = padding
      mm_token_type_ids (B, L) int64: 1 = vision token (transformers' name)
      attn_mask (B, 1, L, L) bool, True = may attend: example_attention_mask on each example's diagonal
                block, nothing across packed examples; a padding query sees only itself (no empty row)
      images, when any:  pixel_values (n_crops, n_patches, patch_dim), image_token_pooling (n_tokens, 4),
                         image_grids (n_images, 4), image_num_crops (n_images,)
      videos, when any:  pixel_values_videos (n_frames, n_patches, patch_dim), video_token_pooling (n_tokens, 9),
                         video_grids (n_videos, 3)
    Images (videos) are concatenated in token order, row after row, and pooling indices offset into the
    concatenated patches: transformers' Molmo2 batch convention. L = pad_to, or the longest row."""
    lengths = [sum(len(ex) for ex in row) for row in rows]
    L = pad_to or max(lengths)
    if max(lengths) > L:
        raise ValueError(f"collate: a row of {max(lengths)} tokens does not fit pad_to={pad_to}")
    B = len(rows)
    input_ids = torch.full((B, L), ENDOFTEXT_ID, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    targets = torch.full((B, L), -1, dtype=torch.long)
    loss_weights = torch.zeros((B, L), dtype=torch.float32)
    example_ids = torch.full((B, L), -1, dtype=torch.long)
    is_vision = torch.zeros((B, L), dtype=torch.bool)
    attn_mask = torch.zeros((B, 1, L, L), dtype=torch.bool)
    for b, row in enumerate(rows):
        start = 0
        for e, ex in enumerate(row):
            span = slice(start, start + len(ex))
            input_ids[b, span], position_ids[b, span] = ex.input_ids, ex.position_ids
            targets[b, span], loss_weights[b, span] = ex.targets, ex.loss_weights
            example_ids[b, span], is_vision[b, span] = e, ex.is_vision
            attn_mask[b, 0, span, span] = example_attention_mask(ex.branch_ids, ex.is_vision)
            start += len(ex)
        padding = torch.arange(start, L)
        attn_mask[b, 0, padding, padding] = True
    batch = {
        "input_ids": input_ids, "position_ids": position_ids, "targets": targets, "loss_weights": loss_weights,
        "example_ids": example_ids, "mm_token_type_ids": is_vision.long(), "attn_mask": attn_mask,
    }
    examples = [ex for row in rows for ex in row]
    for pixels, pooling, extra in (("pixel_values", "image_token_pooling", ("image_grids", "image_num_crops")),
                                   ("pixel_values_videos", "video_token_pooling", ("video_grids",))):
        having = [ex for ex in examples if getattr(ex, pixels) is not None]
        if not having:
            continue
        patches = [getattr(ex, pixels) for ex in having]
        offsets = np.cumsum([0] + [p.shape[0] * p.shape[1] for p in patches])  # patches before each example
        batch[pixels] = torch.cat(patches)
        batch[pooling] = torch.cat([torch.where(getattr(ex, pooling) >= 0, getattr(ex, pooling) + int(o), -1)
                                    for ex, o in zip(having, offsets)])
        for key in extra:
            batch[key] = torch.cat([getattr(ex, key) for ex in having])
    return batch


# (end of section 4)
