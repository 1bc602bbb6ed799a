"""Formatting records into training examples: token layout against transformers' Molmo2Processor and
hand-written chat strings, loss targets and weights by hand, message trees, style prefixes, truncation."""

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

import data

TOK = data.get_tokenizer()


def image(seed, height, width):
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


def record(annotations, **media):
    """annotations: [(style, [(prompt, answer), ...]), ...]"""
    return {"id": "test", **media, "annotations": [
        {"style": style, "messages": [m for q, a in turns for m in ({"role": "user", "content": q},
                                                                      {"role": "assistant", "content": a})]}
        for style, turns in annotations]}


@pytest.fixture(scope="module")
def hf_processor(hf_qwen_tokenizer):
    """transformers' Molmo2Processor with the released token settings and Molmo2's BOS (<|im_end|>)."""
    from transformers import Molmo2ImageProcessor, Molmo2Processor, Molmo2VideoProcessor
    tokenizer = copy.deepcopy(hf_qwen_tokenizer)
    tokenizer.eos_token = "<|im_end|>"
    return Molmo2Processor(image_processor=Molmo2ImageProcessor(), video_processor=Molmo2VideoProcessor(),
                           tokenizer=tokenizer, use_single_crop_col_tokens=False)


def loss_span(example):
    """(decoded loss targets, their weights)"""
    has_loss = example.targets >= 0
    return TOK.decode(example.targets[has_loss].tolist()), example.loss_weights[has_loss]


def test_text_example_by_hand(hf_qwen_tokenizer):
    ex = data.format_example(record([("short_answer", [("What is 2+2?", "It is 4.")])]))
    text = ("<|im_end|><|im_start|>user\nshort_answer: What is 2+2?<|im_end|>\n<|im_start|>assistant\n"
            "It is 4.<|im_end|>")
    ids = hf_qwen_tokenizer(text)["input_ids"]
    assert ex.input_ids.tolist() == ids[:-1]  # the closing <|im_end|> is only a target
    n_answer = len(hf_qwen_tokenizer("It is 4.")["input_ids"]) + 1  # + <|im_end|>
    expected_targets = [-1] * (len(ids) - 1 - n_answer) + ids[-n_answer:]
    assert ex.targets.tolist() == expected_targets
    assert loss_span(ex)[0] == "It is 4.<|im_end|>"
    assert torch.allclose(ex.loss_weights[ex.targets >= 0], torch.full((n_answer,), 2 / math.sqrt(n_answer)))
    assert (ex.loss_weights[ex.targets < 0] == 0).all()
    assert ex.position_ids.tolist() == list(range(len(ids) - 1))
    assert ex.branch_ids.tolist() == [0] + [1] * (len(ids) - 2)  # BOS is the (empty-media) shared prefix
    assert not ex.is_vision.any() and ex.pixel_values is None and ex.n_crops == 0


def test_multi_turn_follows_the_chat_template(hf_qwen_tokenizer):
    ex = data.format_example(record([("user_qa", [("Hi", "Hello!"), ("And?", "Bye.")])]))
    text = ("<|im_end|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
            "<|im_start|>user\nAnd?<|im_end|>\n<|im_start|>assistant\nBye.<|im_end|>")
    ids = hf_qwen_tokenizer(text)["input_ids"]
    assert ex.input_ids.tolist() == ids[:-1]
    targets, weights = loss_span(ex)
    assert targets == "Hello!<|im_end|>Bye.<|im_end|>"  # both answers, each with its <|im_end|>
    assert torch.allclose(weights, torch.full_like(weights, 2 / math.sqrt(len(weights))))  # one conversation


def test_prompt_text_cannot_inject_special_tokens():
    ex = data.format_example(record([("user_qa", [("<|im_end|><im_patch>", "ok")])]))
    assert (ex.input_ids == data.IM_END_ID).sum() == 2  # BOS and the end of the user turn only
    assert not ex.is_vision.any()


def test_images_match_transformers_processor(hf_processor):
    prompt = "<|im_start|>user\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    for images, placeholders in (([image(0, 50, 70)], "<|image|>"),
                                 ([image(1, 90, 40), image(2, 30, 30)], "Image 1<|image|>Image 2<|image|>")):
        ex = data.format_example(record([("user_qa", [("What is it?", "A cat.")])], images=images))
        ref = hf_processor(text=placeholders + prompt, images=images, return_tensors="pt")
        n = ref["input_ids"].shape[1]
        assert ex.input_ids[:n].tolist() == ref["input_ids"][0].tolist()
        assert ex.is_vision[:n].long().tolist() == ref["mm_token_type_ids"][0].tolist()
        for key in ("pixel_values", "image_token_pooling", "image_grids", "image_num_crops"):
            assert torch.equal(getattr(ex, key), ref[key]), key
        assert ex.n_crops == len(ref["pixel_values"])
        assert loss_span(ex)[0] == "A cat.<|im_end|>"


def test_video_layout_matches_transformers_video_string(hf_processor):
    frames = [image(i, 30, 40) for i in range(5)]
    times = [0.0, 0.5, 1.0, 1.5, 2.0]  # 2 fps: every frame is kept
    ex = data.format_example(record([("video_long_caption", [("", "Shapes move.")])],
                                    video_frames=frames, video_times=times))
    grid = ex.video_grids[0]
    video_ids = hf_processor.tokenizer(hf_processor.get_video_string(grid, times))["input_ids"]
    assert ex.input_ids[0] == data.IM_END_ID
    assert ex.input_ids[1:1 + len(video_ids)].tolist() == video_ids
    assert ex.input_ids[1 + len(video_ids)] == data.IM_START_ID  # the conversation follows the video
    assert ex.pixel_values_videos.shape[0] == 5 and ex.n_crops == 5
    n_frame_tokens = int(grid[1] * grid[2])
    assert ex.video_token_pooling.shape == (5 * n_frame_tokens, 9)
    assert ex.is_vision.sum() == 5 * (n_frame_tokens + 2)  # patches + frame start/end; timestamps are text
    _, weights = loss_span(ex)
    assert torch.allclose(weights, torch.full_like(weights, 0.1))  # video captions: flat 0.1 in SFT


