"""
Turn datasets into nanoMolmo2's record format (data.py section 3b): {out}/{name}/{train,val}.jsonl.

    python prepare_data.py synthetic                          # the synthetic world, offline (the default data)
    python prepare_data.py pixmo_points --limit 1000          # download from the Hugging Face hub, convert
    python prepare_data.py pixmo_points --rows rows.parquet   # convert rows you already have (.parquet/.jsonl)

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

import argparse
import collections
import concurrent.futures
import hashlib
import json
import os
import re
import subprocess
import sys
import urllib.request

import data

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


def image_size(path):
    from PIL import Image
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
        width, height = image_size(path)
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and gives each option's default."""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("dataset", choices=["synthetic", *DATASETS])
    parser.add_argument("--out", default="data", help="data folder: datasets go to {out}/{name}/")
    parser.add_argument("--rows", help="convert these local rows (.jsonl, .parquet or a folder) instead of downloading")
    parser.add_argument("--limit", type=int, help="convert at most this many rows")
    parser.add_argument("--no-images", action="store_true", help="do not download image URLs")
    parser.add_argument("--seed", type=int, default=0, help="synthetic world seed")
    parser.add_argument("--image-size", type=int, default=224, help="synthetic world image size")
    parser.add_argument("--max-objects", type=int, default=12,
                        help="synthetic world: at most this many shapes per image, so counts of 0..N (1-12)")
    parser.add_argument("--train-images", type=int, default=data.SYNTHETIC_SIZES["train"]["image"],
                        help="synthetic world: single-image training records")
    args = parser.parse_args()
    if not 1 <= args.max_objects <= data.MAX_SHAPES:
        parser.error(f"--max-objects {args.max_objects}: expected 1..{data.MAX_SHAPES}")

    if args.dataset == "synthetic":
        sizes = {split: dict(parts) for split, parts in data.SYNTHETIC_SIZES.items()}
        sizes["train"]["image"] = args.train_images
        paths = data.generate_synthetic_world(args.out, seed=args.seed, sizes=sizes, image_size=args.image_size,
                                              max_objects=args.max_objects)
        for split, parts in paths.items():
            print(split, {part: sum(1 for _ in open(p)) for part, p in parts.items()})
        return
    repo, folder, convert = DATASETS[args.dataset]
    rows = read_rows(args.rows or download_rows(repo, folder, args.out), args.limit)
    media = Media(args.out)
    if not args.no_images and any("image_url" in row for row in rows[:1]):
        prefetch_images(rows, media)
    dropped = collections.Counter()
    counts = write_dataset(convert(rows, media, dropped), os.path.join(args.out, args.dataset))
    print(f"{args.dataset}: {len(rows)} rows -> {counts['train']} train, {counts['val']} val records")
    for reason, n in dropped.most_common():
        print(f"  dropped {n} rows: {reason}")
    report = data.SkipReport()
    for split in ("train", "val"):
        list(data.RecordFile(os.path.join(args.out, args.dataset, f"{split}.jsonl"), report, load_media=False))
    print(report.summary())


if __name__ == "__main__":
    main()
