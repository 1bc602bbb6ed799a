"""sample.py: its command line, the pictures of an answer's points (checked by their pixels against the
synthetic scene's shape centres), streaming, and a run end to end on a tiny random checkpoint."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import prepare_data
import sample
from model import Molmo2, Molmo2Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_media_arguments_both_forms_and_repeats():
    images, videos, rest = sample.split_media_args(["--image", "a.jpg", "--prompt=Hi there", "--image=b.png",
                                                    "--temperature=0.5"])
    assert images == ["a.jpg", "b.png"] and videos == [] and rest == ["--prompt=Hi there", "--temperature=0.5"]
    assert sample.split_media_args(["--video", "clip.gif"])[1] == ["clip.gif"]
    with pytest.raises(SystemExit, match="expected a path"):
        sample.split_media_args(["--image", "--prompt=x"])
    with pytest.raises(SystemExit, match="one --video"):
        sample.split_media_args(["--image=a.jpg", "--video=b.gif"])


@pytest.fixture
def scene_image(tmp_path):
    """A rendered synthetic scene (the oracle for where each shape is) saved as a PNG."""
    rng = prepare_data._example_rng(0, "test", "image", 5)
    scene = prepare_data.make_image_scene(rng, max_objects=5, n_matching=3)
    path = tmp_path / "scene.png"
    prepare_data.render_scene(scene, 160, 120).save(path)
    return scene, str(path)


def test_points_drawn_where_the_shapes_are(scene_image, tmp_path, monkeypatch, capsys):
    scene, path = scene_image
    monkeypatch.setattr(sample, "out_dir", str(tmp_path / "out"))
    centres = [(s["x"], s["y"]) for s in scene["shapes"] if prepare_data.shape_matches(s, scene["query"])]
    answer = data.pointing_answer(data.image_points_tag(centres, "things"), len(centres), with_count=True)
    record = sample.media_record([path], "", None)
    (png,) = sample.show_points(answer, record, str(tmp_path / "out" / "answer1"))
    drawn = np.asarray(Image.open(png).convert("RGB"))
    factor = drawn.shape[1] // 160  # small images are upscaled before drawing
    assert drawn.shape[:2] == (120 * factor, 160 * factor)
    printed = capsys.readouterr().out
    for x, y in centres:
        # the answer's 0..1000 integers, back in pixels of the 160 x 120 image
        px, py = round(x * 1000) / 1000 * 160, round(y * 1000) / 1000 * 120
        assert tuple(drawn[round(py * factor), round(px * factor)]) == sample.PRED_COLOR
        assert f"x={px:.1f}  y={py:.1f}" in printed


def test_several_images_get_a_picture_each(scene_image, tmp_path, monkeypatch):
    _, path = scene_image
    monkeypatch.setattr(sample, "out_dir", str(tmp_path))
    answer = data.multi_image_points_tag([[(0.25, 0.5)], [(0.75, 0.25)]], "dots")
    record = sample.media_record([path, path], "", None)
    first, second = sample.show_points(answer, record, str(tmp_path / "a"))
    for png, (x, y) in ((first, (0.25, 0.5)), (second, (0.75, 0.25))):
        drawn = np.asarray(Image.open(png).convert("RGB"))
        factor = drawn.shape[1] // 160
        assert tuple(drawn[round(y * 120 * factor), round(x * 160 * factor)]) == sample.PRED_COLOR
    assert (first, second) == (str(tmp_path / "a_image1.png"), str(tmp_path / "a_image2.png"))


def test_video_tracks_make_a_gif(tmp_path, monkeypatch):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 48), (40 * i, 80, 120)).save(frames / f"{i:03d}.png")
    monkeypatch.setattr(sample, "out_dir", str(tmp_path))
    processor = data.Molmo2Processor(crop_size=56, overlap_margins=(1, 1), max_frames=8)
    record = sample.media_record([], str(frames), processor)  # a folder of frames at video_fps = 2
    assert record["video_times"] == [0.0, 0.5, 1.0, 1.5] and len(record["video_frames"]) == 4
    answer = data.video_tracks_tag([(0.0, {"a": (0.5, 0.5)}), (0.5, {"a": (0.6, 0.5)})], "ball")
    (gif,) = sample.show_points(answer, record, str(tmp_path / "v"))
    with Image.open(gif) as animation:
        assert animation.n_frames == 4


def test_streamer_prints_whole_characters(capsys):
    tokenizer = data.get_tokenizer()
    text = "Sí 🙂 ok"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # the emoji spans several byte-level tokens
    streamer = sample.Streamer(tokenizer)
    pieces = []
    for step, token in enumerate(ids + [data.IM_END_ID]):
        streamer(step, torch.tensor([token]))
        pieces.append(capsys.readouterr().out)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    Molmo2(Molmo2Config.preset("tiny")).save_pretrained(str(run / "final"))
    data.save_processor_config(str(run / "final"),
                               data.Molmo2Processor(crop_size=56, overlap_margins=(1, 1), max_crops=2, max_frames=4))
    return str(run)


def test_command_line_end_to_end(checkpoint, scene_image, tmp_path):
    _, path = scene_image
    run = subprocess.run([sys.executable, "sample.py", "--image", path, f"--init_from={checkpoint}",
                          "--max_new_tokens=3", f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "> Describe this image in detail." in run.stdout and "(3 tokens in" in run.stdout
    missing = subprocess.run([sys.executable, "sample.py", "--image", path, f"--init_from={tmp_path}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "make demo" in missing.stderr


def test_interactive_keeps_the_model_and_switches_media(checkpoint, scene_image, tmp_path, monkeypatch, capsys):
    _, path = scene_image
    model, processor, _ = sample.load_model(checkpoint)
    monkeypatch.setattr(sample, "max_new_tokens", 2)
    monkeypatch.setattr(sample, "out_dir", str(tmp_path))
    lines = iter(["How many?", f":image {path} {path}", "Which has more?", ":video missing.gif", ":quit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    asked = []
    real_ask = sample.ask
    monkeypatch.setattr(sample, "ask", lambda m, p, record, q, n: asked.append((len(record["images"]), q))
                        or real_ask(m, p, record, q, n))
    sample.interact(model, processor, sample.media_record([path], "", processor))
    assert asked == [(1, "How many?"), (2, "Which has more?")]
    assert "cannot use missing.gif" in capsys.readouterr().out


def kept_token_model(processor, record, questions):
    """A tiny random model with rows only for the tokens of these questions' prompts (and Qwen3's specials), as
    --vocab=data builds from a world's records."""
    kept = set(range(151643, 151936))
    for question in questions:
        example = sample.prompt_example(record, [{"role": "user", "content": question}], sample.style, processor)
        kept |= {i for i in example.input_ids.tolist() if i < 151936}
    torch.manual_seed(0)
    return Molmo2(Molmo2Config.preset("tiny").keep_tokens(sorted(kept)))


