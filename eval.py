"""
Measuring nanoMolmo2: metrics on plain Python data, a markdown report, and the driver that asks a checkpoint
every question of a record file and scores the answers (the prompts, the generation and the pictures are
sample.py's).

    python eval.py --init_from=out/joint --split=test                  # the synthetic world's test split
    python eval.py --init_from=out/joint --tasks="['counting','pointing']" --max_examples=100
    python eval.py --init_from=allenai/Molmo2-4B --datasets="['bench/pixmo_count/test.jsonl']"

writes report.md (a table per task, example pictures), metrics.json (with the headline counting_accuracy
and pointing_f1), predictions.jsonl and the pictures into out_dir. Section 4 (the driver) says how each
style is scored; sample.py's "Loading a model" section says how prompts are built.

Design choices
- Every metric works on plain data (lists of points, ints, strings), one example at a time, and returns a
  dict of floats; `mean_scores` averages a list of them. Averaging per example, then over examples, is
  what Molmo2 does (allenai/molmo2 olmo/eval/evaluators.py: PointingEval, PointCountEval, VixMoPointEval).
- Points are in **pixels**: (x, y) for an image, (t, x, y) for video (t in seconds). Answers carry integers
  on a 0-1000 scale; `to_pixels` converts them (x_px = x / 1000 * width, as Molmo2's point parser does).
  Distances are Euclidean in pixels.
- Pointing follows Molmo/Molmo2's PointingEval: predictions and true points are paired one-to-one by the
  assignment of minimum total distance (Hungarian), and only then is each pair tested: a hit when the
  prediction lies inside the true object. Molmo2 tests the true object's segmentation mask; we test the
  mask when one is given, else distance <= radius (the object's radius, or one radius for all).
  The assignment minimises distance, it does not maximise hits: a far-off prediction can take the partner
  of a near one (a hand-worked test shows it). precision = hits / predictions, recall = hits / truths,
  F1 = 2PR / (P + R), 0 when a hit count is 0. No truth: all three 1.0 when nothing was predicted, else
  0.0. No prediction with some truth: 0.0.
- Video pointing: a prediction pairs only with truths of the same frame (timestamps equal at 0.1 s, the
  precision Molmo2 writes them with), then by distance as above; hits, predictions and truths are summed
  over the video. Molmo2 (VixMoPointEval) instead pairs in a joint (t, x, y) space normalised to 0-100 and
  rejects cross-frame pairs afterwards; pairing within the frame first never loses such a hit.
  Multi-image pointing is the same with (image_index, x, y).
- Tracking: Molmo2's object-tracking eval (olmo/eval/object_tracking_utils.py) scores each frame that has
  a prediction or a truth like image pointing, ignoring identities, and averages over those frames; it
  adds HOTA for identities. For identities we report the simpler IDF1 (Ristani et al. 2016): whole
  predicted tracks are paired one-to-one with true tracks to maximise the frames where the pair agrees
  (same frame, within radius); IDF1 = 2 * agreeing detections / (predicted + true detections).
- Counting: exact match of the count read from the answer's text (`extract_count`, never raises); an
  answer with no readable count is wrong and not "valid". "close" allows |error| <= 1 + floor(0.05 * true
  count) as Molmo2's video counting eval does (for counts under 20 that is +-1, Molmo2's image rule).
- Captions: an object counts as named when its name appears as whole words (plural -s/-es allowed,
  case and punctuation ignored). Recall over the scene's distinct object names; precision over the
  names mentioned from a vocabulary (by default the scene's own names, so only recall can then drop).
- VQA: exact match after VQA-v2-style normalisation (`vqa_normalize`): lowercase; commas inside numbers
  and apostrophes removed; periods removed unless inside a number; other punctuation becomes space;
  number words zero..ten and "none" become digits; articles a/an/the dropped; whitespace collapsed.
  (VQA v2 also expands contractions and gives min(#matching annotators / 3, 1); neither is done here.)
"""

import json
import math
import os
import re
import time

import numpy as np
import torch

import data
import prepare_data
from configurator import configure
from sample import (DEFAULT_INIT_FROM, DEMO_DATA_DIR, DEMO_INIT_FROM, generate_answers, load_model, local_model_dir,
                    or_demo, prompt_example, python_command, save_example_grid, save_video_gif, unknown_tokens)

# ---------------------------------------------------------------------------
# 1. One-to-one assignment
# ---------------------------------------------------------------------------


