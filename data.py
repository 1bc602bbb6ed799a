"""
Everything between raw inputs and the model's tensors.

1. The Qwen3 tokenizer, on tiktoken: Qwen's byte-level BPE ranks (shipped in assets/, checked by
   sha256), Qwen's pre-tokenizer regex, NFC normalisation, Qwen3's special tokens at 151643..151668 and
   Molmo2's vision tokens at 151936..151945.
2. Images and video -> pixels, pooling indices and token strings (Molmo2's processor).
3. Training data: records, formatting, points, packing, the mixture, the synthetic world.
"""

import functools
import hashlib
import io
import os
import re
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


def resize_to_unit_range(images, height, width):
    """(N, 3, H, W) float 0..255 -> (N, height, width, 3) float32 view in [-1, 1]: bilinear without antialias,
    rounded back to whole 0..255 values (Molmo2 resizes uint8 images), then (x - 127.5) / 127.5."""
    resized = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return resized.round_().clamp_(0, 255).sub_(127.5).div_(127.5).permute(0, 2, 3, 1)


def crops_to_patches(image, rows, cols, crop_size, stride, patch_size, out):
    """Copy square crops of an (H, W, C) image view into out (rows * cols, n_patches, patch_size**2 * C):
    crops of crop_size every `stride` px, row-major, each cut into row-major patches flattened as (dy, dx, c)."""
    n = crop_size // patch_size
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
    patches:       (n_crops or n_frames, n_patches, patch_size**2 * 3) float32 in [-1, 1]
    token_pooling: (n_tokens, window) indices into patches.view(-1, patch_dim), -1 = padding; int32 for images,
                   int64 for video (the dtypes transformers returns)
    grid:          image (low_h, low_w, high_h, high_w) pooled sizes; video (n_frames, h, w)"""
    patches: torch.Tensor
    token_pooling: torch.Tensor
    grid: tuple


def preprocess_image(image, max_crops=MAX_CROPS, crop_size=CROP_SIZE, patch_size=PATCH_SIZE,
                     overlap_margins=OVERLAP_MARGINS, pooling=IMAGE_POOLING, name=None):
    """Image (path, bytes, PIL or uint8 array) -> VisionInput: a global crop (the whole image resized to
    crop_size) followed by up to max_crops overlapping crops of the image resized to its canvas."""
    pixels = load_image(image, name)  # (H, W, 3) uint8
    height, width = pixels.shape[:2]
    rows, cols, canvas_h, canvas_w = crop_geometry(height, width, max_crops, crop_size, patch_size, overlap_margins)
    stride = (crop_size // patch_size - sum(overlap_margins)) * patch_size
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()  # (1, 3, H, W), channels-last in memory
    n_patches, patch_dim = (crop_size // patch_size) ** 2, patch_size * patch_size * 3
    patches = torch.empty(1 + rows * cols, n_patches, patch_dim)  # (n_crops, n_patches, patch_dim)
    global_crop = resize_to_unit_range(x, crop_size, crop_size)[0]  # (S, S, 3)
    crops_to_patches(global_crop, 1, 1, crop_size, crop_size, patch_size, out=patches[:1])
    canvas = resize_to_unit_range(x, canvas_h, canvas_w)[0]  # (canvas_h, canvas_w, 3)
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


def preprocess_video(frames, crop_size=CROP_SIZE, patch_size=PATCH_SIZE, pooling=VIDEO_POOLING):
    """(T, H, W, 3) uint8 frames -> VisionInput: each frame resized to one crop_size crop, pooled in
    pool_h x pool_w windows."""
    chunk = 16  # frames resized at a time: bounds the float copy of the source frames
    frames = torch.as_tensor(frames)
    n_frames = len(frames)
    n = crop_size // patch_size
    patches = torch.empty(n_frames, n * n, patch_size * patch_size * 3)  # (T, n_patches, patch_dim)
    for start in range(0, n_frames, chunk):
        x = frames[start:start + chunk].permute(0, 3, 1, 2).float()  # (t, 3, H, W), channels-last in memory
        resized = resize_to_unit_range(x, crop_size, crop_size)  # (t, S, S, 3)
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


def concat_vision_inputs(inputs):
    """Several VisionInputs (the images, or the videos, of one batch, in order) -> (patches, token_pooling)
    with each input's pooling indices shifted past the patches before it; -1 padding stays -1."""
    if len(inputs) == 1:  # no copy
        return inputs[0].patches, inputs[0].token_pooling
    offsets = np.cumsum([0] + [x.patches.shape[0] * x.patches.shape[1] for x in inputs])
    pooling = [torch.where(x.token_pooling >= 0, x.token_pooling + int(o), -1) for x, o in zip(inputs, offsets)]
    return torch.cat([x.patches for x in inputs]), torch.cat(pooling)


