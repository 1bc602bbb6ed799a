"""Converters of the real datasets (prepare_data.py), each on a small fixture in the dataset's published
schema: the records they write are checked against hand-worked answers and read back without a skip."""

import base64
import collections
import json
import os

import pytest
from PIL import Image

import data
import prepare_data

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
U = "https://example.org/photos/"


def _rows(name):
    rows = prepare_data.read_rows(os.path.join(FIXTURES, f"{name}.jsonl"))
    for row in rows:  # parquet gives embedded images as bytes; the fixture stores them as base64
        if isinstance(row.get("image"), dict) and "bytes_base64" in row["image"]:
            row["image"] = {"bytes": base64.b64decode(row["image"].pop("bytes_base64")), "path": None}
    return rows


def _convert(name, tmp_path, images=(), videos=()):
    """Convert a fixture; `images`: {url: (w, h)} placed where Media expects them, `videos`: frame folders."""
    media = prepare_data.Media(str(tmp_path))
    for url, size in dict(images).items():
        os.makedirs(os.path.dirname(media.url_path(url)), exist_ok=True)
        Image.new("RGB", size, (90, 120, 200)).save(media.url_path(url), format="PNG")
    for key in videos:
        os.makedirs(media.video_path(key))
        for k in range(3):
            Image.new("RGB", (16, 16), (k * 60, 0, 0)).save(os.path.join(media.video_path(key), f"{k:05d}.jpg"))
    dropped = collections.Counter()
    _, _, convert = prepare_data.DATASETS[name]
    counts = prepare_data.write_dataset(convert(_rows(name), media, dropped), str(tmp_path / name))
    report = data.SkipReport()
    records = []
    for split in ("train", "val"):
        records += list(data.RecordFile(str(tmp_path / name / f"{split}.jsonl"), report))
    assert report.n_skipped == 0, report.summary()
    assert len(records) == counts["train"] + counts["val"]
    return sorted(records, key=lambda r: r["id"]), dropped


def _qa(record):
    return [(a["style"], [m["content"] for m in a["messages"]]) for a in record["annotations"]]


def test_pixmo_cap(tmp_path):
    records, dropped = _convert("pixmo_cap", tmp_path, images={U + "beach.jpg": (64, 48)})
    assert dropped == {"no caption": 1}
    (record,) = records
    assert [style for style, _ in _qa(record)] == ["long_caption", "transcript", "transcript"]
    assert _qa(record)[0][1][1].startswith("A wide sandy beach")
    assert record["images"][0].size == (64, 48)


def test_pixmo_points(tmp_path):
    records, dropped = _convert("pixmo_points", tmp_path, images={U + "dogs.jpg": (80, 60)})
    assert dropped == {"more than 60 points": 1}
    (record,) = records  # the two labels of dogs.jpg in one record
    dogs = '<points coords="1 1 250 500 2 750 500">dog</points>'  # 0-100 scale, lower-cased label
    assert _qa(record) == [
        ("point_count", ["How many dog are there?", f"Counting the {dogs} shows a total of 2."]),
        ("pointing", ["Point to the dog.", dogs]),
        ("point_count", ["How many cat are there?", "There are none."]),
        ("pointing", ["Point to the cat.", "There are none."]),
    ]


def test_pixmo_count_pixel_points(tmp_path):
    records, dropped = _convert("pixmo_count", tmp_path, images={U + "apples.jpg": (200, 100)})
    assert dropped == {"no points (eval split) or count mismatch": 1}
    (record,) = records
    # pixels (50, 25) and (150, 75) in a 200 x 100 image
    assert _qa(record)[0][1][1] == 'Counting the <points coords="1 1 250 250 2 750 750">apple</points> shows a total of 2.'
    _, dropped = _convert("pixmo_count", tmp_path / "no_images")
    assert dropped["image not downloaded (pixel points need its size)"] == 2


def test_pixmo_ama_and_cap_qa(tmp_path):
    (record,), dropped = _convert("pixmo_ama", tmp_path, images={U + "beach.jpg": (64, 48)})
    assert _qa(record) == [("user_qa", ["Is it sunny?", "Yes, the sky is clear and bright."]),
                           ("user_qa", ["How many surfers?", "Two."])]
    (record,), dropped = _convert("pixmo_cap_qa", tmp_path / "qa", images={U + "beach.jpg": (64, 48)})
    assert dropped == {"malformed [USER]/[ASSISTANT] turns": 1}
    assert _qa(record) == [("synthetic_qa", ["What is happening?", "Two surfers walk to the sea.",
                                              "What are they carrying?", "Surfboards."])]


