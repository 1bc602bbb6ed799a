"""
Ask nanoMolmo2 about images or a video; see its points.

    python sample.py --image cat.jpg                                   # the default prompt
    python sample.py --image cat.jpg --prompt="Point to the eyes."
    python sample.py --image a.png --image b.png --prompt="Which image has more red circles?"
    python sample.py --video=clip.mp4 --prompt="Track the ball."       # or an animated GIF, or a frame folder
    python sample.py --init_from=allenai/Molmo2-4B --image cat.jpg     # a hub id, a model dir, or a training out_dir
    python sample.py --image cat.jpg --interactive=True                # keep the model loaded, ask again and again
    python sample.py --serve=True                                      # a web page to ask it in (serve.py)

Design choices:
- nanoGPT-style knobs below, overridden by configurator (--key=value). --image and --video also take the
  space-separated form (`--image cat.jpg`), and --image may repeat; those two are read here, before the
  configurator sees the rest of the command line.
- The prompt is laid out exactly as training lays out a record (prompt_example -> data.format_example),
  with the processor settings the checkpoint was trained with (processor.json next to it; see
  data.load_processor). `style` adds the training style prefix ("pointing", "short_answer", ...); the
  default, "demo", has none.
- The answer is streamed as it is generated. When it holds points or tracks they are printed in pixels
  and drawn: a PNG per image, an animated GIF for a video (draw_points / save_video_gif), named
  answer<k> with k one past the highest already in out_dir, so a run never overwrites an earlier one's. What
  could not be read, or names a frame or image the media do not have, is said, never silently left out.
- --explain=True also draws what the model saw and where it looked, from the tensors of this very prompt, into
  out_dir/explain/answer<k>_*.png (the section "See inside" below says how each picture is made).
- A model from scratch with kept tokens (--vocab=data) has rows only for its training data's words. A question
  with other words is refused naming them, with questions of the synthetic world it does have every word
  for (prepare_data.py, drawn here) and the words it knows; a default prompt it lacks words for is
  replaced by such a question.
- With no --init_from, the model is out/joint, or make demo's out/demo/joint where out/joint has none.
- A video file (mp4, webm, ...) needs PyAV (`pip install av`); GIFs and frame folders do not.
- Pictures use pillow only. Small images are upscaled (nearest) so markers stay readable. Predicted
  points: filled orange dots with a white ring and black edge; true points: green rings with black edges;
  a legend names both. eval.py's report draws with the same functions.
"""

import dataclasses
import math
import os
import random
import re
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data
import prepare_data
from configurator import configure
from model import Molmo2, apply_rope, generate, resolve_checkpoint

DEFAULT_INIT_FROM = "out/joint"
# what `make demo` (demo.py) writes: its model and its world. Where the usual default holds nothing, sample.py
# and eval.py use these, so they work after `make demo` with no arguments.
DEMO_INIT_FROM, DEMO_DATA_DIR = "out/demo/joint", "data/demo"

# -- knobs (override with --key=value) ---------------------------------------------------------------------------
init_from = DEFAULT_INIT_FROM  # a training out_dir (holding final/), a model directory, or a hub id; where
#   out/joint holds none, make demo's out/demo/joint
prompt = ""  # default: DEFAULT_PROMPTS for the media given (for a kept-token model, a question it knows)
style = "demo"  # the training style whose prefix the prompt gets (e.g. pointing, short_answer); demo = none
video_fps = 2.0  # frames per second of a folder of frames
max_crops = 0  # crops per image; 0 = as the checkpoint was trained
max_new_tokens = 384
temperature = 0.0  # 0 = greedy
top_k = 0  # 0 = off
top_p = 1.0  # 1.0 = off
seed = 1337
interactive = False  # ask several questions about the same media (":image x.jpg" / ":video y.gif" switches)
out_dir = "out/sample"  # where pictures of the points go (answer<k>.png, k counting on from earlier runs)
explain = False  # also draw what the model saw and where it looked, into out_dir/explain/answer<k>_*.png
explain_layers = ()  # the LLM layers whose attention "where it looked" averages, e.g. (2, 3) or (-1,); () = all
serve = False  # a web page instead of one question (serve.py): drop pictures or a video, ask, see the points
host = "127.0.0.1"  # where the page listens (serve=True); 0.0.0.0 lets other machines ask
port = 8000  # 0 = any free port
max_upload_mb = 50  # the largest request the page may send (serve=True)
device = "cpu"
dtype = "float32"
# ----------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------
# Loading a model, prompts laid out as in training, batched generation
# ----------------------------------------------------------------------------------------------------------------
# A prompt is built by data.format_example itself (the training layout, never a second copy of it): the
# record with the question and a one-token placeholder answer is formatted, and the tokens are cut just
# before the placeholder, i.e. right after '<|im_start|>assistant\n'. Prompts of a batch are collated as
# training collates them, then left-aligned for generation.

PLACEHOLDER_ANSWER = "?"
PER_TOKEN_FIELDS = ("input_ids", "targets", "loss_weights", "position_ids", "branch_ids", "is_vision")


def python_command(*args):
    """A command line to suggest in a message, with the python running now (`.venv/bin/python` after the
    README's set-up), so that it works as typed."""
    python = os.path.relpath(sys.executable)
    return " ".join([sys.executable if python.startswith("..") else python, *args])


def local_model_dir(init_from):
    """init_from/final (a training out_dir) or init_from (a model directory), whichever holds config.json; else None."""
    return next((path for path in (os.path.join(init_from, "final"), init_from)
                 if os.path.isfile(os.path.join(path, "config.json"))), None)


def or_demo(value, default, demo, holds):
    """`value`, or make demo's `demo` when value is the usual `default`, that holds nothing and the demo's does
    (holds(path): truthy when it does)."""
    if value == default and not holds(default) and holds(demo):
        print(f"(nothing in {default}; using {demo}, which make demo wrote)")
        return demo
    return value


def resolve_model_dir(init_from):
    """A training output directory (holding final/), a model directory (holding config.json) or a hub id
    -> a local directory with config.json."""
    path = local_model_dir(init_from)
    if path:
        return path
    train = (f"`{python_command('prepare_data.py', '--dataset=synthetic')}`, then "
             f"`{python_command('train_joint.py', f'--out_dir={init_from}')}`")
    if init_from in (DEFAULT_INIT_FROM, DEMO_INIT_FROM):
        nor = f", nor in {DEMO_INIT_FROM} (make demo's)" if init_from == DEFAULT_INIT_FROM else ""
        raise FileNotFoundError(
            f"init_from '{init_from}': no trained model there{nor}. Run `make demo` (it writes {DEMO_INIT_FROM}, which "
            f"the default falls back to), or train one: {train}; or pass --init_from=<a training out_dir, a model "
            "directory, or a hub id such as allenai/Molmo2-4B>")
    if os.path.exists(init_from):
        raise FileNotFoundError(
            f"init_from '{init_from}': no trained model there (expected {os.path.join(init_from, 'final')}"
            f"/config.json). Pass a finished run's out_dir (`make demo` writes {DEMO_INIT_FROM}), a model directory "
            f"or a hub id such as allenai/Molmo2-4B; or train one there: {train}")
    return resolve_checkpoint(init_from)  # a hub id; raises naming it when it cannot be downloaded


def load_model(init_from, device="cpu", dtype=torch.float32):
    """-> (Molmo2 in eval mode, the data.Molmo2Processor it was trained with, its directory)."""
    path = resolve_model_dir(init_from)
    model = Molmo2.from_pretrained(path, dtype).to(device).eval()
    processor = data.load_processor(path, model.config.vit.image_size, model.config.vit.patch_size)
    return model, processor, path


def unknown_tokens(model, input_ids):
    """The ids of input_ids (in order, once each) that a model with kept tokens (--vocab=data) has no rows for;
    [] for a full-vocabulary model."""
    if model.config.token_ids is None:
        return []
    rows = model.kept_tables(input_ids.device)[0][input_ids]  # the model's own id -> row map, -1 = no row
    return list(dict.fromkeys(input_ids[rows < 0].tolist()))