def min_cost_assignment(cost):
    """Pairs rows with columns one-to-one, min(n_rows, n_cols) pairs, minimising the summed cost (the
    Hungarian method with row/column potentials, O(n^2 m)). Returns [(row, col), ...] sorted by row.
    Entries must be finite."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost: expected a 2-D matrix, got shape {cost.shape}")
    if cost.size == 0:
        return []
    if not np.isfinite(cost).all():
        raise ValueError("cost: entries must be finite (use a large number for forbidden pairs)")
    transposed = cost.shape[0] > cost.shape[1]
    if transposed:
        cost = cost.T
    n_rows, n_cols = cost.shape  # n_rows <= n_cols: every row gets a column
    row_potential = np.zeros(n_rows + 1)
    col_potential = np.zeros(n_cols + 1)
    # 1-based rows and columns; column 0 is a virtual column that holds the row being inserted
    row_of_col = np.zeros(n_cols + 1, dtype=np.int64)  # 0 = column free
    prev_col = np.zeros(n_cols + 1, dtype=np.int64)  # alternating path back to column 0
    for row in range(1, n_rows + 1):
        row_of_col[0] = row
        col = 0
        min_slack = np.full(n_cols + 1, np.inf)
        visited = np.zeros(n_cols + 1, dtype=bool)
        while row_of_col[col] != 0:  # grow a shortest augmenting path until it reaches a free column
            visited[col] = True
            r = row_of_col[col]
            slack = cost[r - 1] - row_potential[r] - col_potential[1:]  # (n_cols,) reduced costs
            improve = ~visited[1:] & (slack < min_slack[1:])
            min_slack[1:][improve] = slack[improve]
            prev_col[1:][improve] = col
            candidates = np.where(visited[1:], np.inf, min_slack[1:])
            next_col = int(np.argmin(candidates)) + 1
            delta = candidates[next_col - 1]
            row_potential[row_of_col[visited]] += delta
            col_potential[visited] -= delta
            min_slack[~visited] -= delta
            col = next_col
        while col != 0:  # flip the path: each column takes the row of the column before it
            row_of_col[col] = row_of_col[prev_col[col]]
            col = prev_col[col]
    pairs = [(int(row_of_col[c]) - 1, c - 1) for c in range(1, n_cols + 1) if row_of_col[c] != 0]
    if transposed:
        pairs = [(c, r) for r, c in pairs]
    return sorted(pairs)


# ---------------------------------------------------------------------------
# 2. Metrics
# ---------------------------------------------------------------------------


def to_pixels(points, width, height):
    """Points from the answer's 0-1000 scale to pixels. Each point is (..., x, y): anything before x and
    y (a timestamp, an image index) is kept as is."""
    return [(*p[:-2], p[-2] / 1000 * width, p[-1] / 1000 * height) for p in points]


def mean_scores(per_example):
    """Averages a list of per-example score dicts key by key; adds n, the number of examples."""
    per_example = list(per_example)
    keys = sorted({k for scores in per_example for k in scores})
    means = {k: float(np.mean([s[k] for s in per_example if k in s])) for k in keys}
    means["n"] = len(per_example)
    return means


def _precision_recall_f1(hits, n_pred, n_true):
    if n_true == 0:
        score = float(n_pred == 0)
        return {"precision": score, "recall": score, "f1": score}
    if n_pred == 0 or hits == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    precision, recall = hits / n_pred, hits / n_true
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall)}


def _as_xy(points, name):
    array = np.asarray(points, dtype=np.float64).reshape(-1, 2) if len(points) else np.zeros((0, 2))
    if array.shape[0] != len(points):
        raise ValueError(f"{name}: expected (x, y) pairs, got {points!r:.80}")
    return array


def _radii(radius, n_true, name="radius"):
    """One radius per true point, from a number or a sequence."""
    radii = np.broadcast_to(np.asarray(radius, dtype=np.float64), (n_true,)) if np.ndim(radius) == 0 \
        else np.asarray(radius, dtype=np.float64)
    if radii.shape != (n_true,):
        raise ValueError(f"{name}: expected a number or one value per true point ({n_true}), got {len(radii)}")
    return radii


def _inside_mask(point, mask):
    # rounded to the nearest pixel, outside the image is a miss (as Molmo2's is_point_in_region)
    x, y = int(round(point[0])), int(round(point[1]))
    return 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and bool(mask[y, x])


def count_hits(pred, true, radius=None, masks=None):
    """Pairs (x, y) predictions with (x, y) truths by minimum total distance, then counts the pairs whose
    prediction lies inside its truth: inside masks[j] (a boolean (H, W) array) when masks are given, else
    within radius (a number or one per true point) of it. Returns the number of hits."""
    pred, true = _as_xy(pred, "pred"), _as_xy(true, "true")
    if masks is None and radius is None:
        raise ValueError("count_hits: give radius (pixels) or masks")
    if masks is not None and len(masks) != len(true):
        raise ValueError(f"masks: expected one per true point ({len(true)}), got {len(masks)}")
    if len(pred) == 0 or len(true) == 0:
        return 0
    distance = np.linalg.norm(pred[:, None, :] - true[None, :, :], axis=-1)  # (n_pred, n_true)
    pairs = min_cost_assignment(distance)
    if masks is not None:
        return sum(_inside_mask(pred[i], masks[j]) for i, j in pairs)
    radii = _radii(radius, len(true))
    return sum(bool(distance[i, j] <= radii[j]) for i, j in pairs)


def point_scores(pred, true, radius=None, masks=None):
    """Image pointing, one example: precision / recall / F1 of (x, y) pixel predictions against (x, y)
    truths, matched as in Molmo2's PointingEval (see the module docstring for the conventions)."""
    hits = count_hits(pred, true, radius, masks)
    return _precision_recall_f1(hits, len(pred), len(true))


