"""
Turn datasets into nanoMolmo2's record format (data.py section 3b): {out}/{name}/{train,val}.jsonl.

    python prepare_data.py --dataset=synthetic                          # the synthetic world, offline (the default)
    python prepare_data.py --dataset=pixmo_points --limit=1000          # download from the Hugging Face hub, convert
    python prepare_data.py --dataset=pixmo_points --rows=rows.parquet   # convert rows you have (.parquet/.jsonl)

Design choices:
- One converter per dataset, a plain function rows -> records, following the dataset's published schema
  (its hub card, and how allenai/molmo2's olmo/data/* reads it). A converter never fetches anything: media
  come from a Media store, so converters are tested offline on small fixtures in the real schema.
- Media: PixMo images are URLs, downloaded once into {out}/media/images/ (sha256-checked when the
  dataset gives one); embedded image bytes are written there too. Videos are looked up as frame folders
  in {out}/media/videos/ (extract_frames makes them with ffmpeg). A missing file does not stop conversion: the record is
  written and the reader skips it and counts it (missing_file), so the report says how many are absent.
- Rows that cannot become a record (no points where points are needed, malformed turns) are dropped and
  counted by reason; the counts are printed.
- Hub datasets are parquet: reading them needs pyarrow, an optional extra that data.py never imports.
- The hub gives only a train split for most of these sets: 1 record in 128 (by a hash of its id) goes to val.
"""

import collections
import concurrent.futures
import functools
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import urllib.request

import numpy as np
from PIL import Image, ImageDraw

import data
import training
from configurator import configure

VAL_FRACTION_BITS = 7  # 1 / 2**7 of the records go to val
MAX_POINTS_PER_LABEL = 60  # as Molmo2's pretraining (max_points=60)

CAPTION_PROMPT = "Describe this image in detail."
TRANSCRIPT_PROMPT = "Generate an audio transcript of a person describing this image."
VIDEO_CAPTION_PROMPTS = {"video_long_caption": "Describe this video in detail.",
                         "video_merged_caption": "Describe this video.",
                         "video_short_caption": "Describe this video in a few sentences."}


# --- media ------------------------------------------------------------------------------------------

class Media:
    """Where records find their media, under {out}/media/. Paths are absolute here; write_dataset makes them
    relative to the dataset's folder."""

    def __init__(self, out_dir, download=False):
        self.images_dir = os.path.join(os.path.abspath(out_dir), "media", "images")
        self.videos_dir = os.path.join(os.path.abspath(out_dir), "media", "videos")
        self.download = download

    def url_path(self, url):
        ext = os.path.splitext(url.split("?")[0])[1].lower()
        ext = ext if ext in (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp") else ".jpg"
        return os.path.join(self.images_dir, hashlib.sha1(url.encode()).hexdigest() + ext)

    def image_for_url(self, url, sha256=None):
        path = self.url_path(url)
        if self.download and not os.path.exists(path):
            fetch_url(url, path, sha256)
        return path

    def image_from_bytes(self, key, image):
        """An HF Image value ({"bytes": ..., "path": ...}) or raw bytes -> a file named after `key`."""
        blob = image.get("bytes") if isinstance(image, dict) else image
        if not blob:
            return None
        path = os.path.join(self.images_dir, re.sub(r"[^A-Za-z0-9_.-]", "_", str(key)) + ".png")
        if not os.path.exists(path):
            os.makedirs(self.images_dir, exist_ok=True)
            with open(path, "wb") as f:
                f.write(blob)
        return path

    def video_path(self, key):
        return os.path.join(self.videos_dir, re.sub(r"[^A-Za-z0-9_.-]", "_", str(key)))


def fetch_url(url, path, sha256=None, timeout=20):
    """Download url to path (via a temporary file); a failure or a checksum mismatch leaves no file."""
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "nanoMolmo2-prepare-data"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            blob = response.read()
    except Exception as e:  # network errors come in many types; the record is then counted as missing
        print(f"  image '{url}': download failed ({type(e).__name__}: {e})", file=sys.stderr)
        return False
    if sha256 and hashlib.sha256(blob).hexdigest() != sha256:
        print(f"  image '{url}': sha256 mismatch, skipped", file=sys.stderr)
        return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".part", "wb") as f:
        f.write(blob)
    os.replace(path + ".part", path)
    return True


def pixel_size(path):
    with Image.open(path) as im:
        return im.size


# --- helpers for the hub's value forms --------------------------------------------------------------

def as_list_of_dicts(value):
    """HF 'sequence of struct' values come as a dict of lists from `datasets` and as a list of dicts from
    parquet; accept both."""
    if value is None:
        return []
    if isinstance(value, dict):
        keys = list(value)
        return [dict(zip(keys, items)) for items in zip(*(value[k] for k in keys))]
    return list(value)