def prompt_example(record, messages, style, processor, style_prefixes="sft"):
    """The generation prompt for `messages` (the turns so far, ending with the user's question) about the
    record's media (section 3's record format, media decoded or as paths) -> data.Example, laid out exactly
    as data.format_example lays out training: BOS, vision tokens, the style prefix for `style` (per
    style_prefixes 'sft' | 'none'), the chat turns, '<|im_start|>assistant\\n'."""
    if style_prefixes not in ("sft", "none"):
        raise ValueError(f"style_prefixes {style_prefixes!r}: prompts support 'sft' or 'none' ('pretrain' "
                         "prefixes hint at the answer's length, which is unknown when asking)")
    conversation = list(messages) + [{"role": "assistant", "content": PLACEHOLDER_ANSWER}]
    example = data.format_example({**record, "annotations": [{"style": style, "messages": conversation}]},
                                  processor, style_prefixes=style_prefixes, loss_weighting="none")
    # inputs end with the placeholder (its <|im_end|> is only a target): the prompt is everything before it
    placeholder = processor.tokenizer.encode(PLACEHOLDER_ANSWER)
    if len(placeholder) != 1 or int(example.input_ids[-1]) != placeholder[0]:
        raise RuntimeError("prompt_example: data.format_example no longer ends with the answer's first token")
    n = len(example) - 1
    return dataclasses.replace(example, **{f: getattr(example, f)[:n] for f in PER_TOKEN_FIELDS})


def collate_prompts(examples):
    """Prompts (data.Example) -> the model's inputs for generate: input_ids, attention_mask and
    mm_token_type_ids (B, L) left-padded with <|endoftext|>, and the vision tensors as data.collate merges
    them (transformers' batch convention). A batch holds images or videos, not both."""
    batch = data.collate([[example] for example in examples])  # right-padded, one example per row
    if "pixel_values" in batch and "pixel_values_videos" in batch:
        raise ValueError("collate_prompts: a batch mixes images and videos; batch them apart")
    B, L = batch["input_ids"].shape
    out = {"input_ids": torch.full((B, L), data.ENDOFTEXT_ID, dtype=torch.long),
           "attention_mask": torch.zeros(B, L, dtype=torch.long),
           "mm_token_type_ids": torch.zeros(B, L, dtype=torch.long)}
    for b, example in enumerate(examples):
        n = len(example)
        out["input_ids"][b, L - n:] = batch["input_ids"][b, :n]
        out["mm_token_type_ids"][b, L - n:] = batch["mm_token_type_ids"][b, :n]
        out["attention_mask"][b, L - n:] = 1
    vision_keys = ("pixel_values", "image_token_pooling", "image_grids", "image_num_crops", "pixel_values_videos",
                   "video_token_pooling", "video_grids")
    out.update({k: batch[k] for k in vision_keys if k in batch})
    return out


def decode_answer(ids, tokenizer):
    """New token ids -> the answer's text, up to the first <|im_end|> / <|endoftext|>."""
    ids = [int(i) for i in ids]
    for stop in (data.IM_END_ID, data.ENDOFTEXT_ID):
        if stop in ids:
            ids = ids[:ids.index(stop)]
    return tokenizer.decode(ids, skip_special=True).strip()


