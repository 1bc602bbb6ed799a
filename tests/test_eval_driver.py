"""eval.py's driver: prompts laid out as training lays them out (sample.py's), scoring against hand-worked cases and
against the truth itself, and a whole run on a tiny random checkpoint over a tiny synthetic world."""

import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as E
import prepare_data
import sample
from model import Molmo2, Molmo2Config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    prepare_data.generate_synthetic_world(str(root), seed=3, sizes={"test": {"image": 3, "multi": 2, "video": 2}},
                                          image_size=112, video_size=64, max_objects=4, max_video_objects=3)
    return str(root)


@pytest.fixture(scope="module")
def processor():
    return data.Molmo2Processor(crop_size=56, overlap_margins=(1, 1), max_crops=2, max_frames=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, processor):
    """A training out_dir holding final/: a tiny random Molmo2 and its processor.json."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    Molmo2(Molmo2Config.preset("tiny")).save_pretrained(str(run / "final"))
    data.save_processor_config(str(run / "final"), processor)
    return str(run)


def all_items(world):
    """Every question of the tiny world, media decoded."""
    items = E.evaluation_items(["synth_image", "synth_multi", "synth_video"], world, "test")
    assert not any("images" in record or "video_frames" in record for _, _, record, _ in items)
    return [(source, task, E.with_media(record), annotation) for source, task, record, annotation in items]


def test_prompt_is_the_training_layout_cut_before_the_answer(world, processor):
    tokenizer = processor.tokenizer
    items = all_items(world)
    assert {task for _, task, _, _ in items} == set(E.MAX_NEW_TOKENS) - {"multi-image pointing"}
    for _, _, record, annotation in items:
        training = data.format_example({**record, "annotations": [annotation]}, processor)  # what was trained on
        prompt = sample.prompt_example(record, annotation["messages"][:-1], annotation["style"], processor)
        n = len(prompt)
        assert torch.equal(prompt.input_ids, training.input_ids[:n])
        assert torch.equal(prompt.position_ids, training.position_ids[:n])
        answer = tokenizer.encode(annotation["messages"][-1]["content"], allow_special=False)
        assert (training.targets[:n - 1] < 0).all() and training.targets[n - 1] == answer[0]
        question = annotation["messages"][-2]["content"]
        prefix = data.style_prefix(annotation["style"], "", "sft")
        assert tokenizer.decode(prompt.input_ids.tolist()).endswith(
            f"<|im_start|>user\n{prefix + ' ' if prefix else ''}{question}<|im_end|>\n<|im_start|>assistant\n")
        for key in ("pixel_values", "pixel_values_videos"):
            assert (getattr(prompt, key) is None) == (getattr(training, key) is None)


def test_collate_prompts_left_pads_and_keeps_vision_in_order(world, processor):
    items = [item for item in all_items(world) if "images" in item[2]][:3]
    examples = [sample.prompt_example(r, a["messages"][:-1], a["style"], processor) for _, _, r, a in items]
    batch = sample.collate_prompts(examples)
    L = max(len(e) for e in examples)
    for b, example in enumerate(examples):
        n = len(example)
        assert batch["attention_mask"][b].tolist() == [0] * (L - n) + [1] * n
        assert torch.equal(batch["input_ids"][b, L - n:], example.input_ids)
        assert (batch["input_ids"][b, :L - n] == data.ENDOFTEXT_ID).all()
        assert torch.equal(batch["mm_token_type_ids"][b, L - n:], example.is_vision.long())
    assert torch.equal(batch["pixel_values"], torch.cat([e.pixel_values for e in examples]))
    assert int((batch["input_ids"] == data.IMAGE_PATCH_ID).sum()) == len(batch["image_token_pooling"])


def test_batched_answers_equal_answers_alone(world, processor, checkpoint):
    model, _, _ = sample.load_model(checkpoint)
    items = [item for item in all_items(world) if item[1] in ("counting", "multi-image counting")]
    examples = [sample.prompt_example(r, a["messages"][:-1], a["style"], processor) for _, _, r, a in items]
    assert len({len(e) for e in examples}) > 1
    together = sample.generate_answers(model, processor, examples, 6)
    assert together == [sample.generate_answers(model, processor, [e], 6)[0] for e in examples]


def hand_record(scene=True):
    record = {"id": "hand", "images": [Image.new("RGB", (200, 100))]}
    if scene:  # radii 0.05 and 0.1 of the width: 10 and 20 px
        record["scene"] = {"shapes": [{"x": 0.25, "y": 0.5, "radius": 0.05}, {"x": 0.75, "y": 0.5, "radius": 0.1}]}
    return record


def test_pointing_radius_comes_from_each_shape():
    truth = data.image_points_tag([(0.25, 0.5), (0.75, 0.5)], "dots")
    # 10.2 px from the small shape (radius 10: a miss), 18 px from the large one (radius 20: a hit)
    pred = data.image_points_tag([(0.301, 0.5), (0.84, 0.5)], "dots")
    scores, drawing = E.score_answer("pointing", pred, truth, hand_record())
    assert scores == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert drawing["true"] == [(50.0, 50.0), (150.0, 50.0)]  # pixels of the 200 x 100 image
    assert np.allclose(drawing["pred"], [(60.2, 50.0), (168.0, 50.0)])
    # no scene: one radius for all, point_radius x the longer side (0.06 x 200 = 12 px): the first hits now
    scores, _ = E.score_answer("pointing", pred, truth, hand_record(scene=False), point_radius=0.06)
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5
    scores, _ = E.score_answer("pointing", pred, truth, hand_record(scene=False), point_radius=0.1)  # 20 px
    assert scores["f1"] == 1.0


def test_counting_vqa_and_unscoreable_captions():
    record = hand_record()
    truth = "Counting the <points coords=\"1 1 250 500 2 750 500\">dots</points> shows a total of 2."
    assert E.score_answer("counting", "There are 2 dots.", truth, record)[0]["correct"] == 1.0
    assert E.score_answer("counting", "There are none.", truth, record)[0]["correct"] == 0.0
    assert E.score_answer("vqa", "Yes.", "yes", record)[0] == {"exact_match": 1.0}
    scores, _ = E.score_answer("captions", "a dog", "a cat", hand_record(scene=False))
    assert scores is None  # no scene lists the objects


def test_the_truth_scores_perfectly_on_every_task(world, processor, monkeypatch):
    items = all_items(world)

    def key(prompt):  # same-size images give the same token ids: the pixels tell the records apart
        pixels = prompt.pixel_values if prompt.pixel_values is not None else prompt.pixel_values_videos
        return tuple(prompt.input_ids.tolist()), pixels.numpy().tobytes()

    truth_of = {}
    for _, _, record, annotation in items:
        prompt = sample.prompt_example(record, annotation["messages"][:-1], annotation["style"], processor)
        truth_of[key(prompt)] = annotation["messages"][-1]["content"]
    assert len(truth_of) == len(items)

    def oracle(model, processor, examples, max_new_tokens, **kwargs):
        return [truth_of[key(e)] for e in examples]

    monkeypatch.setattr(E, "generate_answers", oracle)
    rows = E.evaluate(None, processor, items, batch_size=2, log=lambda *a: None)
    assert len(rows) == len(items) and all(row["scores"] is not None for row in rows)
    main = {"counting": "correct", "multi-image counting": "correct", "video counting": "correct",
            "pointing": "f1", "video pointing": "f1", "tracking": "idf1", "captions": "recall", "vqa": "exact_match"}
    for task, by_source in E.summarize(rows).items():
        for scores in by_source.values():
            assert scores[main[task]] == 1.0, task
    assert E.headline(rows) == {"counting_accuracy": 1.0, "pointing_f1": 1.0}


def run_eval(monkeypatch, *args):
    """`python eval.py args` in this process, with the knobs' defaults each time."""
    monkeypatch.setattr(sys, "argv", ["eval.py", *args])
    runpy.run_path(E.__file__, run_name="__main__")


