"""sample.py --explain=True: the attention it records against transformers' eager attention (the oracle), the places
of crops, patches and pooled tokens worked out by hand, the heat map and the shapes-against-background measure on
hand-made weights, the answer's point tokens, and the pictures written, named and announced by a run."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import model as nano
import sample
from test_molmo2 import hf_model, ours, processor, processor_inputs  # noqa: F401  (module fixtures reused)
from test_sample import checkpoint, scene_image  # noqa: F401

# -- where it looked: the recorded attention is transformers' --------------------------------------------------


def generate_watched(model, inputs, n_new, layers=()):
    """Greedy tokens after the prompt, with an AttentionRecorder on -> (new ids (1, n), its rows, its mask)."""
    inputs = dict(inputs)
    input_ids, attention_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    with sample.AttentionRecorder(model.llm, layers) as recorder:
        new = nano.generate(model, input_ids, n_new, attention_mask=attention_mask, stop_ids=(), **inputs)
    return new, recorder.rows(), recorder.prompt_mask


@pytest.mark.parametrize("layers", [(), (-1,)])
def test_recorded_attention_is_transformers_eager_attention(hf_model, ours, processor, layers):
    """For the query that writes each new token (the prompt's last token, then each new one), the recorded weights
    over all earlier tokens equal transformers' eager attention probabilities, averaged over heads and layers."""
    hf, _ = hf_model
    inputs = processor_inputs(processor, "one image")
    args = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    plain = nano.generate(ours, inputs["input_ids"], 4, attention_mask=inputs["attention_mask"], stop_ids=(), **args)
    new, rows, prompt_mask = generate_watched(ours, inputs, 4, layers)
    assert torch.equal(new, plain), "the hooks must not change the answer"
    T = inputs["input_ids"].shape[1]
    full = torch.cat([inputs["input_ids"], new[:, :3]], 1)  # the prompt and the tokens fed back while decoding
    pad = torch.zeros(1, 3, dtype=torch.long)
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = hf(**{**inputs, "input_ids": full, "attention_mask": torch.ones_like(full),
                        "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], pad], 1)}, output_attentions=True)
    finally:
        hf.set_attn_implementation("sdpa")
    chosen = [out.attentions[i % len(out.attentions)] for i in (layers or range(len(out.attentions)))]
    expected = torch.stack(chosen).mean(0).mean(1)  # (1, L, L): mean over layers and heads
    assert len(rows) == 4
    for i, row in enumerate(rows):
        assert row.shape == (1, T + i)
        # float32 softmax weights in [0, 1], recomputed from cached keys vs transformers' eager attention
        torch.testing.assert_close(row, expected[:, T - 1 + i, :T + i], atol=2e-6, rtol=1e-4)
    assert torch.equal(prompt_mask, ours.vision_attention_mask(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                               inputs["attention_mask"])[:, 0])
    assert prompt_mask[0, 1:].float().mean() < 1 and prompt_mask[0, 1, -1].item() is False  # vision sees no text


def test_layers_out_of_range_are_refused(ours):
    with pytest.raises(ValueError, match=r"explain_layers \(2,\): the LLM has layers 0..1"):
        sample.AttentionRecorder(ours.llm, (2,))


# -- the places of crops, patches and pooled tokens ------------------------------------------------------------

PROCESSOR = data.Molmo2Processor(crop_size=56, overlap_margins=(1, 1), max_crops=4)


def example_for(images, processor=PROCESSOR, question="How many?"):
    record = {"id": "x", "images": images}
    return sample.prompt_example(record, [{"role": "user", "content": question}], "demo", processor)


def test_layout_worked_by_hand():
    """A 130 x 90 image, 56-px crops of 4 x 4 patches, margins of 1 patch: windows of 2 patches (28 px), so the
    tiling is 2 x 2 on an 84 x 84 canvas (select_tiling: the least downscaling when every tiling downscales), the
    crops at 0 and 28 px. The global crop gives 2 x 2 tokens, the stitched 6 x 6 patch grid 3 x 3."""
    example = example_for([Image.new("RGB", (130, 90))])
    crops, tokens, views = sample.vision_layout(example, [(130, 90)], PROCESSOR)
    assert [(c["view"], c["origin"]) for c in crops] == [("global", (0, 0)), ("crops", (0, 0)), ("crops", (28, 0)),
                                                          ("crops", (0, 28)), ("crops", (28, 28))]
    assert views == {(0, "global"): (56, 56), (0, "crops"): (84, 84)}
    assert [t["view"] for t in tokens] == ["global"] * 4 + ["crops"] * 9
    assert tokens[0]["box"] == (0, 0, 28, 28) and tokens[3]["box"] == (28, 28, 56, 56)
    assert tokens[4]["box"] == (0, 0, 28, 28) and tokens[12]["box"] == (56, 56, 84, 84)
    # the top-left crop keeps its first 3 patch rows and columns (its right/bottom margin is its neighbour's)
    assert crops[1]["read"] == {0, 1, 2, 4, 5, 6, 8, 9, 10}
    assert crops[4]["read"] == {5, 6, 7, 9, 10, 11, 13, 14, 15}
    assert sample.image_box(tokens[4], views, [(130, 90)]) == pytest.approx((0, 0, 130 / 3, 30))
    assert sample.image_box(tokens[0], views, [(130, 90)]) == pytest.approx((0, 0, 65, 45))


@pytest.mark.parametrize("size", [(130, 90), (57, 200), (56, 56), (300, 41)])
def test_pooled_tokens_tile_every_view_once(size):
    """Each view is covered by its tokens' windows exactly once: the stitched crops leave no gap and read no pixel
    twice (whatever the tiling, odd grids padded with -1 included)."""
    example = example_for([Image.new("RGB", size)])
    crops, tokens, views = sample.vision_layout(example, [size], PROCESSOR)
    assert len(tokens) == int((example.input_ids == data.IMAGE_PATCH_ID).sum())
    for (media, view), (width, height) in views.items():
        cover = np.zeros((height, width), dtype=int)
        for token in tokens:
            if token["view"] == view:
                x0, y0, x1, y1 = token["box"]
                cover[y0:y1, x0:x1] += 1
        assert (cover == 1).all(), (size, view)


def test_crop_pixels_are_the_image_as_the_vit_got_it():
    """A 112 x 56 image, red on its left half and blue on its right: the global crop (the whole image squeezed
    into 56 x 56) is red on the left and blue on the right, row after row, as the patches flatten (ph, pw, c)."""
    pixels = np.zeros((56, 112, 3), dtype=np.uint8)
    pixels[:, :56] = (255, 0, 0)
    pixels[:, 56:] = (0, 0, 255)
    example = example_for([Image.fromarray(pixels)])
    crop = sample.crop_pixels(example.pixel_values[0], 14)
    assert crop.shape == (56, 56, 3)
    assert (crop[:, :27] == (255, 0, 0)).all() and (crop[:, 29:] == (0, 0, 255)).all()


def test_heat_map_spreads_a_tokens_attention_over_its_window():
    example = example_for([Image.new("RGB", (130, 90))])
    _, tokens, views = sample.vision_layout(example, [(130, 90)], PROCESSOR)
    one_hot = np.zeros(len(tokens))
    one_hot[6] = 1.0  # a crop token: image box (86.7, 0, 130, 30)
    (heat,) = sample.heat_maps(tokens, views, [(130, 90)], one_hot)
    ys, xs = np.nonzero(heat)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (87, 130, 0, 30)
    uniform = np.full(len(tokens), 1 / len(tokens))
    (heat,) = sample.heat_maps(tokens, views, [(130, 90)], uniform, scales=0.5)
    assert heat.shape == (45, 65) and heat.sum() == pytest.approx(1.0)  # attention is moved, never made or lost


def test_attention_on_shapes_worked_by_hand():
    """An 84 x 84 image tiles exactly into 2 x 2 crops (canvas = image): crop tokens are 28-px squares, global
    tokens 42-px squares. A shape of radius 5 px at (14, 14) lies in global token 0 and crop token 4 alone."""
    example = example_for([Image.new("RGB", (84, 84))])
    _, tokens, views = sample.vision_layout(example, [(84, 84)], PROCESSOR)
    weights = np.arange(13, dtype=float)
    shape = (14 / 84, 14 / 84, 5 / 84)
    on_shapes, background = sample.attention_on_shapes(tokens, views, [(84, 84)], weights, [shape])
    assert on_shapes == (0 + 4) / 2 and background == pytest.approx((78 - 4) / 11)
    # a second, uncounted shape at (70, 70): global token 3 and crop token 12 leave the background
    other = (70 / 84, 70 / 84, 5 / 84)
    _, background = sample.attention_on_shapes(tokens, views, [(84, 84)], weights, [shape], [other])
    assert background == pytest.approx((78 - 4 - 3 - 12) / 9)


# -- the answer's points and the prompt's tokens ---------------------------------------------------------------


def test_point_tokens_are_the_tokens_that_write_each_point():
    tokenizer = data.get_tokenizer()
    answer = 'Counting the <points coords="1 1 067 701 2 095 909">red circles</points> shows a total of 2.'
    ids = tokenizer.encode(answer)
    points = sample.point_token_spans(ids, tokenizer)
    assert [(f, x, y) for f, x, y, _ in points] == [(1, 0.067, 0.701), (1, 0.095, 0.909)]
    for (_, _, _, spans), text in zip(points, ["1 067 701", "2 095 909"]):
        assert spans == list(range(spans[0], spans[-1] + 1))
        assert tokenizer.decode([ids[i] for i in spans]).strip() == text
    video = data.video_points_tag([0.5, 1.0], [[(0.1, 0.2)], [(0.3, 0.4)]], "balls")
    assert [(f, x, y) for f, x, y, _ in sample.point_token_spans(tokenizer.encode(video), tokenizer)] == [
        (0.5, 0.1, 0.2), (1.0, 0.3, 0.4)]
    odd = tokenizer.encode('<points coords="1 1 067 2 3 1500 20 4">x</points>')  # a point off the scale, a stray
    assert [(f, x, y) for f, x, y, _ in sample.point_token_spans(odd, tokenizer)] == [(1, 0.067, 0.002)]


def test_token_kinds_of_two_images_and_a_video():
    example = example_for([Image.new("RGB", (130, 90)), Image.new("RGB", (56, 56))])
    kinds = sample.token_kinds(example.input_ids)
    grids = example.image_grids.tolist()  # (low_h, low_w, high_h, high_w) per image
    assert kinds[0] == "bos" and kinds.count("low_start") == 2 and kinds.count("start") == 2
    assert kinds.count("global") == sum(a * b for a, b, _, _ in grids)
    assert kinds.count("patch") == sum(c * d for _, _, c, d in grids) and kinds.count("col") == sum(g[2] for g in grids)
    tokenizer = data.get_tokenizer()
    labels = [i for i, k in zip(example.input_ids.tolist(), kinds) if k == "label"]
    assert tokenizer.decode(labels) == "Image 1Image 2"
    frames = [Image.new("RGB", (64, 48), (40 * i, 80, 120)) for i in range(3)]
    processor = data.Molmo2Processor(crop_size=56, overlap_margins=(1, 1), max_frames=8)
    record = {"id": "v", "video": "v", "video_frames": frames, "video_times": [0.0, 0.5, 1.0]}
    video = sample.prompt_example(record, [{"role": "user", "content": "What moves?"}], "demo", processor)
    assert sample.frame_times(video.input_ids, tokenizer) == [0.0, 0.5, 1.0]
    assert sample.token_kinds(video.input_ids).count("patch") == 3 * 4  # 4 x 4 patches pooled 3 x 3: 2 x 2


# -- a run: the pictures, their names and their lines ----------------------------------------------------------


def forced(answer_ids, monkeypatch):
    """Make generation write `answer_ids` (then <|im_end|>) through the real prefill and decoding steps."""
    queue = list(answer_ids) + [data.IM_END_ID]
    monkeypatch.setattr(nano, "sample_next", lambda logits, *a, **k: torch.tensor([queue.pop(0)]))


def test_explain_run_writes_and_names_each_picture(checkpoint, scene_image, tmp_path, monkeypatch, capsys):
    scene, path = scene_image
    model, processor, _ = sample.load_model(checkpoint)
    record = sample.media_record([path], "", processor)
    monkeypatch.setattr(sample, "out_dir", str(tmp_path))
    monkeypatch.setattr(sample, "explain", True)
    (tmp_path / "answer4.png").write_bytes(b"")  # an earlier run's picture: this run is answer5
    answer = 'Counting the <points coords="1 1 250 300 2 700 650">things</points> shows a total of 2.'
    forced(processor.tokenizer.encode(answer), monkeypatch)
    assert sample.ask(model, processor, record, "How many things?", 1) == answer
    printed = capsys.readouterr().out
    names = ["tokens", "mask", "crops", "pooling", "looked"]
    for name in names:
        picture = tmp_path / "explain" / f"answer5_{name}.png"
        assert f"  {picture}: " in printed
        with Image.open(picture) as image:
            assert image.size[0] > 100 and image.size[1] > 100
    assert (tmp_path / "answer5.png").exists()  # the points, as without --explain
    forced(processor.tokenizer.encode("Two."), monkeypatch)
    sample.ask(model, processor, record, "How many things?", 2)
    assert sorted(os.listdir(tmp_path / "explain")) == sorted(f"answer{k}_{n}.png" for k in (5, 6) for n in names)


def test_looked_picture_is_bright_where_the_attention_went(tmp_path):
    """All attention on one crop token: in the drawn panel, that token's window is the brightest part."""
    example = example_for([Image.new("RGB", (84, 84), (128, 128, 128))])
    _, tokens, views = sample.vision_layout(example, [(84, 84)], PROCESSOR)
    weights = np.zeros(len(tokens))
    weights[12] = 1.0  # the bottom-right crop token: pixels 56..84 both ways
    png = sample.picture_looked([("one token", weights, [])], tokens, views, [(84, 84)],
                                [Image.new("RGB", (84, 84), (128, 128, 128))], str(tmp_path / "l.png"), "t", height=84)
    drawn = np.asarray(Image.open(png).convert("L"), dtype=float)
    panel = drawn[50:134, 10:94]  # under save_panels' title (30 px) and caption (20 px), 10 px in
    assert panel[60:84, 60:84].mean() > 200 and panel[:50, :50].mean() < 60
    assert math.isclose(panel[70, 70], panel.max())