def test_message_tree_shares_the_prefix_and_restarts_positions():
    images = [image(3, 40, 60)]
    turns = [[("How many?", "Two.")], [("What colour?", "Red and blue, mostly.")]]
    tree = data.format_example(record([("user_qa", t) for t in turns], images=images))
    alone = [data.format_example(record([("user_qa", t)], images=images)) for t in turns]
    n_prefix = int((tree.branch_ids == 0).sum())
    assert n_prefix == int((alone[0].branch_ids == 0).sum())
    assert tree.is_vision[n_prefix:].sum() == 0  # vision tokens only in the shared prefix
    assert len(tree) == n_prefix + sum(len(a) - n_prefix for a in alone)
    for k, a in enumerate(alone, 1):
        in_branch = tree.branch_ids == k
        assert tree.input_ids[in_branch].tolist() == a.input_ids[n_prefix:].tolist()
        assert tree.targets[in_branch].tolist() == a.targets[n_prefix:].tolist()
        assert tree.position_ids[in_branch].tolist() == list(range(n_prefix, len(a)))  # restart after prefix
        # each branch: 2/sqrt(its loss tokens), then 1/sqrt(2 branches)
        assert torch.allclose(tree.loss_weights[in_branch], a.loss_weights[n_prefix:] / math.sqrt(2))
    assert tree.position_ids[:n_prefix].tolist() == list(range(n_prefix))


@pytest.mark.parametrize("style, weighting, expected", [
    ("pointing", "sft", lambda n: 0.2),
    ("video_point_track_per_frame", "sft", lambda n: 0.2),
    ("short_answer", "sft", lambda n: 2 / math.sqrt(n)),
    ("pointing", "sqrt", lambda n: 2 / math.sqrt(n)),
    ("pointing", "none", lambda n: 1.0),
])
def test_loss_weight_rules(style, weighting, expected):
    ex = data.format_example(record([(style, [("Point to the dog.", "<points coords=\"1 1 500 500\">dog</points>")])]),
                             loss_weighting=weighting)
    _, weights = loss_span(ex)
    assert torch.allclose(weights, torch.full_like(weights, expected(len(weights))))


def test_style_prefixes():
    assert data.style_prefix("user_qa", "x", "sft") == ""  # demo style: none
    assert data.style_prefix("a_okvqa_mc", "x", "sft") == ""  # multiple choice: none
    assert data.style_prefix("short_answer", "x", "sft") == "short_answer:"
    assert data.style_prefix("short_answer", "x", "none") == ""
    assert data.style_prefix("pointing", "x", "pretrain") == "pointing:"
    caption = "a" * 1240
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(20):  # Molmo2's style_and_length_v2, drawn by hand from the same generator
        if ref.random() > 0.1:
            expected = f"long_caption {(len(caption) + int(ref.normal(scale=25))) // 15}:"
        else:
            expected = "long_caption:"
        assert data.style_prefix("long_caption", caption, "pretrain", rng) == expected
    rng = np.random.default_rng(0)
    hints = [data.style_prefix("long_caption", caption, "pretrain", rng) for _ in range(2000)]
    assert 0.07 < hints.count("long_caption:") / 2000 < 0.13  # dropped 10% of the time
    lengths = [int(h.split()[1][:-1]) for h in hints if h != "long_caption:"]
    assert abs(np.mean(lengths) - (1240 / 15 - 0.5)) < 0.3  # floor((chars + N(0, 25)) / 15) averages chars/15 - 1/2
    ex = data.format_example(record([("long_caption", [("", caption)])]), style_prefixes="pretrain",
                             rng=np.random.default_rng(1), loss_weighting="none")
    prompt = TOK.decode(ex.input_ids[(ex.input_ids == data.IM_START_ID).nonzero()[0, 0]:].tolist())
    assert prompt.startswith("<|im_start|>user\nlong_caption")
    assert prompt.split("\n")[1].endswith(":<|im_end|>")  # empty prompt: the prefix alone
    with pytest.raises(ValueError, match="rng"):
        data.style_prefix("long_caption", caption, "pretrain")


def test_max_len_keeps_whole_annotations_then_cuts_then_refuses():
    turns = [("Q?", "First answer."), ("Q?", "Second answer."), ("Q?", "Third answer.")]
    full = data.format_example(record([("user_qa", [t]) for t in turns]))
    branch_len = int((full.branch_ids == 1).sum())
    two = data.format_example(record([("user_qa", [t]) for t in turns]), max_len=1 + 2 * branch_len + 2)
    assert two.branch_ids.max() == 2 and len(two) == 1 + 2 * branch_len
    assert torch.allclose(two.loss_weights[two.branch_ids == 1], full.loss_weights[full.branch_ids == 1]
                          * math.sqrt(3) / math.sqrt(2))  # 1/sqrt(branches kept)
    cut = data.format_example(record([("user_qa", [t]) for t in turns]), max_len=branch_len - 2)
    assert len(cut) == branch_len - 2 and cut.branch_ids.max() == 1 and (cut.targets >= 0).any()
    with pytest.raises(data.ExampleTooLong):
        data.format_example(record([("user_qa", [t]) for t in turns]), max_len=5)
