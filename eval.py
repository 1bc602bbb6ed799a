"""
Measuring nanoMolmo2: metrics on plain Python data, a markdown report, and pictures drawn with pillow.

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
- Pictures use pillow only. Small images are upscaled (nearest) so markers stay readable. Predicted
  points: filled orange dots with a white ring and black edge; true points: green rings with black edges;
  a legend names both.
"""

import math
import os
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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


def frame_key(t):
    """The frame a timestamp (seconds) or image index belongs to: equal at 0.1 s."""
    return round(float(t), 1)


def _by_frame(points, name):
    frames = {}
    for p in points:
        if len(p) != 3:
            raise ValueError(f"{name}: expected (t, x, y) points, got {p!r}")
        frames.setdefault(frame_key(p[0]), []).append((p[1], p[2]))
    return frames


def video_point_scores(pred, true, radius):
    """Video pointing, one video: (t, x, y) predictions against (t, x, y) truths. A prediction pairs only
    with truths of its own frame; within a frame, as `point_scores`. radius: a number, or one per true
    point in the order given. Also scores multi-image pointing with (image_index, x, y)."""
    radii = _radii(radius, len(true))
    true_by_frame, radii_by_frame = {}, {}
    for p, r in zip(true, radii):
        if len(p) != 3:
            raise ValueError(f"true: expected (t, x, y) points, got {p!r}")
        true_by_frame.setdefault(frame_key(p[0]), []).append((p[1], p[2]))
        radii_by_frame.setdefault(frame_key(p[0]), []).append(r)
    pred_by_frame = _by_frame(pred, "pred")
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
        for f, xys in _by_frame(points, f"{name}[{track_id!r}]").items():
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
# 4. Pictures
# ---------------------------------------------------------------------------

PRED_COLOR = (255, 110, 0)  # orange: predicted
TRUE_COLOR = (0, 220, 90)  # green: true
# one colour per track id, distinguishable on photos and on flat synthetic scenes
TRACK_COLORS = [(255, 110, 0), (0, 200, 255), (255, 0, 200), (255, 230, 0), (120, 80, 255), (0, 220, 90),
                (255, 60, 60), (160, 255, 120)]
PLOT_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
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
            points = [p for p in points if frame_key(p[0]) <= until]
        xys = [(x * factor, y * factor) for _, x, y in points]
        if len(xys) > 1:
            draw.line(xys, fill=(0, 0, 0), width=5 if predicted else 3, joint="curve")
            draw.line(xys, fill=color, width=3 if predicted else 1, joint="curve")
        marked = [xy for p, xy in zip(points, xys) if until is None or frame_key(p[0]) == until]
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
    pred_by_frame = {} if as_tracks or pred is None else _by_frame(pred, "pred")
    true_by_frame = {} if as_tracks or true is None else _by_frame(true, "true")
    drawn = []
    for frame, t in zip(frames, timestamps):
        canvas, factor = _prepare(frame)
        draw = ImageDraw.Draw(canvas)
        r = _marker_radius(canvas)
        font = _font(max(11, canvas.height // 32))
        key = frame_key(t)
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


def _nice_ticks(low, high, target=6):
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high <= low:  # one value: centre it
        pad = 0.1 * abs(low) or 1.0
        low, high = low - pad, high + pad
    raw_step = (high - low) / target
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _tick_labels(ticks):
    """Tick labels with as many digits as the tick spacing needs: plain decimals for ordinary ranges,
    scientific notation for very small or very large values."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    largest = max(abs(t) for t in ticks) or 1.0
    step_exponent = math.floor(math.log10(step))
    if 1e-3 <= largest < 1e5:
        return [f"{t:.{max(0, -step_exponent)}f}" for t in ticks]
    digits = max(0, math.floor(math.log10(largest)) - step_exponent)
    return [f"{t:.{digits}e}" if t else "0" for t in ticks]


def plot_curves(curves, path, title="loss", xlabel="step", ylabel="loss", size=(800, 480)):
    """A line chart PNG of {name: [(step, value), ...]} (e.g. {'train': [...], 'val': [...]}), with axes,
    round ticks, gridlines, axis labels, a title and a legend. Non-finite values are skipped."""
    series = {name: sorted((float(s), float(v)) for s, v in points if math.isfinite(float(v)))
              for name, points in curves.items()}
    series = {name: points for name, points in series.items() if points}
    if not series:
        raise ValueError(f"curves: no finite (step, value) points in {list(curves)}")
    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font, title_font = _font(13), _font(17)
    all_points = [p for points in series.values() for p in points]
    x_ticks = _nice_ticks(min(s for s, _ in all_points), max(s for s, _ in all_points))
    y_ticks = _nice_ticks(min(v for _, v in all_points), max(v for _, v in all_points))
    y_labels = _tick_labels(y_ticks)
    left = 22 + max(draw.textlength(label, font=font) for label in y_labels) + 10
    right, top, bottom = width - 20, 40, height - 50

    def to_xy(step, value):
        x = left + (step - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (right - left)
        y = bottom - (value - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (bottom - top)
        return x, y

    for value, label in zip(y_ticks, y_labels):
        _, y = to_xy(x_ticks[0], value)
        draw.line((left, y, right, y), fill=(228, 228, 228))
        draw.line((left - 5, y, left, y), fill=(0, 0, 0))
        draw.text((left - 8, y), label, fill=(0, 0, 0), font=font, anchor="rm")
    for value, label in zip(x_ticks, _tick_labels(x_ticks)):
        x, _ = to_xy(value, y_ticks[0])
        draw.line((x, top, x, bottom), fill=(228, 228, 228))
        draw.line((x, bottom, x, bottom + 5), fill=(0, 0, 0))
        draw.text((x, bottom + 8), label, fill=(0, 0, 0), font=font, anchor="ma")
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    for index, (name, points) in enumerate(series.items()):
        color = PLOT_COLORS[index % len(PLOT_COLORS)]
        xys = [to_xy(s, v) for s, v in points]
        if len(xys) > 1:
            draw.line(xys, fill=color, width=2, joint="curve")
        if len(xys) <= 50:  # few points (a validation curve): mark each one
            for x, y in xys:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
    draw.text(((left + right) / 2, 12), title, fill=(0, 0, 0), font=title_font, anchor="ma")
    draw.text(((left + right) / 2, height - 8), xlabel, fill=(0, 0, 0), font=font, anchor="md")
    label_image = Image.new("RGB", (int(draw.textlength(ylabel, font=font)) + 4, 18), (255, 255, 255))
    ImageDraw.Draw(label_image).text((2, 2), ylabel, fill=(0, 0, 0), font=font)
    label_image = label_image.rotate(90, expand=True)
    image.paste(label_image, (4, int((top + bottom) / 2 - label_image.height / 2)))
    legend_width = max(draw.textlength(name, font=font) for name in series) + 40
    lx, ly = right - legend_width - 8, top + 8
    draw.rectangle((lx, ly, lx + legend_width, ly + 20 * len(series) + 6), fill=(255, 255, 255),
                   outline=(120, 120, 120))
    for index, name in enumerate(series):
        y = ly + 13 + 20 * index
        draw.line((lx + 8, y, lx + 28, y), fill=PLOT_COLORS[index % len(PLOT_COLORS)], width=3)
        draw.text((lx + 34, y), name, fill=(0, 0, 0), font=font, anchor="lm")
    image.save(path)
    return path