def video_point_scores(pred, true, radius):
    """Video pointing, one video: (t, x, y) predictions against (t, x, y) truths. A prediction pairs only
    with truths of its own frame; within a frame, as `point_scores`. radius: a number, or one per true
    point in the order given. Also scores multi-image pointing with (image_index, x, y)."""
    radii = _radii(radius, len(true))
    true_by_frame, radii_by_frame = {}, {}
    for p, r in zip(true, radii):
        if len(p) != 3:
            raise ValueError(f"true: expected (t, x, y) points, got {p!r}")
        true_by_frame.setdefault(data.frame_key(p[0]), []).append((p[1], p[2]))
        radii_by_frame.setdefault(data.frame_key(p[0]), []).append(r)
    pred_by_frame = data.points_by_frame(pred, "pred")
    hits = sum(count_hits(points, true_by_frame[f], radii_by_frame[f])
               for f, points in pred_by_frame.items() if f in true_by_frame)
    return _precision_recall_f1(hits, len(pred), len(true))


def _track_frames(tracks, name):
    """{track_id: [(t, x, y), ...]} -> {track_id: {frame: (x, y)}}; a second point of one track in one
    frame is ignored (a track is one object, in one place at a time)."""
    if not isinstance(tracks, dict):
        raise ValueError(f"{name}: expected {{track_id: [(t, x, y), ...]}}, got {type(tracks).__name__}")
    out = {}
    for track_id, points in tracks.items():
        frames = {}
        for f, xys in data.points_by_frame(points, f"{name}[{track_id!r}]").items():
            frames[f] = xys[0]
        out[track_id] = frames
    return out


def track_scores(pred_tracks, true_tracks, radius):
    """Tracking, one video. Tracks are {track_id: [(t, x, y), ...]} in pixels; radius is a number or
    {true_track_id: radius}. Returns
    - precision / recall / f1: Molmo2's per-frame scores (identities ignored) averaged over the frames
      that have a prediction or a truth; 1.0 when neither has any frame;
    - idf1 / idp / idr: identity scores; a detection is one track's point in one frame."""
    pred, true = _track_frames(pred_tracks, "pred_tracks"), _track_frames(true_tracks, "true_tracks")
    radius_of = radius if isinstance(radius, dict) else {track_id: radius for track_id in true}
    missing = [track_id for track_id in true if track_id not in radius_of]
    if missing:
        raise ValueError(f"radius: no radius for true tracks {missing}")

    frames = sorted({f for frames in list(pred.values()) + list(true.values()) for f in frames})
    per_frame = []
    for f in frames:
        pred_xy = [frames_[f] for frames_ in pred.values() if f in frames_]
        true_ids = [track_id for track_id, frames_ in true.items() if f in frames_]
        true_xy = [true[track_id][f] for track_id in true_ids]
        hits = count_hits(pred_xy, true_xy, [radius_of[track_id] for track_id in true_ids])
        per_frame.append(_precision_recall_f1(hits, len(pred_xy), len(true_xy)))
    scores = mean_scores(per_frame) if per_frame else {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    scores.pop("n", None)

    # identities: agreement[a, b] = frames where predicted track a is within radius of true track b
    pred_ids, true_ids = list(pred), list(true)
    agreement = np.zeros((len(pred_ids), len(true_ids)))
    for a, pid in enumerate(pred_ids):
        for b, tid in enumerate(true_ids):
            shared = pred[pid].keys() & true[tid].keys()
            agreement[a, b] = sum(math.dist(pred[pid][f], true[tid][f]) <= radius_of[tid] for f in shared)
    id_hits = sum(agreement[a, b] for a, b in min_cost_assignment(-agreement))
    n_pred = sum(len(frames_) for frames_ in pred.values())
    n_true = sum(len(frames_) for frames_ in true.values())
    identity = _precision_recall_f1(id_hits, n_pred, n_true)
    scores.update(idp=identity["precision"], idr=identity["recall"], idf1=identity["f1"])
    return scores


NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
}
_NUMBER = r"\d+(?:,\d{3})*|" + "|".join(NUMBER_WORDS)
_TAG = re.compile(r"<[^>]*>")  # <points coords="..."> and friends: their digits are not the count
_TOTAL = re.compile(rf"\btotal(?: number)?(?: of [a-z ]+?)?(?: of| is| was|:|=)?\s*({_NUMBER})\b")
_ANY_NUMBER = re.compile(rf"\b({_NUMBER})\b")
# "none", "nothing", or "no" after a verb ("there are no ...", "I see no ..."); a bare "no" ("No idea.") is
# not a count
_NONE = re.compile(r"\b(?:none|nothing|(?:are|is|was|were|see|find|count|contains?|has|have) no)\b")