def test_main_writes_report_metrics_and_pictures(world, checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    run_eval(monkeypatch, f"--init_from={checkpoint}", f"--data_dir={world}", f"--out_dir={out}", "--max_new_tokens=3",
             "--max_examples=2", "--batch_size=4")
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"counting_accuracy", "pointing_f1"} <= set(metrics) and "counting" in metrics["results"]
    report = (out / "report.md").read_text()
    for task in ("counting", "pointing", "captions", "vqa", "tracking", "video pointing", "multi-image counting"):
        assert f"## {task}\n" in report
    pictures = [f for f in os.listdir(out) if f.endswith((".png", ".gif"))]
    assert "pointing_synth_image_test.png" in pictures and any(f.startswith("tracking_") for f in pictures)
    for f in pictures:
        assert f"]({f})" in report
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == metrics["n_questions"]
    assert "counting_accuracy" in capsys.readouterr().out


def test_missing_checkpoint_says_how_to_get_one(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="make demo"):
        sample.resolve_model_dir(str(tmp_path))
    with pytest.raises(SystemExit, match="unknown"):
        run_eval(monkeypatch, "--tasks=['countin']")


def test_processor_settings_round_trip_and_fallbacks(tmp_path, processor):
    data.save_processor_config(str(tmp_path), processor)
    loaded = data.load_processor(str(tmp_path))
    for key in data.PROCESSOR_SETTINGS:
        assert getattr(loaded, key) == getattr(processor, key), key
    released = data.load_processor(str(tmp_path / "none"))  # no processor.json, 378-px crops
    assert (released.crop_size, released.overlap_margins, released.max_crops) == (378, (4, 4), 8)
    small = data.load_processor(str(tmp_path / "none"), crop_size=112)  # train_joint.py's small presets
    assert (small.overlap_margins, small.max_crops, small.max_frames) == ((2, 2), 4, 8)
    (tmp_path / "processor.json").write_text('{"max_crop": 3}')
    with pytest.raises(ValueError, match="max_crop"):
        data.load_processor(str(tmp_path))


