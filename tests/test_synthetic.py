"""The synthetic world: same seed -> same bytes, disjoint splits, every answer recomputed from the scene by
an independent checker, pixels where the scene says, and answers that can not be guessed from the
question alone."""

import collections
import hashlib
import json
import math
import os
import re

import pytest

import data
import prepare_data
from configurator import configure

SIZES = {"train": {"image": 60, "multi": 16, "video": 8},
         "val": {"image": 20, "multi": 6, "video": 4},
         "test": {"image": 20, "multi": 6, "video": 4}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world"))
    return out, prepare_data.generate_synthetic_world(out, seed=7, sizes=SIZES)


def _file_hashes(root):
    hashes = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                hashes[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def _records(path):
    records = data.RecordFile(path, load_media=False)
    out = list(records)
    assert records.report.n_skipped == 0, records.report.summary()
    return out


def test_same_seed_same_bytes_in_any_number_of_processes_other_seed_other_bytes(world, tmp_path):
    out, _ = world
    small = {"train": {"image": 5, "multi": 2, "video": 2}}
    # drawn by two processes, against the fixture's one: each example has its own seed, so the bytes are the same
    prepare_data.generate_synthetic_world(str(tmp_path / "a"), seed=7, sizes=SIZES, workers=2)
    prepare_data.generate_synthetic_world(str(tmp_path / "b"), seed=8, sizes=small)
    same, other = _file_hashes(str(tmp_path / "a")), _file_hashes(str(tmp_path / "b"))
    assert same == _file_hashes(out)
    assert len(same) == 9 + 100 + 2 * 28 + 8 * 16  # jsonl files, stills, image pairs, video frames
    shared = set(same) & set(other)
    assert shared and all(same[k] != other[k] for k in shared if k.endswith(".png"))


def test_a_world_stopped_half_way_leaves_no_finished_looking_jsonl(tmp_path, monkeypatch):
    """Each split's jsonl appears whole or not at all: drawing fails at the 4th test image, after the train split
    was written, and the test split's jsonl is then absent (a partial one would pass for a made world)."""
    real, calls = prepare_data._synthetic_record, []

    def failing(dataset_dir, seed, split, part, index, **kwargs):
        calls.append(split)
        if split == "test" and index == 3:
            raise KeyboardInterrupt  # as a user's Ctrl-C
        return real(dataset_dir, seed, split, part, index, **kwargs)

    monkeypatch.setattr(prepare_data, "_synthetic_record", failing)
    out = tmp_path / "w"
    with pytest.raises(KeyboardInterrupt):
        prepare_data.generate_synthetic_world(str(out), sizes={"train": {"image": 5}, "test": {"image": 6}})
    assert calls.count("test") == 4
    assert len((out / "synth_image" / "train.jsonl").read_text().splitlines()) == 5
    assert not (out / "synth_image" / "test.jsonl").exists()


def test_splits_share_no_image(world):
    out, paths = world
    image_hashes = {}
    for split in SIZES:
        hashes = {}
        for dataset in prepare_data.SYNTHETIC_DATASETS.values():
            hashes.update(_file_hashes(os.path.join(out, dataset, split)))
        assert len(hashes) == sum(n * {"image": 1, "multi": 2, "video": 8}[part] for part, n in SIZES[split].items())
        image_hashes[split] = set(hashes.values())
    assert not image_hashes["train"] & image_hashes["val"]
    assert not image_hashes["train"] & image_hashes["test"]
    assert not image_hashes["val"] & image_hashes["test"]
    # and no two stills in a split are the same either
    for split in SIZES:
        for dataset in ("synth_image", "synth_multi"):
            stills = list(_file_hashes(os.path.join(out, dataset, split)).values())
            assert len(set(stills)) == len(stills)


# --- an independent checker: recompute every answer from the scene ---------------------------------

def _matches(shape, query):
    return all(query[key] in (None, shape[key]) for key in ("colour", "kind"))


def _label(query):
    noun = query["kind"] + "s" if query["kind"] else "shapes"
    return f"{query['colour']} {noun}" if query["colour"] else noun


def _key(x, y):
    return round(min(max(x, 0), 1) * 1000), round(min(max(y, 0), 1) * 1000)


def _parsed_keys(parsed):
    return collections.Counter((p.frame, round(p.x * 1000), round(p.y * 1000)) for p in parsed.points)


def _check_points_answer(style, question, answer, query, expected, with_count):
    """expected: Counter of (frame, x_1000, y_1000) for the query's shapes."""
    assert _label(query) in question, (question, query)
    parsed = data.parse_points(answer)
    assert parsed.dropped == [], (answer, parsed.dropped)
    total = sum(expected.values())
    if total == 0:
        assert answer == "There are none.", answer
        return
    assert _parsed_keys(parsed) == expected, (style, answer)
    assert parsed.tags[0].label == _label(query)
    assert parsed.count == (total if with_count else None)


def _check_image_record(record):
    scene = record["scene"]
    shapes, query = scene["shapes"], scene["query"]
    matching = collections.Counter((1, *_key(s["x"], s["y"])) for s in shapes if _matches(s, query))
    for annotation in record["annotations"]:
        style = annotation["style"]
        question, answer = (m["content"] for m in annotation["messages"])
        if style == "long_caption":
            n = len(shapes)
            assert (f"shows {n} shape" in answer) if n else ("no shapes" in answer)
            assert len(re.findall(r"\bA (?:small|large) ", answer)) == n
            for colour in ("red", "green", "blue", "yellow"):
                k = sum(s["colour"] == colour for s in shapes)
                assert (f"{k} {colour} shape" in answer) == (k > 0)
        elif style in ("point_count", "pointing"):
            _check_points_answer(style, question, answer, query, matching, style == "point_count")
        elif style == "short_answer":
            if question == "How many shapes are there?":
                assert answer == str(len(shapes))
            elif question.startswith("Is there a "):
                colour, kind = question[len("Is there a "):-1].split()
                assert answer == ("yes" if any(s["colour"] == colour and s["kind"] == kind for s in shapes) else "no")
            elif question == "What shape is furthest to the left?":
                assert answer == min(shapes, key=lambda s: s["x"])["kind"]
            elif question == "What colour is the largest shape?":
                radii = sorted((s["radius"] for s in shapes), reverse=True)
                assert len(radii) == 1 or radii[0] ** 2 > 1.3 * radii[1] ** 2
                assert answer == max(shapes, key=lambda s: s["radius"])["colour"]
            else:
                raise AssertionError(f"unchecked question {question!r}")
        else:
            raise AssertionError(f"unchecked style {style}")


def _check_multi_record(record):
    scenes = record["scene"]["images"]
    query = scenes[0]["query"]
    assert all(scene["query"] == query for scene in scenes) and len(record["image"]) == len(scenes) == 2
    counts = [sum(_matches(s, query) for s in scene["shapes"]) for scene in scenes]
    expected = collections.Counter((i, *_key(s["x"], s["y"])) for i, scene in enumerate(scenes, 1)
                                   for s in scene["shapes"] if _matches(s, query))
    for annotation in record["annotations"]:
        question, answer = (m["content"] for m in annotation["messages"])
        if annotation["style"] == "multi_image_short_answer":
            want = "Image 1" if counts[0] > counts[1] else "Image 2" if counts[1] > counts[0] else "same"
            assert want in answer
        else:
            assert annotation["style"] == "multi_image_point_then_count"
            _check_points_answer("multi", question, answer, query, expected, True)


def _check_video_record(record):
    scene = record["scene"]
    shapes, query, times = scene["shapes"], scene["query"], scene["frame_times"]
    assert times == [f / 2 for f in range(len(times))]
    matching = [s for s in shapes if _matches(s, query)]
    first = collections.Counter((round(times[s["appear"]], 1), *_key(*s["track"][s["appear"]])) for s in matching)
    for s in shapes:  # a shape is in the video from the frame it appears to the frame before it leaves
        assert all((p is None) == (not s["appear"] <= f < s["leave"]) for f, p in enumerate(s["track"]))
    for annotation in record["annotations"]:
        style = annotation["style"]
        question, answer = (m["content"] for m in annotation["messages"])
        if style in ("video_point_count", "video_point"):
            _check_points_answer(style, question, answer, query, first, style == "video_point_count")
        elif style == "video_point_track_per_frame":
            expected = collections.Counter((round(t, 1), *_key(*s["track"][f])) for s in matching
                                           for f, t in enumerate(times) if s["track"][f])
            _check_points_answer(style, question, answer, query, expected, False)
            if matching:  # one id per shape: the id's points follow one shape's track
                parsed = data.parse_points(answer)
                assert parsed.tags[0].kind == "tracks"
                by_id = collections.defaultdict(list)
                for p in parsed.points:
                    by_id[p.id].append((p.frame, round(p.x * 1000), round(p.y * 1000)))
                tracks = sorted(sorted((round(times[f], 1), *_key(*xy)) for f, xy in enumerate(s["track"]) if xy)
                                for s in matching)
                assert sorted(sorted(v) for v in by_id.values()) == tracks
        elif style == "video_short_answer":
            assert answer == str(sum(s["track"][-1] is not None for s in shapes))
        else:
            raise AssertionError(f"unchecked style {style}")


def test_every_answer_agrees_with_its_scene(world):
    out, paths = world
    checkers = {"image": _check_image_record, "multi": _check_multi_record, "video": _check_video_record}
    n_checked = collections.Counter()
    for split in SIZES:
        for part, path in paths[split].items():
            records = _records(path)
            assert len(records) == SIZES[split][part]
            for record in records:
                checkers[part](record)
                n_checked[part] += 1
    assert n_checked == {"image": 100, "multi": 28, "video": 16}


def test_records_read_back_with_media(world):
    out, paths = world
    records = data.RecordFile(paths["val"]["video"])
    video = records.get(0)
    assert len(video["video_frames"]) == 8 and video["video_times"] == [f / 2 for f in range(8)]
    image = data.RecordFile(paths["val"]["image"]).get(0)
    assert image["images"][0].size == (224, 224)


def _uncovered_centres(path):
    """(record id, shape, the pixel at its centre) for every shape of the image records at path that no shape drawn
    later covers."""
    for record in data.RecordFile(path):
        image, shapes = record["images"][0], record["scene"]["shapes"]
        for k, s in enumerate(shapes):
            if not any(math.hypot(s["x"] - t["x"], s["y"] - t["y"]) < 1.6 * t["radius"] for t in shapes[k + 1:]):
                yield record["id"], s, image.getpixel((int(s["x"] * image.width), int(s["y"] * image.height)))


def test_pixels_show_the_scene(world):
    """At the centre of every solid shape that nothing drawn later covers, the pixel has the shape's colour."""
    out, paths = world
    n_checked = 0
    for record_id, s, pixel in _uncovered_centres(paths["train"]["image"]):
        if s["texture"] == "solid":
            assert pixel == prepare_data.SHAPE_COLOURS[s["colour"]], (record_id, s)
            n_checked += 1
    assert n_checked > 100


# --- answers need the image -------------------------------------------------------------------------

def _normalised_answer(style, answer):
    if style in ("point_count", "pointing", "multi_image_point_then_count", "video_point_count", "video_point",
                 "video_point_track_per_frame"):
        parsed = data.parse_points(answer)
        return len(parsed.points) if style != "video_point_track_per_frame" else len({p.id for p in parsed.points})
    return answer


def test_answers_cannot_be_guessed_from_the_question():
    """For every question text asked often enough, no answer (for points: no number of points) is common:
    someone who only reads the question can not do much better than chance. Scenes only, no pixels."""
    by_question = collections.defaultdict(collections.Counter)
    for index in range(1500):
        for part in ("image", "multi", "video"):
            rng = prepare_data._example_rng(3, "train", part, index)
            if part == "image":
                annotations = prepare_data.image_annotations(rng, prepare_data.make_image_scene(rng))
            elif part == "multi":
                annotations = prepare_data.multi_image_annotations(rng, prepare_data.multi_image_scenes(rng))
            else:
                annotations = prepare_data.video_annotations(rng, prepare_data.make_video_scene(rng))
            for a in annotations:
                question, answer = (m["content"] for m in a["messages"])
                assert not re.search(r"\d", question), question  # no number in any question
                if a["style"] != "long_caption":
                    by_question[(a["style"], question)][_normalised_answer(a["style"], answer)] += 1
    n_groups = 0
    for (style, question), answers in by_question.items():
        n = sum(answers.values())
        if n < 40:
            continue
        n_groups += 1
        top_answer, top = answers.most_common(1)[0]
        binary = set(answers) <= {"yes", "no"}
        # chance plus sampling noise: 1/2 for yes/no, 1/3 for which-image-has-more, 1/4 otherwise
        chance = 0.5 if binary else 1 / 3 if style == "multi_image_short_answer" else 0.25
        limit = chance + 3.5 * math.sqrt(chance * (1 - chance) / n)
        assert top / n <= limit, (style, question, answers.most_common(4))
        if not binary and style != "multi_image_short_answer":
            entropy = -sum(c / n * math.log2(c / n) for c in answers.values())
            assert entropy >= 1.5, (style, question, entropy)
    assert n_groups > 50


def test_prepare_data_world_knobs_bound_counts_and_sizes(tmp_path, monkeypatch):
    """`prepare_data.py --max_objects=2 --train_images=30 --extra_queries=1`: every training image holds at most 2
    shapes (so every count is 0, 1 or 2), and there are 30 of them, each with one more question; the other parts keep
    their default sizes, and world.json says what the world was made with."""
    monkeypatch.setattr(prepare_data, "SYNTHETIC_SIZES", {"train": {"image": 999, "multi": 2, "video": 1},
                                                          "val": {"image": 3}})
    knobs = {k: getattr(prepare_data, k) for k in ("dataset", "out", "max_objects", "train_images", "image_size",
                                                    "extra_queries")}
    configure(knobs, ["--dataset=synthetic", f"--out={tmp_path}", "--max_objects=2", "--train_images=30",
                      "--image_size=56", "--extra_queries=1"])  # the command line, read as prepare_data.py reads it
    for name, value in knobs.items():
        monkeypatch.setattr(prepare_data, name, value)
    prepare_data.main()
    train = _records(str(tmp_path / "synth_image" / "train.jsonl"))
    val = _records(str(tmp_path / "synth_image" / "val.jsonl"))
    assert len(train) == 30 and len(val) == 3
    # one more question on each training image (caption, counting, pointing, two short answers: 5 without)
    assert {len(r["annotations"]) for r in train} == {6} and {len(r["annotations"]) for r in val} == {5}
    with open(tmp_path / prepare_data.WORLD_FILE) as f:  # what demo.py reads to tell the world is the one it asks
        assert json.load(f) == {"seed": 0, "max_objects": 2, "shape_style": "world", "extra_queries": 1,
                                "image_size": 56, "train_images": 30}
    assert len(_records(str(tmp_path / "synth_multi" / "train.jsonl"))) == 2
    shapes = [len(r["scene"]["shapes"]) for r in train]
    assert max(shapes) <= 2 and 2 in shapes  # bounded, and the bound is reached
    for bad in (0, 13):
        with pytest.raises(ValueError, match=f"max_objects={bad}, expected 1..12"):
            prepare_data.generate_synthetic_world(str(tmp_path / "bad"), sizes={"val": {"image": 1}}, max_objects=bad)
    with pytest.raises(ValueError, match="extra_queries=-1, expected a whole number >= 0"):
        prepare_data.generate_synthetic_world(str(tmp_path / "bad"), sizes={"val": {"image": 1}}, extra_queries=-1)


def _query_in(question):
    """The query a counting or pointing question names, read back from its words (the longest label it holds)."""
    queries = [{"colour": c, "kind": k} for c in (None, *prepare_data.SHAPE_COLOURS)
               for k in (None, *prepare_data.SHAPE_KINDS)]
    named = [q for q in queries if re.search(rf"\b{_label(q)}\b", question)]
    return max(named, key=lambda q: len(_label(q)))


def test_extra_queries_add_checked_questions_to_training_images_and_change_nothing_else(world, tmp_path):
    """`prepare_data.py --extra_queries=2`: each training image gets two more counting or pointing questions, about
    two other queries than its own, each answer recomputed from the scene by the checker above; every other byte of
    the world (the images, the held-out splits, each training image's own questions) is the fixture's."""
    out, _ = world
    sizes = {"train": {"image": 40}, "test": {"image": 20}}
    prepare_data.generate_synthetic_world(str(tmp_path), seed=7, sizes=sizes, extra_queries=2)
    before, after = _file_hashes(os.path.join(out, "synth_image")), _file_hashes(str(tmp_path / "synth_image"))
    assert {k: v for k, v in after.items() if k != "train.jsonl"} == \
        {k: v for k, v in before.items() if k in after and k != "train.jsonl"}
    assert after["test.jsonl"] == before["test.jsonl"] and len(after) == 2 + 40 + 20
    plain = _records(os.path.join(out, "synth_image", "train.jsonl"))[:40]
    styles = collections.Counter()
    for old, new in zip(plain, _records(str(tmp_path / "synth_image" / "train.jsonl")), strict=True):
        assert new["annotations"][:-2] == old["annotations"] and new["scene"] == old["scene"]
        asked = [new["scene"]["query"]]
        for annotation in new["annotations"][-2:]:
            question, answer = (m["content"] for m in annotation["messages"])
            query = _query_in(question)
            assert query not in asked, (question, asked)  # another question than those the image has
            asked.append(query)
            matching = collections.Counter((1, *_key(s["x"], s["y"])) for s in new["scene"]["shapes"]
                                           if _matches(s, query))
            _check_points_answer(annotation["style"], question, answer, query, matching,
                                 annotation["style"] == "point_count")
            styles[annotation["style"], sum(matching.values()) > 0] += 1
    # both kinds of question, about shapes the image holds and (rarer) about ones it does not
    assert styles["point_count", True] and styles["pointing", True] and styles["point_count", False] + \
        styles["pointing", False] > 0, styles


def test_big_solid_style_draws_one_large_solid_kind_of_shape_on_grey(tmp_path, monkeypatch):
    """`prepare_data.py --shape_style=big_solid --max_objects=3`: every shape of every part has the style's radius and
    is solid, every background plain light grey (up to its jitter), every answer still agrees with its scene, and the
    pixel at each uncovered centre has the shape's colour. More shapes than the style fits, or an unknown style, is
    refused with its name."""
    monkeypatch.setattr(prepare_data, "SYNTHETIC_SIZES", {"train": {"image": 40, "multi": 6, "video": 4}})
    knobs = {k: getattr(prepare_data, k) for k in ("dataset", "out", "max_objects", "shape_style")}
    configure(knobs, ["--dataset=synthetic", f"--out={tmp_path}", "--max_objects=3", "--shape_style=big_solid"])
    for name, value in knobs.items():
        monkeypatch.setattr(prepare_data, name, value)
    prepare_data.main()
    checkers = {"image": _check_image_record, "multi": _check_multi_record, "video": _check_video_record}
    n_shapes = 0
    for part, folder in (("image", "synth_image"), ("multi", "synth_multi"), ("video", "synth_video")):
        for record in _records(str(tmp_path / folder / "train.jsonl")):
            checkers[part](record)
            scenes = record["scene"]["images"] if part == "multi" else [record["scene"]]
            for scene in scenes:
                assert scene["background"]["name"] == "light grey" and scene["background"]["pattern"] == "plain"
                assert all(abs(c - 214) <= 12 for c in scene["background"]["colour"])
                assert len(scene["shapes"]) <= 3
                for shape in scene["shapes"]:
                    assert shape["radius"] == 0.12 and shape["texture"] == "solid", shape
                    n_shapes += 1
    assert n_shapes > 50
    centres = list(_uncovered_centres(str(tmp_path / "synth_image" / "train.jsonl")))
    assert len(centres) > 20
    for record_id, s, pixel in centres:
        assert pixel == prepare_data.SHAPE_COLOURS[s["colour"]], (record_id, s)
    with pytest.raises(ValueError, match="max_objects=4, expected 1..3 with shape_style='big_solid'"):
        prepare_data.generate_synthetic_world(str(tmp_path / "bad"), sizes={"val": {"image": 1}}, max_objects=4,
                                              shape_style="big_solid")
    with pytest.raises(ValueError, match="shape_style='tiny'"):
        prepare_data.generate_synthetic_world(str(tmp_path / "bad"), sizes={"val": {"image": 1}}, shape_style="tiny")


def test_record_token_ids_are_each_prefixed_conversations_tokens(world):
    """record_token_ids encodes what a style prefix does not change once (data._annotation_token_ids): its set is
    the union of _conversation_tokens' ids under each prefix, for hand-written conversations (a system message, two
    turns, an empty first prompt, a long answer past the memo's length) and for every record of the world."""
    tokenizer = data.Tokenizer()
    prefixes = {"", "pointing:", "pointing 0:", "pointing -1:", "count:"}
    long_answer = "A small striped yellow circle at the bottom right. " * 4
    conversations = [
        [{"role": "user", "content": "How many red circles?"}, {"role": "assistant", "content": "3"}],
        [{"role": "system", "content": "Count shapes."}, {"role": "user", "content": ""},
         {"role": "assistant", "content": "none"}, {"role": "user", "content": "And the stars?"},
         {"role": "assistant", "content": long_answer}],
    ]
    for messages in conversations:
        expected = set().union(*(data._conversation_tokens(messages, p, tokenizer)[0] for p in prefixes))
        memo = data.MemoTokenizer(tokenizer)
        assert data._annotation_token_ids(messages, prefixes, memo) == expected
        assert data._annotation_token_ids(messages, prefixes, memo) == expected  # again, from the memo

    out, _ = world
    names = list(prepare_data.SYNTHETIC_DATASETS.values())
    expected = set(data.record_token_ids(out, {"none": (1.0, [])}, tokenizer))  # the fixed part: no records
    for name in names:
        for split in SIZES:
            for record in data.RecordFile(os.path.join(out, name, f"{split}.jsonl"), load_media=False):
                for annotation in record["annotations"]:
                    style = annotation["style"]
                    for prefix in {data.style_prefix(style, "", "sft"), "", f"{style} 0:", f"{style} -1:",
                                   f"{style}:"}:
                        expected.update(data._conversation_tokens(annotation["messages"], prefix, tokenizer)[0])
    assert data.record_token_ids(out, {"all": (1.0, names)}, tokenizer) == sorted(expected)


def test_record_token_ids_in_forked_processes_are_the_serial_scans(world, tmp_path, monkeypatch):
    """workers=2 with chunks of 7 records: the same ids, and the same skip counts and first messages, for the world
    plus a dataset of bad records (malformed JSON, a missing image, an unknown style) among a good one."""
    import shutil

    out, _ = world
    good = data.RecordFile(os.path.join(out, "synth_image", "train.jsonl"), load_media=False).offsets
    with open(os.path.join(out, "synth_image", "train.jsonl")) as f:
        first_line = f.readline()
    shutil.copytree(out, tmp_path / "w")
    os.makedirs(tmp_path / "w" / "bad")
    shutil.copytree(os.path.join(out, "synth_image", "train"), tmp_path / "w" / "bad" / "train")
    record = json.loads(first_line)
    lines = ["{not json", json.dumps({**record, "image": "train/nowhere.png"}),
             json.dumps({**record, "annotations": [{"style": "poetry", "messages": []}]}), first_line.strip()]
    with open(tmp_path / "w" / "bad" / "train.jsonl", "w") as f:
        f.write("\n".join(lines * 5) + "\n")
    assert len(good) > 7
    mixture = {"all": (1.0, [*prepare_data.SYNTHETIC_DATASETS.values(), "bad"])}
    serial_report, forked_report = data.SkipReport(), data.SkipReport()
    serial = data.record_token_ids(str(tmp_path / "w"), mixture, report=serial_report)
    monkeypatch.setattr(data, "SCAN_CHUNK", 7)
    forked = data.record_token_ids(str(tmp_path / "w"), mixture, report=forked_report, workers=2)
    assert forked == serial
    assert serial_report.counts == {"malformed_json": 5, "missing_file": 5, "unknown_style": 5}
    assert (forked_report.n_seen, forked_report.counts, forked_report.first) == \
        (serial_report.n_seen, serial_report.counts, serial_report.first)


def test_record_token_ids_cover_every_formatted_example(world):
    """vocab='data' keeps rows for data.record_token_ids: every token of every example the loader or the
    evaluation can build from these records (any split, style prefixes sft / none / pretrain) must be there."""
    import numpy as np

    import training
    out, _ = world
    names = list(prepare_data.SYNTHETIC_DATASETS.values())
    kept = set(data.record_token_ids(out, {"all": (1.0, names)}))
    assert data.IM_END_ID in kept and len(kept) < 1000
    processor = data.Molmo2Processor(max_crops=2, max_frames=4, crop_size=56, patch_size=14, overlap_margins=(1, 1))
    n = 0
    for name in names:
        for split in SIZES:
            for record in data.RecordFile(os.path.join(out, name, f"{split}.jsonl")):
                for mode in ("sft", "none", "pretrain"):
                    example = data.format_example(record, processor, rng=np.random.default_rng(n), style_prefixes=mode)
                    ids = set(example.input_ids.tolist()) | set(example.targets[example.targets >= 0].tolist())
                    assert {i for i in ids if i < 151936} <= kept, (record["id"], mode)
                    n += 1
    assert n == 3 * sum(sum(parts.values()) for parts in SIZES.values())

    model = training.build_model("scratch", "tiny", vocab="data", data_dir=out, mixture={"all": (1.0, names)})
    assert model.config.token_ids == tuple(sorted(kept)) and model.llm.embed_tokens.weight.shape[0] == len(kept)
    with pytest.raises(ValueError, match="vocab='words': expected 'full' or 'data'"):
        training.build_model("scratch", "tiny", vocab="words")
    with pytest.raises(ValueError, match="vocab='data' is for models from scratch"):
        training.build_model("parts", "tiny", vocab="data")
