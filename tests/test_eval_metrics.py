"""eval.py's metrics on hand-worked cases, the assignment against brute force, and the pictures (sample.py's,
training.py's curves) by their pixels (a predicted dot's colour at its point, a true ring hollow around its
point, a GIF dot only on its own frame)."""

import itertools
import math

import numpy as np
import pytest
from PIL import Image

import eval as E
import sample
import training

# ---------------------------------------------------------------------------
# assignment
# ---------------------------------------------------------------------------


def brute_force_min_cost(cost):
    n_rows, n_cols = cost.shape
    if n_rows <= n_cols:
        return min(sum(cost[r, c] for r, c in zip(range(n_rows), cols))
                   for cols in itertools.permutations(range(n_cols), n_rows))
    return brute_force_min_cost(cost.T)


def test_assignment_hand_worked():
    # taking each row's cheapest free column gives 1 + 10 = 11; the optimum crosses over: 2 + 2 = 4
    assert E.min_cost_assignment([[1, 2], [2, 10]]) == [(0, 1), (1, 0)]
    assert E.min_cost_assignment([[4, 1, 3], [2, 0, 5], [3, 2, 2]]) == [(0, 1), (1, 0), (2, 2)]  # total 5
    assert E.min_cost_assignment([[5, 1, 9]]) == [(0, 1)]
    assert E.min_cost_assignment([[5], [1], [9]]) == [(1, 0)]
    assert E.min_cost_assignment(np.zeros((0, 3))) == []


@pytest.mark.parametrize("seed", range(60))
def test_assignment_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_rows, n_cols = rng.integers(1, 6, size=2)
    # small integers make ties common; negative entries check nothing assumes costs >= 0
    cost = rng.integers(-3, 6, size=(n_rows, n_cols)).astype(float) if seed % 2 else rng.random((n_rows, n_cols))
    pairs = E.min_cost_assignment(cost)
    assert len(pairs) == min(n_rows, n_cols)
    assert len({r for r, _ in pairs}) == len(pairs) and len({c for _, c in pairs}) == len(pairs)
    assert math.isclose(sum(cost[r, c] for r, c in pairs), brute_force_min_cost(cost), abs_tol=1e-9)


def test_assignment_rejects_bad_cost():
    with pytest.raises(ValueError, match="finite"):
        E.min_cost_assignment([[0.0, np.inf]])
    with pytest.raises(ValueError, match="2-D"):
        E.min_cost_assignment([1.0, 2.0])


# ---------------------------------------------------------------------------
# image pointing
# ---------------------------------------------------------------------------


def test_threshold_just_inside_and_outside():
    true = [(100.0, 100.0)]
    # (6, 8) away is exactly 10 px: a hit at radius 10 (<=); 0.01 px further is a miss
    assert E.point_scores([(106.0, 108.0)], true, radius=10) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert E.point_scores([(106.0, 108.01)], true, radius=10) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert E.point_scores([(109.99, 100.0)], true, radius=10)["f1"] == 1.0
    assert E.point_scores([(110.01, 100.0)], true, radius=10)["f1"] == 0.0


def test_duplicate_predictions_match_one_truth_once():
    scores = E.point_scores([(100, 100), (101, 100), (100, 101)], [(100, 100)], radius=5)
    assert scores["precision"] == pytest.approx(1 / 3)
    assert scores["recall"] == 1.0
    assert scores["f1"] == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))  # 0.5
    # the other way: two truths close together, one prediction
    scores = E.point_scores([(100, 100)], [(99, 100), (101, 100)], radius=5)
    assert (scores["precision"], scores["recall"]) == (1.0, 0.5)


def test_empty_truth_and_empty_prediction_conventions():
    assert E.point_scores([], [], radius=5) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert E.point_scores([(1, 1)], [], radius=5) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert E.point_scores([], [(1, 1)], radius=5) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_pairs_by_minimum_total_distance_not_most_hits():
    # truths at x=0 and x=10, radius 1. Prediction p1 at x=1 hits the first truth; p2 at x=-8 hits nothing.
    # Pairing p1-t0, p2-t10 costs 1 + 18 = 19; p1-t10, p2-t0 costs 9 + 8 = 17, so the minimum-distance
    # assignment (Molmo2's) pairs p1 with the far truth: 0 hits, where a hit-maximising matcher finds 1.
    assert E.count_hits([(1, 0), (-8, 0)], [(0, 0), (10, 0)], radius=1) == 0
    assert E.count_hits([(1, 0)], [(0, 0), (10, 0)], radius=1) == 1