def generate_answers(model, processor, examples, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                     on_token=None, generator=None):
    """Answers (str) to a batch of prompts (prompt_example), generated together; on_token(step, ids (B,))
    streams the new tokens."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_prompts(examples).items()}
    input_ids, attention_mask = batch.pop("input_ids"), batch.pop("attention_mask")
    new = generate(model, input_ids, max_new_tokens, attention_mask=attention_mask, temperature=temperature,
                   top_k=top_k, top_p=top_p, stop_ids=(data.IM_END_ID, data.ENDOFTEXT_ID), on_token=on_token,
                   generator=generator, **batch)
    return [decode_answer(row, processor.tokenizer) for row in new.tolist()]


# ----------------------------------------------------------------------------------------------------------------
# The command line: media from paths, the answer streamed as it comes, its points printed and drawn
# ----------------------------------------------------------------------------------------------------------------

DEFAULT_PROMPTS = {"image": "Describe this image in detail.", "images": "Describe these images.",
                   "video": "Describe this video.", "text": "Hello! What can you do?"}
MEDIA_FLAGS = ("--image", "--video")


def split_media_args(argv):
    """Take --image / --video values out of argv (as --image=x or --image x; --image may repeat) ->
    (images, videos, the rest for the configurator)."""
    media = {"--image": [], "--video": []}
    rest, i = [], 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in MEDIA_FLAGS:
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise SystemExit(f"{flag}: expected a path after it ({flag} cat.jpg or {flag}=cat.jpg)")
                i += 1
                value = argv[i]
            media[flag].append(value)
        else:
            rest.append(argv[i])
        i += 1
    if len(media["--video"]) > 1 or (media["--video"] and media["--image"]):
        raise SystemExit("give several --image, or one --video (a prompt holds at most one video, and no images then)")
    return media["--image"], media["--video"], rest


def media_record(images, video, processor):
    """Paths -> a record (data.py section 3b's shape) holding the decoded media, as format_example reads it."""
    if video:
        source = (video, video_fps) if os.path.isdir(video) else video
        clip = data.load_video(source, processor.max_frames, processor.max_fps, "uniform_last_frame", name=video)
        return {"id": video, "video": video, "video_frames": [Image.fromarray(f) for f in clip.frames],
                "video_times": clip.timestamps}
    if not images:
        return {"id": "text"}
    return {"id": ", ".join(images), "image": list(images),
            "images": [Image.fromarray(data.load_image(path)) for path in images]}


class Streamer:
    """Prints the answer as tokens come: decodes all tokens so far and shows what is new (a character split
    over several byte-level tokens shows once it is whole)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, step, ids):
        token = int(ids[0])
        if token in (data.IM_END_ID, data.ENDOFTEXT_ID):
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special=True)
        if not text.endswith("\ufffd"):
            self.show(text[len(self.shown):], text)
            self.shown = text

    def show(self, new, text):
        """The answer's new text (new) and the whole answer so far (text); serve.py sends them to the page instead."""
        print(new, end="", flush=True)


def next_picture_stem():
    """out_dir/answer<k>, k one past the highest k of the pictures already there or in out_dir/explain."""
    folders = [folder for folder in (out_dir, os.path.join(out_dir, "explain")) if os.path.isdir(folder)]
    taken = [int(m.group(1)) for folder in folders for name in os.listdir(folder)
             if (m := re.match(r"answer(\d+)[._]", name))]
    return os.path.join(out_dir, f"answer{max(taken, default=0) + 1}")


def show_points(answer, record, stem):
    """Print the answer's points in pixels and draw them; say what could not be read and which points name a
    frame or image the media do not have. Returns the paths of the pictures written."""
    parsed = data.parse_points(answer)
    if parsed.dropped:
        print(f"dropped {len(parsed.dropped)} unreadable part(s) of the answer's points:")
        for problem in parsed.dropped:
            print(f"  {problem}")
    if not parsed.points or not (record.get("images") or record.get("video_frames")):
        if parsed.dropped:
            print("no points left to draw")
        return []
    os.makedirs(out_dir, exist_ok=True)
    if "video_frames" in record:
        return [show_video_points(parsed, record, stem)]
    images = record["images"]
    for tag in parsed.tags:
        print(f"{tag.kind} '{tag.label}':")
        for p in tag.points:
            width, height = images[min(max(int(p.frame), 1), len(images)) - 1].size
            where = f"image {int(p.frame)}  " if len(images) > 1 else ""
            print(f"  {where}id {p.id}  x={p.x * width:.1f}  y={p.y * height:.1f}")
    if len(images) > 1:
        elsewhere = [p for p in parsed.points if not 1 <= int(p.frame) <= len(images)]
        if elsewhere:
            print(f"{len(elsewhere)} point(s) name an image other than 1..{len(images)}: not drawn")
    paths = []
    for k, image in enumerate(images, 1):
        mine = [p for p in parsed.points if len(images) == 1 or int(p.frame) == k]
        path = f"{stem}.png" if len(images) == 1 else f"{stem}_image{k}.png"
        draw_points(image, [(p.x * image.width, p.y * image.height) for p in mine], path=path)
        paths.append(path)
    return paths


def show_video_points(parsed, record, stem):
    """Print a video answer's points in pixels and draw them on their frames in a GIF; returns its path."""
    width, height = record["video_frames"][0].size
    for tag in parsed.tags:
        print(f"{tag.kind} '{tag.label}':")
        for p in tag.points:
            print(f"  t={float(p.frame):.1f}s  id {p.id}  x={p.x * width:.1f}  y={p.y * height:.1f}")
    times = {data.frame_key(t) for t in record["video_times"]}
    elsewhere = [p for p in parsed.points if data.frame_key(p.frame) not in times]
    if elsewhere:
        print(f"{len(elsewhere)} point(s) at times with no frame (the frames are at "
              f"{', '.join(f'{t:.1f}' for t in record['video_times'])} s): not drawn")
    pred = [(float(p.frame), p.x * width, p.y * height) for p in parsed.points]
    if any(tag.kind == "tracks" for tag in parsed.tags):
        tracks = {}
        for p, (t, x, y) in zip(parsed.points, pred):
            tracks.setdefault(p.id, []).append((t, x, y))
        pred = tracks
    return save_video_gif(f"{stem}.gif", record["video_frames"], record["video_times"], pred)


# ----------------------------------------------------------------------------------------------------------------
# Pictures: points and tracks drawn on the media, heat maps, panels of pictures
# ----------------------------------------------------------------------------------------------------------------

PRED_COLOR = (255, 110, 0)  # orange: predicted
TRUE_COLOR = (0, 220, 90)  # green: true
# one colour per track id, distinguishable on photos and on flat synthetic scenes
TRACK_COLORS = [(255, 110, 0), (0, 200, 255), (255, 0, 200), (255, 230, 0), (120, 80, 255), (0, 220, 90),
                (255, 60, 60), (160, 255, 120)]
MIN_DRAW_SIZE = 320  # images smaller than this on their long side are upscaled before drawing


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _prepare(image, min_size=MIN_DRAW_SIZE):
    """An RGB copy to draw on, upscaled by an integer factor when small; returns (copy, factor)."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"image: expected a PIL image, got {type(image).__name__}")
    factor = max(1, math.ceil(min_size / max(image.size)))
    canvas = image.convert("RGB")
    if factor > 1:
        canvas = canvas.resize((image.width * factor, image.height * factor), Image.NEAREST)
    return canvas, factor


def _marker_radius(canvas):
    return max(4, round(0.012 * max(canvas.size)))


def _dot(draw, xy, r, color):
    """A predicted point: filled dot, white ring, black edge (visible on light and dark backgrounds)."""
    x, y = xy
    draw.ellipse((x - r - 2, y - r - 2, x + r + 2, y + r + 2), fill=(0, 0, 0))
    draw.ellipse((x - r - 1, y - r - 1, x + r + 1, y + r + 1), fill=(255, 255, 255))
    draw.ellipse((x - r + 1, y - r + 1, x + r - 1, y + r - 1), fill=color)


def _ring(draw, xy, r, color):
    """A true point: a thick hollow ring of inner radius r with black edges, wide enough that a predicted
    dot of radius r on the same spot shows inside it."""
    x, y = xy
    width = max(2, round(r * 0.6))
    inner = r + 2
    outer = inner + width
    draw.ellipse((x - outer - 1, y - outer - 1, x + outer + 1, y + outer + 1), outline=(0, 0, 0), width=1)
    draw.ellipse((x - outer, y - outer, x + outer, y + outer), outline=color, width=width)
    draw.ellipse((x - inner, y - inner, x + inner, y + inner), outline=(0, 0, 0), width=1)


def _legend(draw, entries, font, corner=(6, 6)):
    """A dark box with a marker and a name per entry: entries = [(kind 'dot'|'ring'|'line', color, text)]."""
    size = font.size if hasattr(font, "size") else 11
    r = max(4, size // 3)
    row = size + 6
    width = max(draw.textlength(text, font=font) for _, _, text in entries) + 3 * r + 18
    x0, y0 = corner
    draw.rectangle((x0, y0, x0 + width, y0 + row * len(entries) + 6), fill=(20, 20, 20), outline=(230, 230, 230))
    for i, (kind, color, text) in enumerate(entries):
        cy = y0 + 6 + i * row + row // 2 - 2
        cx = x0 + 6 + r + 2
        if kind == "dot":
            _dot(draw, (cx, cy), r, color)
        elif kind == "ring":
            _ring(draw, (cx, cy), max(2, r - 3), color)
        else:
            draw.line((cx - r - 2, cy, cx + r + 2, cy), fill=color, width=3)
        draw.text((cx + r + 8, cy), text, fill=(255, 255, 255), font=font, anchor="lm")


def _draw_points_on(draw, pred, true, factor, r):
    for x, y in true or ():
        _ring(draw, (x * factor, y * factor), r, TRUE_COLOR)
    for x, y in pred or ():
        _dot(draw, (x * factor, y * factor), r, PRED_COLOR)


def _points_entries(pred, true):
    entries = [("dot", PRED_COLOR, f"predicted ({len(pred or ())})")]
    if true is not None:
        entries.append(("ring", TRUE_COLOR, f"true ({len(true)})"))
    return entries


def draw_points(image, pred, true=None, path=None, legend=True):
    """Draws (x, y) pixel points on a copy of `image`: predicted as orange dots, true (optional) as green
    rings, with a legend. Saves a PNG when `path` is given. Returns the drawn image (upscaled when the
    input is under MIN_DRAW_SIZE px on its long side)."""
    canvas, factor = _prepare(image)
    draw = ImageDraw.Draw(canvas)
    _draw_points_on(draw, pred, true, factor, _marker_radius(canvas))
    if legend:
        _legend(draw, _points_entries(pred, true), _font(max(11, canvas.height // 32)))
    if path is not None:
        canvas.save(path)
    return canvas


def _track_color(index):
    return TRACK_COLORS[index % len(TRACK_COLORS)]


def _draw_tracks_on(draw, tracks, factor, r, predicted, until=None):
    """Polylines of {track_id: [(t, x, y)]}, one colour per track (in id order); `until` (a frame key)
    draws each track up to that frame, with its point at that frame marked."""
    for index, track_id in enumerate(sorted(tracks, key=str)):
        color = _track_color(index)
        points = sorted(tracks[track_id], key=lambda p: p[0])
        if until is not None:
            points = [p for p in points if data.frame_key(p[0]) <= until]
        xys = [(x * factor, y * factor) for _, x, y in points]
        if len(xys) > 1:
            draw.line(xys, fill=(0, 0, 0), width=5 if predicted else 3, joint="curve")
            draw.line(xys, fill=color, width=3 if predicted else 1, joint="curve")
        marked = [xy for p, xy in zip(points, xys) if until is None or data.frame_key(p[0]) == until]
        for xy in marked:
            (_dot if predicted else _ring)(draw, xy, r, color)


def draw_tracks(image, pred_tracks, true_tracks=None, path=None):
    """Draws tracks {track_id: [(t, x, y), ...]} (pixels) on a copy of `image` as one polyline per track
    with a marker at every point: predicted thick lines and dots, true thin lines and rings; colours
    follow the track ids' sorted order. Saves a PNG when `path` is given; returns the image."""
    canvas, factor = _prepare(image)
    draw = ImageDraw.Draw(canvas)
    r = _marker_radius(canvas)
    if true_tracks:
        _draw_tracks_on(draw, true_tracks, factor, r, predicted=False)
    _draw_tracks_on(draw, pred_tracks, factor, r, predicted=True)
    entries = [("dot", (255, 255, 255), "predicted (thick, dots)")]
    if true_tracks is not None:
        entries.append(("ring", (255, 255, 255), "true (thin, rings)"))
    _legend(draw, entries, _font(max(11, canvas.height // 32)))
    if path is not None:
        canvas.save(path)
    return canvas


def save_video_gif(path, frames, timestamps, pred=None, true=None, frame_ms=500):
    """An animated GIF of `frames` (PIL images) at `timestamps` (seconds) with points drawn on the frame
    they belong to. pred / true: video points [(t, x, y), ...] or tracks {track_id: [(t, x, y), ...]}
    (drawn as trails up to the current frame), in pixels."""
    if len(frames) != len(timestamps) or not frames:
        raise ValueError(f"frames / timestamps: expected the same non-zero length, "
                         f"got {len(frames)} / {len(timestamps)}")
    as_tracks = isinstance(pred, dict) or isinstance(true, dict)
    pred_by_frame = {} if as_tracks or pred is None else data.points_by_frame(pred, "pred")
    true_by_frame = {} if as_tracks or true is None else data.points_by_frame(true, "true")
    drawn = []
    for frame, t in zip(frames, timestamps):
        canvas, factor = _prepare(frame)
        draw = ImageDraw.Draw(canvas)
        r = _marker_radius(canvas)
        font = _font(max(11, canvas.height // 32))
        key = data.frame_key(t)
        if as_tracks:
            if true:
                _draw_tracks_on(draw, true, factor, r, predicted=False, until=key)
            if pred:
                _draw_tracks_on(draw, pred, factor, r, predicted=True, until=key)
            entries = [("dot", (255, 255, 255), "predicted")] + ([("ring", (255, 255, 255), "true")] if true else [])
        else:
            _draw_points_on(draw, pred_by_frame.get(key, []), true_by_frame.get(key, []), factor, r)
            entries = [("dot", PRED_COLOR, "predicted")] + ([("ring", TRUE_COLOR, "true")] if true is not None else [])
        _legend(draw, entries, font)
        label = f"t = {t:.1f} s"
        x1 = canvas.width - 6
        box = draw.textbbox((x1, 6), label, font=font, anchor="ra")
        draw.rectangle((box[0] - 4, box[1] - 3, box[2] + 4, box[3] + 3), fill=(20, 20, 20))
        draw.text((x1, 6), label, fill=(255, 255, 255), font=font, anchor="ra")
        drawn.append(canvas)
    drawn[0].save(path, save_all=True, append_images=drawn[1:], duration=frame_ms, loop=0)
    return path


def _fit_text(draw, text, font, width):
    """`text` cut (with an ellipsis) to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def save_example_grid(path, examples, columns=4, cell_size=256):
    """A report figure: one cell per example, each its image with predicted and true points and up to two
    caption lines beneath. examples: [{"image": PIL image, "pred": [(x, y)], "true": [(x, y)] or None,
    "title": str (optional, e.g. the prompt), "subtitle": str (optional, e.g. 'P 1.00 R 0.50')}]."""
    if not examples:
        raise ValueError("examples: expected at least one example")
    font = _font(13)
    line = 17
    has_truth = any(example.get("true") is not None for example in examples)
    header = 16 + line * (2 if has_truth else 1)
    columns = min(columns, len(examples))
    rows = math.ceil(len(examples) / columns)
    cell_h = cell_size + 2 * line + 8
    grid = Image.new("RGB", (columns * (cell_size + 8) + 8, header + rows * cell_h + 8), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, example in enumerate(examples):
        image = example["image"]
        if not isinstance(image, Image.Image):
            raise ValueError(f"examples[{i}]['image']: expected a PIL image, got {type(image).__name__}")
        scale = cell_size / max(image.size)  # fit the cell, then draw, so markers keep their size
        shown = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                            Image.NEAREST if scale > 1 else Image.BILINEAR)
        _draw_points_on(ImageDraw.Draw(shown), example.get("pred"), example.get("true"), scale, 5)
        x0 = 8 + (i % columns) * (cell_size + 8)
        y0 = header + (i // columns) * cell_h
        grid.paste(shown, (x0 + (cell_size - shown.width) // 2, y0 + (cell_size - shown.height) // 2))
        draw.rectangle((x0 - 1, y0 - 1, x0 + cell_size, y0 + cell_size), outline=(180, 180, 180))
        for k, key in enumerate(("title", "subtitle")):
            if example.get(key):
                text = _fit_text(draw, str(example[key]), font, cell_size)
                draw.text((x0, y0 + cell_size + 4 + k * line), text, fill=(0, 0, 0), font=font)
    entries = [("dot", PRED_COLOR, "predicted")] + ([("ring", TRUE_COLOR, "true")] if has_truth else [])
    _legend(draw, entries, font, corner=(8, 4))
    grid.save(path)
    return path


# Heat maps (sample.py --explain, docs/figures.py): a colour ramp from black through purple and orange to pale
# yellow (after matplotlib's "inferno"), so brightness alone orders the values and the ramp survives greyscale.
HEAT_RAMP = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                      (250, 193, 39), (252, 255, 164)], dtype=np.float32)


def heat_colors(values):
    """Values in [0, 1] (any shape) -> uint8 RGB (..., 3) along HEAT_RAMP; values outside are clipped."""
    position = np.clip(np.asarray(values, dtype=np.float32), 0, 1) * (len(HEAT_RAMP) - 1)
    low = np.minimum(position.astype(np.int64), len(HEAT_RAMP) - 2)
    t = (position - low)[..., None]
    return np.round(HEAT_RAMP[low] * (1 - t) + HEAT_RAMP[low + 1] * t).astype(np.uint8)


def overlay_heat(image, heat, alpha=0.7):
    """A PIL image with a heat map (H, W) of values in [0, 1] laid over its greyscale copy (the heat map is
    resized to the image, nearest, so each cell keeps its edges): alpha of the colour, 1 - alpha of the photo."""
    grey = np.asarray(image.convert("L").convert("RGB"), dtype=np.float32)
    cells = Image.fromarray(heat_colors(heat)).resize(image.size, Image.NEAREST)
    blended = (1 - alpha) * grey + alpha * np.asarray(cells, dtype=np.float32)
    return Image.fromarray(np.round(blended).astype(np.uint8))


def upscale(image, min_size=MIN_DRAW_SIZE, max_size=1600):
    """`image` enlarged (nearest) by the integer factor that brings its long side to at least min_size, without
    passing max_size; returns (image, factor)."""
    factor = max(1, min(math.ceil(min_size / max(image.size)), max_size // max(image.size)))
    if factor == 1:
        return image.convert("RGB"), 1
    return image.convert("RGB").resize((image.width * factor, image.height * factor), Image.NEAREST), factor


def fit(image, size):
    """`image` scaled to `size` pixels on its long side: nearest when enlarging (pixels stay crisp), bilinear when
    shrinking."""
    scale = size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(new, Image.NEAREST if scale > 1 else Image.BILINEAR)


def panel_grid(panels, columns=4, title=None, note=None, background=(255, 255, 255)):
    """Panels [(PIL image, caption)] in a grid, row-major, each caption above its panel, with an optional title line
    on top and a note line at the bottom -> PIL image. Panels keep their sizes (a row is as tall as its tallest)."""
    if not panels:
        raise ValueError("panels: expected at least one (image, caption)")
    font, title_font = _font(13), _font(16)
    caption_h, gap = 20, 10
    columns = min(columns, len(panels))
    rows = [panels[i:i + columns] for i in range(0, len(panels), columns)]
    widths = [max(image.width for image, _ in (row[c] for row in rows if c < len(row))) for c in range(columns)]
    heights = [max(image.height for image, _ in row) + caption_h for row in rows]
    top = 30 if title else gap
    bottom = 24 if note else gap
    figure = Image.new("RGB", (sum(widths) + gap * (columns + 1), top + sum(heights) + gap * len(rows) + bottom),
                       background)
    draw = ImageDraw.Draw(figure)
    if title:
        draw.text((gap, 8), title, fill=(0, 0, 0), font=title_font)
    y = top
    for row, height in zip(rows, heights):
        x = gap
        for (image, caption), width in zip(row, widths):
            draw.text((x, y + 3), _fit_text(draw, caption, font, width), fill=(0, 0, 0), font=font)
            figure.paste(image.convert("RGB"), (x, y + caption_h))
            x += width + gap
        y += height + gap
    if note:
        draw.text((gap, figure.height - 20), _fit_text(draw, note, font, figure.width - 2 * gap), fill=(90, 90, 90),
                  font=font)
    return figure


def save_panels(path, panels, columns=4, title=None, note=None):
    """panel_grid saved as a PNG at `path`; returns the path."""
    panel_grid(panels, columns, title, note).save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# See inside (--explain=True): pictures drawn from the tensors the model used for this prompt
# ----------------------------------------------------------------------------------------------------------------
# - Crops, patches and pooling windows come from the prompt's own tensors: pixel_values turned back into pixels
#   (crop_pixels), the pooling indices turned into boxes (vision_layout), image_num_crops and the processor's own
#   tiling rule (data.crop_geometry) for where each crop lies on the image.
# - The token strip is the prompt's input_ids; the attention mask is the (B, 1, T, T) mask the model built at
#   prefill, caught by AttentionRecorder as it went past.
# - "Where it looked": F.scaled_dot_product_attention returns no weights, so AttentionRecorder's forward hooks
#   recompute softmax(q k^T / sqrt(hd) + mask) for the one query that writes each new token, from the layer's own
#   projections and the keys already in the KV cache. The hooks only read: the answer is the same with or
#   without them (tests/test_explain.py checks the weights against transformers' eager attention).
# - The k-th pooled token is added to the k-th <im_patch> (model.Molmo2.add_vision_features), so the attention
#   paid to the k-th <im_patch> is spread over the pixels of the k-th pooling window: per pixel, the token's
#   attention over its window's area, summed over the global crop's and the crops' tokens that cover the pixel.

TOKEN_KINDS = {  # kind -> (colour, legend) of the token strip and the mask's edges
    "bos": ((70, 70, 70), "BOS (<|im_end|>)"), "chat": ((160, 160, 160), "chat template: <|im_start|>, <|im_end|>"),
    "text": ((238, 238, 238), "text"), "label": ((255, 205, 140), "text before an image or frame: 'Image i', times"),
    "low_start": ((130, 40, 170), "<low_res_im_start>"), "start": ((40, 90, 210), "<im_start>, <frame_start>"),
    "global": ((190, 130, 240), "<im_patch> of the global crop"),
    "patch": ((120, 175, 250), "<im_patch> of the crops or frames"),
    "col": ((250, 120, 40), "<im_col> (end of a row)"), "end": ((20, 25, 110), "<im_end>, <frame_end>"),
}
_SPECIAL_KINDS = {data.IMAGE_LOW_RES_START_ID: "low_start", data.IMAGE_START_ID: "start", data.FRAME_START_ID: "start",
                  data.IMAGE_END_ID: "end", data.FRAME_END_ID: "end", data.IMAGE_COL_ID: "col"}


def token_kinds(input_ids):
    """The kind (a key of TOKEN_KINDS) of each token of a prompt, read from the ids as data.image_token_ids and
    data.video_token_ids lay them out."""
    ids = [int(i) for i in input_ids]
    kinds, in_global = [], False
    for i in ids:
        if i == data.IMAGE_PATCH_ID:
            kinds.append("global" if in_global else "patch")
        else:
            kinds.append(_SPECIAL_KINDS.get(i, "text" if i < data.ENDOFTEXT_ID else "chat"))
        in_global = i == data.IMAGE_LOW_RES_START_ID or (in_global and i != data.IMAGE_END_ID)
    if ids and ids[0] == data.IM_END_ID:
        kinds[0] = "bos"
    for t, i in enumerate(ids):  # the text just before an image or a frame: its label or its time
        j = t - 1
        while i in (data.IMAGE_LOW_RES_START_ID, data.FRAME_START_ID) and j >= 0 and kinds[j] == "text":
            kinds[j], j = "label", j - 1
    return kinds


def frame_times(input_ids, tokenizer):
    """The time (s) of each video frame of a prompt, read from the text before each <frame_start>."""
    ids, kinds = [int(i) for i in input_ids], token_kinds(input_ids)
    times, label = [], []
    for i, kind in zip(ids, kinds):
        if kind == "label":
            label.append(i)
        elif i == data.FRAME_START_ID:
            times.append(float(tokenizer.decode(label)))
        if kind != "label":
            label = []
    return times


def crop_pixels(patches, patch_size):
    """One crop as the ViT received it, (P, patch_size**2 * 3) patches in [-1, 1] flattened (ph, pw, c) -> an
    (S, S, 3) uint8 image."""
    n = math.isqrt(patches.shape[0])
    crop = patches.reshape(n, n, patch_size, patch_size, 3).permute(0, 2, 1, 3, 4).reshape(n * patch_size, -1, 3)
    return (crop.float() * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def vision_layout(example, sizes, processor):
    """Where each ViT crop and each pooled token of a prompt come from, worked out from its own tensors.
    sizes: (width, height) of each image, or of each video frame. Returns (crops, tokens, views):
      crops[c]:  {media, view, origin: (x, y) of the crop on its view, read: the patches some token reads} for
                 each row of pixel_values (pixel_values_videos);
      tokens[k]: {media, view, box: (x0, y0, x1, y1) of its window's patches on the view} for the k-th pooled
                 token, which the model adds at the k-th <im_patch>;
      views[(media, view)]: (width, height) in pixels.
    media is the image's index (the frame's, for a video); view is 'global' (the whole image squeezed into one
    crop), 'crops' (the canvas the overlapping crops are cut from) or 'frame'."""
    video = example.pixel_values_videos is not None
    pixels = example.pixel_values_videos if video else example.pixel_values
    pooling = example.video_token_pooling if video else example.image_token_pooling
    size, ps = processor.crop_size, processor.patch_size
    n = size // ps
    crops, views = [], {}
    if video:
        for f in range(len(pixels)):
            crops.append({"media": f, "view": "frame", "origin": (0, 0), "read": set()})
            views[(f, "frame")] = (size, size)
    else:
        stride = (n - sum(processor.overlap_margins)) * ps
        for m, (n_crops, (width, height)) in enumerate(zip(example.image_num_crops.tolist(), sizes)):
            rows, cols, canvas_h, canvas_w = data.crop_geometry(height, width, processor.max_crops, size, ps,
                                                                processor.overlap_margins)
            if rows * cols + 1 != n_crops:
                raise ValueError(f"image {m + 1}: {n_crops} crops in the prompt, but the processor tiles a "
                                 f"{width}x{height} image into {rows * cols} + 1")
            crops.append({"media": m, "view": "global", "origin": (0, 0), "read": set()})
            crops += [{"media": m, "view": "crops", "origin": (c * stride, r * stride), "read": set()}
                      for r in range(rows) for c in range(cols)]
            views[(m, "global")], views[(m, "crops")] = (size, size), (canvas_w, canvas_h)
    tokens = []
    for window in pooling.tolist():
        corners = []
        for index in window:
            if index >= 0:  # -1: a padding slot
                crop, patch = divmod(index, n * n)
                crops[crop]["read"].add(patch)
                (ox, oy), (py, px) = crops[crop]["origin"], divmod(patch, n)
                corners.append((ox + px * ps, oy + py * ps))
        if corners:  # an all-padding window gives no token
            xs, ys = zip(*corners)
            tokens.append({"media": crops[crop]["media"], "view": crops[crop]["view"],
                           "box": (min(xs), min(ys), max(xs) + ps, max(ys) + ps)})
    return crops, tokens, views


def image_box(token, views, sizes):
    """A token's window (vision_layout) in pixels of its image (frame): (x0, y0, x1, y1), floats."""
    (view_w, view_h), (width, height) = views[(token["media"], token["view"])], sizes[token["media"]]
    x0, y0, x1, y1 = token["box"]
    return x0 * width / view_w, y0 * height / view_h, x1 * width / view_w, y1 * height / view_h


def view_pixels(crops, pixels, media, view, views, patch_size):
    """The picture of one view as the ViT received it: its crops turned back into pixels and put at their places
    (the overlapping crops are cut from one canvas, so they agree where they overlap) -> PIL image."""
    width, height = views[(media, view)]
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for crop, patches in zip(crops, pixels):
        if (crop["media"], crop["view"]) == (media, view):
            x, y = crop["origin"]
            piece = crop_pixels(patches, patch_size)
            canvas[y:y + piece.shape[0], x:x + piece.shape[1]] = piece
    return Image.fromarray(canvas)


def heat_maps(tokens, views, sizes, weights, scales=1.0):
    """Attention to each pooled token (n_tokens,) -> a map (H, W) per image (frame) at scales[m] (or one scale) of
    its size: each token's weight spread evenly over its window's pixels, summed where windows overlap (a global
    crop's token covers what four crop tokens do)."""
    scales = [scales] * len(sizes) if isinstance(scales, (int, float)) else scales
    maps = [np.zeros((max(1, round(h * s)), max(1, round(w * s)))) for (w, h), s in zip(sizes, scales)]
    for token, weight in zip(tokens, np.asarray(weights, dtype=np.float64)):
        scale = scales[token["media"]]
        x0, y0, x1, y1 = (round(v * scale) for v in image_box(token, views, sizes))
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        maps[token["media"]][y0:y1, x0:x1] += weight / ((x1 - x0) * (y1 - y0))
    return maps


def attention_on_shapes(tokens, views, sizes, weights, counted, others=(), media=0):
    """The mean attention per pooled token of one image (frame) on the tokens whose window overlaps a counted
    shape, and on those whose window overlaps no shape at all (the background). Shapes are (x, y, radius) as the
    synthetic world's scenes give them (normalised, the radius to the width); `others` are the shapes that were
    not counted (their tokens join neither side). -> (on the counted shapes, on the background); nan when a side
    has no token."""
    width, height = sizes[media]

    def overlaps(box, shape):
        x, y, radius = shape[0] * width, shape[1] * height, shape[2] * width
        x0, y0, x1, y1 = box
        return math.hypot(x - min(max(x, x0), x1), y - min(max(y, y0), y1)) < radius

    on_shapes, background = [], []
    for token, weight in zip(tokens, np.asarray(weights, dtype=np.float64)):
        if token["media"] != media:
            continue
        box = image_box(token, views, sizes)
        if any(overlaps(box, s) for s in counted):
            on_shapes.append(weight)
        elif not any(overlaps(box, s) for s in others):
            background.append(weight)
    return tuple(float(np.mean(side)) if side else float("nan") for side in (on_shapes, background))


class AttentionRecorder:
    """Where the model looked: while active, forward hooks on the chosen layers of the LLM recompute, for the last
    query of each call (the prefill's last prompt token, then each new token), its attention over all keys,
    softmax(q k^T / sqrt(head_dim) + mask), from the layer's own projections and the keys in the KV cache, and
    keep it averaged over heads and the chosen layers. Also keeps the prefill's (B, T, T) attention mask.

        with AttentionRecorder(model.llm) as recorder:
            new_ids = generate(model, input_ids, ...)
        rows = recorder.rows()  # rows[i] (B, S_i): the attention of the query that wrote new_ids[:, i]
    """

    def __init__(self, llm, layers=()):
        n = len(llm.layers)
        if any(not -n <= i < n for i in layers):
            raise ValueError(f"explain_layers {tuple(layers)}: the LLM has layers 0..{n - 1} (or -{n}..-1)")
        self.n_layers, self.layers = n, sorted({i % n for i in layers}) or list(range(n))
        self.attentions = [llm.layers[i].self_attn for i in self.layers]
        self.sums, self.prompt_mask, self.handles = {}, None, []

    def __enter__(self):
        self.sums, self.prompt_mask = {}, None
        self.handles = [attention.register_forward_hook(self._record) for attention in self.attentions]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @torch.no_grad()
    def _record(self, attention, args, output):
        x, cos, sin, attn_mask, kv_cache = args  # as model.Block calls it; x is the normed input, kv_cache a LayerKV
        B, T, _ = x.shape
        nh, n_kv, hd = attention.n_head, attention.n_kv_head, attention.head_dim
        q = attention.q_norm(attention.q_proj(x[:, -1:]).view(B, 1, nh, hd)).transpose(1, 2)  # (B, nh, 1, hd)
        q = apply_rope(q, cos[:, -1:], sin[:, -1:])
        past = kv_cache.pos if kv_cache is not None else 0
        if kv_cache is not None:  # this call's keys are in the cache already (pos moves on after the last layer)
            k = kv_cache.k[:, :, :past + T]  # (B, n_kv, S, hd)
        else:
            k = apply_rope(attention.k_norm(attention.k_proj(x).view(B, T, n_kv, hd)).transpose(1, 2), cos, sin)
        k = k.repeat_interleave(nh // n_kv, dim=1)  # (B, nh, S, hd): query head h reads kv head h // (nh / n_kv)
        scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(hd)  # (B, nh, 1, S)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask[:, :, -1:], float("-inf"))
        elif past == 0 and self.prompt_mask is None:  # plain causal prefill (no vision tokens)
            attn_mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]
        # (no mask: the last query sees every key, causal or after a cache)
        if past == 0 and self.prompt_mask is None:
            self.prompt_mask = attn_mask[:, 0].cpu()  # (B, T, T)
        total, count = self.sums.get(past, (0.0, 0))
        self.sums[past] = (total + scores.softmax(-1).mean(1)[:, 0], count + 1)  # (B, S): mean over heads

    def rows(self):
        """[(B, S_i)] in order of the calls (the prefill, then each decoding step), averaged over heads and the
        recorded layers."""
        return [(total / count).cpu() for _, (total, count) in sorted(self.sums.items())]


def point_token_spans(answer_ids, tokenizer):
    """The points an answer writes and the answer tokens that write each one (its id and its two coordinates):
    [(frame, x, y, [token indices])], x and y in 0..1, frame the image index or the time as data.parse_points
    reads them. Triples that are no 'id x y' of 0..1000 are left out."""
    ends = [len(tokenizer.decode(answer_ids[:i + 1])) for i in range(len(answer_ids))]
    text = tokenizer.decode(answer_ids)
    points = []
    for coords in re.finditer(r'coords="([^"]*)"', text):
        for group in re.finditer(r"[^;\t]+", coords.group(1)):
            words = list(re.finditer(r"\S+", group.group()))
            if not words or not re.fullmatch(r"\d+(\.\d+)?", words[0].group()):
                continue
            frame = (float if "." in words[0].group() else int)(words[0].group())
            for k in range(1, len(words) - 2, 3):
                triple = words[k:k + 3]
                if not all(w.group().isdigit() for w in triple) or max(int(w.group()) for w in triple[1:]) > 1000:
                    continue
                start = coords.start(1) + group.start() + triple[0].start()
                end = coords.start(1) + group.start() + triple[2].end()
                spans = [i for i in range(len(ends)) if (ends[i - 1] if i else 0) < end and ends[i] > start]
                points.append((frame, int(triple[1].group()) / 1000, int(triple[2].group()) / 1000, spans))
    return points


def _crop_colour(index):
    return TRACK_COLORS[index % len(TRACK_COLORS)]


def _outline(draw, box, colour, width):
    """A rectangle with a black edge around it, visible on light and dark pixels."""
    x0, y0, x1, y1 = box
    draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), outline=(0, 0, 0), width=width + 2)
    draw.rectangle(box, outline=colour, width=width)


def picture_crops(crops, pixels, views, images, patch_size, path, title, thumb=180):
    """Each image with its crops drawn where they were cut (thin: the whole crop; thick: the part its tokens read,
    inside the overlap margins), beside every crop as the ViT received it, the unread margins darkened."""
    panels, n = [], math.isqrt(pixels.shape[1])
    size = n * patch_size
    for m, image in enumerate(images):
        mine = [(c, crop) for c, crop in enumerate(crops) if crop["media"] == m]
        tiles = [crop for _, crop in mine if crop["view"] == "crops"]
        if tiles:
            shown = fit(image, min(max(360, max(image.size)), 640))
            factor = shown.width / image.width
            draw = ImageDraw.Draw(shown)
            canvas_w, canvas_h = views[(m, "crops")]
            sx, sy = image.width / canvas_w * factor, image.height / canvas_h * factor
            for i, crop in enumerate(tiles):
                (ox, oy), colour = crop["origin"], _crop_colour(i)
                rows, cols = zip(*(divmod(p, n) for p in crop["read"]))
                read = (ox + min(cols) * patch_size, oy + min(rows) * patch_size,
                        ox + (max(cols) + 1) * patch_size, oy + (max(rows) + 1) * patch_size)
                _outline(draw, (ox * sx, oy * sy, (ox + size) * sx - 1, (oy + size) * sy - 1), colour, 1)
                _outline(draw, (read[0] * sx + 3, read[1] * sy + 3, read[2] * sx - 4, read[3] * sy - 4), colour, 3)
            panels.append((shown, f"image {m + 1} ({image.width}x{image.height}): {len(tiles)} crops cut from it "
                                  f"resized to {canvas_w}x{canvas_h}"))
        sheet = []
        for i, (c, crop) in enumerate(mine):
            picture = crop_pixels(pixels[c], patch_size).astype(np.float32)
            unread = np.ones((n, n), dtype=bool)
            unread.flat[sorted(crop["read"])] = False
            picture[np.kron(unread, np.ones((patch_size, patch_size), dtype=bool))] *= 0.35
            shown = fit(Image.fromarray(picture.astype(np.uint8)), thumb)
            if crop["view"] == "crops":
                _outline(ImageDraw.Draw(shown), (1, 1, shown.width - 2, shown.height - 2), _crop_colour(i - 1), 3)
            sheet.append((shown, "global crop" if crop["view"] == "global" else f"crop {i}"))
        if len(images) == 1 or tiles:
            what = f"the {len(sheet)} crops of {size}x{size} px as the ViT got them" if tiles else f"{size}x{size} px"
            panels.append((panel_grid(sheet, columns=min(5, len(sheet))), what))
        else:  # video frames: one sheet of them all
            frames = [(fit(Image.fromarray(crop_pixels(pixels[c], patch_size)), thumb), f"frame {c + 1}")
                      for c in range(len(crops))]
            panels.append((panel_grid(frames, columns=min(8, len(crops))),
                           f"the {len(crops)} frames of {size}x{size} px as the ViT got them"))
            break
    return save_panels(path, panels, columns=2 if all(p.width < 700 for p, _ in panels) else 1, title=title,
                         note="darkened: patches no pooled token reads (a neighbouring crop's copy is read instead)")


def picture_pooling(crops, tokens, pixels, views, patch_size, pooling, path, title, max_views=6):
    """Each view (global crop, the crops stitched, or a frame) with its patch grid (thin lines), its pooling windows
    (boxes) and each window's token numbered in the order the LLM reads it."""
    panels = []
    for (media, view) in list(views)[:max_views]:
        picture = view_pixels(crops, pixels, media, view, views, patch_size)
        window = patch_size * max(pooling)
        shown, factor = upscale(picture, max(320, math.ceil(26 / window) * max(picture.size)))
        layer = Image.new("RGBA", shown.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        step = patch_size * factor
        for x in range(0, shown.width + 1, step):
            draw.line((x, 0, x, shown.height), fill=(255, 255, 255, 90))
        for y in range(0, shown.height + 1, step):
            draw.line((0, y, shown.width, y), fill=(255, 255, 255, 90))
        font = _font(max(9, min(16, window * factor // 3)))
        mine = [(k, t) for k, t in enumerate(tokens) if (t["media"], t["view"]) == (media, view)]
        for k, token in mine:
            x0, y0, x1, y1 = (v * factor for v in token["box"])
            draw.rectangle((x0 + 1, y0 + 1, x1 - 2, y1 - 2), outline=(255, 40, 40, 255), width=2)
            draw.text(((x0 + x1) / 2, (y0 + y1) / 2), str(k + 1), fill=(255, 255, 255, 255), font=font, anchor="mm",
                      stroke_width=2, stroke_fill=(0, 0, 0, 255))
        shown = Image.alpha_composite(shown.convert("RGBA"), layer).convert("RGB")
        name = {"global": f"image {media + 1}: global crop", "crops": f"image {media + 1}: crops stitched",
                "frame": f"frame {media + 1}"}[view]
        panels.append((shown, f"{name}, tokens {mine[0][0] + 1}-{mine[-1][0] + 1}" if mine else name))
    note = f"{len(tokens)} pooled tokens of {'x'.join(map(str, pooling))} patches ({patch_size} px each)"
    if len(views) > max_views:
        note += f"; the first {max_views} of {len(views)} views shown"
    return save_panels(path, panels, columns=min(3, len(panels)), title=title, note=note)


def token_strip(input_ids, tokenizer, width=1100, colours=None, legend=None):
    """A prompt as a strip of tokens in order, wrapped into rows: text with its characters, vision tokens as narrow
    cells, coloured by kind (TOKEN_KINDS) with a legend of kinds and counts -> PIL image. colours: one RGB per token
    instead, with legend [(RGB, text)] instead."""
    kinds, font = token_kinds(input_ids), _font(11)
    if legend is None:
        legend = [(TOKEN_KINDS[k][0], f"{TOKEN_KINDS[k][1]} ({kinds.count(k)})") for k in TOKEN_KINDS if k in kinds]
    colours = colours or [TOKEN_KINDS[k][0] for k in kinds]
    row_h, x, y, cells = 22, 0, 0, []
    for i, kind, colour in zip((int(i) for i in input_ids), kinds, colours):
        if kind in ("text", "label"):
            label = tokenizer.decode([i]).replace("\n", "\\n")
        elif kind in ("bos", "chat"):
            label = "BOS" if kind == "bos" else tokenizer.decode([i]).strip("<|>")
        else:
            label = ""
        w = int(font.getlength(label)) + 6 if label else (5 if kind in ("global", "patch") else 8)
        if x + w > width:
            x, y = 0, y + row_h
        cells.append((x, y, w, kind, label, tuple(int(c) for c in colour)))
        x += w + 1
    per_row = 2 if any(len(text) > 45 for _, text in legend) else 3
    top = 10 + 18 * math.ceil(len(legend) / per_row) + 10
    strip = Image.new("RGB", (width + 20, top + y + row_h + 10), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for n, (colour, text) in enumerate(legend):
        lx, ly = 10 + (n % per_row) * (width // per_row), 10 + (n // per_row) * 18
        draw.rectangle((lx, ly + 2, lx + 12, ly + 14), fill=tuple(int(c) for c in colour), outline=(0, 0, 0))
        draw.text((lx + 18, ly), text, fill=(0, 0, 0), font=font)
    for x, y, w, kind, label, colour in cells:
        draw.rectangle((10 + x, top + y, 10 + x + w - 1, top + y + row_h - 4), fill=colour,
                       outline=(200, 200, 200) if kind in ("text", "label") else None)
        if label:
            ink = (255, 255, 255) if sum(colour) < 300 else (0, 0, 0)
            draw.text((10 + x + 3, top + y + (row_h - 4) // 2), label, fill=ink, font=font, anchor="lm")
    return strip


def picture_tokens(input_ids, tokenizer, path, title):
    """The prompt's token strip (token_strip), saved with a line that counts its tokens."""
    kinds = token_kinds(input_ids)
    n_patches = sum(k in ("global", "patch") for k in kinds)
    return save_panels(path, [(token_strip(input_ids, tokenizer), f"{len(kinds)} tokens, {n_patches} of them "
                                                                    "<im_patch>, in the order the LLM reads them")],
                         title=title)


def mask_image(mask, input_ids, max_side=720):
    """A (T, T) attention mask as a picture (row: the query, column: the key; white: may attend), the tokens' kinds
    as coloured edges along both axes -> (PIL image, step): a long prompt shows every step-th token."""
    T = mask.shape[-1]
    step = max(1, math.ceil(T / max_side))
    shown = mask[::step, ::step].numpy()
    t, scale, edge = len(shown), max(1, max_side // len(shown)), 10
    colours = np.array([TOKEN_KINDS[k][0] for k in token_kinds(input_ids)[::step]], dtype=np.uint8)  # (t, 3)
    grid = np.where(shown[..., None], np.uint8(255), np.uint8(35)).repeat(3, -1).repeat(scale, 0).repeat(scale, 1)
    picture = np.full((t * scale + edge + 2, t * scale + edge + 2, 3), 255, dtype=np.uint8)
    picture[edge + 2:, edge + 2:] = grid
    picture[:edge, edge + 2:] = colours.repeat(scale, 0)[None]
    picture[edge + 2:, :edge] = colours.repeat(scale, 0)[:, None]
    return Image.fromarray(picture), step


def picture_mask(mask, input_ids, path, title):
    """The prompt's (T, T) attention mask (mask_image), saved with a line saying how to read it."""
    image, step = mask_image(mask, input_ids)
    T = mask.shape[-1]
    what = f"{T} x {T}" + (f", every {step}th token" if step > 1 else "")
    return save_panels(path, [(image, f"{what}; row = query, column = key; white = may attend; edges: token kinds "
                                        "as in the token strip")], title=title)


def looked_panels(entries, tokens, views, sizes, images, height=240):
    """'Where it looked': one panel per entry (caption, attention over the pooled tokens (n_tokens,), points
    [(media, x_px, y_px)]): the images (frames) side by side in grey, with the attention per pixel as a heat map,
    each panel stretched from its own least (dark) to its most (bright) -> [(PIL image, caption)]."""
    panels = []
    for caption, weights, points in entries:
        scales = [height / h for _, h in sizes]
        maps = heat_maps(tokens, views, sizes, weights, scales)
        low, high = min(float(h.min()) for h in maps), max(float(h.max()) for h in maps)
        row = []
        for m, (image, heat) in enumerate(zip(images, maps)):
            shown = image.convert("RGB").resize((heat.shape[1], heat.shape[0]), Image.BILINEAR)
            shown = overlay_heat(shown, (heat - low) / max(high - low, 1e-30))
            draw = ImageDraw.Draw(shown)
            for media, x, y in points:
                if media == m:
                    _dot(draw, (x * scales[m], y * scales[m]), 5, PRED_COLOR)
            row.append(shown)
        strip = Image.new("RGB", (sum(r.width for r in row) + 4 * (len(row) - 1), height), (255, 255, 255))
        x = 0
        for r in row:
            strip.paste(r, (x, 0))
            x += r.width + 4
        panels.append((strip, caption))
    return panels


def picture_looked(entries, tokens, views, sizes, images, path, title, height=240):
    """looked_panels saved in a grid with a note on how to read them."""
    panels = looked_panels(entries, tokens, views, sizes, images, height)
    columns = max(1, min(4, 1100 // (panels[0][0].width + 10)))
    return save_panels(path, panels, columns=columns, title=title,
                         note="attention to the image tokens per pixel, each panel from its least (dark) to its most "
                              "(bright); dots: the points the answer wrote")


def explain_answer(processor, record, example, answer_ids, recorder, base):
    """Draw what the model saw and where it looked for one answer, as <base>_tokens.png, _mask.png, _crops.png,
    _pooling.png and _looked.png (those the media have), printing one line for each. answer_ids: the answer's
    tokens (no stop token); recorder: the AttentionRecorder that watched it being generated. Returns the paths."""
    tokenizer, ids, written = processor.tokenizer, example.input_ids, []

    def said(path, what):
        print(f"  {path}: {what}")
        written.append(path)

    print("explain:")
    said(picture_tokens(ids, tokenizer, f"{base}_tokens.png", "the prompt, token by token"),
         "the prompt's tokens in order, coloured by kind (text, chat markers, the vision tokens of each crop or frame)")
    said(picture_mask(recorder.prompt_mask[0], ids, f"{base}_mask.png", "the prompt's attention mask"),
         "the attention mask the model built for the prompt: causal for text, vision tokens see each other both ways")
    video = example.pixel_values_videos is not None
    if example.pixel_values is None and not video:
        return written
    pixels, ps = (example.pixel_values_videos if video else example.pixel_values), processor.patch_size
    pooling = processor.video_pooling if video else processor.image_pooling
    if video:
        size = record["video_frames"][0].size
        images = [Image.fromarray(crop_pixels(crop, ps)).resize(size, Image.BILINEAR) for crop in pixels]
        sizes, times = [size] * len(images), frame_times(ids, tokenizer)
    else:
        images, sizes = record["images"], [image.size for image in record["images"]]
    crops, tokens, views = vision_layout(example, sizes, processor)
    said(picture_crops(crops, pixels, views, images, ps, f"{base}_crops.png", "the crops the ViT received"),
         "the crops: where each was cut from the image (thick: the part its tokens read), and each as the ViT got it")
    window = "x".join(map(str, pooling))
    said(picture_pooling(crops, tokens, pixels, views, ps, pooling, f"{base}_pooling.png",
                         f"{ps}-px patches pooled {window}: one LLM token per window"),
         f"the patch grid and the {window} pooling windows, each pooled token numbered in the order the LLM reads it")
    if not answer_ids:
        return written
    columns = torch.nonzero(ids == data.IMAGE_PATCH_ID)[:, 0]  # where the pooled tokens sit in the prompt
    rows = [row[0, columns].numpy() for row in recorder.rows()[:len(answer_ids)]]  # (n_tokens,) per answer token

    def entry(caption, which, points=()):
        weights = np.mean([rows[i] for i in which], axis=0)
        return f"{caption} ({weights.sum():.0%} on the image)", weights, list(points)

    entries = [entry(f"whole answer, {len(rows)} tokens", range(len(rows)))]
    for frame, x, y, spans in point_token_spans(answer_ids, tokenizer):
        if video:
            media = min(range(len(times)), key=lambda f: abs(times[f] - frame))
            media = media if abs(times[media] - frame) < 0.051 else None
        else:
            media = int(frame) - 1 if len(images) > 1 else 0
        if media is not None and 0 <= media < len(images):
            width, height = sizes[media]
            where = f"t={frame:.1f}s " if video else f"image {media + 1} " if len(images) > 1 else ""
            entries.append(entry(f"point {len(entries)}, {where}({x * width:.0f}, {y * height:.0f})", spans,
                                 [(media, x * width, y * height)]))
    if len(entries) == 1:  # no points: each answer token on its own (a few, for a video's rows of frames)
        entries += [entry(f"{i + 1}: {tokenizer.decode([answer_ids[i]])[:8]!r}", [i])
                    for i in range(min(7 if video else 15, len(rows)))]
    n_layers = len(recorder.attentions) if recorder.layers == list(range(recorder.n_layers)) else None
    layers = f"all {n_layers} layers" if n_layers else f"layers {', '.join(map(str, recorder.layers))}"
    said(picture_looked(entries, tokens, views, sizes, images, f"{base}_looked.png",
                        f"where the model looked: attention to the image tokens, mean over heads and {layers}",
                        height=240 if len(images) <= 2 else 120),
         "where the model looked: for the whole answer and for each point (or token), its attention to the image "
         "tokens as a heat map")
    return written


def media_kind(record):
    """'video' | 'images' (several) | 'image' | 'text': the key of DEFAULT_PROMPTS for the record's media."""
    if "video_frames" in record:
        return "video"
    n_images = len(record.get("images", ()))
    return "images" if n_images > 1 else "image" if n_images else "text"


def world_questions(kind, n_scenes=4):
    """Questions of the synthetic world (prepare_data.py) about a few scenes drawn with a fixed seed: for `kind`
    media first, then the other kinds'."""
    rng = random.Random(0)
    draw = {"image": lambda: prepare_data.image_annotations(rng, prepare_data.make_image_scene(rng, max_objects=5)),
            "images": lambda: prepare_data.multi_image_annotations(
                rng, prepare_data.multi_image_scenes(rng, max_objects=5)),
            "video": lambda: prepare_data.video_annotations(rng, prepare_data.make_video_scene(rng))}
    order = [kind] * (kind in draw) + [k for k in draw if k != kind]
    questions = [a["messages"][-2]["content"] for k in order for _ in range(n_scenes) for a in draw[k]()]
    return list(dict.fromkeys(questions))


def unknown_words(model, processor, question):
    """The tokens of `question` (decoded, in order) that the model has no rows for; [] when it has them all."""
    example = prompt_example({"id": "text"}, [{"role": "user", "content": question}], style, processor)
    return [processor.tokenizer.decode([i]) for i in unknown_tokens(model, example.input_ids)]


def what_it_knows(model, processor, kind, n_questions=6, n_words=150):
    """Lines for a kept-token model: questions of the synthetic world it has every word for, and its words."""
    questions = [q for q in world_questions(kind) if not unknown_words(model, processor, q)][:n_questions]
    lines = ["questions from the synthetic world that it has every word for:"] if questions else []
    lines += [f"  {q}" for q in questions]
    pieces = {processor.tokenizer.decode([i]) for i in model.config.token_ids}
    # whole words: a token that starts with a space, or a capitalised one that starts a sentence ("How")
    words = sorted({w.strip() for w in pieces if re.fullmatch(r" [A-Za-z]{2,}|[A-Z][a-z]+", w)}, key=str.lower)
    more = f" ... and {len(words) - n_words} more" if len(words) > n_words else ""
    lines.append(f"the {len(words)} words it knows: {', '.join(words[:n_words])}{more}")
    return lines


def ask(model, processor, record, question, n):
    """Answer one question about the record's media, streaming; draw the points. Returns the answer."""
    messages = [{"role": "user", "content": question}]
    example = prompt_example(record, messages, style, processor)
    unknown = unknown_tokens(model, example.input_ids)  # --vocab=data: the model has rows for its data's tokens only
    if unknown:
        words = ", ".join(repr(processor.tokenizer.decode([i])) for i in unknown)
        raise ValueError("\n".join([f"this model knows only the {len(model.config.token_ids)} tokens of its training "
                                     f"data; not {words}", *what_it_knows(model, processor, media_kind(record))]))
    generator = torch.Generator(device=device).manual_seed(seed + n)
    streamer = Streamer(processor.tokenizer)
    recorder = AttentionRecorder(model.llm, explain_layers) if explain else nullcontext()
    t0 = time.time()
    with recorder:
        answer = generate_answers(model, processor, [example], max_new_tokens, temperature, top_k or None,
                                    top_p if top_p < 1.0 else None, on_token=streamer, generator=generator)[0]
    print(f"\n({len(streamer.ids)} tokens in {time.time() - t0:.1f}s)")
    stem = next_picture_stem()
    for path in show_points(answer, record, stem):
        print(f"points drawn: {path}")
    if explain:
        os.makedirs(os.path.join(out_dir, "explain"), exist_ok=True)
        explain_answer(processor, record, example, streamer.ids, recorder,
                       os.path.join(out_dir, "explain", os.path.basename(stem)))
    return answer


def default_prompt(record, model, processor):
    """DEFAULT_PROMPTS for the media; for a kept-token model without its words, the first world question it knows."""
    prompt = DEFAULT_PROMPTS[media_kind(record)]
    if model.config.token_ids is None or not unknown_words(model, processor, prompt):
        return prompt
    return next((q for q in world_questions(media_kind(record)) if not unknown_words(model, processor, q)), prompt)


def interact(model, processor, record):
    print("ask a question; ':image a.jpg [b.jpg ...]' or ':video clip.gif' changes the media; ':quit' or an "
          "empty line ends")
    n = 1
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line or line == ":quit":
            break
        if line.startswith((":image ", ":video ")):
            kind, *paths = line.split()
            try:
                record = media_record(paths if kind == ":image" else [], paths[0] if kind == ":video" else "",
                                      processor)
            except (data.MediaError, ImportError, IndexError) as e:
                print(f"cannot use {' '.join(paths)}: {e}")
            continue
        try:
            ask(model, processor, record, line, n)
        except ValueError as e:
            print(e)
            continue
        n += 1


if __name__ == "__main__":
    images, videos, rest = split_media_args(sys.argv[1:])
    configure(globals(), rest)
    torch.set_grad_enabled(False)
    init_from = or_demo(init_from, DEFAULT_INIT_FROM, DEMO_INIT_FROM, local_model_dir)
    try:
        model, processor, model_dir = load_model(init_from, device, getattr(torch, dtype))
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    processor.max_crops = max_crops or processor.max_crops
    if serve:  # the page answers every request with this model, and these knobs as its defaults
        import serve as web
        web.serve(sys.modules[__name__], model, processor, model_dir)
        raise SystemExit
    try:
        record = media_record(images, videos[0] if videos else "", processor)
    except (data.MediaError, ImportError) as e:  # ImportError: a video file without PyAV installed
        raise SystemExit(str(e)) from None
    print(f"model: {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    if interactive:
        interact(model, processor, record)
    else:
        question = prompt or default_prompt(record, model, processor)
        print(f"> {question}")
        try:
            ask(model, processor, record, question, 1)
        except ValueError as e:
            raise SystemExit(str(e)) from None