def test_scene_lookup_for_video_uses_the_frame_at_that_time(world):
    record = next(r for _, t, r, _ in all_items(world) if t == "tracking")
    shapes = record["scene"]["shapes"]
    f, k = next((f, k) for k, s in enumerate(shapes) for f, xy in enumerate(s["track"]) if xy is not None)
    t = record["scene"]["frame_times"][f]
    got = E._scene_shapes(record, t)
    assert (*shapes[k]["track"][f], shapes[k]["radius"]) in got
    assert len(got) == sum(s["track"][f] is not None for s in shapes)
    assert np.isclose(E._true_radius(record, data.Point(t, 1, *shapes[k]["track"][f]), 0.05),
                      shapes[k]["radius"] * 64)


def test_undecodable_media_skip_their_questions(tmp_path, processor, checkpoint):
    Image.new("RGB", (60, 40), (200, 30, 30)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    qa = [{"style": "short_answer", "messages": [{"role": "user", "content": "Colour?"},
                                                 {"role": "assistant", "content": "red"}]}]
    with open(tmp_path / "bench.jsonl", "w") as f:
        for name in ("good.png", "bad.png"):
            f.write(json.dumps({"image": name, "annotations": qa}) + "\n")
    items = E.evaluation_items([str(tmp_path / "bench.jsonl")], str(tmp_path), "test")
    assert len(items) == 2
    model, _, _ = sample.load_model(checkpoint)
    report = data.SkipReport()
    rows = E.evaluate(model, processor, items, max_new_tokens=2, log=lambda *a: None, report=report)
    assert [row["record"]["image"][0].endswith("good.png") for row in rows] == [True]
    assert report.counts == {"undecodable_image": 1}


def test_empty_scene_caption_scores_when_nothing_is_named():
    record = {"images": [Image.new("RGB", (50, 50))], "scene": {"shapes": []}}
    scores, _ = E.score_answer("captions", "An empty image with no shapes on it.", "", record)
    assert scores == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    scores, _ = E.score_answer("captions", "A red circle on the left.", "", record)
    assert scores["precision"] == 0.0


def test_a_kept_token_model_skips_the_questions_it_has_no_words_for(world, processor):
    """A model trained on the single images (--vocab=data over synth_image) is asked only what it can read: the
    questions whose every token (by the tokenizer alone) it has rows for; the log says how many were left out."""
    kept = data.record_token_ids(world, {"image": (1.0, ["synth_image"])})
    torch.manual_seed(0)
    model = Molmo2(Molmo2Config.preset("tiny").keep_tokens(kept))
    items = E.evaluation_items(["synth_image", "synth_multi", "synth_video"], world, "test")
    readable = [item for item in items
                if set(processor.tokenizer.encode(item[3]["messages"][-2]["content"])) <= set(kept)]
    assert 0 < len(readable) < len(items)
    logged = []
    assert E.known_items(model, processor, items, "sft", logged.append) == readable
    assert logged[0].startswith(f"{len(items) - len(readable)} of {len(items)} questions skipped: this model has "
                                f"rows only for the {len(kept)} tokens of its training data")
    full = Molmo2(Molmo2Config.preset("tiny"))
    assert E.known_items(full, processor, items, "sft") == items


def test_defaults_fall_back_to_what_make_demo_wrote(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    default, demo_dir = sample.DEFAULT_INIT_FROM, sample.DEMO_INIT_FROM
    demo = tmp_path / demo_dir / "final"
    demo.mkdir(parents=True)
    (demo / "config.json").write_text("{}")
    assert sample.or_demo(default, default, demo_dir, sample.local_model_dir) == demo_dir
    assert "(nothing in out/joint; using out/demo/joint, which make demo wrote)" in capsys.readouterr().out
    assert sample.or_demo("out/mine", default, demo_dir, sample.local_model_dir) == "out/mine"  # asked for
    (tmp_path / "out" / "joint").mkdir()
    (tmp_path / "out" / "joint" / "config.json").write_text("{}")  # the usual default holds a model again
    assert sample.or_demo(default, default, demo_dir, sample.local_model_dir) == default


def test_missing_inputs_stop_with_advice_that_names_the_command(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # neither out/joint nor make demo's out/demo/joint
    python = sample.python_command()
    with pytest.raises(SystemExit, match=f"no trained model there, nor in out/demo/joint .*Run `make demo`.*"
                                         f"`{python} prepare_data.py --dataset=synthetic`, then "
                                         f"`{python} train_joint.py --out_dir=out/joint`"):
        run_eval(monkeypatch, f"--data_dir={world}")
    with pytest.raises(SystemExit, match="dataset 'x.jsonl': no such file"):
        run_eval(monkeypatch, "--datasets=['x.jsonl']")
    with pytest.raises(SystemExit, match=f"dataset 'synth_video': no '{tmp_path}/synth_video/test.jsonl' "
                                         f"\\(`{python} prepare_data.py --dataset=synthetic --out={tmp_path}` "
                                         "makes it"):
        run_eval(monkeypatch, f"--data_dir={tmp_path}", "--datasets=['synth_video']")