def test_radius_per_true_point():
    true = [(0, 0), (100, 0)]
    assert E.count_hits([(4, 0), (115, 0)], true, radius=[5, 20]) == 2
    assert E.count_hits([(6, 0), (115, 0)], true, radius=[5, 20]) == 1
    with pytest.raises(ValueError, match="radius"):
        E.count_hits([(0, 0)], true, radius=[5, 20, 3])


def test_masks_round_to_the_nearest_pixel():
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:5, 2:5] = True  # pixels x, y in 2..4
    assert E.count_hits([(4.4, 4.4)], [(3, 3)], masks=[mask]) == 1
    assert E.count_hits([(4.6, 3.0)], [(3, 3)], masks=[mask]) == 0  # x rounds to 5: outside
    assert E.count_hits([(-1.0, 3.0)], [(3, 3)], masks=[mask]) == 0
    with pytest.raises(ValueError, match="radius"):
        E.count_hits([(0, 0)], [(0, 0)])


def test_to_pixels_and_mean_scores():
    assert E.to_pixels([(500, 250)], 640, 480) == [(320.0, 120.0)]
    assert E.to_pixels([(0.5, 1000, 0)], 640, 480) == [(0.5, 640.0, 0.0)]
    means = E.mean_scores([{"f1": 1.0, "precision": 1.0}, {"f1": 0.0, "precision": 0.5}])
    assert means == {"f1": 0.5, "precision": 0.75, "n": 2}


# ---------------------------------------------------------------------------
# video pointing and tracking
# ---------------------------------------------------------------------------


def test_video_points_pair_only_within_a_frame():
    true = [(0.5, 10, 10)]
    assert E.video_point_scores([(1.0, 10, 10)], true, radius=5)["f1"] == 0.0  # right place, wrong frame
    assert E.video_point_scores([(0.5, 12, 10)], true, radius=5)["f1"] == 1.0
    assert E.video_point_scores([(0.50000001, 12, 10)], true, radius=5)["f1"] == 1.0  # same at 0.1 s
    # two predictions in frame 0.0, truths one per frame at the same spot: one hit of two, either way
    scores = E.video_point_scores([(0.0, 1, 0), (0.0, 2, 0)], [(0.0, 0, 0), (0.5, 0, 0)], radius=5)
    assert (scores["precision"], scores["recall"]) == (0.5, 0.5)
    # multi-image pointing: (image_index, x, y)
    assert E.video_point_scores([(1, 5, 5)], [(2, 5, 5)], radius=3)["f1"] == 0.0
    assert E.video_point_scores([], [], radius=3)["f1"] == 1.0
    with pytest.raises(ValueError, match=r"\(t, x, y\)"):
        E.video_point_scores([(5, 5)], [(0.0, 5, 5)], radius=3)


def test_tracks_perfect_swapped_and_missing():
    true = {1: [(t, 0, 0) for t in range(4)], 2: [(t, 100, 0) for t in range(4)]}
    perfect = E.track_scores(true, true, radius=5)
    assert all(perfect[k] == 1.0 for k in ("precision", "recall", "f1", "idp", "idr", "idf1"))

    # identities swapped half way: every frame is right (per-frame F1 = 1), but each predicted track
    # agrees with either true track on only 2 of its 4 frames: IDF1 = 2 * 4 / (8 + 8) = 0.5
    swapped = {"a": [(0, 0, 0), (1, 0, 0), (2, 100, 0), (3, 100, 0)],
               "b": [(0, 100, 0), (1, 100, 0), (2, 0, 0), (3, 0, 0)]}
    scores = E.track_scores(swapped, true, radius=5)
    assert scores["f1"] == 1.0
    assert scores["idf1"] == pytest.approx(0.5)

    # one object followed for frames 0-1 of 0-3, the other never. Frames 0, 1: 1 hit, 1 prediction,
    # 2 truths (P 1, R 1/2, F1 2/3); frames 2, 3: no prediction (all 0). Means: P 1/2, R 1/4, F1 1/3
    partial = E.track_scores({"a": [(0, 1, 0), (1, 1, 0)]}, true, radius=5)
    assert partial["precision"] == pytest.approx(0.5)
    assert partial["recall"] == pytest.approx(0.25)
    assert partial["f1"] == pytest.approx(1 / 3)
    # identities: 2 agreeing detections, 2 predicted, 8 true
    assert (partial["idp"], partial["idr"]) == (1.0, 0.25)
    assert partial["idf1"] == pytest.approx(2 * 2 / (2 + 8))


