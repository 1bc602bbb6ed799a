"""The record format and its lazy reader: good records of every kind come back with decoded media; each
kind of defect is skipped, counted and named in the report, and reading goes on. The mixture sampler:
shares x sqrt(size) (hand-worked), epochs without replacement, exact resume."""

import itertools
import json
import os
from collections import Counter

import pytest
from PIL import Image

import data


def _messages(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _write_media(root):
    Image.new("RGB", (32, 24), (200, 10, 10)).save(os.path.join(root, "red.png"))
    Image.new("RGB", (16, 16), (10, 10, 200)).save(os.path.join(root, "blue.jpg"))
    with open(os.path.join(root, "blue.jpg"), "rb") as f:
        jpeg = f.read()
    with open(os.path.join(root, "truncated.jpg"), "wb") as f:
        f.write(jpeg[: len(jpeg) // 2])
    with open(os.path.join(root, "not_an_image.png"), "wb") as f:
        f.write(b"hello, I am text")
    frames = [Image.new("RGB", (20, 20), (40 * i, 0, 0)) for i in range(3)]
    frames[0].save(os.path.join(root, "clip.gif"), save_all=True, append_images=frames[1:], duration=500, loop=0)
    os.makedirs(os.path.join(root, "clip_frames"))
    for i, frame in enumerate(frames):
        frame.save(os.path.join(root, "clip_frames", f"{i:04d}.png"))
    with open(os.path.join(root, "broken.gif"), "wb") as f:
        f.write(b"GIF89a" + b"\x00" * 5)


def test_reader_skips_counts_and_names_each_defect(tmp_path):
    root = str(tmp_path)
    _write_media(root)
    good_qa = {"style": "short_answer", "messages": _messages("What colour?", "red")}
    lines = [
        json.dumps({"id": "good_image", "image": "red.png", "annotations": [good_qa, good_qa]}),
        "{not json",
        json.dumps({"id": "missing", "image": "nowhere.png", "annotations": [good_qa]}),
        json.dumps({"id": "good_multi", "image": ["red.png", "blue.jpg"], "annotations": [good_qa]}),
        json.dumps({"id": "truncated", "image": "truncated.jpg", "annotations": [good_qa]}),
        json.dumps({"id": "garbage", "image": "not_an_image.png", "annotations": [good_qa]}),
        json.dumps({"id": "empty", "image": "red.png",
                    "annotations": [{"style": "short_answer", "messages": _messages("What colour?", "  ")}]}),
        json.dumps({"id": "style", "image": "red.png",
                    "annotations": [{"style": "haiku", "messages": _messages("?", "x")}]}),
        json.dumps({"id": "no_annotations", "image": "red.png"}),
        json.dumps({"id": "good_gif", "video": "clip.gif",
                    "annotations": [{"style": "video_short_answer", "messages": _messages("How many?", "3")}]}),
        json.dumps({"id": "good_frames", "video": "clip_frames", "video_fps": 4,
                    "annotations": [{"style": "video_short_answer", "messages": _messages("How many?", "3")}]}),
        json.dumps({"id": "broken_video", "video": "broken.gif",
                    "annotations": [{"style": "video_short_answer", "messages": _messages("How many?", "3")}]}),
        "",  # blank lines are not records
        json.dumps({"id": "good_text", "annotations": [{"style": "text_sft", "messages": [
            {"role": "system", "content": "Be brief."}, *_messages("Hi", "Hello"), *_messages("Bye?", "Bye")]}]}),
        json.dumps({"id": "odd_turns", "annotations": [{"style": "text_sft", "messages": [
            {"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello"}]}]}),
    ]
    path = os.path.join(root, "records.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")

    records = data.RecordFile(path)
    assert len(records) == 14
    got = list(records)
    assert [r["id"] for r in got] == ["good_image", "good_multi", "good_gif", "good_frames", "good_text"]

    image = got[0]
    assert image["image"] == [os.path.join(root, "red.png")]  # paths resolved next to the JSONL file
    assert image["images"][0].size == (32, 24) and image["images"][0].getpixel((0, 0)) == (200, 10, 10)
    assert [im.size for im in got[1]["images"]] == [(32, 24), (16, 16)]
    assert len(got[2]["video_frames"]) == 3 and got[2]["video_times"] == [0.0, 0.5, 1.0]
    assert got[3]["video_times"] == [0.0, 0.25, 0.5]
    assert "images" not in got[4] and "video_frames" not in got[4]

    report = records.report
    assert report.n_seen == 14 and report.n_skipped == 9
    assert dict(report.counts) == {"malformed_json": 1, "missing_file": 1, "undecodable_image": 2,
                                   "empty_answer": 1, "unknown_style": 1, "bad_schema": 2,
                                   "undecodable_video": 1}
    summary = report.summary()
    for reason in report.counts:
        assert reason in summary
    assert "nowhere.png' not found" in summary and "'haiku'" in summary


def test_reader_without_media_still_finds_missing_files(tmp_path):
    qa = {"style": "short_answer", "messages": _messages("q", "a")}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"image": "gone.png", "annotations": [qa]}) + "\n"
                    + json.dumps({"annotations": [qa]}) + "\n")
    records = data.RecordFile(str(path), load_media=False)
    assert records.get(0) is None and records.report.counts == {"missing_file": 1}
    assert records.get(1)["id"] == "r.jsonl record 1"


