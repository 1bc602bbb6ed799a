"""
Everything between raw inputs and the model's tensors.

1. The Qwen3 tokenizer, on tiktoken: Qwen's byte-level BPE ranks (shipped in assets/, checked by
   sha256), Qwen's pre-tokenizer regex, NFC normalisation, Qwen3's special tokens at 151643..151668 and
   Molmo2's vision tokens at 151936..151945.
2. Images and video -> pixels, pooling indices and token strings (Molmo2's processor).
3. Training data: records, formatting, points, packing, the mixture, the synthetic world.
"""

import collections
import dataclasses
import hashlib
import math
import os
import re
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

# --- 3a. Points: Molmo2's grounding strings -------------------------------------------------------
# Coordinates are normalised to [0, 1] everywhere in our code; in text they are integers 0..1000 written
# with at least 3 digits ("%03d", so 1000 keeps its 4), points sorted by (x, y) after rounding, each point
# an "id x y" triple. A group starts with the image index (1-based) or the frame time ("%.1f" seconds);
# groups are joined by ";" (SFT format) or "\t" (pretrain format). Point ids run on across groups; track
# ids name one object for the whole video. Matches allenai/molmo2 UnifiedPointFormatter ("html-v1"/"v2"),
# except that an image or frame with no points gets no group at all (Molmo2 writes a bare "2 " prefix).

POINT_SCALE = 1000
NO_POINTS_ANSWER = "There are none."
POINT_GROUP_SEPARATORS = (";", "\t")


def _scaled(x, y):
    """Normalised (x, y) -> integer coordinates on the 0..1000 scale, clamped to the image."""
    x, y = float(x), float(y)
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"point ({x}, {y}): coordinates must be finite")
    return (round(min(max(x, 0.0), 1.0) * POINT_SCALE), round(min(max(y, 0.0), 1.0) * POINT_SCALE))


def _triples(ids, scaled_points):
    return " ".join(f"{i} {x:03d} {y:03d}" for i, (x, y) in zip(ids, scaled_points))


def _point_tag(tag, coords, label, alt):
    if "<" in label or ">" in label:
        raise ValueError(f"point label {label!r}: must not contain '<' or '>'")
    alt_attr = "" if alt is None else f' alt="{alt.replace(chr(34), chr(39))}"'
    return f'<{tag}{alt_attr} coords="{coords}">{label}</{tag}>'


def _check_separator(sep):
    if sep not in POINT_GROUP_SEPARATORS:
        raise ValueError(f"point group separator {sep!r}: expected ';' (SFT) or '\\t' (pretrain)")


def image_points_tag(points, label, alt=None):
    """One image's points [(x, y), ...] (normalised) -> '<points coords="1 1 x y 2 x y">label</points>'."""
    return multi_image_points_tag([points], label, alt)


def multi_image_points_tag(points_per_image, label, alt=None, sep=";"):
    """Points of several images [[(x, y), ...] per image] -> one <points> tag; groups start with the
    1-based image index, point ids run on from image to image."""
    _check_separator(sep)
    groups, next_id = [], 1
    for image_index, points in enumerate(points_per_image, 1):
        scaled = sorted(_scaled(x, y) for x, y in points)
        if scaled:
            groups.append(f"{image_index} " + _triples(range(next_id, next_id + len(scaled)), scaled))
            next_id += len(scaled)
    return _point_tag("points", sep.join(groups), label, alt)


def video_points_tag(timestamps, points_per_frame, label, alt=None, sep=";"):
    """Video points: frame times (s) and [[(x, y), ...] per frame] -> one <points> tag whose groups
    start with the time ("%.1f"); point ids run on from frame to frame."""
    _check_separator(sep)
    if len(timestamps) != len(points_per_frame):
        raise ValueError(f"video points: {len(timestamps)} timestamps for {len(points_per_frame)} frames")
    groups, next_id = [], 1
    for t, points in sorted(zip(timestamps, points_per_frame), key=lambda tp: tp[0]):
        scaled = sorted(_scaled(x, y) for x, y in points)
        if scaled:
            groups.append(f"{t:.1f} " + _triples(range(next_id, next_id + len(scaled)), scaled))
            next_id += len(scaled)
    return _point_tag("points", sep.join(groups), label, alt)


def video_tracks_tag(frames, label, alt=None, sep=";"):
    """Tracks: [(time, {object_key: (x, y)}), ...] -> one <tracks> tag. Object keys become ids 1, 2, ...
    in order of first appearance (frames by time, points of a frame by (x, y)); in each frame the points
    are listed by id, as Molmo2 does."""
    _check_separator(sep)
    id_of, groups = {}, []
    for t, objects in sorted(frames, key=lambda f: f[0]):
        scaled = sorted((_scaled(x, y), key) for key, (x, y) in objects.items())
        for _, key in scaled:
            id_of.setdefault(key, len(id_of) + 1)
        by_id = sorted((id_of[key], xy) for xy, key in scaled)
        if by_id:
            groups.append(f"{t:.1f} " + _triples([i for i, _ in by_id], [xy for _, xy in by_id]))
    return _point_tag("tracks", sep.join(groups), label, alt)