def test_pixmo_docs_and_cosyn_point_embedded_images(tmp_path):
    (record,), _ = _convert("pixmo_docs_charts", tmp_path)
    assert record["images"][0].size == (40, 30)
    assert _qa(record) == [("pixmo_docs_charts", ["What is the highest bar?", "2019"]),
                           ("pixmo_docs_charts", ["What is the title?", "Sales by year"])]
    (record,), _ = _convert("cosyn_point", tmp_path)
    assert _qa(record) == [
        ("cosyn_point", ["Point to the submit button", '<points coords="1 1 500 900">submit button</points>']),
        ("cosyn_point", ["Point to the checkboxes", '<points coords="1 1 100 100 2 100 200">checkboxes</points>'])]


def test_tulu(tmp_path):
    (record,), dropped = _convert("tulu", tmp_path)
    assert dropped == {"turns not user/assistant pairs, or an empty answer": 1}
    assert "image" not in record and "video" not in record
    assert [m["role"] for m in record["annotations"][0]["messages"]] == ["system", "user", "assistant"]


def test_molmo2_cap(tmp_path):
    (record,), _ = _convert("molmo2_cap", tmp_path, videos=["yt_abc"])
    assert [style for style, _ in _qa(record)] == ["video_long_caption", "video_merged_caption", "video_short_caption"]
    assert len(record["video_frames"]) == 3


def test_molmo2_video_point_times_from_clip_start(tmp_path):
    (record,), _ = _convert("molmo2_video_point", tmp_path, videos=["v1_10_40"])
    # clip starts at 10 s: 12.0 -> 2.0, 13.5 -> 3.5; 0-100 scale; ids run on across frames
    assert _qa(record) == [
        ("video_point_count", ["How many red cars drive past?", 'Counting the <points coords="2.0 1 100 500;'
                               '3.5 2 400 600 3 900 200">red car</points> shows a total of 3.']),
        ("video_point_count", ["How many buses?", "There are none."])]


def test_molmo2_video_track_sampled_at_two_fps(tmp_path):
    (record,), _ = _convert("molmo2_video_track", tmp_path, videos=["mose_abc_0"])
    # 6 fps -> every 3rd frame (0, 3, 6 at 0.0, 0.5, 1.0 s); pixels / (200, 100); 'm7' is seen first -> id 1
    assert _qa(record) == [("video_point_track_per_frame", [
        "Track the dog on the left at 2 FPS.",
        '<tracks coords="0.0 1 100 100;0.5 1 150 200 2 500 500;1.0 1 250 500 2 900 900">the dog on the left</tracks>'])]


def test_every_dataset_has_a_fixture_and_presets_name_known_datasets():
    names = set(prepare_data.DATASETS)
    fixtures = {f[:-len(".jsonl")] for f in os.listdir(FIXTURES) if f.endswith(".jsonl")}
    assert {n for n in names if not n.startswith("pixmo_docs_")} | {"pixmo_docs_charts"} == fixtures
    known = names | set(prepare_data.SYNTHETIC_DATASETS.values())
    config_dir = os.path.join(os.path.dirname(FIXTURES), "..", "config")
    presets = [f for f in os.listdir(config_dir) if f.startswith("mix_")]
    assert len(presets) == 4
    for preset in presets:
        values = {}
        exec(open(os.path.join(config_dir, preset)).read(), {}, values)
        mixture = values["data_mixture"]
        # Molmo2's SFT shares add up to 1.1 (launch_scripts/sft.py); the sampler normalises them
        total = 1.1 if preset in ("mix_sft.py", "mix_long_context.py") else 1.0
        assert sum(share for share, _ in mixture.values()) == pytest.approx(total), preset
        for _, names_in_group in mixture.values():
            assert set(names_in_group) <= known, (preset, set(names_in_group) - known)


def test_split_is_stable_and_small():
    ids = [f"pixmo_points/{U}{k}.jpg" for k in range(4000)]
    n_val = sum(prepare_data.is_val(i) for i in ids)
    assert 10 < n_val < 60  # about 1 in 128
    assert [prepare_data.is_val(i) for i in ids[:50]] == [prepare_data.is_val(i) for i in ids[:50]]
