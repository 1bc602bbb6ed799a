"""
Everything between raw inputs and the model's tensors.

1. The Qwen3 tokenizer, on tiktoken: Qwen's byte-level BPE ranks (shipped in assets/, checked by
   sha256), Qwen's pre-tokenizer regex, NFC normalisation, Qwen3's special tokens at 151643..151668 and
   Molmo2's vision tokens at 151936..151945.
2. Images and video -> pixels, pooling indices and token strings (Molmo2's processor).
3. Training data: records, points, the mixture, dataset readers (prepare_data.py makes the datasets,
   the synthetic world among them).
4. Training examples: formatting, loss weights, message trees, packing, collation.
"""

import collections
import dataclasses
import functools
import gc
import hashlib
import io
import json
import math
import os
import random
import re
import sys
import unicodedata
from typing import NamedTuple

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

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

# Design: everything is computed once per image at its final size (two bilinear resizes, one strided copy into
# the (n_crops, n_patches, patch_dim) buffer); pooling indices depend only on the tiling and are cached; token
# ids are built directly (placeholder expansion never goes through a long token string). Files are decoded
# fully up front, so a bad file fails in load_image/load_video with a MediaError that names it. PyAV (video
# files) is imported only when a video file is read.
#
# Settings verified against transformers==5.23.0 (Molmo2ImageProcessor / Molmo2VideoProcessor / Molmo2Processor)
# and the released processor config (Molmo2's hub conversion script):
#   images: 378-px crops of 14-px patches, overlap margins 4+4 patches, 2x2 pooling, max_crops 8,
#           bilinear resize without antialias, round to 0..255, then (x - 127.5) / 127.5.
#   video:  one 378-px crop per frame, 3x3 pooling, at most max_fps=2 frames per second and num_frames=128,
#           rescale + normalize on (the released config sets do_rescale/do_normalize; transformers'
#           class default leaves video pixels as raw uint8).
#   tokens: image_use_col_tokens=True, use_single_crop_col_tokens=False, use_single_crop_start_token=True,
#           video_use_col_tokens=False, use_frame_special_tokens=True; BOS = <|im_end|>.
CROP_SIZE = 378
PATCH_SIZE = 14
OVERLAP_MARGINS = (4, 4)  # patches dropped on each inner side of a crop (left/top, right/bottom)
IMAGE_POOLING = (2, 2)
VIDEO_POOLING = (3, 3)
MAX_CROPS = 8  # training budget; Molmo2 evaluates with 24
MAX_CROPS_EVAL = 24
MAX_FRAMES = 128
MAX_FPS = 2
FRAME_SAMPLINGS = ("uniform", "uniform_last_frame")
DEFAULT_ANIMATION_FPS = 10.0  # animated images without frame durations: the browsers' 100 ms per frame

# token ids the model treats as vision tokens (mm_token_type_ids == 1), as transformers marks them
VISION_TOKEN_IDS = (
    IMAGE_PATCH_ID, IMAGE_COL_ID, IMAGE_START_ID, IMAGE_LOW_RES_START_ID,
    FRAME_START_ID, IMAGE_END_ID, FRAME_END_ID, IMAGE_LOW_ID,
)
VIDEO_EXTENSIONS_PILLOW = (".gif", ".webp", ".png", ".apng")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class MediaError(ValueError):
    """An image or video that cannot be used: missing, unreadable, truncated, empty or with a zero side.
    `source` names the input (a path, or e.g. 'images[2]' for an in-memory array); the message starts with it."""

    def __init__(self, kind, source, problem):
        self.source = source
        super().__init__(f"{kind} {source!r}: {problem}")


def _describe(source, name):
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    shape = source.size if isinstance(source, Image.Image) else getattr(source, "shape", "")
    return f"<{type(source).__name__} {tuple(shape)}>"


# --- images -------------------------------------------------------------------------------------------------


def _pil_to_rgb(image):
    """PIL image of any mode -> RGB, transparency composited on white (as transformers' convert_to_rgb).
    Other modes go through PIL's own conversion: CMYK naively, 16-bit values clipped at 255 like PIL does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source, name=None):
    """A path, bytes, PIL image or (H, W[, 1|3|4]) uint8 array -> (H, W, 3) uint8 RGB array.
    Files are decoded fully (a truncated file fails here, not later) and EXIF-rotated upright; PIL images and
    arrays are taken as they are, as transformers does. Raises MediaError naming the input if unusable."""
    name = _describe(source, name)
    if isinstance(source, (str, os.PathLike, bytes)):
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
                image = _pil_to_rgb(image)
        except FileNotFoundError:
            raise MediaError("image", name, "no such file") from None
        except IsADirectoryError:
            raise MediaError("image", name, "is a directory, not an image file") from None
        except UnidentifiedImageError:
            n_bytes = len(source) if isinstance(source, bytes) else os.path.getsize(source)
            problem = "not an image file (cannot identify format)" if n_bytes else "empty file"
            raise MediaError("image", name, problem) from None
        except Image.DecompressionBombError as e:
            raise MediaError("image", name, f"too large ({e})") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise MediaError("image", name, f"cannot decode ({e})") from None
    elif isinstance(source, Image.Image):
        image = _pil_to_rgb(source)
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        pixels = source.numpy() if isinstance(source, torch.Tensor) else source
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or pixels.ndim == 3 and pixels.shape[2] in (3, 4)):
            got = f"{pixels.dtype} {pixels.shape}"
            raise MediaError("image", name, f"expected an (H, W[, 1|3|4]) uint8 array, got {got}")
        if 0 in pixels.shape[:2]:
            raise MediaError("image", name, f"has a zero side ({pixels.shape[1]}x{pixels.shape[0]})")
        image = pixels if pixels.ndim == 3 and pixels.shape[2] == 3 else _pil_to_rgb(Image.fromarray(pixels))
    else:
        kind = type(source).__name__
        raise MediaError("image", name, f"expected a path, bytes, PIL image or uint8 array, got {kind}")
    pixels = np.array(image)  # (H, W, 3) uint8, writable (torch.from_numpy wants that)
    if 0 in pixels.shape[:2]:
        raise MediaError("image", name, f"has a zero side ({pixels.shape[1]}x{pixels.shape[0]})")
    return pixels


def select_tiling(height, width, window_size, max_crops):
    """(rows, cols) of crop windows for an image of height x width px (overlap margins already removed):
    the fewest crops whose windows cover the image without upscaling it; if none can, the tiling that
    downscales it least. Ties go to fewer crops, then fewer rows. Scales in float32, as Molmo2 computes them."""
    candidates = range(1, max_crops + 1)
    tilings = [(rows, cols) for rows in candidates for cols in candidates if rows * cols <= max_crops]
    tilings.sort(key=lambda t: (t[0] * t[1], t[0]))
    sizes = np.array(tilings, dtype=np.float32) * np.float32(window_size)  # (n_tilings, 2) px
    with np.errstate(divide="ignore"):  # a side of exactly the margins gives inf, which min() then skips
        scales = (sizes / np.array([height, width], dtype=np.float32)).min(axis=1)  # (n_tilings,) scale to fit
    if (scales < 1).all():
        return tilings[int(scales.argmax())]
    return tilings[int(np.where(scales < 1, np.float32(1e10), scales).argmin())]


def crop_geometry(height, width, max_crops, crop_size=CROP_SIZE, patch_size=PATCH_SIZE,
                  overlap_margins=OVERLAP_MARGINS):
    """Tiling and canvas for one image -> (rows, cols, canvas_height, canvas_width). Neighbouring crops
    overlap by the margins; the canvas is what the image is resized to (aspect not kept)."""
    crop_patches = crop_size // patch_size
    window_patches = crop_patches - sum(overlap_margins)  # patches each crop contributes
    if crop_size % patch_size or window_patches <= 0:
        raise ValueError(f"crop_size {crop_size} must be a multiple of patch_size {patch_size} and leave room "
                         f"for overlap margins {overlap_margins}")
    window_size = window_patches * patch_size
    margin_size = sum(overlap_margins) * patch_size
    rows, cols = select_tiling(height - margin_size, width - margin_size, window_size, max_crops)
    return rows, cols, rows * window_size + margin_size, cols * window_size + margin_size


def resize_levels(images, height, width):
    """(N, 3, H, W) float 0..255 -> (N, height, width, 3) float32 view of whole 0..255 values: bilinear without
    antialias, rounded back (Molmo2 resizes uint8 images)."""
    resized = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return resized.round_().clamp_(0, 255).permute(0, 2, 3, 1)


def resize_to_unit_range(images, height, width):
    """resize_levels, then (x - 127.5) / 127.5: float32 in [-1, 1], the model's input."""
    return resize_levels(images, height, width).sub_(127.5).div_(127.5)