def pointing_answer(tag, count, with_count=False):
    """The answer around a points tag: the tag alone, or Molmo2's counting sentence; no points at all is
    always 'There are none.'."""
    if count == 0:
        return NO_POINTS_ANSWER
    if with_count:
        return f"Counting the {tag} shows a total of {count}."
    return tag


# Parsing must survive anything a model writes: every pattern is bounded (no nested quantifiers), and
# numbers are checked by pattern before int()/float() so no huge or odd literal reaches them.
Point = collections.namedtuple("Point", "frame id x y")  # frame: image index (int) or time (float, s)
_TAG_OPEN = re.compile(r"<(points|tracks)\b")
_ATTRIBUTE = re.compile(r'([A-Za-z_]{1,32})\s*=\s*"([^"]*)"')
_INT = re.compile(r"\d{1,9}")
_TIME = re.compile(r"\d{1,9}\.\d{1,6}")
_COUNT = re.compile(r"total of (\d{1,9})\b")


@dataclasses.dataclass
class PointTag:
    kind: str  # "points" or "tracks"
    label: str
    alt: str | None
    points: list  # [Point]


@dataclasses.dataclass
class ParsedPoints:
    tags: list  # [PointTag]
    count: int | None  # from "... shows a total of N." (0 for "There are none."), else None
    dropped: list  # [str]: what could not be read, and why

    @property
    def points(self):
        return [p for tag in self.tags for p in tag.points]


def _parse_coords(coords, where, dropped):
    points = []
    for g, group in enumerate(re.split(r"[;\t]", coords), 1):
        tokens = group.split()
        if not tokens:
            dropped.append(f"{where} group {g}: empty")
            continue
        frame_token, rest = tokens[0], tokens[1:]
        if _INT.fullmatch(frame_token):
            frame = int(frame_token)
        elif _TIME.fullmatch(frame_token):
            frame = float(frame_token)
        else:
            dropped.append(f"{where} group {g}: {frame_token[:20]!r} is not an image index or a time")
            continue
        if len(rest) % 3:
            dropped.append(f"{where} group {g}: {len(rest) % 3} trailing value(s) {' '.join(rest[-(len(rest) % 3):])[:40]!r}")
        for k in range(0, len(rest) - len(rest) % 3, 3):
            i, x, y = rest[k:k + 3]
            if not (_INT.fullmatch(i) and _INT.fullmatch(x) and _INT.fullmatch(y)):
                dropped.append(f"{where} group {g}: {' '.join((i, x, y))[:40]!r} is not an 'id x y' triple")
            elif int(x) > POINT_SCALE or int(y) > POINT_SCALE:
                dropped.append(f"{where} group {g}: point {i} ({x}, {y}) is outside 0..{POINT_SCALE}")
            else:
                points.append(Point(frame, int(i), int(x) / POINT_SCALE, int(y) / POINT_SCALE))
    return points


def parse_points(text):
    """Read every <points>/<tracks> tag and the count from a model's answer. Never raises: whatever can
    not be read is skipped and described in `dropped`."""
    if not isinstance(text, str):
        return ParsedPoints([], None, [f"answer is a {type(text).__name__}, not text"])
    tags, dropped = [], []
    for n, match in enumerate(_TAG_OPEN.finditer(text), 1):
        kind = match.group(1)
        where = f"<{kind}> #{n}"
        head_end = text.find(">", match.end())
        next_open = _TAG_OPEN.search(text, match.end())
        if head_end < 0 or (next_open and next_open.start() < head_end):
            head_end = next_open.start() if next_open else len(text)
            dropped.append(f"{where}: opening tag not closed with '>'")
            body_start = head_end
        else:
            body_start = head_end + 1
        attributes = dict(_ATTRIBUTE.findall(text[match.end():head_end]))
        close = text.find(f"</{kind}>", body_start)
        if text[match.end():head_end].rstrip().endswith("/"):
            body_end = body_start  # self-closing <points .../>: no label
        elif close < 0 or (next_open and next_open.start() < close):
            body_end = next_open.start() if next_open else len(text)
            dropped.append(f"{where}: no </{kind}>")
        else:
            body_end = close
        label = text[body_start:body_end].split("<", 1)[0].strip()
        if "coords" not in attributes:
            dropped.append(f"{where}: no coords attribute")
            continue
        points = _parse_coords(attributes["coords"], where, dropped)
        tags.append(PointTag(kind, label, attributes.get("alt"), points))
    count = None
    counts = _COUNT.findall(text)
    if counts:
        count = int(counts[-1])
    elif NO_POINTS_ANSWER.rstrip(".") in text:
        count = 0
    return ParsedPoints(tags, count, dropped)


# (end of section 3)