def test_a_kept_token_model_names_the_words_it_does_not_know(scene_image, tmp_path, monkeypatch, capsys):
    """A model with rows for some tokens only (--vocab=data): a question with other words gets an error that
    names them (interactive: printed, and the session goes on), not a crash inside the model."""
    _, path = scene_image
    processor = data.Molmo2Processor(crop_size=56, overlap_margins=(1, 1), max_crops=2, max_frames=4)
    record = sample.media_record([path], "", processor)
    known = "How many circles?"
    model = kept_token_model(processor, record, [known])
    monkeypatch.setattr(sample, "max_new_tokens", 2)
    monkeypatch.setattr(sample, "out_dir", str(tmp_path))
    sample.ask(model, processor, record, known, 1)  # every word known: answers
    with pytest.raises(ValueError, match=r"knows only the \d+ tokens of its training data; not ' gir', 'aff', 'es'\n"):
        sample.ask(model, processor, record, "How many giraffes?", 2)
    lines = iter(["How many giraffes?", known, ":quit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    sample.interact(model, processor, record)
    assert "not ' gir', 'aff', 'es'" in capsys.readouterr().out


def test_a_kept_token_model_shows_questions_and_words_it_knows(scene_image, tmp_path, monkeypatch):
    """Trained on part of the synthetic world's questions, the model's refusal lists world questions whose every
    token it has rows for (checked here by the tokenizer alone) and its whole words; its default prompt becomes
    such a question."""
    _, path = scene_image
    processor = data.Molmo2Processor(crop_size=56, overlap_margins=(1, 1), max_crops=2, max_frames=4)
    record = sample.media_record([path], "", processor)
    trained_on = ["How many red circles are there?", "Where are the blue squares?", "Is there a green star?"]
    model = kept_token_model(processor, record, trained_on)
    monkeypatch.setattr(sample, "out_dir", str(tmp_path))
    with pytest.raises(ValueError) as refused:
        sample.ask(model, processor, record, "Point to the cat.", 1)
    lines = str(refused.value).splitlines()
    assert lines[1] == "questions from the synthetic world that it has every word for:"
    listed = [line.strip() for line in lines[2:-1]]
    kept = set(model.config.token_ids)
    assert listed and all(set(processor.tokenizer.encode(q)) <= kept for q in listed)
    assert set(listed) <= set(sample.world_questions("image"))
    # every whole word of the three questions, and no word fragment
    words = "are, blue, circles, green, How, Is, many, red, squares, star, the, there, Where"
    assert lines[-1] == f"the 13 words it knows: {words}"
    assert sample.default_prompt(record, model, processor) == listed[0]  # "Describe this image ..." has no rows
    full = Molmo2(Molmo2Config.preset("tiny"))
    assert sample.default_prompt(record, full, processor) == sample.DEFAULT_PROMPTS["image"]


def test_pictures_never_overwrite_an_earlier_runs(scene_image, tmp_path, monkeypatch, capsys):
    _, path = scene_image
    monkeypatch.setattr(sample, "out_dir", str(tmp_path))
    assert sample.next_picture_stem() == str(tmp_path / "answer1")
    for name in ("answer2.png", "answer9_image2.png", "answer10.gif", "answers.txt", "other12.png"):
        (tmp_path / name).write_bytes(b"")
    assert sample.next_picture_stem() == str(tmp_path / "answer11")
    record = sample.media_record([path], "", None)
    answer = data.image_points_tag([(0.5, 0.5)], "dot")
    (first,) = sample.show_points(answer, record, sample.next_picture_stem())
    (second,) = sample.show_points(answer, record, sample.next_picture_stem())
    assert (first, second) == (str(tmp_path / "answer11.png"), str(tmp_path / "answer12.png"))


def test_points_that_cannot_be_read_or_placed_are_said(scene_image, tmp_path, monkeypatch, capsys):
    _, path = scene_image
    monkeypatch.setattr(sample, "out_dir", str(tmp_path))
    record = sample.media_record([path], "", None)
    # the shape of the answer: values past 1000 and a dangling pair
    assert sample.show_points('<points coords="5 550 8882 8444 12 7">things</points>', record, "x") == []
    out = capsys.readouterr().out
    assert "dropped 2 unreadable part(s) of the answer's points:" in out and "no points left to draw" in out
    pair = sample.media_record([path, path], "", None)
    pictures = sample.show_points('<points coords="1 1 500 500;3 1 200 200">dots</points>', pair, str(tmp_path / "p"))
    assert len(pictures) == 2 and "1 point(s) name an image other than 1..2: not drawn" in capsys.readouterr().out
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 48), (40 * i, 80, 120)).save(frames / f"{i:03d}.png")
    processor = data.Molmo2Processor(crop_size=56, overlap_margins=(1, 1), max_frames=8)
    clip = sample.media_record([], str(frames), processor)  # frames at 0.0 and 0.5 s
    (gif,) = sample.show_points('<points coords="0.5 1 500 500;7.0 1 200 200">dots</points>', clip, str(tmp_path / "v"))
    assert gif.endswith(".gif") and "1 point(s) at times with no frame (the frames are at 0.0, 0.5 s): not drawn" \
        in capsys.readouterr().out