def crops_to_patches(image, rows, cols, crop_size, stride, patch_size, out):
    """Copy square crops of an (H, W, C) image view into out (rows * cols, n_patches, patch_size**2 * C):
    crops of crop_size every `stride` px, row-major, each cut into row-major patches flattened as (dy, dx, c)."""
    n = crop_size // patch_size
    # the gather reads each patch row's (x, channel) run: from the resize's output, an (H, W, C) view of a (C, H, W)
    # layout, a run is 42 scattered values; one copy into (H, W, C) order (and the output's dtype) first took the
    # training loader's crops of a 224-px image from ~340 to ~145 us on this project's CPU, the values unchanged
    image = torch.empty(image.shape, dtype=out.dtype).copy_(image)
    s_y, s_x, s_c = image.stride()
    crops = image.as_strided(
        (rows, cols, n, n, patch_size, patch_size, image.shape[2]),
        (stride * s_y, stride * s_x, patch_size * s_y, patch_size * s_x, s_y, s_x, s_c),
        image.storage_offset(),
    )  # (rows, cols, n, n, p, p, C) view
    out.view(crops.shape).copy_(crops)


def pool_windows(index_grid, pool_h, pool_w):
    """(h, w) patch-index grid -> (n_tokens, pool_h * pool_w): one row of patch indices per output token,
    windows row-major. The grid is padded with -1 to a multiple of the window, the odd pad row/column going
    to the bottom/right. Returns (windows, tokens_h, tokens_w)."""
    h, w = index_grid.shape
    pad_h, pad_w = -h % pool_h, -w % pool_w
    grid = np.pad(index_grid, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)), constant_values=-1)
    tokens_h, tokens_w = grid.shape[0] // pool_h, grid.shape[1] // pool_w
    windows = grid.reshape(tokens_h, pool_h, tokens_w, pool_w).transpose(0, 2, 1, 3).reshape(-1, pool_h * pool_w)
    return windows, tokens_h, tokens_w


@functools.lru_cache(maxsize=256)
def _image_pooling(rows, cols, crop_patches, overlap_margins, pooling):
    """Pooling windows of one image (global crop first, then the crops) -> (token_pooling (n_tokens, ph*pw)
    int32, grid (low_h, low_w, high_h, high_w)). Depends only on the tiling, hence cached."""
    global_grid = np.arange(crop_patches * crop_patches).reshape(crop_patches, crop_patches)
    low, low_h, low_w = pool_windows(global_grid, *pooling)
    # The stitched high-res grid keeps each crop's central patches: a crop's margin rows/columns are dropped
    # where a neighbouring crop covers them, kept at the image border.
    left, right = overlap_margins

    def kept(n_crops):  # (crop, patch) of every row (or column) of the stitched grid
        return [(i, p) for i in range(n_crops)
                for p in range(left if i > 0 else 0, crop_patches - right if i < n_crops - 1 else crop_patches)]

    row_crop, row_patch = np.array(kept(rows)).T  # (high_rows,) each
    col_crop, col_patch = np.array(kept(cols)).T  # (high_cols,) each
    crop_index = row_crop[:, None] * cols + col_crop[None, :]  # (high_rows, high_cols)
    patch_index = (crop_index * crop_patches + row_patch[:, None]) * crop_patches + col_patch[None, :]
    high, high_h, high_w = pool_windows(patch_index + crop_patches * crop_patches, *pooling)  # after the global crop
    token_pooling = np.concatenate([low, high]).astype(np.int32)
    token_pooling.flags.writeable = False
    return token_pooling, (low_h, low_w, high_h, high_w)


class VisionInput(NamedTuple):
    """One image or one video, ready for the model.
    patches:       (n_crops or n_frames, n_patches, patch_size**2 * 3) float32 in [-1, 1]; with levels=True the
                   uint8 0..255 values they are made from (training.from_uint8 turns them into the same floats)
    token_pooling: (n_tokens, window) indices into patches.view(-1, patch_dim), -1 = padding; int32 for images,
                   int64 for video (the dtypes transformers returns)
    grid:          image (low_h, low_w, high_h, high_w) pooled sizes; video (n_frames, h, w)"""
    patches: torch.Tensor
    token_pooling: torch.Tensor
    grid: tuple