def test_every_style_has_a_loss_rule():
    assert set(data.STYLES.values()) == {"sqrt", "grounding", "video_caption"}
    for style in ("pointing", "point_count", "video_point", "video_point_track_per_frame"):
        assert data.STYLES[style] == "grounding"  # flat 0.2 in spec section 8
    assert data.STYLES["video_long_caption"] == "video_caption"  # flat 0.1


# --- the mixture ------------------------------------------------------------------------------------

def test_mixture_probabilities_are_shares_times_sqrt_size():
    mixture = {"a": (0.75, ["x", "y"]), "b": (0.25, ["z"]), "none": (0.5, [])}
    sampler = data.MixtureSampler(mixture, {"x": 100, "y": 400, "z": 50})
    # hand-worked: group a gets 0.75 (the empty group is left out), split 10:20 by sqrt size
    want = {"x": 0.25, "y": 0.5, "z": 0.25}
    assert sampler.probabilities() == pytest.approx(want)
    counts = Counter(name for name, _ in itertools.islice(sampler, 20000))
    for name, p in want.items():
        assert abs(counts[name] / 20000 - p) < 0.015, (name, counts)


def test_mixture_walks_each_dataset_without_replacement_per_epoch():
    sampler = data.MixtureSampler({"g": (1.0, ["small", "big"])}, {"small": 7, "big": 10_000}, seed=3)
    small = [i for name, i in itertools.islice(sampler, 3000) if name == "small"]
    assert len(small) > 21
    for epoch in range(3):
        assert sorted(small[7 * epoch: 7 * epoch + 7]) == list(range(7))
    assert small[:7] != small[7:14]  # a new order each epoch


def test_mixture_resumes_exactly_and_is_deterministic():
    mixture = {"a": (0.6, ["x", "y"]), "b": (0.4, ["z"])}
    sizes = {"x": 13, "y": 40, "z": 5}
    reference = list(itertools.islice(data.MixtureSampler(mixture, sizes, seed=1), 300))
    first = data.MixtureSampler(mixture, sizes, seed=1)
    head = list(itertools.islice(first, 120))
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    resumed = data.MixtureSampler(mixture, sizes, seed=1)
    resumed.load_state_dict(state)
    assert head + list(itertools.islice(resumed, 180)) == reference
    other_rank = list(itertools.islice(data.MixtureSampler(mixture, sizes, seed=1, rank=1), 300))
    assert other_rank != reference
    with pytest.raises(ValueError, match="rank"):
        data.MixtureSampler(mixture, sizes, seed=1, rank=1).load_state_dict(state)


def test_mixture_reads_records_and_skips_bad_ones(tmp_path):
    qa = {"style": "short_answer", "messages": _messages("q", "a")}
    for name, lines in {"good": [json.dumps({"annotations": [qa]})] * 3,
                        "half_bad": [json.dumps({"annotations": [qa]}), "{oops", json.dumps({"image": "x.png", "annotations": [qa]})]}.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "train.jsonl").write_text("\n".join(lines) + "\n")
    sampler, files = data.open_mixture({"g": (1.0, ["good", "half_bad"])}, str(tmp_path))
    got = list(itertools.islice(data.mixture_records(sampler, files), 200))
    assert len(got) == 200 and {name for name, _ in got} == {"good", "half_bad"}
    report = files["good"].report
    assert report is files["half_bad"].report
    assert report.counts["malformed_json"] > 0 and report.counts["missing_file"] > 0
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        data.open_mixture({"g": (1.0, ["absent"])}, str(tmp_path))