def _number_value(token):
    return NUMBER_WORDS[token] if token in NUMBER_WORDS else int(token.replace(",", ""))


def extract_count(text):
    """The count an answer gives, or None when none can be read (never raises). Reads, in order: the number after
    "total" ("... shows a total of 2."), else the last number (digits or a word up to twenty), else 0 when
    it says none ("There are none.", "There are no ..."). Markup such as <points coords=...> is skipped."""
    if not isinstance(text, str):
        return None
    text = _TAG.sub(" ", text).lower()
    totals = _TOTAL.findall(text)
    if totals:
        return _number_value(totals[-1])
    numbers = _ANY_NUMBER.findall(text)
    if numbers:
        return _number_value(numbers[-1])
    return 0 if _NONE.search(text) else None


def count_score(pred_text, true_count):
    """Counting, one example: correct (exact match), close (|error| <= 1 + floor(0.05 * true)), valid
    (a count could be read at all). Images and video alike."""
    count = extract_count(pred_text)
    if count is None:
        return {"correct": 0.0, "close": 0.0, "valid": 0.0}
    return {"correct": float(count == true_count),
            "close": float(abs(count - true_count) <= 1 + math.floor(0.05 * true_count)),
            "valid": 1.0}


def _normalize_words(text):
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def mentioned_objects(caption, names):
    """The names (e.g. "red circle") that `caption` mentions as whole words, a plural -s/-es allowed."""
    caption = _normalize_words(caption)
    found = []
    for name in names:
        words = _normalize_words(name).split()
        if words and re.search(r"\b" + r"\s+".join(map(re.escape, words)) + r"(?:s|es)?\b", caption):
            found.append(name)
    return found


def caption_object_scores(caption, scene_objects, vocabulary=None):
    """Caption, one example: precision / recall / F1 of the object names the caption mentions. Recall over
    the scene's distinct names; precision over the names of `vocabulary` (all names the world can hold;
    default: the scene's) that it mentions. Empty cases as for points."""
    true = set(scene_objects)
    mentioned = set(mentioned_objects(caption, sorted(set(vocabulary or ()) | true)))
    return _precision_recall_f1(len(mentioned & true), len(mentioned), len(true))


_VQA_NUMBER_WORDS = {w: str(n) for w, n in NUMBER_WORDS.items() if n <= 10} | {"none": "0"}
_VQA_ARTICLES = {"a", "an", "the"}