def preprocess_image(image, max_crops=MAX_CROPS, crop_size=CROP_SIZE, patch_size=PATCH_SIZE,
                     overlap_margins=OVERLAP_MARGINS, pooling=IMAGE_POOLING, name=None, levels=False):
    """Image (path, bytes, PIL or uint8 array) -> VisionInput: a global crop (the whole image resized to
    crop_size) followed by up to max_crops overlapping crops of the image resized to its canvas. levels: the
    patches as their uint8 0..255 values, before the normalisation (the training loaders': a quarter of the bytes,
    and the normalising left to the GPU)."""
    pixels = load_image(image, name)  # (H, W, 3) uint8
    height, width = pixels.shape[:2]
    rows, cols, canvas_h, canvas_w = crop_geometry(height, width, max_crops, crop_size, patch_size, overlap_margins)
    stride = (crop_size // patch_size - sum(overlap_margins)) * patch_size
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()  # (1, 3, H, W), channels-last in memory
    n_patches, patch_dim = (crop_size // patch_size) ** 2, patch_size * patch_size * 3
    resize = resize_levels if levels else resize_to_unit_range
    # (n_crops, n_patches, patch_dim); whole 0..255 values copy into uint8 exactly
    patches = torch.empty(1 + rows * cols, n_patches, patch_dim, dtype=torch.uint8 if levels else torch.float32)
    global_crop = resize(x, crop_size, crop_size)[0]  # (S, S, 3)
    crops_to_patches(global_crop, 1, 1, crop_size, crop_size, patch_size, out=patches[:1])
    canvas = resize(x, canvas_h, canvas_w)[0]  # (canvas_h, canvas_w, 3)
    crops_to_patches(canvas, rows, cols, crop_size, stride, patch_size, out=patches[1:])
    token_pooling, grid = _image_pooling(rows, cols, crop_size // patch_size, tuple(overlap_margins), tuple(pooling))
    return VisionInput(patches, torch.from_numpy(token_pooling.copy()), grid)


def image_token_ids(grid):
    """Token ids standing for one image, given its grid (low_h, low_w, high_h, high_w): the low-res view
    <low_res_im_start> + rows of <im_patch> + <im_end>, then the high-res view <im_start> +
    [<im_patch> x high_w + <im_col>] x high_h + <im_end>."""
    low_h, low_w, high_h, high_w = grid
    low = [IMAGE_LOW_RES_START_ID] + [IMAGE_PATCH_ID] * (low_h * low_w) + [IMAGE_END_ID]
    high = [IMAGE_START_ID] + ([IMAGE_PATCH_ID] * high_w + [IMAGE_COL_ID]) * high_h + [IMAGE_END_ID]
    return low + high


def vision_prefix(n_images=0, n_videos=0):
    """The placeholders Molmo2's chat template puts before the conversation: '<|image|>' for one image,
    'Image 1<|image|>Image 2<|image|>...' for several, then '<|video|>' per video."""
    if n_images == 1:
        images = "<|image|>"
    else:
        images = "".join(f"Image {i + 1}<|image|>" for i in range(n_images))
    return images + "<|video|>" * n_videos


# --- video --------------------------------------------------------------------------------------------------


def sample_frame_indices(n_frames, fps, max_frames=MAX_FRAMES, max_fps=MAX_FPS, sampling="uniform"):
    """Which frames of an n_frames video at `fps` to keep -> int64 array of ascending indices.
    'uniform' (transformers' Molmo2VideoProcessor): k = min(max_frames, int(duration * max_fps)) frames (all
        frames up to max_frames when fps <= max_fps), at floor(i * n_frames / k); the last frame is not forced.
    'uniform_last_frame' (Molmo2's training sampler): if the video fits in max_frames at max_fps, every
        fps/max_fps-th frame (never faster than the video itself) plus the last frame; otherwise max_frames
        frames evenly spaced from the first to the last."""
    if sampling == "uniform":
        duration = n_frames / fps
        k = max_frames
        if fps > max_fps:
            k = min(k, int(duration * max_fps))
        k = max(min(k, n_frames), 1)
        # torch's float arange, truncated, exactly as transformers samples
        return torch.arange(0, n_frames, n_frames / k).int().numpy().astype(np.int64)
    if sampling == "uniform_last_frame":
        if n_frames <= 2:
            return np.arange(n_frames)
        if n_frames / fps > (max_frames - 1) / max_fps:
            return np.linspace(0, n_frames - 1, num=min(max_frames, n_frames)).astype(np.int64)
        positions = np.arange(0.0, n_frames - 1, max(fps / max_fps, 1.0))
        indices = np.round(positions).astype(np.int64)
        return indices if indices[-1] == n_frames - 1 else np.append(indices, n_frames - 1)
    raise ValueError(f"frame sampling {sampling!r}: expected one of {FRAME_SAMPLINGS}")


class VideoClip(NamedTuple):
    """The sampled frames of one video: frames (T, H, W, 3) uint8, their indices in the source video, and
    their timestamps in seconds (float32 index / fps, the precision transformers' timestamps have)."""
    frames: np.ndarray
    frame_indices: np.ndarray
    timestamps: list
    fps: float


def _frames_array(frames, name):
    pixels = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[3] != 3:
        raise MediaError("video", name, f"expected (T, H, W, 3) uint8 frames, got {pixels.dtype} {pixels.shape}")
    if len(pixels) == 0:
        raise MediaError("video", name, "has no frames")
    if 0 in pixels.shape[1:3]:
        raise MediaError("video", name, f"frames have a zero side ({pixels.shape[2]}x{pixels.shape[1]})")
    return pixels


def _read_pillow_animation(path, name, pick):
    """GIF / WebP / APNG (or a still image as one frame) -> (frames, indices, fps)."""
    try:
        with Image.open(path) as image:
            n_frames = getattr(image, "n_frames", 1)
            total_ms = 0
            for i in range(n_frames):
                image.seek(i)
                image.load()  # WebP sets a frame's duration only once the frame is decoded
                total_ms += image.info.get("duration", 0) or 0
            fps = n_frames / (total_ms / 1000) if total_ms > 0 else DEFAULT_ANIMATION_FPS
            indices = pick(n_frames, fps)
            frames = {}
            for i in sorted(set(indices.tolist())):
                image.seek(i)
                frames[i] = np.asarray(_pil_to_rgb(image))
    except FileNotFoundError:
        raise MediaError("video", name, "no such file") from None
    except UnidentifiedImageError:
        problem = "not a video or animated image (cannot identify format)" if os.path.getsize(path) else "empty file"
        raise MediaError("video", name, problem) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError("video", name, f"cannot decode ({e})") from None
    return np.stack([frames[i] for i in indices.tolist()]), indices, fps


def _read_pyav(path, name, pick):
    """A video file through PyAV (FFmpeg) -> (frames, indices, fps). Only the sampled frames are converted
    to RGB; decoding stops after the last one."""
    try:
        import av
    except ImportError:
        raise ImportError(f"video {name!r}: reading {os.path.splitext(path)[1] or 'video'} files needs PyAV, "
                          "an optional dependency: pip install av") from None
    if not os.path.exists(path):
        raise MediaError("video", name, "no such file")
    if os.path.getsize(path) == 0:
        raise MediaError("video", name, "empty file")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError("video", name, "has no frames (no video stream)")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            n_frames = stream.frames
            if n_frames <= 0:  # not in the header (webm, mkv): count the packets
                n_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
                if n_frames == 0:
                    raise MediaError("video", name, "has no frames")
                container.seek(0)
            if fps <= 0:
                raise MediaError("video", name, "has no frame rate")
            indices = pick(n_frames, fps)
            wanted, last, frames = set(indices.tolist()), int(indices[-1]), {}
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except MediaError:
        raise
    except av.FFmpegError as e:
        raise MediaError("video", name, f"cannot decode ({e})") from None
    if len(frames) < len(wanted):  # the header over-counted: sample again from the frames that exist
        frames = _decode_all_pyav(path, name)
        indices = pick(len(frames), fps)
        return frames[indices], indices, fps
    return np.stack([frames[i] for i in indices.tolist()]), indices, fps


def _decode_all_pyav(path, name):
    import av
    try:
        with av.open(path) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    except av.FFmpegError as e:
        raise MediaError("video", name, f"cannot decode ({e})") from None
    if not frames:
        raise MediaError("video", name, "has no frames")
    return np.stack(frames)


def load_video(source, max_frames=MAX_FRAMES, max_fps=MAX_FPS, sampling="uniform", name=None):
    """A video -> VideoClip of its sampled frames. `source` is one of
      - (frames, fps): frames a (T, H, W, 3) uint8 array or tensor;
      - (folder, fps): a folder of image files, one frame each, in file-name order;
      - a path to an animated GIF / WebP / APNG (read by pillow; fps from the frame durations);
      - a path to any other video file (mp4, webm, mkv, ...), read by PyAV, an optional dependency.
    Raises MediaError naming the input for a missing, empty, undecodable or frameless video."""
    fps = None
    if isinstance(source, tuple):
        if len(source) != 2:
            raise MediaError("video", _describe(source, name), "expected (frames, fps) or (folder, fps)")
        source, fps = source
        if not isinstance(fps, (int, float)) or fps <= 0:
            raise MediaError("video", _describe(source, name), f"fps must be a positive number, got {fps!r}")
    name = _describe(source, name)

    def pick(n_frames, video_fps):
        return sample_frame_indices(n_frames, video_fps, max_frames, max_fps, sampling)

    if isinstance(source, (np.ndarray, torch.Tensor)):
        if fps is None:
            raise MediaError("video", name, "frames given without fps: pass (frames, fps)")
        frames = _frames_array(source, name)
        indices = pick(len(frames), fps)
        frames = frames[indices]
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            if fps is None:
                raise MediaError("video", name, "a folder of frames needs its fps: pass (folder, fps)")
            files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                raise MediaError("video", name, "folder has no image files")
            indices = pick(len(files), fps)
            frames = np.stack([load_image(os.path.join(path, files[i])) for i in indices.tolist()])
            if len({f.shape for f in frames}) > 1:
                raise MediaError("video", name, "frames differ in size")
        elif fps is not None:
            raise MediaError("video", name, "(path, fps) is only for a folder of frames; a file has its own fps")
        elif path.lower().endswith(VIDEO_EXTENSIONS_PILLOW):
            frames, indices, fps = _read_pillow_animation(path, name, pick)
        else:
            frames, indices, fps = _read_pyav(path, name, pick)
    else:
        raise MediaError("video", name, f"expected a path or (frames, fps), got {type(source).__name__}")
    frames = _frames_array(frames, name)
    timestamps = (indices.astype(np.float32) / np.float32(fps)).tolist()
    return VideoClip(frames, indices, timestamps, float(fps))


def preprocess_video(frames, crop_size=CROP_SIZE, patch_size=PATCH_SIZE, pooling=VIDEO_POOLING, levels=False):
    """(T, H, W, 3) uint8 frames -> VisionInput: each frame resized to one crop_size crop, pooled in
    pool_h x pool_w windows. levels: as preprocess_image's."""
    chunk = 16  # frames resized at a time: bounds the float copy of the source frames
    frames = torch.as_tensor(frames)
    n_frames = len(frames)
    n = crop_size // patch_size
    dtype = torch.uint8 if levels else torch.float32
    patches = torch.empty(n_frames, n * n, patch_size * patch_size * 3, dtype=dtype)  # (T, n_patches, patch_dim)
    for start in range(0, n_frames, chunk):
        x = frames[start:start + chunk].permute(0, 3, 1, 2).float()  # (t, 3, H, W), channels-last in memory
        resized = (resize_levels if levels else resize_to_unit_range)(x, crop_size, crop_size)  # (t, S, S, 3)
        for t in range(len(resized)):
            crops_to_patches(resized[t], 1, 1, crop_size, crop_size, patch_size, out=patches[start + t:start + t + 1])
    windows, tokens_h, tokens_w = pool_windows(np.arange(n * n).reshape(n, n), *pooling)  # (tokens, window)
    windows = torch.from_numpy(windows).long()
    frame_offsets = torch.arange(n_frames).view(-1, 1, 1) * (n * n)  # (T, 1, 1)
    token_pooling = torch.where(windows >= 0, windows + frame_offsets, -1).view(-1, windows.shape[1])
    return VisionInput(patches, token_pooling, (n_frames, tokens_h, tokens_w))


def video_token_ids(grid, timestamps, tokenizer=None):
    """Token ids standing for one video: per frame its timestamp as text ("0.0 ", then " 0.5 ", ...) and
    <frame_start> + <im_patch> x (h * w) + <frame_end>."""
    tokenizer = tokenizer or get_tokenizer()
    n_frames, tokens_h, tokens_w = grid
    frame = [FRAME_START_ID] + [IMAGE_PATCH_ID] * (tokens_h * tokens_w) + [FRAME_END_ID]
    ids = []
    for i, t in enumerate(timestamps):
        ids += tokenizer.encode(f"{' ' if i else ''}{t:.1f} ") + frame
    return ids


# --- the processor ------------------------------------------------------------------------------------------


def concat_pooled(patches, poolings, out=None):
    """Several inputs' patches (n_crops, n_patches, patch_dim) and the pooling indices into each -> one
    (patches, pooling), each input's indices shifted past the patches before it; -1 padding stays -1. How
    images (videos) are concatenated across a batch: transformers' Molmo2 batch convention.
    out(n, crop_shape, dtype): the tensor to write all n crops into, of their dtype and crop shape and at least n
    rows, or None (then as without out): the patches are written into its first rows, its other rows zeroed, and it
    is the patches returned (the training loader's crops, padded and in memory the training process reads, in one
    copy: training.TrainLoader)."""
    if out is not None:
        n = sum(p.shape[0] for p in patches)
        out = out(n, patches[0].shape[1:], patches[0].dtype)
    if out is not None:
        torch.cat(patches, out=out[:n])
        out[n:].zero_()
    if len(patches) == 1:  # no copy
        return patches[0] if out is None else out, poolings[0]
    offsets = torch.tensor(np.cumsum([0] + [p.shape[0] * p.shape[1] for p in patches[:-1]]))  # patches before each
    pooling = torch.cat(poolings)
    # one shift per pooled token, whole-batch ops: a training step joins ~80 examples, and an op per example held the
    # GIL of the process that also launches the GPU's kernels (BENCHMARKS.md "128 joint rows a step")
    shift = torch.repeat_interleave(offsets, torch.tensor([len(x) for x in poolings]))[:, None].to(pooling.dtype)
    return torch.cat(patches) if out is None else out, torch.where(pooling >= 0, pooling + shift, -1)


class Molmo2Processor:
    """Text with <|image|> / <|video|> placeholders + images + videos -> the model's tensors, under the key
    names transformers' Molmo2Processor uses. Molmo2Processor() has the released settings.

        processor = Molmo2Processor()
        batch = processor(text="<|image|>Describe this.", images=["cat.jpg"])
        batch = processor(text="<|video|>What happens?", videos=[(frames, 30.0)])  # or videos=["clip.mp4"]

    Images are paths, bytes, PIL images or (H, W, 3) uint8 arrays; a video is a path (file, or an animated
    GIF/WebP/APNG), a (frames, fps) pair with (T, H, W, 3) uint8 frames, or a (folder, fps) pair. A list of
    texts is left-padded with <|endoftext|>. Unusable media raise MediaError naming the input.
    pixel_levels=True (the training loaders): pixels as their uint8 0..255 levels, before the normalisation
    (preprocess_image's levels)."""

    def __init__(self, tokenizer=None, max_crops=MAX_CROPS, max_frames=MAX_FRAMES, max_fps=MAX_FPS,
                 frame_sampling="uniform", crop_size=CROP_SIZE, patch_size=PATCH_SIZE,
                 overlap_margins=OVERLAP_MARGINS, image_pooling=IMAGE_POOLING, video_pooling=VIDEO_POOLING,
                 pixel_levels=False):
        if frame_sampling not in FRAME_SAMPLINGS:
            raise ValueError(f"frame_sampling {frame_sampling!r}: expected one of {FRAME_SAMPLINGS}")
        crop_geometry(crop_size, crop_size, 1, crop_size, patch_size, overlap_margins)  # validates the sizes
        self.tokenizer = tokenizer or get_tokenizer()
        self.max_crops, self.max_frames, self.max_fps = max_crops, max_frames, max_fps
        self.frame_sampling, self.crop_size, self.patch_size = frame_sampling, crop_size, patch_size
        self.overlap_margins = tuple(overlap_margins)
        self.image_pooling, self.video_pooling = tuple(image_pooling), tuple(video_pooling)
        self.pixel_levels = pixel_levels

    def image(self, image, max_crops=None, name=None):
        """One image -> VisionInput (see preprocess_image)."""
        return preprocess_image(image, max_crops or self.max_crops, self.crop_size, self.patch_size,
                                self.overlap_margins, self.image_pooling, name, levels=self.pixel_levels)

    def video(self, video, name=None):
        """One video -> (VisionInput, timestamps) (see load_video and preprocess_video)."""
        clip = load_video(video, self.max_frames, self.max_fps, self.frame_sampling, name)
        vision = preprocess_video(clip.frames, self.crop_size, self.patch_size, self.video_pooling, self.pixel_levels)
        return vision, clip.timestamps

    def __call__(self, text=None, images=None, videos=None, max_crops=None):
        """-> dict of torch tensors: input_ids, attention_mask, mm_token_type_ids (B, L) int64 when text is
        given; pixel_values (n_crops, n_patches, patch_dim) float32, image_token_pooling (n_tokens, 4) int32,
        image_grids (n_images, 4), image_num_crops (n_images,) when images are; pixel_values_videos
        (n_frames, n_patches, patch_dim), video_token_pooling (n_tokens, 9), video_grids (n_videos, 3) when
        videos are. Images and videos are consumed in placeholder order across the batch."""
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        videos = [] if videos is None else list(videos) if isinstance(videos, list) else [videos]
        texts = [text] if isinstance(text, str) else text
        if texts is not None:
            n_image_slots = sum(t.count("<|image|>") for t in texts)
            n_video_slots = sum(t.count("<|video|>") for t in texts)
            if n_image_slots != len(images) or n_video_slots != len(videos):
                raise ValueError(f"text has {n_image_slots} <|image|> and {n_video_slots} <|video|> placeholders "
                                 f"for {len(images)} images and {len(videos)} videos")
            if any(t.count("<|video|>") > 1 for t in texts):
                raise ValueError("at most one <|video|> per text")
        out = {}
        image_ids, video_ids = [], []
        if images:
            inputs = [self.image(img, max_crops, name=None if isinstance(img, (str, os.PathLike)) else f"images[{i}]")
                      for i, img in enumerate(images)]
            out["pixel_values"], out["image_token_pooling"] = concat_pooled([x.patches for x in inputs],
                                                                            [x.token_pooling for x in inputs])
            out["image_grids"] = torch.tensor([x.grid for x in inputs], dtype=torch.long)
            out["image_num_crops"] = torch.tensor([x.patches.shape[0] for x in inputs], dtype=torch.long)
            image_ids = [image_token_ids(x.grid) for x in inputs]
        if videos:
            inputs = [self.video(v, name=None if isinstance(v, (str, os.PathLike)) else f"videos[{i}]")
                      for i, v in enumerate(videos)]
            out["pixel_values_videos"], out["video_token_pooling"] = concat_pooled([x.patches for x, _ in inputs],
                                                                                   [x.token_pooling for x, _ in inputs])
            out["video_grids"] = torch.tensor([x.grid for x, _ in inputs], dtype=torch.long)
            video_ids = [video_token_ids(x.grid, ts, self.tokenizer) for x, ts in inputs]
        if texts is not None:
            out.update(self.tokenize(texts, iter(image_ids), iter(video_ids)))
        return out

    def tokenize(self, texts, image_ids, video_ids):
        """Texts -> input_ids, attention_mask, mm_token_type_ids: <|im_end|> (Molmo2's BOS) first unless the
        text starts with it, each placeholder replaced by the next id list from the iterators image_ids /
        video_ids (image_token_ids / video_token_ids of the inputs, in order)."""
        rows = []
        for text in texts:
            ids = [] if text.startswith("<|im_end|>") else [IM_END_ID]
            for piece in re.split(r"(<\|image\|>|<\|video\|>)", text):
                if piece == "<|image|>":
                    ids += next(image_ids)
                elif piece == "<|video|>":
                    ids += next(video_ids)
                elif piece:
                    ids += self.tokenizer.encode(piece)
            rows.append(ids)
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), ENDOFTEXT_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, ids in enumerate(rows):  # left padding, as Molmo2's tokenizer is configured
            input_ids[i, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, length - len(ids):] = 1
        mm_token_type_ids = torch.isin(input_ids, torch.tensor(VISION_TOKEN_IDS)).long()  # 1 = vision token
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}


# --- the processor next to a checkpoint ----------------------------------------------------------------------
# A model only works with the preprocessing it was trained with (crop size, overlap margins, crop and frame
# budgets). Training writes processor.json next to the exported model; sample.py and eval.py read it back.

PROCESSOR_FILE = "processor.json"
PROCESSOR_SETTINGS = ("max_crops", "max_frames", "max_fps", "frame_sampling", "crop_size", "patch_size",
                      "overlap_margins", "image_pooling", "video_pooling")


def save_processor_config(out_dir, processor):
    """Write the processor's settings to out_dir/processor.json (next to config.json)."""
    os.makedirs(out_dir, exist_ok=True)
    settings = {k: list(v) if isinstance(v, tuple) else v
                for k, v in ((k, getattr(processor, k)) for k in PROCESSOR_SETTINGS)}
    with open(os.path.join(out_dir, PROCESSOR_FILE), "w") as f:
        json.dump(settings, f, indent=2)


def load_processor(ckpt_dir, crop_size=CROP_SIZE, patch_size=PATCH_SIZE, tokenizer=None):
    """The Molmo2Processor a checkpoint was trained with: ckpt_dir/processor.json when there is one; else, for
    crop_size 378 (the released models), the released settings; else train_joint.py's settings for the small
    presets (overlap margins of 2 patches, or fewer on tiny crops, 4 crops per image, 8 frames)."""
    path = os.path.join(ckpt_dir, PROCESSOR_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            try:
                settings = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"processor settings '{path}': not JSON ({e})") from None
        unknown = sorted(set(settings) - set(PROCESSOR_SETTINGS))
        if unknown:
            raise ValueError(f"processor settings '{path}': unknown keys {unknown}; known {list(PROCESSOR_SETTINGS)}")
        return Molmo2Processor(tokenizer=tokenizer, **settings)
    if crop_size == CROP_SIZE:
        return Molmo2Processor(tokenizer=tokenizer, crop_size=crop_size, patch_size=patch_size)
    margin = min(2, (crop_size // patch_size - 1) // 2)
    return Molmo2Processor(tokenizer=tokenizer, crop_size=crop_size, patch_size=patch_size,
                           overlap_margins=(margin, margin), max_crops=4, max_frames=8)


# (end of section 2)


# ---------------------------------------------------------------------------
# 3. Training data: points, records, the mixture
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


def scaled_point(x, y):
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
        scaled = sorted(scaled_point(x, y) for x, y in points)
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
        scaled = sorted(scaled_point(x, y) for x, y in points)
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
        scaled = sorted((scaled_point(x, y), key) for key, (x, y) in objects.items())
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


def frame_key(t):
    """The frame a timestamp (seconds) or image index belongs to: equal at 0.1 s."""
    return round(float(t), 1)


def points_by_frame(points, name):
    """Video points [(t, x, y), ...] -> {frame_key(t): [(x, y), ...]}; `name` says which points, in errors."""
    frames = {}
    for p in points:
        if len(p) != 3:
            raise ValueError(f"{name}: expected (t, x, y) points, got {p!r}")
        frames.setdefault(frame_key(p[0]), []).append((p[1], p[2]))
    return frames


# --- 3b. Records: one JSON line per image / image set / video / text example ---------------------------
# The record format, shared by every dataset (real ones after prepare_data.py, and the synthetic world):
#
#     {"id": "pixmo_points/000017",                    optional, for reports
#      "image": "images/a.jpg" | ["a.jpg", "b.jpg"],   optional: one image or several (multi-image)
#      "video": "clips/c.gif" | "clips/c_frames/",     optional, never with "image": an animated GIF or a
#                                                      folder of frames in name order (played at "video_fps",
#                                                      default 2)
#      "annotations": [                                one or more; each is a conversation about the same
#         {"style": "point_count",                     media (a branch of the message tree), in a known style
#          "messages": [{"role": "user", "content": "How many red circles are there?"},
#                       {"role": "assistant", "content": "Counting the <points ...>red circles</points> ..."}]},
#         ...],
#      "scene": {...},                                 optional: the synthetic world's ground truth
#      "meta": {...}}                                  optional, anything
#
# Paths are relative to the folder of the JSONL file (or absolute). Messages alternate user / assistant,
# start with the user (a leading "system" message is allowed) and end with the assistant; the user's text
# may be empty (the style prefix then is the prompt), no assistant answer may be. No image and no video is
# a text-only record. Point answers are already Molmo2 text (section 3a): a record is exactly what is
# trained on, and a reader can be checked by eye.
#
# Reading is lazy: RecordFile indexes line offsets once and parses a line, checks it and decodes its media
# only when asked. A bad record raises BadRecord(reason, message); RecordFile.get() counts it in a
# SkipReport and returns None, so a training run skips it and goes on, and prints the counts by reason.

# style -> the per-token loss weight rule it gets (spec section 8): "sqrt" scales a conversation's loss
# tokens by 2/sqrt(n), "grounding" is a flat 0.2 (pointing, counting with points, tracking), "video_caption"
# a flat 0.1. Names follow allenai/molmo2's styles where one exists.
STYLES = {
    # captions
    "long_caption": "sqrt", "transcript": "sqrt",
    "video_long_caption": "video_caption", "video_short_caption": "video_caption",
    "video_merged_caption": "video_caption",
    # image grounding
    "pointing": "grounding", "point_count": "grounding", "cosyn_point": "grounding",
    "multi_image_pointing": "grounding", "multi_image_point_then_count": "grounding",
    # video grounding
    "video_point": "grounding", "video_point_count": "grounding", "video_point_track_per_frame": "grounding",
    # question answering
    "short_answer": "sqrt", "user_qa": "sqrt", "synthetic_qa": "sqrt", "correction_qa": "sqrt",
    "multi_image_short_answer": "sqrt", "video_short_answer": "sqrt",
    "pixmo_docs_charts": "sqrt", "pixmo_docs_tables": "sqrt", "pixmo_docs_diagrams": "sqrt",
    "pixmo_docs_other": "sqrt",
    # text only
    "text_sft": "sqrt",
}

SKIP_REASONS = ("malformed_json", "bad_schema", "unknown_style", "empty_answer", "missing_file",
                "undecodable_image", "undecodable_video")
DEFAULT_VIDEO_FPS = 2.0
_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class BadRecord(Exception):
    def __init__(self, reason, message):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


class SkipReport:
    """Counts skipped records by reason and keeps the first message of each reason."""

    def __init__(self):
        self.n_seen = 0
        self.counts = collections.Counter()
        self.first = {}

    def skip(self, error):
        self.counts[error.reason] += 1
        self.first.setdefault(error.reason, error.message)

    def add(self, n_seen, counts, first):
        """What another process counted (its n_seen, counts and first) -> added to these."""
        self.n_seen += n_seen
        self.counts.update(counts)
        for reason, message in first.items():
            self.first.setdefault(reason, message)

    @property
    def n_skipped(self):
        return sum(self.counts.values())

    def summary(self):
        if not self.counts:
            return f"records: {self.n_seen} read, none skipped"
        lines = [f"records: {self.n_seen} read, {self.n_skipped} skipped"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {reason}: {n} (first: {self.first[reason]})")
        return "\n".join(lines)


def read_image_file(path):
    """An image file -> RGB PIL image, decoded now so a broken file fails here, with its name."""
    from PIL import Image, UnidentifiedImageError
    if not os.path.isfile(path):
        raise BadRecord("missing_file", f"image '{path}' not found")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadRecord("undecodable_image", f"image '{path}': cannot decode ({e})") from None


def read_video_file(path, fps=DEFAULT_VIDEO_FPS):
    """An animated GIF or a folder of frames -> ([RGB PIL frame], [time in s]). A GIF's times come from its
    frame durations; a folder's frames are `fps` apart."""
    from PIL import Image, ImageSequence, UnidentifiedImageError
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(_FRAME_SUFFIXES))
        if not names:
            raise BadRecord("undecodable_video", f"video '{path}': folder has no frame images")
        frames = []
        for name in names:
            try:
                frames.append(read_image_file(os.path.join(path, name)))
            except BadRecord as e:
                raise BadRecord("undecodable_video", f"video '{path}': {e.message}") from None
        return frames, [i / fps for i in range(len(frames))]
    if not os.path.isfile(path):
        raise BadRecord("missing_file", f"video '{path}' not found")
    try:
        frames, times, t = [], [], 0.0
        with Image.open(path) as im:
            for frame in ImageSequence.Iterator(im):
                frames.append(frame.convert("RGB"))
                times.append(t)
                t += frame.info.get("duration", 1000 / fps) / 1000
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError) as e:
        raise BadRecord("undecodable_video", f"video '{path}': cannot decode ({e})") from None
    return frames, times


def check_record(record, where="record"):
    """Raise BadRecord unless `record` (a parsed JSON line) follows the record format. No file access."""
    if not isinstance(record, dict):
        raise BadRecord("bad_schema", f"{where}: a record is a JSON object, got {type(record).__name__}")
    image, video = record.get("image"), record.get("video")
    if image is not None and video is not None:
        raise BadRecord("bad_schema", f"{where}: has both 'image' and 'video'")
    images = [image] if isinstance(image, str) else image
    if image is not None and not (isinstance(images, list) and images and all(isinstance(p, str) and p for p in images)):
        raise BadRecord("bad_schema", f"{where}: 'image' must be a path or a non-empty list of paths")
    if video is not None and not (isinstance(video, str) and video):
        raise BadRecord("bad_schema", f"{where}: 'video' must be a path")
    annotations = record.get("annotations")
    if not isinstance(annotations, list) or not annotations:
        raise BadRecord("bad_schema", f"{where}: 'annotations' must be a non-empty list")
    for a, annotation in enumerate(annotations):
        at = f"{where} annotation {a}"
        if not isinstance(annotation, dict) or not isinstance(annotation.get("messages"), list):
            raise BadRecord("bad_schema", f"{at}: must be an object with 'style' and a 'messages' list")
        style = annotation.get("style")
        if style not in STYLES:
            raise BadRecord("unknown_style", f"{at}: style {style!r} is not one of data.STYLES")
        messages = annotation["messages"]
        if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
            messages = messages[1:]
        if not messages or len(messages) % 2:
            raise BadRecord("bad_schema", f"{at}: needs user/assistant pairs, got {len(messages)} message(s)")
        for m, message in enumerate(messages):
            role = "user" if m % 2 == 0 else "assistant"
            if not isinstance(message, dict) or message.get("role") != role or not isinstance(message.get("content"), str):
                raise BadRecord("bad_schema", f"{at} message {m}: expected {{'role': '{role}', 'content': str}}")
            if role == "assistant" and not message["content"].strip():
                raise BadRecord("empty_answer", f"{at} message {m}: empty answer")


class RecordFile:
    """Lazy random access to a JSONL file of records.

    get(i) -> the record with absolute media paths and, when load_media, its decoded media added as
    "images" ([PIL]) or "video_frames" ([PIL]) + "video_times" ([s]); None for a bad record, which is
    counted in `report` (a SkipReport, shared between files if you like)."""

    def __init__(self, path, report=None, load_media=True):
        self.path = os.path.abspath(path)
        self.root = os.path.dirname(self.path)
        self.report = report if report is not None else SkipReport()
        self.load_media = load_media
        self.offsets = []
        with open(self.path, "rb") as f:
            offset = 0
            for line in f:
                if line.strip():
                    self.offsets.append(offset)
                offset += len(line)

    def __len__(self):
        return len(self.offsets)

    def read(self, i):
        """The i-th record; raises BadRecord."""
        where = f"{os.path.basename(self.path)} record {i}"
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            line = f.readline()
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRecord("malformed_json", f"{where}: {e}") from None
        check_record(record, where)
        if "id" not in record:
            record["id"] = where
        if "image" in record:
            paths = record["image"] if isinstance(record["image"], list) else [record["image"]]
            record["image"] = [os.path.normpath(os.path.join(self.root, p)) for p in paths]
            if self.load_media:
                record["images"] = [read_image_file(p) for p in record["image"]]
            else:
                for p in record["image"]:
                    if not os.path.isfile(p):
                        raise BadRecord("missing_file", f"image '{p}' not found")
        if "video" in record:
            record["video"] = os.path.normpath(os.path.join(self.root, record["video"]))
            if self.load_media:
                record["video_frames"], record["video_times"] = read_video_file(
                    record["video"], record.get("video_fps", DEFAULT_VIDEO_FPS))
            elif not os.path.exists(record["video"]):
                raise BadRecord("missing_file", f"video '{record['video']}' not found")
        return record

    def get(self, i):
        """The i-th record, or None (counted in self.report) if it is bad."""
        self.report.n_seen += 1
        try:
            return self.read(i)
        except BadRecord as e:
            self.report.skip(e)
            return None

    def __iter__(self):
        for i in range(len(self)):
            record = self.get(i)
            if record is not None:
                yield record


# --- 3c. The mixture: groups of datasets with shares ---------------------------------------------------
# A mixture is {group: (share, [dataset, ...])}, as in config/mix_*.py. Each draw picks a group by share
# (groups with no dataset are left out, the others' shares scaled up), then a dataset of the group with
# probability proportional to sqrt(its size) (Molmo2's rule), then the dataset's next index in a fresh
# random order per epoch. The draw is a function of (seed, rank, draw number) and the per-dataset
# cursors, so a sampler's state is a few integers: state_dict() / load_state_dict() resume it exactly.
# Each rank draws its own stream (seeded by rank); a dataset lives at {data_dir}/{name}/{split}.jsonl.

class MixtureSampler:
    """An endless stream of (dataset name, record index) drawn from a mixture."""

    def __init__(self, mixture, dataset_sizes, seed=0, rank=0):
        self.seed, self.rank = seed, rank
        self.groups = []  # [(group, share, [names], [sqrt-size weights])]
        for group, (share, names) in mixture.items():
            names = [n for n in names if dataset_sizes.get(n, 0) > 0]
            if names and share > 0:
                self.groups.append((group, share, names, [math.sqrt(dataset_sizes[n]) for n in names]))
        if not self.groups:
            raise ValueError(f"mixture {mixture}: no group has a non-empty dataset (sizes {dataset_sizes})")
        self.sizes = dict(dataset_sizes)
        self.draws = 0
        self.cursors = {n: [0, 0] for _, _, names, _ in self.groups for n in names}  # name -> [epoch, position]
        self._orders = {}  # name -> (epoch, permutation)

    def probabilities(self):
        """{dataset: probability of being drawn}, from the shares and sqrt sizes."""
        total_share = sum(share for _, share, _, _ in self.groups)
        return {name: share / total_share * w / sum(weights)
                for _, share, names, weights in self.groups for name, w in zip(names, weights)}

    def _order(self, name, epoch):
        import numpy as np
        if self._orders.get(name, (None,))[0] != epoch:
            key = int.from_bytes(hashlib.sha256(f"{self.seed}/{self.rank}/{name}/{epoch}".encode()).digest()[:8], "little")
            self._orders[name] = (epoch, np.random.default_rng(key).permutation(self.sizes[name]))
        return self._orders[name][1]

    def __iter__(self):
        return self

    def __next__(self):
        rng = random.Random(f"{self.seed}/{self.rank}/{self.draws}")
        self.draws += 1
        _, _, names, weights = rng.choices(self.groups, weights=[g[1] for g in self.groups])[0]
        name = rng.choices(names, weights=weights)[0]
        epoch, position = self.cursors[name]
        index = int(self._order(name, epoch)[position])
        self.cursors[name] = [epoch, position + 1] if position + 1 < self.sizes[name] else [epoch + 1, 0]
        return name, index

    def state_dict(self):
        return {"seed": self.seed, "rank": self.rank, "draws": self.draws,
                "cursors": {n: list(c) for n, c in self.cursors.items()}}

    def load_state_dict(self, state):
        if (state["seed"], state["rank"]) != (self.seed, self.rank):
            raise ValueError(f"mixture state for seed {state['seed']} rank {state['rank']}, "
                             f"this sampler has seed {self.seed} rank {self.rank}")
        if set(state["cursors"]) != set(self.cursors):
            raise ValueError(f"mixture state datasets {sorted(state['cursors'])} != {sorted(self.cursors)}")
        self.draws = state["draws"]
        self.cursors = {n: list(c) for n, c in state["cursors"].items()}


def prepare_command(name, data_dir):
    """The arguments of the prepare_data.py command that makes dataset `name` in data_dir: the synthetic world's
    three come from one."""
    return ["prepare_data.py", f"--dataset={'synthetic' if name.startswith('synth_') else name}", f"--out={data_dir}"]


def open_mixture(mixture, data_dir, split="train", seed=0, rank=0, load_media=True, report=None):
    """Open every dataset of a mixture ({data_dir}/{name}/{split}.jsonl; a missing file is an error) and
    its sampler. Returns (sampler, {name: RecordFile}); the files share one SkipReport."""
    report = report if report is not None else SkipReport()
    files = {}
    for group, (share, names) in mixture.items():
        for name in names:
            path = os.path.join(data_dir, name, f"{split}.jsonl")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"mixture group {group!r}: dataset {name!r} has no '{path}' "
                                        f"(`python {' '.join(prepare_command(name, data_dir))}` makes it)")
            files[name] = RecordFile(path, report=report, load_media=load_media)
    sampler = MixtureSampler(mixture, {name: len(f) for name, f in files.items()}, seed, rank)
    return sampler, files


def mixture_records(sampler, files, max_consecutive_skips=1000):
    """Endless (dataset name, record) from a sampler, skipping bad records (counted in the files' report)."""
    skipped = 0
    for name, index in sampler:
        record = files[name].get(index)
        if record is not None:
            skipped = 0
            yield name, record
        else:
            skipped += 1
            if skipped >= max_consecutive_skips:
                raise RuntimeError(f"mixture: {skipped} bad records in a row\n{files[name].report.summary()}")


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
# builds the boolean attention mask block by block from each example's branch and vision ids, and merges
# the vision tensors under transformers' Molmo2 names and batch convention, so both our model and
# transformers' accept a batch.

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
    # (n_image_tokens, n_attributes) int64, set by the training loader when asked (training.image_scene_targets):
    # the synthetic world's attributes of the shape whose centre each image token holds, for train_joint's token_loss
    scene_targets: torch.Tensor | None = None

    def __len__(self):
        return self.input_ids.shape[0]  # not len(tensor): ~5x slower, and a Packer asks ~1,000 times a GPU step

    @property
    def n_crops(self):
        """ViT inputs: image crops plus video frames (what the crop budget counts)."""
        return sum(x.shape[0] for x in (self.pixel_values, self.pixel_values_videos) if x is not None)


def _media_prefix(record, processor):
    """BOS + the record's image or video tokens -> (ids, dict of this example's vision tensors)."""
    ids, vision = [IM_END_ID], {}
    images = record.get("images", record.get("image", []))
    images = [images] if isinstance(images, str) else images
    if images:
        inputs = [processor.image(image) for image in images]
        for i, x in enumerate(inputs):
            if len(inputs) > 1:
                ids += processor.tokenizer.encode(f"Image {i + 1}")
            ids += image_token_ids(x.grid)
        vision["pixel_values"], vision["image_token_pooling"] = concat_pooled([x.patches for x in inputs],
                                                                              [x.token_pooling for x in inputs])
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
        x = preprocess_video(frames, processor.crop_size, processor.patch_size, processor.video_pooling,
                             processor.pixel_levels)
        ids += video_token_ids(x.grid, [times[i] for i in keep], processor.tokenizer)
        vision["pixel_values_videos"] = x.patches
        vision["video_token_pooling"] = x.token_pooling
        vision["video_grids"] = torch.tensor([x.grid], dtype=torch.long)
    elif record.get("video") is not None:
        raise ValueError(f"record {record.get('id', '?')!r}: video {record['video']!r} is not decoded; read "
                         "records with their media (video_frames, video_times)")
    return ids, vision


USER_TURN = "user\n"  # a prompt's turn starts <|im_start|>user\n


def _prefixed(prompt, prefix):
    """The first prompt with the style prefix before it."""
    return f"{prefix} {prompt}" if prompt else prefix


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
            prompt = _prefixed(prompt, prefix)
        if turn > 0:
            add(tokenizer.encode("\n"), False)  # the previous answer's <|im_end|> is already there
        add([IM_START_ID] + tokenizer.encode(USER_TURN + prompt, allow_special=False) + [IM_END_ID]
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
        prefix = style_prefix(style, messages[-1]["content"], style_prefixes, rng)
        ids, has_loss = _conversation_tokens(messages, prefix, tokenizer)
        inputs = ids[:-1]
        targets = [t if loss else -1 for t, loss in zip(ids[1:], has_loss[1:])]
        n_loss = sum(has_loss)
        if budget is not None and len(inputs) > budget:
            if branches:
                break  # this annotation and the later ones do not fit
            inputs, targets = inputs[:max(budget, 0)], targets[:max(budget, 0)]
            if all(t < 0 for t in targets):
                raise ExampleTooLong(f"{where}: {n_prefix} prefix tokens leave no room for an answer "
                                     f"in max_len {max_len}")
        branches.append((inputs, targets, style, n_loss))
        if budget is not None:
            budget -= len(inputs)

    input_ids, positions = list(prefix_ids), list(range(n_prefix))
    target_ids, weights, branch_ids = [-1] * n_prefix, [0.0] * n_prefix, [0] * n_prefix
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
        is_vision=torch.isin(input_ids, torch.tensor(list(VISION_TOKEN_IDS))),
        **vision,
    )


SCAN_CHUNK = 5_000  # records one task of record_token_ids scans


def record_token_ids(data_dir, mixture, tokenizer=None, report=None, workers=0):
    """Every Qwen3 token id that examples of a mixture's datasets can hold, for a small model trained from scratch
    with rows for these tokens only (model.Molmo2Config.keep_tokens): each annotation of every split's
    records in the chat template under each style-prefix mode (so evaluation prompts too), plus what layouts
    add - image labels, video timestamps, single characters, Qwen3's special tokens. Media are not opened;
    bad records are skipped and counted in `report`. Returns a sorted list.
    workers > 1: chunks of SCAN_CHUNK records are scanned in that many forked processes (Linux): the same ids and
    counts. The GPU demo's world of 60,000 images took 21.6 s in one process on this 2-core machine, 11.4 in two."""
    global _SCAN
    tokenizer = MemoTokenizer(tokenizer or Tokenizer())
    ids = set(range(min(SPECIAL_TOKENS.values()), MOLMO2_FIRST_ID))  # <|endoftext|>, <|im_start|>, ... the rest
    texts = [chr(c) for c in range(32, 127)] + ["\n", "\n\n"] + [f"Image {i}" for i in range(1, 17)]
    texts += [f"{' ' if k else ''}{k / 10:.1f} " for k in range(1000)]  # video timestamps up to 99.9 s
    for text in texts:
        ids.update(tokenizer.encode(text, allow_special=False))
    files = []
    for name in {name: None for _, (_, names) in mixture.items() for name in names}:
        paths = [os.path.join(data_dir, name, f"{split}.jsonl") for split in ("train", "val", "test")]
        if not any(os.path.exists(p) for p in paths):
            raise FileNotFoundError(f"dataset {name!r}: no train/val/test.jsonl in {os.path.join(data_dir, name)} "
                                    f"(`python {' '.join(prepare_command(name, data_dir))}` makes it)")
        files += [RecordFile(path, load_media=False) for path in filter(os.path.exists, paths)]
    _SCAN = tokenizer, files  # indexed once here; forked workers inherit both
    chunks = [(f, start, min(start + SCAN_CHUNK, len(records)))
              for f, records in enumerate(files) for start in range(0, len(records), SCAN_CHUNK)]
    if workers > 1 and len(chunks) > 1 and sys.platform.startswith("linux"):
        with fork_context().Pool(min(workers, len(chunks)), initializer=gc.freeze) as pool:
            scanned = pool.map(_scan_records, chunks, chunksize=1)
    else:
        scanned = map(_scan_records, chunks)
    for chunk_ids, counted in scanned:  # in the files' order, so each reason's first message is the serial scan's
        ids |= chunk_ids
        if report is not None:
            report.add(counted.n_seen, counted.counts, counted.first)
    _SCAN = None
    return sorted(ids)


def fork_context():
    """multiprocessing's "fork" context (Linux), for workers that inherit this process's files and loaders instead
    of pickling them, once this process's garbage is collected: a decoded video's codec (PyAV) left in a reference
    cycle owns threads, and freeing it waits on them. A forked child has none of its parent's threads, so a worker
    whose collector freed such a codec waited forever (it hung the test suite's loader tests). Each child also
    calls gc.freeze() first: its collector then never looks at what the fork copied (and those pages stay shared)."""
    import multiprocessing
    gc.collect()
    return multiprocessing.get_context("fork")


_SCAN = None  # record_token_ids' (tokenizer, [RecordFile]) for _scan_records


def _scan_records(chunk):
    """(file number, start, stop) -> (the token ids of that file's records start..stop-1 under every prefix, their
    SkipReport)."""
    f, start, stop = chunk
    tokenizer, files = _SCAN
    records = files[f]
    records.report = SkipReport()  # this chunk's counts alone
    ids = set()
    for i in range(start, stop):
        record = records.get(i)
        for annotation in record["annotations"] if record is not None else ():
            style, messages = annotation["style"], annotation["messages"]
            # sft, none, and pretrain's length hints (negative for short answers)
            prefixes = {style_prefix(style, "", "sft"), "", f"{style} 0:", f"{style} -1:", f"{style}:"}
            ids.update(_annotation_token_ids(messages, prefixes, tokenizer))
    return ids, records.report


def _annotation_token_ids(messages, prefixes, tokenizer):
    """The token ids of _conversation_tokens(messages, prefix) under any of the prefixes, as one set. A prefix
    changes the first prompt alone, so the rest is encoded once, not once a prefix: the GPU demo's world of 60,000
    images took 21.6 s instead of 42.3 on this 2-core machine, and the GPU demo's align stage, which builds that
    vocabulary, 26 s instead of 47 on one H200's host. tests/test_synthetic.py checks the set against
    _conversation_tokens' own under each prefix."""
    ids = set(_conversation_tokens(messages, "", tokenizer)[0])
    first = messages[1 if messages[0]["role"] == "system" else 0]["content"]
    for prefix in prefixes - {""}:
        ids.update(tokenizer.encode(USER_TURN + _prefixed(first, prefix), allow_special=False))
    return ids


class MemoTokenizer:
    """A tokenizer that encodes each distinct short text once (prompts, short answers and the template's pieces
    recur across records; long answers, mostly unique, are encoded as they come, so the memory stays small). The
    same ids as the tokenizer's: encoding is a function of the text."""

    def __init__(self, tokenizer, longest=64, most=100_000):
        self.tokenizer, self.seen, self.longest, self.most = tokenizer, {}, longest, most

    def __getattr__(self, name):  # decode, special ids, ...: the tokenizer's
        if name == "tokenizer":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def encode(self, text, allow_special=True):
        if len(text) > self.longest:
            return self.tokenizer.encode(text, allow_special=allow_special)
        key = (text, allow_special)
        ids = self.seen.get(key)
        if ids is None:
            ids = self.tokenizer.encode(text, allow_special=allow_special)
            if len(self.seen) < self.most:
                self.seen[key] = ids
        return ids


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
        return self.next_keyed()[1]

    def next_keyed(self):
        """-> (the keys of the row's examples, the row). make_example remakes the row from its keys: for a caller
        that holds rows back across a checkpoint (training.TrainLoader's length_groups)."""
        keys, row, n_tokens, n_crops = [], [], 0, 0
        while True:
            self._fill()
            i = next((i for i, (_, ex) in enumerate(self.waiting) if self._fits(ex, n_tokens, n_crops)), None)
            if i is None:
                break
            key, example = self.waiting.pop(i)
            keys.append(key)
            row.append(example)
            n_tokens, n_crops = n_tokens + len(example), n_crops + example.n_crops
        if not row:
            raise StopIteration
        return keys, row

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


def batch_attention_mask(example_ids, branch_ids, is_vision):
    """A collated batch's (B, L) example_ids, branch_ids and vision flags -> its (B, 1, L, L) attn_mask, the
    one collate(mask=True) builds example by example: within an example, example_attention_mask (an example's
    tokens are contiguous, so row order is its order); nothing across examples; a padding query sees itself."""
    L = example_ids.shape[1]
    same_example = (example_ids[:, :, None] == example_ids[:, None, :]) & (example_ids >= 0)[:, :, None]
    branch = (branch_ids[:, :, None] == branch_ids[:, None, :]) | (branch_ids == 0)[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=example_ids.device).tril()
    vision = is_vision.bool()
    mask = same_example & ((branch & causal) | (vision[:, :, None] & vision[:, None, :]))
    mask |= torch.eye(L, dtype=torch.bool, device=example_ids.device) & (example_ids < 0)[:, :, None]
    return mask[:, None]


def collate(rows, pad_to=None, mask=True, crops_out=None):
    """Rows of Examples (from Packer) -> the model's batch, a dict of tensors:

      input_ids (B, L) int64, padded with <|endoftext|>; position_ids (B, L) int64 (0 on padding)
      targets (B, L) int64, -1 = no loss; loss_weights (B, L) float32, 0 = no loss
      example_ids (B, L) int64: the example's index within its row, -1 = padding
      mm_token_type_ids (B, L) int64: 1 = vision token (transformers' name)
      branch_ids (B, L) int64: each token's branch within its example (0 = shared prefix, 0 on padding)
      attn_mask (B, 1, L, L) bool, True = may attend: example_attention_mask on each example's diagonal
                block, nothing across packed examples; a padding query sees only itself (no empty row).
                mask=False leaves it out: batch_attention_mask makes the same from the (B, L) ids, on the GPU,
                where a batch of 64 rows of 512 takes no host time (building it here took 26 ms of a step)
      images, when any:  pixel_values (n_crops, n_patches, patch_dim), image_token_pooling (n_tokens, 4),
                         image_grids (n_images, 4), image_num_crops (n_images,)
      videos, when any:  pixel_values_videos (n_frames, n_patches, patch_dim), video_token_pooling (n_tokens, 9),
                         video_grids (n_videos, 3)
    Images (videos) are concatenated in token order, row after row, and pooling indices offset into the
    concatenated patches: transformers' Molmo2 batch convention. L = pad_to, or the longest row.
    Pixels keep their dtype: the training loader's are uint8 (training.to_uint8, a quarter of the bytes to
    concatenate and copy), and training.batch_to turns them back into the processor's floats, bit for bit.
    crops_out: concat_pooled's out for each media stream, or None; the training loader's pads the crops for a CUDA
    graph where it concatenates them."""
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
    branch_ids = torch.zeros((B, L), dtype=torch.long)
    is_vision = torch.zeros((B, L), dtype=torch.bool)
    examples = [ex for row in rows for ex in row]
    if examples:
        # each token's place in the flattened (B * L) batch: its row's start, then its example's start within the
        # row. Each field is then one concatenation and one indexed write, not a slice write per example (a GPU
        # step's ~80 examples made ~600 small ops, the GIL held between them)
        starts, within_row = [], []  # each example's first place in the flat batch, its index in its row
        for b, row in enumerate(rows):
            start = b * L
            for e, ex in enumerate(row):
                starts.append(start)
                within_row.append(e)
                start += len(ex)
        lens = torch.tensor([len(ex) for ex in examples])
        within_row = torch.tensor(within_row)
        place = torch.repeat_interleave(torch.tensor(starts) - (lens.cumsum(0) - lens), lens) + torch.arange(
            int(lens.sum()))
        for out, name in ((input_ids, "input_ids"), (position_ids, "position_ids"), (targets, "targets"),
                          (loss_weights, "loss_weights"), (is_vision, "is_vision"), (branch_ids, "branch_ids")):
            out.view(-1)[place] = torch.cat([getattr(ex, name) for ex in examples]).to(out.dtype)
        example_ids.view(-1)[place] = torch.repeat_interleave(within_row, lens)
    attn_mask = torch.zeros((B, 1, L, L), dtype=torch.bool) if mask else None
    if mask:
        for b, row in enumerate(rows):
            start = 0
            for ex in row:
                span = slice(start, start + len(ex))
                attn_mask[b, 0, span, span] = example_attention_mask(ex.branch_ids, ex.is_vision)
                start += len(ex)
            padding = torch.arange(start, L)
            attn_mask[b, 0, padding, padding] = True
    batch = {
        "input_ids": input_ids, "position_ids": position_ids, "targets": targets, "loss_weights": loss_weights,
        "example_ids": example_ids, "branch_ids": branch_ids, "mm_token_type_ids": is_vision.long(),
    }
    if mask:
        batch["attn_mask"] = attn_mask
    for pixels, pooling, extra in (("pixel_values", "image_token_pooling", ("image_grids", "image_num_crops")),
                                   ("pixel_values_videos", "video_token_pooling", ("video_grids",))):
        having = [ex for ex in examples if getattr(ex, pixels) is not None]
        if not having:
            continue
        if len({getattr(ex, pixels).dtype for ex in having}) > 1:  # torch.cat would promote uint8 to float
            dtypes = sorted(str(getattr(ex, pixels).dtype) for ex in having)
            raise ValueError(f"collate: {pixels} of mixed dtypes {dtypes}")
        batch[pixels], batch[pooling] = concat_pooled([getattr(ex, pixels) for ex in having],
                                                      [getattr(ex, pooling) for ex in having], out=crops_out)
        for key in extra:
            batch[key] = torch.cat([getattr(ex, key) for ex in having])
    return batch


# (end of section 4)