def test_tracks_empty_and_radius_per_track():
    assert E.track_scores({}, {}, radius=5)["f1"] == 1.0
    assert E.track_scores({}, {}, radius=5)["idf1"] == 1.0
    assert E.track_scores({"a": [(0, 1, 1)]}, {}, radius=5)["f1"] == 0.0
    true = {1: [(0, 0, 0)], 2: [(0, 100, 0)]}
    pred = {"a": [(0, 8, 0)], "b": [(0, 108, 0)]}
    assert E.track_scores(pred, true, radius={1: 10, 2: 5})["recall"] == 0.5
    with pytest.raises(ValueError, match="no radius"):
        E.track_scores(pred, true, radius={1: 10})


# ---------------------------------------------------------------------------
# counting
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, count", [
    ('Counting the <points coords="1 1 900 400 2 911 800">red circle</points> shows a total of 2.', 2),
    ("3", 3),
    ("3.", 3),
    ("Three.", 3),
    ("twelve", 12),
    ("There are none.", 0),
    ("There are no red circles in the image.", 0),
    ("I count 1,024 dots.", 1024),
    ("There are 2 cats and 3 dogs, 5 in total.", 5),
    ("The total number of red squares is 7.", 7),
    ("A total of 4 circles, 2 of them red.", 4),  # the stated total wins over the last number
    ("No, there are 3.", 3),
    ("I see no circles.", 0),
    ("No idea.", None),
    ("No.", None),
    ('<points coords="1 1 900 400">x</points>', None),  # coordinates are not a count
    ("I cannot tell.", None),
    ("", None),
    (None, None),
])
def test_extract_count(text, count):
    assert E.extract_count(text) == count


def test_count_score():
    assert E.count_score("a total of 2.", 2) == {"correct": 1.0, "close": 1.0, "valid": 1.0}
    assert E.count_score("3", 2) == {"correct": 0.0, "close": 1.0, "valid": 1.0}
    assert E.count_score("4", 2)["close"] == 0.0
    assert E.count_score("22", 20)["close"] == 1.0  # margin 1 + floor(0.05 * 20) = 2
    assert E.count_score("23", 20)["close"] == 0.0
    assert E.count_score("no idea", 0) == {"correct": 0.0, "close": 0.0, "valid": 0.0}


# ---------------------------------------------------------------------------
# captions and VQA
# ---------------------------------------------------------------------------


def test_caption_object_scores():
    scene = ["red circle", "blue square", "green triangle"]
    vocabulary = scene + ["yellow star"]
    scores = E.caption_object_scores("A Red circle sits left of two blue squares.", scene, vocabulary)
    assert (scores["precision"], scores["recall"]) == (1.0, pytest.approx(2 / 3))
    assert scores["f1"] == pytest.approx(0.8)
    scores = E.caption_object_scores("A yellow star and a red circle.", ["red circle", "blue square"], vocabulary)
    assert (scores["precision"], scores["recall"]) == (0.5, 0.5)
    assert E.mentioned_objects("a reddish circle, a red circlet", ["red circle"]) == []
    assert E.mentioned_objects("two red  circles!", ["red circle"]) == ["red circle"]
    assert E.caption_object_scores("An empty grey canvas.", [], vocabulary)["f1"] == 1.0
    assert E.caption_object_scores("A red circle.", [], vocabulary)["f1"] == 0.0
    # duplicates in the scene list are one kind of object
    assert E.caption_object_scores("a red circle", ["red circle", "red circle"])["recall"] == 1.0