def vqa_normalize(text):
    """VQA-v2-style answer normalisation (rules in the module docstring): 'The Two dogs.' -> '2 dogs'."""
    text = str(text).lower().replace("\n", " ").replace("\t", " ")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = text.replace("'", "")
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # keep 3.5, drop sentence periods
    text = re.sub(r"[^\w\s.]|_", " ", text)
    words = [_VQA_NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(w for w in words if w not in _VQA_ARTICLES)


def vqa_score(pred_text, answers):
    """VQA, one example: exact_match = 1.0 when the normalised answer equals the normalised reference
    (any of them, when `answers` is a list)."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    pred = vqa_normalize(pred_text)
    return {"exact_match": float(any(pred == vqa_normalize(a) for a in answers))}


# ---------------------------------------------------------------------------
# 3. Report
# ---------------------------------------------------------------------------


def _format_value(value):
    # scores are fractions (3 decimals); counts such as n are whole numbers
    if isinstance(value, float) and not (value.is_integer() and abs(value) > 1):
        return f"{value:.3f}"
    return str(int(value)) if isinstance(value, float) else str(value)


def write_report(path, results, images=None, title="nanoMolmo2 evaluation"):
    """Writes a markdown report. results: {task: {source: {metric: value}}}, e.g.
    {"counting": {"synthetic/val": mean_scores([...])}}: one table per task, a row per source, a column
    per metric (n last). images: {caption: png_path}, embedded under "Examples" by a path relative to
    the report."""
    lines = [f"# {title}", ""]
    for task, by_source in results.items():
        metrics = sorted({m for scores in by_source.values() for m in scores}, key=lambda m: (m == "n", m))
        lines += [f"## {task}", "", "| source | " + " | ".join(metrics) + " |",
                  "|---" * (len(metrics) + 1) + "|"]
        for source, scores in by_source.items():
            cells = [_format_value(scores[m]) if m in scores else "" for m in metrics]
            lines.append(f"| {source} | " + " | ".join(cells) + " |")
        lines.append("")
    if images:
        lines += ["## Examples", ""]
        report_dir = os.path.dirname(os.path.abspath(path))
        for caption, png_path in images.items():
            relative = os.path.relpath(os.path.abspath(png_path), report_dir).replace(os.sep, "/")
            lines += [f"![{caption}]({relative})", "", f"*{caption}*", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


# ---------------------------------------------------------------------------
# 4. Evaluating a checkpoint on records
# ---------------------------------------------------------------------------
# Any JSONL of records (section 3b's format: the synthetic world, or a real benchmark prepared into it) is
# evaluated the same way: each annotation's last answer is the truth, its style names the task, and the
# turns before it are the prompt (laid out with the style prefix the model was trained with).
# - Truth comes from the annotation's answer text (points, tracks, counts, words), parsed like a prediction.
# - Matching radius for points: the synthetic world's scene records every shape, so a true point is a hit
#   zone of its shape's equal-area radius (a fraction of the image width, here in pixels), taken from the
#   shape whose centre lies nearest to the true point. Records without a scene use point_radius times the
#   image's longer side for every point.
# - Captions are scored only where a scene lists the objects (names "red circle", ...; precision over the
#   world's 16 names).
# - Prompts are grouped by task and generated in batches (greedy); a batch holds images or a video.

TASK_OF_STYLE = {
    "point_count": "counting", "multi_image_point_then_count": "multi-image counting",
    "video_point_count": "video counting",
    "pointing": "pointing", "cosyn_point": "pointing", "multi_image_pointing": "multi-image pointing",
    "video_point": "video pointing", "video_point_track_per_frame": "tracking",
    "long_caption": "captions",
    "short_answer": "vqa", "multi_image_short_answer": "vqa", "video_short_answer": "vqa",
}
# enough for the longest answers of the synthetic world's test split, plus <|im_end|>
MAX_NEW_TOKENS = {"counting": 192, "multi-image counting": 320, "video counting": 128, "pointing": 160,
                  "multi-image pointing": 320, "video pointing": 128, "tracking": 448, "captions": 192, "vqa": 16}
HEADLINE_METRICS = {"counting_accuracy": ("counting", "correct"), "pointing_f1": ("pointing", "f1")}
SCENE_NAMES = [f"{colour} {kind}" for colour in prepare_data.SHAPE_COLOURS for kind in prepare_data.SHAPE_KINDS]


def _frame_sizes(record):
    """(width, height) of each image, or of the video's frames (one entry)."""
    if "images" in record:
        return [image.size for image in record["images"]]
    if "video_frames" in record:
        return [record["video_frames"][0].size]
    return []


def _scene_shapes(record, frame):
    """[(x, y, radius)] normalised to the width, of the shapes of a synthetic scene in one image (1-based
    index) or at one video time (s); [] without a scene."""
    scene = record.get("scene") or {}
    if "images" in scene:
        index = int(frame) - 1
        shapes = scene["images"][index]["shapes"] if 0 <= index < len(scene["images"]) else []
        return [(s["x"], s["y"], s["radius"]) for s in shapes]
    if "frame_times" in scene:
        f = int(np.argmin([abs(t - float(frame)) for t in scene["frame_times"]]))
        return [(*s["track"][f], s["radius"]) for s in scene.get("shapes", []) if s["track"][f] is not None]
    return [(s["x"], s["y"], s["radius"]) for s in scene.get("shapes", [])]


def _size_at(record, frame):
    """(width, height) of the image a point's frame names (1-based index), or of the video."""
    sizes = _frame_sizes(record)
    return sizes[min(max(int(frame) - 1, 0), len(sizes) - 1)] if "images" in record else sizes[0]


def _true_radius(record, point, point_radius):
    """Matching radius in pixels for one true point (data.Point, normalised)."""
    width, height = _size_at(record, point.frame)
    shapes = _scene_shapes(record, point.frame)
    if not shapes:
        return point_radius * max(width, height)
    x, y, radius = min(shapes, key=lambda s: math.hypot(s[0] - point.x, s[1] - point.y))
    return radius * width


def _pixels(record, point):
    """data.Point (normalised) -> (frame, x_px, y_px): frame is the image index or the time."""
    width, height = _size_at(record, point.frame)
    return point.frame, point.x * width, point.y * height


def _tracks(parsed, points_px):
    """The points of parsed <tracks> as {track_id: [(t, x, y), ...]} (pixels)."""
    tracks = {}
    for point, (t, x, y) in zip(parsed.points, points_px):
        tracks.setdefault(point.id, []).append((t, x, y))
    return tracks


def score_answer(task, pred_text, true_text, record, point_radius=0.05):
    """One answer -> (scores dict, or None when the task cannot be scored on this record; drawing dict with
    'pred' / 'true' points in pixels: [(x, y)] for one image, [(frame, x, y)] for several or a video,
    {track_id: [(t, x, y)]} for tracks)."""
    pred, true = data.parse_points(pred_text), data.parse_points(true_text)
    pred_px = [_pixels(record, p) for p in pred.points]
    true_px = [_pixels(record, p) for p in true.points]
    one_image = len(record.get("images", ())) == 1
    drawing = {"pred": [(x, y) for _, x, y in pred_px] if one_image else pred_px,
               "true": [(x, y) for _, x, y in true_px] if one_image else true_px}
    radii = [_true_radius(record, p, point_radius) for p in true.points]
    if task in ("counting", "multi-image counting", "video counting"):
        true_count = true.count if true.count is not None else extract_count(true_text)
        if true_count is None:
            return None, drawing
        return count_score(pred_text, true_count), drawing
    if task == "pointing":
        return point_scores(drawing["pred"], drawing["true"], radii), drawing
    if task in ("multi-image pointing", "video pointing"):
        return video_point_scores(pred_px, true_px, radii), drawing
    if task == "tracking":
        pred_tracks, true_tracks = _tracks(pred, pred_px), _tracks(true, true_px)
        radius_of = {}
        for p, r in zip(true.points, radii):
            radius_of.setdefault(p.id, r)
        drawing = {"pred": pred_tracks, "true": true_tracks}
        return track_scores(pred_tracks, true_tracks, radius_of), drawing
    if task == "captions":
        scene = record.get("scene") or {}
        if "shapes" not in scene and "images" not in scene:
            return None, drawing
        shapes = scene.get("shapes", []) + [s for image in scene.get("images", []) for s in image["shapes"]]
        return caption_object_scores(pred_text, [f"{s['colour']} {s['kind']}" for s in shapes], SCENE_NAMES), drawing
    if task == "vqa":
        return vqa_score(pred_text, true_text), drawing
    raise ValueError(f"task {task!r}: expected one of {sorted(set(TASK_OF_STYLE.values()))}")


def dataset_path(name, data_dir, split):
    """A dataset name ({data_dir}/{name}/{split}.jsonl) or a path to a .jsonl file of records."""
    return name if name.endswith(".jsonl") else os.path.join(data_dir, name, f"{split}.jsonl")


def evaluation_items(datasets, data_dir, split, tasks=(), max_examples=0, report=None):
    """[(source, task, record, annotation)] for every scoreable annotation of the first max_examples (0 = all)
    records of each dataset; `tasks` (empty = all) filters. Records hold media paths (decoded only when
    their batch comes: see with_media); bad records are skipped into `report`."""
    items = []
    for name in datasets:
        path = dataset_path(name, data_dir, split)
        if not os.path.isfile(path):
            if name.endswith(".jsonl"):
                raise FileNotFoundError(f"dataset '{name}': no such file")
            make = python_command(*data.prepare_command(name, data_dir))
            raise FileNotFoundError(f"dataset {name!r}: no '{path}' (`{make}` makes it; or check data_dir and split)")
        records = data.RecordFile(path, report=report, load_media=False)
        source = os.path.splitext(os.path.relpath(path, data_dir))[0] if not name.endswith(".jsonl") else name
        for i in range(len(records) if max_examples <= 0 else min(max_examples, len(records))):
            record = records.get(i)
            if record is None:
                continue
            for annotation in record["annotations"]:
                task = TASK_OF_STYLE.get(annotation["style"])
                if task is not None and (not tasks or task in tasks):
                    items.append((source, task, record, annotation))
    return items


def with_media(record):
    """A record read without media (RecordFile(load_media=False)) -> a copy with its media decoded, as
    RecordFile(load_media=True) returns it; raises data.BadRecord for media that cannot be decoded."""
    if "image" in record and "images" not in record:
        return {**record, "images": [data.read_image_file(path) for path in record["image"]]}
    if "video" in record and "video_frames" not in record:
        frames, times = data.read_video_file(record["video"], record.get("video_fps", data.DEFAULT_VIDEO_FPS))
        return {**record, "video_frames": frames, "video_times": times}
    return record


def evaluate(model, processor, items, batch_size=32, max_new_tokens=0, point_radius=0.05, style_prefixes="sft",
             log=print, report=None):
    """Answer and score every item (evaluation_items) -> per-example rows, dicts with source, task, id, record
    (media not decoded), prompt, answer, truth, scores (None: not scoreable), drawing. max_new_tokens 0 =
    MAX_NEW_TOKENS[task]. Media that cannot be decoded skip their item, counted in `report`."""
    report = report if report is not None else data.SkipReport()
    rows = []
    order = sorted(range(len(items)), key=lambda i: (items[i][1], "video" in items[i][2], items[i][0]))
    groups = {}
    for i in order:  # batches never mix tasks, nor images with videos
        source, task, record, _ = items[i]
        groups.setdefault((task, "video" in record), []).append(items[i])
    t0 = time.time()
    for (task, _), group in groups.items():
        limit = max_new_tokens or MAX_NEW_TOKENS[task]
        for start in range(0, len(group), batch_size):
            chunk, loaded = [], []
            for item in group[start:start + batch_size]:
                try:
                    loaded.append(with_media(item[2]))
                    chunk.append(item)
                except data.BadRecord as e:
                    report.skip(e)
            if not chunk:
                continue
            examples = [prompt_example(record, annotation["messages"][:-1], annotation["style"], processor,
                                       style_prefixes) for record, (_, _, _, annotation) in zip(loaded, chunk)]
            answers = generate_answers(model, processor, examples, limit)
            for (source, task_, record, annotation), media, answer in zip(chunk, loaded, answers):
                truth = annotation["messages"][-1]["content"]
                scores, drawing = score_answer(task_, answer, truth, media, point_radius)
                rows.append({"source": source, "task": task_, "id": record["id"], "record": record,
                             "prompt": annotation["messages"][-2]["content"], "answer": answer, "truth": truth,
                             "scores": scores, "drawing": drawing})
            log(f"{task}: {min(start + batch_size, len(group))}/{len(group)} answered ({time.time() - t0:.0f}s)")
    return rows


def known_items(model, processor, items, style_prefixes, log=print):
    """The items whose words a model with kept tokens (--vocab=data) has rows for; logs how many were left out,
    and why. A full-vocabulary model knows them all."""
    if model.config.token_ids is None:
        return items
    known, unknown = [], []
    for item in items:
        _, _, record, annotation = item
        text = prompt_example({"id": record.get("id")}, annotation["messages"][:-1], annotation["style"], processor,
                              style_prefixes)  # the words alone: vision tokens always have rows
        missing = unknown_tokens(model, text.input_ids)
        (unknown if missing else known).append((item, missing))
    if unknown:
        (_, _, _, annotation), missing = unknown[0]
        words = ", ".join(repr(processor.tokenizer.decode([i])) for i in missing)
        log(f"{len(unknown)} of {len(items)} questions skipped: this model has rows only for the "
            f"{len(model.config.token_ids)} tokens of its training data (first: "
            f"{annotation['messages'][-2]['content']!r}: not {words})")
    return [item for item, _ in known]


def summarize(rows):
    """Per-example rows -> {task: {source: mean scores}} (rows that could not be scored left out)."""
    results = {}
    for row in rows:
        if row["scores"] is not None:
            results.setdefault(row["task"], {}).setdefault(row["source"], []).append(row["scores"])
    return {task: {source: mean_scores(s) for source, s in by_source.items()} for task, by_source in results.items()}


def headline(rows):
    """The numbers a demo prints: counting accuracy and pointing F1 over every source (None when absent)."""
    out = {}
    for name, (task, metric) in HEADLINE_METRICS.items():
        values = [row["scores"][metric] for row in rows if row["task"] == task and row["scores"] is not None]
        out[name] = float(np.mean(values)) if values else None
    return out


POINT_TASKS = ("counting", "multi-image counting", "video counting", "pointing", "multi-image pointing",
               "video pointing", "tracking")


def _subtitle(row):
    """The main score and the answer (and, where no points show the truth, the true answer)."""
    scores = row["scores"] or {}
    key = next((k for k in ("correct", "f1", "exact_match") if k in scores), None)
    text = (f"{key} {scores[key]:.2f} | " if key else "") + row["answer"].replace("\n", " ")
    return text if row["task"] in POINT_TASKS else f"{text} [true: {row['truth']}]"


def save_figures(rows, out_dir, n_show=8):
    """Example pictures per (task, source): a grid for image tasks, an animated GIF per video (first few).
    Returns {caption: path} for write_report."""
    figures = {}
    by_group = {}
    for row in rows:
        by_group.setdefault((row["task"], row["source"]), []).append(row)
    for (task, source), group in by_group.items():
        slug = re.sub(r"[^a-z0-9]+", "_", f"{task} {source}".lower()).strip("_")
        if "video" in group[0]["record"]:
            if task not in POINT_TASKS:
                continue  # nothing to draw on the frames
            for k, row in enumerate(group[:min(2, n_show)]):
                path = os.path.join(out_dir, f"{slug}_{k}.gif")
                record = with_media(row["record"])
                save_video_gif(path, record["video_frames"], record["video_times"], row["drawing"]["pred"],
                               row["drawing"]["true"])
                figures[f"{task}, {source}, {row['id']}: {row['prompt']} -> {row['answer'][:80]}"] = path
            continue
        examples = []
        for row in group[:n_show]:
            record, drawing = with_media(row["record"]), row["drawing"]
            pred, true = drawing["pred"], drawing["true"]
            if len(record["images"]) > 1:  # show the first image with its own points
                pred = [(x, y) for f, x, y in pred if int(f) == 1]
                true = [(x, y) for f, x, y in true if int(f) == 1]
            examples.append({"image": record["images"][0], "pred": pred, "true": true,
                             "title": row["prompt"], "subtitle": _subtitle(row)})
        path = os.path.join(out_dir, f"{slug}.png")
        save_example_grid(path, examples)
        what = " (predicted and true points)" if task in POINT_TASKS else ""
        figures[f"{task}, {source}: the first {len(examples)} examples{what}"] = path
    return figures


def summary_table(results):
    """Plain-text table of every task's main scores."""
    lines = [f"{'task':<22} {'source':<28} {'n':>5}  scores"]
    for task, by_source in results.items():
        for source, scores in by_source.items():
            shown = "  ".join(f"{k} {v:.3f}" for k, v in scores.items() if k != "n")
            lines.append(f"{task:<22} {source:<28} {scores['n']:>5}  {shown}")
    return "\n".join(lines)


# -- knobs (override with --key=value) -------------------------------------------------------------------------
init_from = DEFAULT_INIT_FROM  # a training out_dir (with final/), a model directory, or a hub id; where
#   out/joint holds none, make demo's out/demo/joint
data_dir = "data"  # datasets are {data_dir}/{name}/{split}.jsonl; where data/ has none, make demo's data/demo
split = "test"
datasets = ["synth_image", "synth_multi", "synth_video"]  # names under data_dir, or paths to .jsonl files
tasks = []  # e.g. ["counting", "pointing"]; empty = every task the records have
max_examples = 0  # records per dataset, 0 = all
batch_size = 32
max_new_tokens = 0  # 0 = the task's default (MAX_NEW_TOKENS)
point_radius = 0.05  # matching radius without a scene: a fraction of the image's longer side
style_prefixes = "sft"  # as the model was trained: sft | none
max_crops = 0  # crops per image; 0 = as the checkpoint was trained (Molmo2 evaluates its 8-crop models with 24)
n_show = 8  # examples drawn per task
out_dir = ""  # default: {init_from}/eval_{split} (out/eval_{split} for a hub id)
device = "cpu"
dtype = "float32"
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def main(config):
    """python eval.py --init_from=out/joint --split=test [--tasks="['counting','pointing']"] [--max_examples=50]
    Writes report.md, metrics.json, predictions.jsonl and example pictures into out_dir; returns the headline.
    The knobs are this module's values; config (configure's dict of them) is recorded in metrics.json."""
    global init_from, data_dir
    unknown = sorted(set(tasks) - set(MAX_NEW_TOKENS))
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; known {sorted(MAX_NEW_TOKENS)}")
    init_from = config["init_from"] = or_demo(init_from, DEFAULT_INIT_FROM, DEMO_INIT_FROM, local_model_dir)
    data_dir = config["data_dir"] = or_demo(data_dir, "data", DEMO_DATA_DIR, lambda folder: any(
        os.path.isfile(dataset_path(name, folder, split)) for name in datasets))
    skipped = data.SkipReport()
    try:
        items = evaluation_items(datasets, data_dir, split, tasks, max_examples, skipped)
        model, processor, model_dir = load_model(init_from, device, getattr(torch, dtype))
    except FileNotFoundError as e:  # a dataset or a model that is not there: the message says how to make it
        raise SystemExit(str(e)) from None
    processor.max_crops = max_crops or processor.max_crops
    report_dir = out_dir or os.path.join(init_from if os.path.isdir(init_from) else "out", f"eval_{split}")
    os.makedirs(report_dir, exist_ok=True)
    print(f"model {model_dir} | {len(items)} questions from {', '.join(datasets)} ({split})")
    items = known_items(model, processor, items, style_prefixes)
    t0 = time.time()
    rows = evaluate(model, processor, items, batch_size, max_new_tokens, point_radius, style_prefixes, report=skipped)
    seconds = time.time() - t0
    results = summarize(rows)
    figures = save_figures(rows, report_dir, n_show)
    report = write_report(os.path.join(report_dir, "report.md"), results, figures,
                          title=f"nanoMolmo2 evaluation: {model_dir}, {split} split")
    numbers = headline(rows)
    with open(os.path.join(report_dir, "metrics.json"), "w") as f:
        json.dump({**numbers, "results": results, "n_questions": len(rows), "seconds": round(seconds, 1),
                   "model": model_dir, "config": config}, f, indent=2)
    with open(os.path.join(report_dir, "predictions.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in ("source", "task", "id", "prompt", "answer", "truth", "scores")})
                    + "\n")
    print(summary_table(results))
    if skipped.n_skipped:
        print(skipped.summary())
    print(" | ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in numbers.items())
          + f" | {len(rows)} answers in {seconds:.0f}s | report: {report}")
    return numbers


if __name__ == "__main__":
    main(configure(globals()))