class Molmo2Processor:
    """Text with <|image|> / <|video|> placeholders + images + videos -> the model's tensors, under the key
    names transformers' Molmo2Processor uses. Molmo2Processor() has the released settings.

        processor = Molmo2Processor()
        batch = processor(text="<|image|>Describe this.", images=["cat.jpg"])
        batch = processor(text="<|video|>What happens?", videos=[(frames, 30.0)])  # or videos=["clip.mp4"]

    Images are paths, bytes, PIL images or (H, W, 3) uint8 arrays; a video is a path (file, or an animated
    GIF/WebP/APNG), a (frames, fps) pair with (T, H, W, 3) uint8 frames, or a (folder, fps) pair. A list of
    texts is left-padded with <|endoftext|>. Unusable media raise MediaError naming the input."""

    def __init__(self, tokenizer=None, max_crops=MAX_CROPS, max_frames=MAX_FRAMES, max_fps=MAX_FPS,
                 frame_sampling="uniform", crop_size=CROP_SIZE, patch_size=PATCH_SIZE,
                 overlap_margins=OVERLAP_MARGINS, image_pooling=IMAGE_POOLING, video_pooling=VIDEO_POOLING):
        if frame_sampling not in FRAME_SAMPLINGS:
            raise ValueError(f"frame_sampling {frame_sampling!r}: expected one of {FRAME_SAMPLINGS}")
        crop_geometry(crop_size, crop_size, 1, crop_size, patch_size, overlap_margins)  # validates the sizes
        self.tokenizer = tokenizer or get_tokenizer()
        self.max_crops, self.max_frames, self.max_fps = max_crops, max_frames, max_fps
        self.frame_sampling, self.crop_size, self.patch_size = frame_sampling, crop_size, patch_size
        self.overlap_margins = tuple(overlap_margins)
        self.image_pooling, self.video_pooling = tuple(image_pooling), tuple(video_pooling)

    def image(self, image, max_crops=None, name=None):
        """One image -> VisionInput (see preprocess_image)."""
        return preprocess_image(image, max_crops or self.max_crops, self.crop_size, self.patch_size,
                                self.overlap_margins, self.image_pooling, name)

    def video(self, video, name=None):
        """One video -> (VisionInput, timestamps) (see load_video and preprocess_video)."""
        clip = load_video(video, self.max_frames, self.max_fps, self.frame_sampling, name)
        return preprocess_video(clip.frames, self.crop_size, self.patch_size, self.video_pooling), clip.timestamps

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
            out["pixel_values"], out["image_token_pooling"] = concat_vision_inputs(inputs)
            out["image_grids"] = torch.tensor([x.grid for x in inputs], dtype=torch.long)
            out["image_num_crops"] = torch.tensor([x.patches.shape[0] for x in inputs], dtype=torch.long)
            image_ids = [image_token_ids(x.grid) for x in inputs]
        if videos:
            inputs = [self.video(v, name=None if isinstance(v, (str, os.PathLike)) else f"videos[{i}]")
                      for i, v in enumerate(videos)]
            out["pixel_values_videos"], out["video_token_pooling"] = concat_vision_inputs([x for x, _ in inputs])
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


# (end of section 2)


# ---------------------------------------------------------------------------
# 3. Training data: records, formatting, points, packing, mixture, synthetic world
# ---------------------------------------------------------------------------


# (end of section 3)