def _turn(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _annotation(style, messages):
    return {"style": style, "messages": messages}


def _group_by(rows, key):
    groups = collections.OrderedDict()
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return groups


def _points_xy(points, scale_x, scale_y):
    """[{x, y}] (or {x: [...], y: [...]}) on some scale -> [(x, y)] normalised to [0, 1]."""
    return [(p["x"] / scale_x, p["y"] / scale_y) for p in as_list_of_dicts(points)]


# --- converters: rows in the dataset's published schema -> records ------------------------------------
# Each takes (rows, media, dropped) where dropped is a Counter of reasons for rows left out.

def convert_pixmo_cap(rows, media, dropped):
    """allenai/pixmo-cap: image_url, caption, transcripts [str]. One record per image: the caption and each
    transcript are branches (Molmo2's pretraining 'pixmo_cap_with_transcripts')."""
    for row in rows:
        annotations = [_annotation("long_caption", _turn(CAPTION_PROMPT, row["caption"]))] if row.get("caption") else []
        annotations += [_annotation("transcript", _turn(TRANSCRIPT_PROMPT, t)) for t in row.get("transcripts") or [] if t]
        if not annotations:
            dropped["no caption"] += 1
            continue
        yield {"id": f"pixmo_cap/{row['image_url']}", "image": media.image_for_url(row["image_url"], row.get("image_sha256")),
               "annotations": annotations}


def _pointing_annotations(label, points):
    """Molmo2's counting='both': one branch points and counts, one only points."""
    label = label.lower()
    tag = data.image_points_tag(points, label) if points else ""
    return [_annotation("point_count", _turn(f"How many {label} are there?", data.pointing_answer(tag, len(points), True))),
            _annotation("pointing", _turn(f"Point to the {label}.", data.pointing_answer(tag, len(points))))]


def convert_pixmo_points(rows, media, dropped):
    """allenai/pixmo-points: one row per (image_url, label) with points [{x, y}] on a 0-100 scale (Molmo2
    reads them with point_scale=100), count, collection_method. Rows of one image become one record."""
    for url, group in _group_by(rows, "image_url").items():
        annotations = []
        for row in group:
            points = _points_xy(row["points"], 100, 100)
            if len(points) > MAX_POINTS_PER_LABEL:
                dropped[f"more than {MAX_POINTS_PER_LABEL} points"] += 1
                continue
            annotations += _pointing_annotations(row["label"], points)
        if annotations:
            yield {"id": f"pixmo_points/{url}", "image": media.image_for_url(url, group[0].get("image_sha256")),
                   "annotations": annotations}


def convert_pixmo_count(rows, media, dropped):
    """allenai/pixmo-count: image_url, count, points {x: [...], y: [...]} in pixels, label. Pixels need the
    image's size, so a row whose image is not here is dropped."""
    for row in rows:
        path = media.image_for_url(row["image_url"], row.get("image_sha256"))
        points = as_list_of_dicts(row.get("points"))
        if not os.path.exists(path):
            dropped["image not downloaded (pixel points need its size)"] += 1
            continue
        if len(points) != row["count"]:
            dropped["no points (eval split) or count mismatch"] += 1
            continue
        width, height = pixel_size(path)
        yield {"id": f"pixmo_count/{row['image_url']}/{row['label']}", "image": path,
               "annotations": _pointing_annotations(row["label"], _points_xy(points, width, height))}


def convert_pixmo_ama(rows, media, dropped):
    """allenai/pixmo-ask-model-anything: image_url, question, answer; one row per question."""
    for url, group in _group_by(rows, "image_url").items():
        yield {"id": f"pixmo_ama/{url}", "image": media.image_for_url(url, group[0].get("image_sha256")),
               "annotations": [_annotation("user_qa", _turn(r["question"].strip(), r["answer"])) for r in group]}


def convert_pixmo_cap_qa(rows, media, dropped):
    """allenai/pixmo-cap-qa: image_url, question = "[USER] q [ASSISTANT] a [USER] q ..." (earlier turns
    inline), answer = the last answer."""
    for url, group in _group_by(rows, "image_url").items():
        annotations = []
        for row in group:
            messages = _cap_qa_turns(row["question"])
            if messages is None:
                dropped["malformed [USER]/[ASSISTANT] turns"] += 1
                continue
            messages.append({"role": "assistant", "content": row["answer"]})
            annotations.append(_annotation("synthetic_qa", messages))
        if annotations:
            yield {"id": f"pixmo_cap_qa/{url}", "image": media.image_for_url(url, group[0].get("image_sha256")),
                   "annotations": annotations}


def _cap_qa_turns(question):
    """"[USER] q1 [ASSISTANT] a1 [USER] q2" -> [user q1, assistant a1, user q2], or None if malformed."""
    parts = re.split(r"\s*(\[USER\]|\[ASSISTANT\])\s*", question)
    if parts[0] or len(parts) < 3:
        return None
    messages = []
    for k in range(1, len(parts) - 1, 2):
        role = "user" if len(messages) % 2 == 0 else "assistant"
        if parts[k] != ("[USER]" if role == "user" else "[ASSISTANT]") or not parts[k + 1]:
            return None
        messages.append({"role": role, "content": parts[k + 1]})
    return messages if len(messages) % 2 == 1 else None


def convert_pixmo_docs(doc_type, rows, media, dropped):
    """allenai/pixmo-docs (configs charts, tables, diagrams, other): image (embedded), image_id,
    questions {question: [...], answer: [...]}."""
    for row in rows:
        path = media.image_from_bytes(f"pixmo_docs_{doc_type}_{row['image_id']}", row["image"])
        qas = as_list_of_dicts(row["questions"])
        if path is None or not qas:
            dropped["no image bytes or no questions"] += 1
            continue
        yield {"id": f"pixmo_docs_{doc_type}/{row['image_id']}", "image": path,
               "annotations": [_annotation(f"pixmo_docs_{doc_type}", _turn(qa["question"], qa["answer"])) for qa in qas]}


def convert_cosyn_point(rows, media, dropped):
    """allenai/CoSyn-point: id, image (embedded), questions [str], answer_points [[{x, y}]] on a 0-100 scale,
    names [str] (the label of each answer). Style cosyn_point answers with the points alone."""
    for row in rows:
        path = media.image_from_bytes(f"cosyn_point_{row['id']}", row["image"])
        annotations = []
        for question, points, name in zip(row["questions"], row["answer_points"], row["names"]):
            points = _points_xy(points, 100, 100)
            tag = data.image_points_tag(points, name) if points else ""
            annotations.append(_annotation("cosyn_point", _turn(question, data.pointing_answer(tag, len(points)))))
        if path is None or not annotations:
            dropped["no image bytes or no questions"] += 1
            continue
        yield {"id": f"cosyn_point/{row['id']}", "image": path, "annotations": annotations}


def convert_tulu(rows, media, dropped):
    """allenai/tulu-3-sft-mixture: id, messages [{role, content}], source. Kept when the turns are an
    optional system message then user/assistant pairs, as Molmo2 keeps them."""
    for row in rows:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
        if (not turns or len(turns) % 2 or any(m["role"] != ("user", "assistant")[k % 2] for k, m in enumerate(turns))
                or not all(m["content"].strip() for m in turns[1::2])):
            dropped["turns not user/assistant pairs, or an empty answer"] += 1
            continue
        yield {"id": f"tulu/{row['id']}", "annotations": [_annotation("text_sft", messages)],
               "meta": {"source": row.get("source")}}


def convert_molmo2_cap(rows, media, dropped):
    """allenai/Molmo2-Cap: video_id, video_caption, merged_caption, video_frame_merged_caption,
    annotation_score, ... (videos from YouTube, fetched separately). Caption styles as in Molmo2."""
    columns = {"video_frame_merged_caption": "video_long_caption", "merged_caption": "video_merged_caption",
               "video_caption": "video_short_caption"}
    for row in rows:
        annotations = [_annotation(style, _turn(VIDEO_CAPTION_PROMPTS[style], row[column]))
                       for column, style in columns.items() if row.get(column)]
        if not annotations:
            dropped["no caption"] += 1
            continue
        yield {"id": f"molmo2_cap/{row['video_id']}", "video": media.video_path(row["video_id"]),
               "annotations": annotations}


def _floor_to_half_second(t):
    return int(t / 0.5 + 1e-6) * 0.5


def _clip_key(video_id, start, end):
    return video_id if start is None else f"{video_id}_{start:g}_{end:g}"


def convert_molmo2_video_point(rows, media, dropped):
    """allenai/Molmo2-VideoPoint: video_id, video_source, label, question, count, two_fps_timestamps [s],
    points [[{x, y}] per timestamp] on a 0-100 scale, clip_start / clip_end (s, or null), video_duration.
    Rows of one clip become one record; times are taken from the clip start and floored to the 0.5 s grid
    as Molmo2 does. The clip's frames are looked up as {video_id}_{start}_{end}."""
    for (video_id, start, end), group in _group_by(
            [dict(r, _clip=(r["video_id"], r.get("clip_start"), r.get("clip_end"))) for r in rows], "_clip").items():
        annotations = []
        for row in group:
            label = row["label"]
            times = [_floor_to_half_second(t - (start or 0.0)) for t in row["two_fps_timestamps"] or []]
            per_frame = [_points_xy(p, 100, 100) for p in row["points"] or []]
            n = sum(len(p) for p in per_frame)
            if n != row["count"] or len(times) != len(per_frame):
                dropped["count does not match the points"] += 1
                continue
            tag = data.video_points_tag(times, per_frame, label) if n else ""
            question = row.get("question") or f"How many {label} are there?"
            annotations.append(_annotation("video_point_count", _turn(question, data.pointing_answer(tag, n, True))))
        if annotations:
            yield {"id": f"molmo2_video_point/{_clip_key(video_id, start, end)}",
                   "video": media.video_path(_clip_key(video_id, start, end)), "annotations": annotations}


def convert_molmo2_video_track(rows, media, dropped, sampling_fps=2):
    """allenai/Molmo2-VideoTrack: id, video, clip, fps, video_dataset, start_frame, end_frame, exp (the
    expression), w, h, mask_id [ids], points [{object_id, points: [[x, y] | null per clip frame]}] in
    pixels. Frames kept at `sampling_fps` (every fps/sampling_fps-th), times frame/fps, as Molmo2 does."""
    for row in rows:
        fps = int(row["fps"])
        if fps % sampling_fps:
            dropped[f"fps not a multiple of {sampling_fps}"] += 1
            continue
        frames = collections.defaultdict(dict)
        for obj in as_list_of_dicts(row["points"]):
            for frame, point in enumerate(obj["points"]):
                if point is not None and frame % (fps // sampling_fps) == 0:
                    frames[frame][obj["object_id"]] = (point[0] / row["w"], point[1] / row["h"])
        label = row["exp"]
        n_objects = len({o for objects in frames.values() for o in objects})
        tag = data.video_tracks_tag([(f / fps, objects) for f, objects in frames.items()], label) if n_objects else ""
        yield {"id": f"molmo2_video_track/{row['id']}", "video": media.video_path(row["clip"]),
               "annotations": [_annotation("video_point_track_per_frame",
                                           _turn(f"Track {label} at {sampling_fps} FPS.",
                                                 data.pointing_answer(tag, n_objects)))],
               "meta": {"video_dataset": row.get("video_dataset")}}


# name -> (hub repo, parquet folder inside it or None, converter)
DATASETS = {
    "pixmo_cap": ("allenai/pixmo-cap", None, convert_pixmo_cap),
    "pixmo_points": ("allenai/pixmo-points", None, convert_pixmo_points),
    "pixmo_count": ("allenai/pixmo-count", None, convert_pixmo_count),
    "pixmo_ama": ("allenai/pixmo-ask-model-anything", None, convert_pixmo_ama),
    "pixmo_cap_qa": ("allenai/pixmo-cap-qa", None, convert_pixmo_cap_qa),
    **{f"pixmo_docs_{t}": ("allenai/pixmo-docs", t,
                           lambda rows, media, dropped, t=t: convert_pixmo_docs(t, rows, media, dropped))
       for t in ("charts", "tables", "diagrams", "other")},
    "cosyn_point": ("allenai/CoSyn-point", None, convert_cosyn_point),
    "tulu": ("allenai/tulu-3-sft-mixture", None, convert_tulu),
    "molmo2_cap": ("allenai/Molmo2-Cap", None, convert_molmo2_cap),
    "molmo2_video_point": ("allenai/Molmo2-VideoPoint", None, convert_molmo2_video_point),
    "molmo2_video_track": ("allenai/Molmo2-VideoTrack", None, convert_molmo2_video_track),
}


# --- reading rows, writing records ------------------------------------------------------------------

def read_rows(path, limit=None):
    """Rows from a .jsonl file, a .parquet file (needs pyarrow) or a folder of them."""
    files = sorted(os.path.join(folder, n) for folder, _, names in os.walk(path) for n in names
                   if n.endswith((".parquet", ".jsonl"))) if os.path.isdir(path) else [path]
    rows = []
    for file in files:
        if file.endswith(".jsonl"):
            with open(file) as f:
                rows += [json.loads(line) for line in f if line.strip()]
        else:
            try:
                import pyarrow.parquet
            except ImportError:
                sys.exit(f"'{file}' is parquet: reading it needs pyarrow (pip install pyarrow)")
            rows += pyarrow.parquet.read_table(file).to_pylist()
        if limit and len(rows) >= limit:
            return rows[:limit]
    return rows


def download_rows(repo, folder, out_dir):
    """The dataset's train parquet files from the hub (huggingface_hub) -> local folder."""
    from huggingface_hub import snapshot_download
    pattern = f"{folder}/*train*.parquet" if folder else "*train*.parquet"
    return snapshot_download(repo, repo_type="dataset", allow_patterns=[pattern, f"**/{pattern}"],
                             local_dir=os.path.join(out_dir, "hub", repo.replace("/", "__")))


def is_val(record_id):
    return hashlib.sha256(record_id.encode()).digest()[0] >> (8 - VAL_FRACTION_BITS) == 0


def write_dataset(records, dataset_dir):
    """Records -> {dataset_dir}/train.jsonl and val.jsonl, media paths made relative to dataset_dir."""
    os.makedirs(dataset_dir, exist_ok=True)
    counts = collections.Counter()
    with open(os.path.join(dataset_dir, "train.jsonl"), "w") as train, open(os.path.join(dataset_dir, "val.jsonl"), "w") as val:
        for record in records:
            for key in ("image", "video"):
                if isinstance(record.get(key), list):
                    record[key] = [os.path.relpath(p, dataset_dir) for p in record[key]]
                elif record.get(key):
                    record[key] = os.path.relpath(record[key], dataset_dir)
            split = "val" if is_val(record["id"]) else "train"
            (val if split == "val" else train).write(json.dumps(record) + "\n")
            counts[split] += 1
    return counts


def prefetch_images(rows, media, n_threads=16):
    """Download every row's image_url in parallel before converting (converters then find them on disk)."""
    todo = {row["image_url"]: row.get("image_sha256") for row in rows if row.get("image_url")}
    todo = {u: s for u, s in todo.items() if not os.path.exists(media.url_path(u))}
    with concurrent.futures.ThreadPoolExecutor(n_threads) as pool:
        ok = sum(pool.map(lambda us: fetch_url(us[0], media.url_path(us[0]), us[1]), todo.items()))
    print(f"images: {ok} of {len(todo)} downloaded")


def extract_frames(video_file, frames_dir, fps=2.0, start=None, end=None):
    """A video file -> a folder of frames at `fps` (needs the ffmpeg program), the form data.read_video_file reads."""
    os.makedirs(frames_dir, exist_ok=True)
    clip = (["-ss", str(start)] if start is not None else []) + (["-to", str(end)] if end is not None else [])
    subprocess.run(["ffmpeg", "-loglevel", "error", *clip, "-i", video_file, "-vf", f"fps={fps}",
                    os.path.join(frames_dir, "%05d.jpg")], check=True)


# --- the synthetic world: shapes to learn from, generated here ---------------------------------------
# Images of 0..max_objects shapes (4 kinds, 4 colours, 2 sizes, 3 textures) on 4 backgrounds x 3 patterns,
# with a dense caption, short QA, counting with points and pointing; pairs of images to compare and count
# across; and short videos (frame folders at 2 fps) of shapes that appear and move, with counting, video
# pointing and tracking. Design choices:
# - Deterministic: every example has its own random.Random seeded by sha256(seed/split/part/index), and
#   PNG bytes depend only on pixels, so the same seed writes the same bytes. Splits use different seeds;
#   the background colour is jittered so no two images coincide (the tests check both).
# - Answers need the image: each scene is built around a query ("red circles", "red shapes", "circles")
#   whose count is drawn uniformly from 0..max_objects before the scene, the other shapes never match it,
#   and yes/no questions ask about a present or an absent shape half the time each.
# - Every record carries its scene (shapes with centres, sizes, tracks), from which a checker recomputes
#   every answer. Sizes are equal-area radii (fractions of the width); a point is a shape's centre.

SHAPE_KINDS = ("circle", "square", "triangle", "star")
SHAPE_COLOURS = {"red": (220, 45, 45), "green": (40, 165, 70), "blue": (45, 85, 225), "yellow": (240, 200, 30)}
SHAPE_TEXTURES = ("solid", "striped", "outline")
SHAPE_SIZES = {"small": (0.035, 0.05), "large": (0.065, 0.085)}
BACKGROUNDS = {"light grey": (214, 214, 214), "beige": (226, 212, 184), "pale blue": (194, 208, 228),
               "dark grey": (68, 70, 76)}
BACKGROUND_PATTERNS = ("plain", "gradient", "grid")
MAX_SHAPES = 12  # the most shapes _place can always fit into one image of the world's sizes
# How a world draws its shapes and backgrounds. "world": the tables above. "big_solid": every shape large (equal-area
# radius 0.12, 27 px across in a 112-px crop), solid, on plain light grey: the lesson a ViT from scratch learns kinds
# of shape in, where in the world's own images it does not (BENCHMARKS.md "What holds the kinds back")
SHAPE_STYLES = {
    "world": {"sizes": SHAPE_SIZES, "textures": SHAPE_TEXTURES, "backgrounds": BACKGROUNDS,
              "patterns": BACKGROUND_PATTERNS, "max_objects": MAX_SHAPES},
    "big_solid": {"sizes": {"small": (0.12, 0.12), "large": (0.12, 0.12)}, "textures": ("solid",),
                  "backgrounds": {"light grey": BACKGROUNDS["light grey"]}, "patterns": ("plain",),
                  "max_objects": 3},  # more shapes this large do not always fit in one image
}
# bounding radius / equal-area radius, so shapes of one size cover about the same area
_EXTENT = {"circle": 1.0, "square": math.sqrt(math.pi) / 2 * math.sqrt(2), "triangle": 1.555, "star": 1.46}
SYNTHETIC_FPS = 2.0

_POSITION_NAMES = [["at the top left", "at the top", "at the top right"],
                   ["on the left", "in the center", "on the right"],
                   ["at the bottom left", "at the bottom", "at the bottom right"]]
_CAPTION_PROMPTS = ["Describe this image in detail.", "Write a detailed description of the picture.",
                    "What does this image show? Describe everything."]
_COUNT_PROMPTS = ["How many {label} are there?", "Count the {label}.", "How many {label} can you see?"]
_POINT_PROMPTS = ["Point to the {label}.", "Point to all the {label}.", "Where are the {label}?"]
_VIDEO_COUNT_PROMPTS = ["How many {label} appear in the video?", "Count the {label} in this video."]
_VIDEO_POINT_PROMPTS = ["Point to the {label} when they first appear.", "Point to each of the {label}."]
_TRACK_PROMPTS = ["Track the {label}.", "Track every one of the {label} through the video."]


def _example_rng(seed, split, part, index):
    digest = hashlib.sha256(f"{seed}/{split}/{part}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _plural(kind):
    return kind + "s"


def query_label(query):
    """{"colour": "red"|None, "kind": "circle"|None} -> 'red circles' / 'red shapes' / 'circles'."""
    noun = _plural(query["kind"]) if query["kind"] else "shapes"
    return f"{query['colour']} {noun}" if query["colour"] else noun


def shape_matches(shape, query):
    return (query["colour"] in (None, shape["colour"])) and (query["kind"] in (None, shape["kind"]))


def query_asks_about(query):
    """What a query names: 'colour' ("the red shapes"), 'kind' ("the circles"), 'colour and kind' ("the red
    circles"), or 'nothing' (every shape)."""
    return " and ".join(k for k in ("colour", "kind") if query[k]) or "nothing"


def _random_query(rng):
    form = rng.randrange(3)
    return {"colour": rng.choice(list(SHAPE_COLOURS)) if form != 1 else None,
            "kind": rng.choice(SHAPE_KINDS) if form != 0 else None}


def _shape_specs(rng, query, n_matching, n_other, style="world"):
    """Colours, kinds, sizes and textures of the shapes: n_matching match the query, n_other do not."""
    sizes, textures = SHAPE_STYLES[style]["sizes"], SHAPE_STYLES[style]["textures"]
    specs = []
    for matching in [True] * n_matching + [False] * n_other:
        while True:
            shape = {"kind": rng.choice(SHAPE_KINDS), "colour": rng.choice(list(SHAPE_COLOURS))}
            if matching:
                shape["kind"] = query["kind"] or shape["kind"]
                shape["colour"] = query["colour"] or shape["colour"]
            if shape_matches(shape, query) == matching:
                break
        shape["size"] = "large" if rng.random() < 0.4 else "small"
        shape["radius"] = round(rng.uniform(*sizes[shape["size"]]), 4)
        shape["texture"] = rng.choice(textures)
        specs.append(shape)
    rng.shuffle(specs)
    return specs


def _place(rng, shapes, style="world"):
    """Give each shape a centre (x, y) in [0, 1] so it lies inside the image and overlaps its neighbours at
    most a little; large shapes first, drawn first, so small ones stay on top."""
    shapes.sort(key=lambda s: -s["radius"])
    placed = []
    for shape in shapes:
        for attempt in range(400):
            if attempt == 200:  # crowded: shrink to a small shape and try again
                shape["size"], shape["radius"] = "small", SHAPE_STYLES[style]["sizes"]["small"][0]
            e = shape["radius"] * _EXTENT[shape["kind"]]
            x, y = rng.uniform(e, 1 - e), rng.uniform(e, 1 - e)
            if all(math.hypot(x - p["x"], y - p["y"]) >= 0.7 * (e + p["radius"] * _EXTENT[p["kind"]])
                   for p in placed):
                break
        else:
            raise RuntimeError("synthetic scene: could not place the shapes")  # not reached for <= 12 shapes
        shape["x"], shape["y"] = round(x, 4), round(y, 4)
        placed.append(shape)
    return placed


def _background(rng, style="world"):
    backgrounds = SHAPE_STYLES[style]["backgrounds"]
    name = rng.choice(list(backgrounds))
    colour = [min(255, max(0, c + rng.randint(-12, 12))) for c in backgrounds[name]]
    return {"name": name, "colour": colour, "pattern": rng.choice(SHAPE_STYLES[style]["patterns"])}


def make_image_scene(rng, max_objects=12, query=None, n_matching=None, style="world"):
    """A scene: background, query and shapes; the query's count is uniform over 0..max_objects unless given.
    style: a key of SHAPE_STYLES."""
    query = query or _random_query(rng)
    n_matching = rng.randint(0, max_objects) if n_matching is None else n_matching
    n_other = rng.randint(0, max_objects - n_matching)
    shapes = _place(rng, _shape_specs(rng, query, n_matching, n_other, style), style)
    return {"background": _background(rng, style), "query": query, "shapes": shapes}


def _shape_polygon(kind, cx, cy, r):
    """Outline of a shape of equal-area radius r (pixels) centred at (cx, cy), as a list of points."""
    if kind == "square":
        h = r * math.sqrt(math.pi) / 2
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        R = r * _EXTENT["triangle"]
        return [(cx + R * math.sin(a), cy - R * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    R = r * _EXTENT["star"]  # five-pointed star, inner radius R / 2
    return [(cx + (R if i % 2 == 0 else R / 2) * math.sin(i * math.pi / 5),
             cy - (R if i % 2 == 0 else R / 2) * math.cos(i * math.pi / 5)) for i in range(10)]


def _draw_shape(canvas, shape, x, y, width):
    r = shape["radius"] * width
    colour = tuple(SHAPE_COLOURS[shape["colour"]])
    border = max(2, round(r * 0.3))
    # draw into a mask, then paint the texture through it
    e = math.ceil(r * _EXTENT[shape["kind"]]) + 2
    x0, y0 = round(x) - e, round(y) - e
    mask = Image.new("L", (2 * e, 2 * e), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = x - x0, y - y0
    if shape["kind"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_shape_polygon(shape["kind"], cx, cy, r), fill=255)
    if shape["texture"] == "outline":  # keep only a rim: erase an eroded copy
        inner = Image.new("L", mask.size, 0)
        draw_inner = ImageDraw.Draw(inner)
        ri = max(r - border, 1)
        if shape["kind"] == "circle":
            draw_inner.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=255)
        else:
            draw_inner.polygon(_shape_polygon(shape["kind"], cx, cy, ri * 0.92), fill=255)
        mask.paste(0, (0, 0), inner)
        canvas.paste(colour, (x0, y0), mask)
    elif shape["texture"] == "striped":
        light = tuple(int(c * 0.45 + 255 * 0.55) for c in colour)
        stripes = Image.new("RGB", mask.size, light)
        stripe_draw = ImageDraw.Draw(stripes)
        step = max(4, round(r * 0.5))
        for k in range(-2 * e, 2 * e, step):
            stripe_draw.line([(k, 0), (k + 2 * e, 2 * e)], fill=colour, width=max(2, step // 2))
        canvas.paste(stripes, (x0, y0), mask)
    else:
        canvas.paste(colour, (x0, y0), mask)


def _draw_background(background, width, height):
    import numpy as np
    colour = np.array(background["colour"], dtype=np.float32)
    if background["pattern"] == "gradient":  # darker towards the bottom
        shade = np.linspace(1.0, 0.8, height, dtype=np.float32)[:, None, None]  # (H, 1, 1)
        pixels = np.broadcast_to(colour * shade, (height, width, 3))  # (H, W, 3)
        return Image.fromarray(np.ascontiguousarray(pixels.round().astype(np.uint8)))
    canvas = Image.new("RGB", (width, height), tuple(int(c) for c in colour))
    if background["pattern"] == "grid":
        draw = ImageDraw.Draw(canvas)
        line = tuple(int(c * 0.85) for c in colour)
        for k in range(0, max(width, height), max(8, width // 8)):
            draw.line([(k, 0), (k, height)], fill=line)
            draw.line([(0, k), (width, k)], fill=line)
    return canvas


def render_scene(scene, width, height=None, positions=None):
    """Scene -> RGB PIL image. `positions` overrides the shapes' centres (video frames), None = hidden."""
    height = height or width
    canvas = _draw_background(scene["background"], width, height)
    for k, shape in enumerate(scene["shapes"]):
        x, y = (shape["x"], shape["y"]) if positions is None else (positions[k] or (None, None))
        if x is not None:
            _draw_shape(canvas, shape, x * width, y * height, width)
    return canvas


def _position_name(x, y):
    return _POSITION_NAMES[min(2, int(y * 3))][min(2, int(x * 3))]


def _count_phrase(n, noun):
    return f"{n} {noun if n != 1 else noun[:-1]}"


def describe_scene(scene):
    """The dense caption: background, counts by colour, then every shape in reading order."""
    shapes, background = scene["shapes"], scene["background"]
    pattern = {"plain": "", "gradient": " that darkens towards the bottom", "grid": " with a faint grid"}
    setting = f"a {background['name']} background{pattern[background['pattern']]}"
    if not shapes:
        return f"An empty image: {setting}, with no shapes on it."
    sentences = [f"The image shows {_count_phrase(len(shapes), 'shapes')} on {setting}."]
    by_colour = collections.Counter(s["colour"] for s in shapes)
    parts = [_count_phrase(by_colour[c], f"{c} shapes") for c in SHAPE_COLOURS if by_colour[c]]
    sentences.append("There " + ("is " if len(shapes) == 1 else "are ") + _join_words(parts) + ".")
    for s in sorted(shapes, key=lambda s: (min(2, int(s["y"] * 3)), s["x"])):
        texture = {"solid": "", "striped": " striped", "outline": " outlined"}[s["texture"]]
        sentences.append(f"A {s['size']}{texture} {s['colour']} {s['kind']} {_position_name(s['x'], s['y'])}.")
    return " ".join(sentences)


def _join_words(parts):
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _qa(style, question, answer):
    return {"style": style, "messages": [{"role": "user", "content": question},
                                         {"role": "assistant", "content": answer}]}


def _area(shape):
    return shape["radius"] ** 2


def _short_questions(rng, scene):
    """Short questions whose answers are balanced over scenes: (question, answer) pairs."""
    shapes = scene["shapes"]
    questions = [("How many shapes are there?", str(len(shapes)))]
    present = {(s["colour"], s["kind"]) for s in shapes}
    absent = sorted({(c, k) for c in SHAPE_COLOURS for k in SHAPE_KINDS} - present)
    if present and rng.random() < 0.5:
        colour, kind = rng.choice(sorted(present))
    else:
        colour, kind = rng.choice(absent)
    questions.append((f"Is there a {colour} {kind}?", "yes" if (colour, kind) in present else "no"))
    if shapes:
        questions.append(("What shape is furthest to the left?", min(shapes, key=lambda s: s["x"])["kind"]))
        by_area = sorted(shapes, key=_area, reverse=True)
        if len(by_area) == 1 or _area(by_area[0]) > 1.3 * _area(by_area[1]):
            questions.append(("What colour is the largest shape?", by_area[0]["colour"]))
    return questions


def image_annotations(rng, scene):
    """A caption, counting with points and pointing for the scene's query, and two short questions."""
    query, shapes = scene["query"], scene["shapes"]
    label = query_label(query)
    points = [(s["x"], s["y"]) for s in shapes if shape_matches(s, query)]
    tag = data.image_points_tag(points, label) if points else ""
    annotations = [
        _qa("long_caption", rng.choice(_CAPTION_PROMPTS), describe_scene(scene)),
        _qa("point_count", rng.choice(_COUNT_PROMPTS).format(label=label),
            data.pointing_answer(tag, len(points), with_count=True)),
        _qa("pointing", rng.choice(_POINT_PROMPTS).format(label=label), data.pointing_answer(tag, len(points))),
    ]
    for question, answer in rng.sample(_short_questions(rng, scene), 2):
        annotations.append(_qa("short_answer", question, answer))
    return annotations


def extra_query_annotations(rng, scene, n):
    """n more counting or pointing questions on one image, each about another query than the scene's: a query of a
    shape it holds (3 in 4) or one drawn as the scene's was (it may match none). They give one image more point lists
    to learn from, about other colours and kinds, for the cost of their answers' tokens (prepare_data's
    extra_queries)."""
    annotations, asked = [], [scene["query"]]
    for _ in range(n):
        for _ in range(8):  # another query than those asked; a scene of one shape has only three
            form = rng.randrange(3)
            if scene["shapes"] and rng.random() < 0.75:
                shape = rng.choice(scene["shapes"])
                query = {"colour": shape["colour"] if form != 1 else None, "kind": shape["kind"] if form != 0 else None}
            else:
                query = _random_query(rng)
            if query not in asked:
                break
        asked.append(query)
        label = query_label(query)
        points = [(s["x"], s["y"]) for s in scene["shapes"] if shape_matches(s, query)]
        tag = data.image_points_tag(points, label) if points else ""
        if rng.random() < 0.5:
            annotations.append(_qa("point_count", rng.choice(_COUNT_PROMPTS).format(label=label),
                                   data.pointing_answer(tag, len(points), with_count=True)))
        else:
            annotations.append(_qa("pointing", rng.choice(_POINT_PROMPTS).format(label=label),
                                   data.pointing_answer(tag, len(points))))
    return annotations


def multi_image_scenes(rng, max_objects=12, style="world"):
    """Two scenes sharing a query; which has more of it (or neither) is drawn uniformly first."""
    query = _random_query(rng)
    relation = rng.randrange(3)  # 0: image 1 has more, 1: image 2 has more, 2: same
    if relation == 2:
        counts = [rng.randint(0, max_objects)] * 2
    else:
        low, high = sorted(rng.sample(range(max_objects + 1), 2))
        counts = [high, low] if relation == 0 else [low, high]
    return [make_image_scene(rng, max_objects, query, n, style) for n in counts]


def multi_image_annotations(rng, scenes):
    query = scenes[0]["query"]
    label = query_label(query)
    counts = [sum(shape_matches(s, query) for s in scene["shapes"]) for scene in scenes]
    more = ("Image 1" if counts[0] > counts[1] else "Image 2" if counts[1] > counts[0]
            else "They have the same number.")
    per_image = [[(s["x"], s["y"]) for s in scene["shapes"] if shape_matches(s, query)] for scene in scenes]
    tag = data.multi_image_points_tag(per_image, label) if sum(counts) else ""
    return [
        _qa("multi_image_short_answer", f"Which image has more {label}?", more),
        _qa("multi_image_point_then_count", f"How many {label} are there in the two images?",
            data.pointing_answer(tag, sum(counts), with_count=True)),
    ]


def make_video_scene(rng, n_frames=8, max_objects=6, style="world"):
    """Shapes that appear at some frame, move in straight lines bouncing off the edges, and some leave
    before the end. Each shape's track holds its centre per frame, None while it is not in the video."""
    scene = make_image_scene(rng, max_objects, style=style)
    for shape in scene["shapes"]:
        e = shape["radius"] * _EXTENT[shape["kind"]]
        appear = rng.randrange(n_frames - 2)
        leave = rng.randint(appear + 2, n_frames - 1) if rng.random() < 0.4 else n_frames
        x, y = shape.pop("x"), shape.pop("y")
        speed, angle = rng.uniform(0.03, 0.08), rng.uniform(0, 2 * math.pi)
        vx, vy = speed * math.cos(angle), speed * math.sin(angle)
        track = []
        for f in range(n_frames):
            track.append([round(x, 4), round(y, 4)] if appear <= f < leave else None)
            if f >= appear:
                x, y = x + vx, y + vy
                if not e <= x <= 1 - e:
                    vx, x = -vx, min(max(x, e), 1 - e)
                if not e <= y <= 1 - e:
                    vy, y = -vy, min(max(y, e), 1 - e)
        shape["appear"], shape["leave"], shape["track"] = appear, leave, track
    scene["frame_times"] = [f / SYNTHETIC_FPS for f in range(n_frames)]
    return scene


def video_annotations(rng, scene):
    """Counting with points at each shape's first frame, the same points alone, tracks, and a count of the
    shapes in the last frame."""
    query, times = scene["query"], scene["frame_times"]
    label = query_label(query)
    matching = [k for k, s in enumerate(scene["shapes"]) if shape_matches(s, query)]
    first_points = [[tuple(scene["shapes"][k]["track"][f]) for k in matching if scene["shapes"][k]["appear"] == f]
                    for f in range(len(times))]
    tag = data.video_points_tag(times, first_points, label) if matching else ""
    frames = [(t, {k: tuple(scene["shapes"][k]["track"][f]) for k in matching if scene["shapes"][k]["track"][f]})
              for f, t in enumerate(times)]
    tracks = data.video_tracks_tag(frames, label) if matching else ""
    n_last = sum(s["track"][-1] is not None for s in scene["shapes"])
    return [
        _qa("video_point_count", rng.choice(_VIDEO_COUNT_PROMPTS).format(label=label),
            data.pointing_answer(tag, len(matching), with_count=True)),
        _qa("video_point", rng.choice(_VIDEO_POINT_PROMPTS).format(label=label),
            data.pointing_answer(tag, len(matching))),
        _qa("video_point_track_per_frame", rng.choice(_TRACK_PROMPTS).format(label=label),
            data.pointing_answer(tracks, len(matching))),
        _qa("video_short_answer", "How many shapes are there at the end of the video?", str(n_last)),
    ]


def _save_png(image, path):
    image.save(path, format="PNG", compress_level=1)


SYNTHETIC_DATASETS = {"image": "synth_image", "multi": "synth_multi", "video": "synth_video"}


WORLD_FILE = "world.json"  # {out}/world.json: the knobs a synthetic world was made with (main writes it last)
WORLD_CONTENT = ("seed", "max_objects", "shape_style", "extra_queries", "image_size")  # those its records depend on
#   beyond their number

SYNTHETIC_SIZES = {"train": {"image": 2000, "multi": 300, "video": 200},
                   "val": {"image": 200, "multi": 50, "video": 50},
                   "test": {"image": 200, "multi": 50, "video": 50}}


def generate_synthetic_world(data_dir, seed=0, sizes=None, image_size=224, video_size=128, max_objects=12,
                             max_video_objects=6, n_frames=8, shape_style="world", workers=1, extra_queries=0):
    """Write the synthetic world as three datasets under data_dir, each laid out like a prepared real one:
    {data_dir}/{synth_image|synth_multi|synth_video}/{split}.jsonl with media in {split}/ next to it.
    sizes: {split: {"image"|"multi"|"video": n_records}} (default SYNTHETIC_SIZES). max_objects bounds every
    image's shapes, and so the counts (1..12; fewer makes an easier world). shape_style: a key of SHAPE_STYLES.
    workers > 1 draws the examples in that many processes: the same bytes, since each example has its own seed.
    extra_queries: that many more counting or pointing questions on each training image (extra_query_annotations),
    drawn from a seed of their own, so that everything else is the same bytes as without them.
    Returns {split: {part: jsonl path}}."""
    if shape_style not in SHAPE_STYLES:
        raise ValueError(f"synthetic world: shape_style={shape_style!r}, expected one of {list(SHAPE_STYLES)}")
    if not (isinstance(extra_queries, int) and extra_queries >= 0):
        raise ValueError(f"synthetic world: extra_queries={extra_queries!r}, expected a whole number >= 0")
    for name, value in (("max_objects", max_objects), ("max_video_objects", max_video_objects)):
        if not 1 <= value <= SHAPE_STYLES[shape_style]["max_objects"]:
            raise ValueError(f"synthetic world: {name}={value}, expected 1..{SHAPE_STYLES[shape_style]['max_objects']}"
                             + (f" with shape_style={shape_style!r}" if shape_style != "world" else ""))
    sizes = sizes or SYNTHETIC_SIZES
    paths = {}
    pool = concurrent.futures.ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for split, parts in sizes.items():
            paths[split] = {}
            for part, n in parts.items():
                if part not in SYNTHETIC_DATASETS:
                    raise ValueError(f"synthetic world part {part!r}: expected one of {list(SYNTHETIC_DATASETS)}")
                dataset_dir = os.path.join(data_dir, SYNTHETIC_DATASETS[part])
                os.makedirs(os.path.join(dataset_dir, split), exist_ok=True)
                draw = functools.partial(_synthetic_record, dataset_dir, seed, split, part, image_size=image_size,
                                         video_size=video_size, max_objects=max_objects,
                                         max_video_objects=max_video_objects, n_frames=n_frames,
                                         shape_style=shape_style, extra_queries=extra_queries)
                # map keeps the index order, so the jsonl is the same whichever process drew each example
                records = pool.map(draw, range(n), chunksize=32) if pool else map(draw, range(n))
                paths[split][part] = path = os.path.join(dataset_dir, f"{split}.jsonl")
                # written whole or not at all: a run stopped half-way leaves no jsonl that looks finished (demo.py
                # takes an existing test.jsonl as a made world)
                with open(path + ".tmp", "w") as f:
                    for record in records:
                        f.write(json.dumps(record) + "\n")
                os.replace(path + ".tmp", path)
    finally:
        if pool:
            pool.shutdown()
    return paths


def _synthetic_record(dataset_dir, seed, split, part, index, *, image_size, video_size, max_objects,
                      max_video_objects, n_frames, shape_style="world", extra_queries=0):
    """Draw, render and save one example; return its record (media paths relative to dataset_dir)."""
    rng = _example_rng(seed, split, part, index)
    name = f"{split}/{index:06d}"
    if part == "image":
        scene = make_image_scene(rng, max_objects, style=shape_style)
        _save_png(render_scene(scene, image_size), os.path.join(dataset_dir, name + ".png"))
        annotations = image_annotations(rng, scene)
        if extra_queries and split == "train":  # the held-out splits keep one question of each kind an image
            annotations += extra_query_annotations(_example_rng(seed, split, "image extra", index), scene,
                                                   extra_queries)
        return {"id": f"{SYNTHETIC_DATASETS[part]}/{name}", "image": name + ".png",
                "annotations": annotations, "scene": scene}
    if part == "multi":
        scenes = multi_image_scenes(rng, max_objects, shape_style)
        files = [f"{name}_{k}.png" for k in range(1, len(scenes) + 1)]
        for scene, file in zip(scenes, files):
            _save_png(render_scene(scene, image_size), os.path.join(dataset_dir, file))
        return {"id": f"{SYNTHETIC_DATASETS[part]}/{name}", "image": files,
                "annotations": multi_image_annotations(rng, scenes), "scene": {"images": scenes}}
    scene = make_video_scene(rng, n_frames, max_video_objects, shape_style)
    os.makedirs(os.path.join(dataset_dir, name), exist_ok=True)
    for frame in range(n_frames):
        positions = [s["track"][frame] for s in scene["shapes"]]
        _save_png(render_scene(scene, video_size, positions=positions),
                  os.path.join(dataset_dir, name, f"{frame:04d}.png"))
    return {"id": f"{SYNTHETIC_DATASETS[part]}/{name}", "video": name, "video_fps": SYNTHETIC_FPS,
            "annotations": video_annotations(rng, scene), "scene": scene}


# -- knobs (override with --key=value) -------------------------------------------------------------------------
dataset = "synthetic"  # the synthetic world, or one of DATASETS (converted from the hub, or from rows)
out = "data"  # data folder: datasets go to {out}/{name}/
rows = ""  # convert these local rows (.jsonl, .parquet or a folder) instead of downloading
limit = 0  # convert at most this many rows; 0 = all
download_images = True  # download the rows' image URLs
seed = 0  # synthetic world seed
image_size = 224  # synthetic world image size
max_objects = 12  # synthetic world: at most this many shapes per image, so counts of 0..N (1-12)
train_images = SYNTHETIC_SIZES["train"]["image"]  # synthetic world: single-image training records
shape_style = "world"  # synthetic world: world | big_solid (every shape large, solid, on plain grey; max_objects <= 3):
#   an easy world for stage 1's first steps (SHAPE_STYLES)
extra_queries = 0  # synthetic world: this many more counting or pointing questions on each training image, about
#   other colours and kinds than its own question (extra_query_annotations); the rest of the world is unchanged
workers = 0  # synthetic world: processes drawing it (0 = every core this process may use); the bytes do not change
# ----------------------------------------------------------------------------------------------------------------


def main():
    if dataset != "synthetic" and dataset not in DATASETS:
        raise SystemExit(f"--dataset={dataset}: expected synthetic or one of {sorted(DATASETS)}")
    if not 1 <= max_objects <= MAX_SHAPES:
        raise SystemExit(f"--max_objects={max_objects}: expected 1..{MAX_SHAPES}")
    if shape_style not in SHAPE_STYLES:
        raise SystemExit(f"--shape_style={shape_style!r}: expected one of {list(SHAPE_STYLES)}")
    if dataset == "synthetic":
        sizes = {split: dict(parts) for split, parts in SYNTHETIC_SIZES.items()}
        sizes["train"]["image"] = train_images
        try:
            paths = generate_synthetic_world(out, seed=seed, sizes=sizes, image_size=image_size,
                                             max_objects=max_objects,
                                             max_video_objects=min(6, SHAPE_STYLES[shape_style]["max_objects"]),
                                             shape_style=shape_style, extra_queries=extra_queries,
                                             workers=workers or training.usable_cores())
        except ValueError as e:
            raise SystemExit(f"prepare_data: {e}") from None
        for split, parts in paths.items():
            print(split, {part: sum(1 for _ in open(p)) for part, p in parts.items()})
        # what the world was made with, written last: demo.py makes a world again whose content knobs differ
        made = {"seed": seed, "max_objects": max_objects, "shape_style": shape_style, "extra_queries": extra_queries,
                "image_size": image_size, "train_images": train_images}
        with open(os.path.join(out, WORLD_FILE), "w") as f:
            json.dump(made, f, indent=2)
        return
    repo, folder, convert = DATASETS[dataset]
    dataset_rows = read_rows(rows or download_rows(repo, folder, out), limit)
    media = Media(out)
    if download_images and any("image_url" in row for row in dataset_rows[:1]):
        prefetch_images(dataset_rows, media)
    dropped = collections.Counter()
    counts = write_dataset(convert(dataset_rows, media, dropped), os.path.join(out, dataset))
    print(f"{dataset}: {len(dataset_rows)} rows -> {counts['train']} train, {counts['val']} val records")
    for reason, n in dropped.most_common():
        print(f"  dropped {n} rows: {reason}")
    report = data.SkipReport()
    for split in ("train", "val"):
        list(data.RecordFile(os.path.join(out, dataset, f"{split}.jsonl"), report, load_media=False))
    print(report.summary())


if __name__ == "__main__":
    configure(globals())
    main()