@pytest.mark.parametrize("text, normalized", [
    ("The Two dogs.", "2 dogs"),
    ("Yes!", "yes"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("an apple", "apple"),
    ("don't", "dont"),
    ("  Red,\tblue ", "red blue"),
    ("e-mail", "e mail"),
    ("None", "0"),
])
def test_vqa_normalize(text, normalized):
    assert E.vqa_normalize(text) == normalized


def test_vqa_score():
    assert E.vqa_score("Two", "2") == {"exact_match": 1.0}
    assert E.vqa_score("blue", ["red", "Blue."]) == {"exact_match": 1.0}
    assert E.vqa_score("a cat", "dog") == {"exact_match": 0.0}
    assert E.vqa_score("a black cat", "cat") == {"exact_match": 0.0}


# ---------------------------------------------------------------------------
# report and pictures
# ---------------------------------------------------------------------------


def test_write_report(tmp_path):
    grid = tmp_path / "figures" / "grid.png"
    grid.parent.mkdir()
    Image.new("RGB", (4, 4)).save(grid)
    results = {"counting": {"synthetic/val": {"correct": 0.5, "close": 0.75, "n": 40},
                            "countbench": {"correct": 1.0, "n": 3}},
               "pointing": {"synthetic/val": {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "n": 40}}}
    text = open(E.write_report(tmp_path / "report.md", results, images={"examples": grid})).read()
    assert "## counting\n\n| source | close | correct | n |\n|---|---|---|---|\n" in text
    assert "| synthetic/val | 0.750 | 0.500 | 40 |" in text
    assert "| countbench |  | 1.000 | 3 |" in text
    assert "| synthetic/val | 0.667 | 1.000 | 0.500 | 40 |" in text
    assert "![examples](figures/grid.png)" in text


GREY = (128, 128, 128)


def test_draw_points_pixels():
    image = Image.new("RGB", (640, 480), GREY)
    drawn = sample.draw_points(image, pred=[(320, 240)], true=[(100, 300)])
    assert drawn.size == (640, 480) and image.getpixel((320, 240)) == GREY  # input untouched
    assert drawn.getpixel((320, 240)) == sample.PRED_COLOR
    assert drawn.getpixel((100, 300)) == GREY  # the true ring is hollow
    r = sample._marker_radius(drawn)
    assert drawn.getpixel((100 + r + 2 + max(2, round(0.6 * r)) // 2 + 1, 300)) == sample.TRUE_COLOR
    assert drawn.getpixel((10, 10)) != GREY  # legend
    # small images are upscaled by a whole factor, points with them
    small = sample.draw_points(Image.new("RGB", (64, 48), GREY), pred=[(10, 10)], legend=False)
    assert small.size == (320, 240) and small.getpixel((50, 50)) == sample.PRED_COLOR


def test_draw_tracks_and_gif(tmp_path):
    image = Image.new("RGB", (400, 300), GREY)
    tracks = {7: [(0.0, 100, 150), (0.5, 200, 150), (1.0, 300, 150)]}
    drawn = sample.draw_tracks(image, tracks, true_tracks=tracks, path=tmp_path / "tracks.png")
    assert drawn.getpixel((200, 150)) == sample.TRACK_COLORS[0]
    assert Image.open(tmp_path / "tracks.png").size == (400, 300)

    frames = [image] * 3
    path = sample.save_video_gif(tmp_path / "points.gif", frames, [0.0, 0.5, 1.0], pred=[(0.5, 200, 150)])
    gif = Image.open(path)
    assert gif.n_frames == 3
    colors = []
    for index in range(3):
        gif.seek(index)
        colors.append(gif.convert("RGB").getpixel((200, 150)))
    near = [sum(abs(a - b) for a, b in zip(c, sample.PRED_COLOR)) < 60 for c in colors]
    assert near == [False, True, False]
    sample.save_video_gif(tmp_path / "tracks.gif", frames, [0.0, 0.5, 1.0], pred=tracks, true=tracks)
    with pytest.raises(ValueError, match="same non-zero length"):
        sample.save_video_gif(tmp_path / "x.gif", frames, [0.0])


def test_example_grid_and_curves(tmp_path):
    examples = [{"image": Image.new("RGB", (640, 480), GREY), "pred": [(320, 240)], "true": [(100, 100)],
                 "title": "Point to the red circle", "subtitle": "P 1.00 R 1.00"} for _ in range(5)]
    grid = Image.open(sample.save_example_grid(tmp_path / "grid.png", examples, columns=3, cell_size=128))
    assert grid.width == 3 * (128 + 8) + 8
    # the first cell's image is 128 x 96, centred in its 128 x 128 cell; its point (320, 240) -> (64, 48)
    header = 16 + 2 * 17
    assert grid.getpixel((8 + 64, header + 16 + 48)) == sample.PRED_COLOR

    path = training.plot_curves({"train": [(0, 3.0), (10, 2.0), (20, float("nan")), (30, 1.0)], "val": [(30, 1.5)]},
                                tmp_path / "curve.png")
    curve = Image.open(path).convert("RGB")
    assert curve.size == (800, 480)
    assert training.PLOT_COLORS[0] in {c for _, c in curve.getcolors(1 << 20)}
    with pytest.raises(ValueError, match="curves"):
        training.plot_curves({"train": []}, tmp_path / "empty.png")

    # the legend (its box outlined in grey 120) takes the corner its box covers fewest points in: top right above a
    # falling loss, bottom right below a rising accuracy that ends in the top right
    falling, rising = [(s, 1 - s / 100) for s in range(101)], [(s, s / 100) for s in range(101)]
    for points, legend_below in ((falling, False), (rising, True)):
        chart = Image.open(training.plot_curves({"curve": points}, tmp_path / "legend.png")).convert("RGB")
        grey_rows = [y for y in range(chart.height) if any(chart.getpixel((x, y)) == (120, 120, 120)
                                                            for x in range(chart.width // 2, chart.width))]
        assert grey_rows and all((y > chart.height // 2) == legend_below for y in grey_rows), grey_rows[:3]
