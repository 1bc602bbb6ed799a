"""Stage 1 (train_vision.py) against hand-worked cases and transformers: the sigmoid loss and its bias and
temperature gradients by hand; the localisation targets (token cells, which cell holds a point, pointed labels,
per-image targets in a batch) on hand-made images and records, with the cells checked against the processor's own
pixels; the uint8 crops bit for bit; the loader's workers and resume; the script itself resumed after SIGKILL and
under 2-process DDP (exact losses); and its export read by transformers.SiglipVisionModel and train_align.py."""

import collections
import json
import math
import os
import runpy
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
import training
from conftest import assert_same_steps, assert_workers_match_serial, run_gloo_ranks
from model import Molmo2Config, load_safetensors
from vision import SigLIP2, SigLIP2Config, sigmoid_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300  # a stuck subprocess fails the test instead of hanging it
# The runs below use one torch thread each: 2 DDP ranks fit 2 cores, and on a busy machine a team of OpenMP threads
# waiting on a taken core made a tiny step take seconds instead of 20 ms. Every run computes alike.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny_processor(max_crops=2):
    """The tiny preset's crops: 56 px of 4x4 patches of 14 px, so overlap margins of 1 patch; 2x2 pooling."""
    return data.Molmo2Processor(max_crops=max_crops, crop_size=56, patch_size=14, overlap_margins=(1, 1))


def answer(style, text, question="?"):
    return {"style": style, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": text}]}


def black(width, height):
    return Image.new("RGB", (width, height))


# ---------------------------------------------------------------------------
# 1. The sigmoid loss by hand
# ---------------------------------------------------------------------------


def softplus(x):
    return math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_sigmoid_loss_and_its_bias_and_temperature_gradients_by_hand():
    """B = 2: images e1, e2; captions e1, (0.6, 0.8): cosines [[1, 0.6], [0, 0.8]]. t = log 2, b = -1, so
    logits z = 2 cos - 1 = [[1, 0.2], [-1, 0.6]]. -log sigmoid(s z) = softplus(-s z), s = +1 on the diagonal:
    loss = (softplus(-1) + softplus(0.2) + softplus(-1) + softplus(-0.6)) / 2 = 0.93107510.
    d softplus(-s z) / dz = -s sigmoid(-s z) =: g; z = e^t cos + b, so dL/db = sum g / B, dL/dt = sum g e^t cos / B,
    dL/dI_i = sum_j g_ij e^t T_j / B, dL/dT_j = sum_i g_ij e^t I_i / B. Here dL/db = (-sigmoid(-1) + sigmoid(0.2)
    + sigmoid(-1) - sigmoid(-0.6)) / 2 = 0.0977452 (a step lowers b: the negative at z = 0.2 outweighs the positive
    at 0.6) and dL/dt = (-2 sigmoid(-1) + 1.2 sigmoid(0.2) - 1.6 sigmoid(-0.6)) / 2 = -0.222516. In float64 these
    sums of four terms agree with autograd to a few ulps: rel 1e-12."""
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64, requires_grad=True)
    log_t = torch.tensor(math.log(2.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    loss = sigmoid_loss(image, text, log_t, bias, torch.eye(2, dtype=torch.bool))
    loss.backward()

    cos = [[1.0, 0.6], [0.0, 0.8]]
    sign = [[1, -1], [-1, 1]]
    z = [[2 * cos[i][j] - 1 for j in range(2)] for i in range(2)]
    assert sum(z, []) == pytest.approx([1.0, 0.2, -1.0, 0.6])
    expected = sum(softplus(-sign[i][j] * z[i][j]) for i in range(2) for j in range(2)) / 2
    assert expected == pytest.approx(0.93107510, abs=1e-8)  # the docstring's sum, worked out once more
    g = [[-sign[i][j] * sigmoid(-sign[i][j] * z[i][j]) for j in range(2)] for i in range(2)]
    d_bias = sum(g[i][j] for i in range(2) for j in range(2)) / 2
    d_log_t = sum(g[i][j] * 2 * cos[i][j] for i in range(2) for j in range(2)) / 2
    images, texts = [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.6, 0.8]]
    d_image = [[sum(g[i][j] * 2 * texts[j][k] for j in range(2)) / 2 for k in range(2)] for i in range(2)]
    d_text = [[sum(g[i][j] * 2 * images[i][k] for i in range(2)) / 2 for k in range(2)] for j in range(2)]

    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert bias.grad.item() == pytest.approx(d_bias, rel=1e-12)
    assert log_t.grad.item() == pytest.approx(d_log_t, rel=1e-12)
    torch.testing.assert_close(image.grad, torch.tensor(d_image, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(text.grad, torch.tensor(d_text, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert (d_bias, d_log_t) == pytest.approx((0.0977452, -0.222516), abs=1e-6)  # the docstring's numbers


def test_sigmoid_loss_gradients_pass_gradcheck():
    """Every input's gradient against finite differences, float64 (gradcheck's own tolerances are for float64)."""
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(3, 4, generator=generator, dtype=torch.float64), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(3, 4, generator=generator, dtype=torch.float64), dim=-1).requires_grad_()
    log_t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    positives = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda *x: sigmoid_loss(*x, positives), (image, text, log_t, bias))


def test_images_with_the_same_caption_are_both_positives():
    """A batch of 4 images: captions 'a red circle', none (points only), 'a blue square', 'a red circle'. Only the
    captioned ones enter the loss (images 0, 2, 3), and images 0 and 3 are positives for each other's caption.
    The loss with those positives, by hand (B' = 3): cosines of images e1, e2, (0.8, 0.6) with captions e1, e2,
    (0.6, 0.8); t = log 3, b = -2; positives are pairs (0,0), (1,1), (2,2), (0,2), (2,0)."""
    processor = tiny_processor()
    records = [
        {"images": [black(56, 56)], "annotations": [answer("long_caption", "a red circle")]},
        {"images": [black(56, 56)], "annotations": [answer("pointing", '<points coords="1 1 500 500">dots</points>')]},
        {"images": [black(56, 56)], "annotations": [answer("long_caption", "a blue square")]},
        {"images": [black(56, 56)], "annotations": [answer("long_caption", "a red circle")]},
    ]
    examples = [training.VisionExample(r, 0, processor, 16, True, True) for r in records]
    batch = training.collate_vision(examples)
    assert batch["caption_image"].tolist() == [0, 2, 3]
    assert batch["caption_same"].tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    encode = processor.tokenizer.encode
    assert batch["caption_lengths"].tolist() == [len(encode("a red circle")), len(encode("a blue square")),
                                                 len(encode("a red circle"))]

    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]], dtype=torch.float64)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    log_t, bias = torch.tensor(math.log(3.0), dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    cos = [[1.0, 0.0, 0.6], [0.0, 1.0, 0.8], [0.8, 0.6, 0.96]]
    torch.testing.assert_close(image @ text.T, torch.tensor(cos, dtype=torch.float64), rtol=0, atol=1e-15)

    def by_hand(positive):
        return sum(softplus(-(1 if positive[i][j] else -1) * (3 * cos[i][j] - 2))
                   for i in range(3) for j in range(3)) / 3

    same = [[True, False, True], [False, True, False], [True, False, True]]
    loss = sigmoid_loss(image, text, log_t, bias, batch["caption_same"])
    assert loss.item() == pytest.approx(by_hand(same), rel=1e-12)
    # the diagonal alone would call the pairs (0, 2) and (2, 0) negatives; as softplus(z) - softplus(-z) = z, that
    # adds their logits, (3 * 0.6 - 2) + (3 * 0.8 - 2) = 0.2, over B' = 3
    diagonal_only = sigmoid_loss(image, text, log_t, bias, torch.eye(3, dtype=torch.bool)).item()
    assert diagonal_only == pytest.approx(by_hand([[i == j for j in range(3)] for i in range(3)]), rel=1e-12)
    assert diagonal_only - loss.item() == pytest.approx(0.2 / 3, rel=1e-12)


# ---------------------------------------------------------------------------
# 2. The localisation targets by hand
# ---------------------------------------------------------------------------

# A 100x56 image through the tiny preset (max_crops 2): 28-px windows (4 patches less 1 + 1 margin), 28 px of
# margins. Tilings of the 72x28 px left after margins: 1x1 scales by min(28/28, 28/72) = 0.39, 1x2 by
# min(1, 56/72) = 0.78, 2x1 by 0.39: none fits, so the one that shrinks least, 1 row x 2 columns, on a canvas of
# 28 + 28 = 56 x 2 * 28 + 28 = 84 px. Crops every 28 px: crop 0 covers canvas x 0..56, crop 1 x 28..84. The
# stitched grid keeps crop 0's patch columns 0-2 (x 0..42) and crop 1's 1-3 (x 42..84): 4 x 6 patches of 14 px
# tiling the canvas, pooled 2x2 into 2 x 3 tokens of 28 x 28 px. The global crop: 4x4 patches, 2x2 tokens.
WIDE_GRID = (2, 2, 2, 3)
WIDE_CELLS = [[0, 0, 1 / 2, 1 / 2], [1 / 2, 0, 1, 1 / 2], [0, 1 / 2, 1 / 2, 1], [1 / 2, 1 / 2, 1, 1],  # global
              [0, 0, 1 / 3, 1 / 2], [1 / 3, 0, 2 / 3, 1 / 2], [2 / 3, 0, 1, 1 / 2],  # high-res, top row
              [0, 1 / 2, 1 / 3, 1], [1 / 3, 1 / 2, 2 / 3, 1], [2 / 3, 1 / 2, 1, 1]]  # bottom row
# A 56x56 image: 1x1 scales by exactly 1 (no upscaling needed), so one crop on a 56x56 canvas; 2x2 tokens a view.
SQUARE_GRID = (2, 2, 2, 2)
SQUARE_CELLS = [[0, 0, 1 / 2, 1 / 2], [1 / 2, 0, 1, 1 / 2], [0, 1 / 2, 1 / 2, 1], [1 / 2, 1 / 2, 1, 1]] * 2


def test_token_cells_of_a_wide_tiny_image_by_hand():
    processor = tiny_processor()
    vision = processor.image(np.zeros((56, 100, 3), dtype=np.uint8))
    assert vision.grid == WIDE_GRID and vision.patches.shape[0] == 3  # the global crop and 1 x 2 crops
    cells = training.token_cells(56, 100, vision.grid, processor)
    np.testing.assert_allclose(cells, WIDE_CELLS, rtol=0, atol=1e-12)  # float64 quotients like 28 / 84
    # the point (0.8, 0.25): the global view's top-right quadrant (token 1), the high-res view's top row, third
    # column (token 4 + 2); offsets in the cell ((0.8 - 0.5) / 0.5, 0.25 / 0.5), ((0.8 - 2/3) / (1/3), 0.25 / 0.5)
    holds, offsets = training.cell_targets(np.array([[0.8, 0.25]]), cells)
    assert np.flatnonzero(holds).tolist() == [1, 6]
    # offsets are stored in float32: within one float32 ulp at 1 (2^-23) of the exact quotients
    np.testing.assert_allclose(offsets[[1, 6]], [[0.6, 0.5], [0.4, 0.5]], rtol=0, atol=2 ** -23)
    assert (offsets[~holds] == -1).all()


def test_token_cells_of_a_tall_small_preset_image_by_hand():
    """The small preset's crops: 112 px of 8x8 patches, margins (2, 2), max_crops 4: 56-px windows, 56 px of margins.
    A 100 wide x 200 high image leaves 44 x 144 px; tilings (rows, cols) scale by min(56 rows / 144, 56 cols / 44):
    1x1 .39, 1x2 .39, 2x1 .78, 1x3 .39, 3x1 1.17, 1x4 .39, 2x2 .78, 4x1 1.27; the smallest that does not shrink
    is 3x1, on a 112 x 224 canvas. Stitched rows: crop 0 keeps patch rows 0-5, crop 1 rows 2-5, crop 2 rows 2-7:
    16 rows of 14 px = 224, 8 columns of 14 px = 112; pooled 2x2: 8 x 4 tokens, each 1/8 high and 1/4 wide. The
    global crop: 8x8 patches, 4x4 tokens of 1/4 x 1/4."""
    vit = SigLIP2Config.preset("small")
    assert (vit.image_size, vit.patch_size) == (112, 14)
    processor = data.Molmo2Processor(max_crops=4, crop_size=112, patch_size=14, overlap_margins=(2, 2))
    vision = processor.image(np.zeros((200, 100, 3), dtype=np.uint8))
    assert vision.grid == (4, 4, 8, 4) and vision.patches.shape[0] == 1 + 3
    cells = training.token_cells(200, 100, vision.grid, processor)
    expected = [[c / 4, r / 4, (c + 1) / 4, (r + 1) / 4] for r in range(4) for c in range(4)]
    expected += [[c / 4, r / 8, (c + 1) / 4, (r + 1) / 8] for r in range(8) for c in range(4)]
    np.testing.assert_allclose(cells, expected, rtol=0, atol=1e-12)
    # (0.3, 0.55): global row 2, column 1 -> token 9; high-res row 4 (0.55 * 8 = 4.4), column 1 -> 16 + 4 * 4 + 1
    holds, offsets = training.cell_targets(np.array([[0.3, 0.55]]), cells)
    assert np.flatnonzero(holds).tolist() == [9, 33]
    np.testing.assert_allclose(offsets[[9, 33]], [[0.2, 0.2], [0.2, 0.4]], rtol=0, atol=2 ** -23)  # float32


def test_token_cells_are_where_the_processor_puts_the_pixels():
    """The oracle is the crops themselves: a white 6x6 square on black, centred on (80, 14) px = (0.8, 0.25) of the
    100x56 image, lights up exactly the tokens whose pooled patches the processor filled from it, and those are
    the tokens cell_targets says hold the point (1 of the global view, 6 of the high-res view)."""
    image = black(100, 56)
    ImageDraw.Draw(image).rectangle([77, 11, 82, 16], fill=(255, 255, 255))
    processor = tiny_processor()
    vision = processor.image(image)
    patches = vision.patches.reshape(-1, vision.patches.shape[-1])  # (n_crops * 16, 588) in [-1, 1]
    pooling = vision.token_pooling.long()  # (M, 4)
    # a token sees the square where a pixel of its pooled patches is brighter than a quarter of the way from black
    lit = torch.where(pooling >= 0, (patches[pooling.clamp(min=0)] > -0.5).any(-1), False).any(-1)  # (M,)
    assert torch.nonzero(lit).flatten().tolist() == [1, 6]
    holds, _ = training.cell_targets(np.array([[0.8, 0.25]]), training.token_cells(56, 100, vision.grid, processor))
    assert np.flatnonzero(holds).tolist() == [1, 6]


def test_cell_targets_edges_and_shared_cells():
    """Four quadrant cells. A point on the edge two cells share goes to the later one (cells are half-open); on
    the image's far edge (x or y = 1.0) to the last cell; two points in one cell: it holds, with the first's offset."""
    quadrants = np.array([[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]])
    cases = [  # (points, holding cells, their offsets)
        ([[0.5, 0.25]], [1], [[0.0, 0.5]]),  # on the edge of cells 0 and 1
        ([[0.5, 0.5]], [3], [[0.0, 0.0]]),  # on the corner of all four
        ([[0.25, 0.5]], [2], [[0.5, 0.0]]),  # on the edge of cells 0 and 2
        ([[1.0, 0.2]], [1], [[1.0, 0.4]]),  # the right edge of the image
        ([[1.0, 1.0]], [3], [[1.0, 1.0]]),  # the far corner
        ([[0.0, 0.0]], [0], [[0.0, 0.0]]),
        ([[0.1, 0.1], [0.3, 0.4]], [0], [[0.2, 0.2]]),  # two points in cell 0: the first one's offset
        ([[0.9, 0.9], [0.1, 0.6], [0.2, 0.7]], [2, 3], [[0.2, 0.2], [0.8, 0.8]]),
    ]
    for points, cells, offsets in cases:
        holds, got = training.cell_targets(np.array(points, dtype=np.float64), quadrants)
        assert np.flatnonzero(holds).tolist() == cells, points
        np.testing.assert_allclose(got[holds], offsets, rtol=0, atol=2 ** -23, err_msg=str(points))  # float32
        assert (got[~holds] == -1).all(), points
    holds, offsets = training.cell_targets(np.zeros((0, 2)), quadrants)
    assert not holds.any() and (offsets == -1).all()


def test_pointed_labels_of_a_hand_written_record():
    """Every <points> tag of every assistant answer: labels in first-seen order, each label's points merged over
    annotations without repeats; 'There are none.' answers, <tracks>, unlabelled tags and the user's text give none."""
    record = {"annotations": [
        answer("long_caption", "Two cats and a dog."),
        answer("pointing", '<points coords="1 1 100 200 2 300 400">cats</points>'),
        answer("point_count", 'Counting the <points coords="1 1 100 200 2 500 600">cats</points> shows a total of 2.'),
        answer("pointing", '<points coords="1 1 900 050">dog</points> and '
                           '<points coords="1 1 250 750">red ball</points>'),
        answer("point_count", "There are none.", question="How many birds are there?"),
        answer("pointing", "There are none.", question='<points coords="1 1 10 10">ghost</points>'),
        answer("pointing", '<points coords="1 1 600 600"/>'),
        answer("video_point_track", '<tracks coords="0.5 1 100 100">fish</tracks>'),
        answer("pointing", '<points coords="1 1 300 400">cats</points>'),  # seen already
    ]}
    assert list(training.pointed_labels(record).items()) == [
        ("cats", [(0.1, 0.2), (0.3, 0.4), (0.5, 0.6)]), ("dog", [(0.9, 0.05)]), ("red ball", [(0.25, 0.75)])]
    assert training.pointed_labels({"annotations": [answer("point_count", "There are none.")]}) == {}


def test_collate_vision_marks_only_the_labels_own_image():
    """Image 0 (100x56, 10 tokens) has 'cats' at (0.8, 0.25); image 1 (56x56, 8 tokens) has 'dogs' at (0.1, 0.9)
    and 'cats' at (0.8, 0.25) and (0.9, 0.1), both in its top-right cells. By hand (the cells above): label 0 holds
    tokens 1 and 6 of image 0 and none of image 1, where the same-named label sits in the same place; label 1
    tokens 2 and 6 of image 1 (rows 12, 16), label 2 tokens 1 and 5 of image 1 (rows 11, 15)."""
    processor = tiny_processor()
    wide = {"images": [black(100, 56)],
            "annotations": [answer("pointing", '<points coords="1 1 800 250">cats</points>')]}
    square = {"images": [black(56, 56)], "annotations": [answer(
        "pointing", '<points coords="1 1 100 900">dogs</points> <points coords="1 1 800 250 2 900 100">cats</points>')]}
    examples = [training.VisionExample(r, 0, processor, 16, True, True) for r in (wide, square)]
    assert [ex.grid for ex in examples] == [WIDE_GRID, SQUARE_GRID] and [ex.labels for ex in examples] == [
        ["cats"], ["dogs", "cats"]]
    batch = training.collate_vision(examples)

    loc = torch.zeros(18, 3)
    loc[[1, 6], 0] = 1
    loc[[12, 16], 1] = 1
    loc[[11, 15], 2] = 1
    assert torch.equal(batch["loc_targets"], loc)
    offsets = torch.full((18, 2), -1.0)
    offsets[1] = torch.tensor([0.6, 0.5])  # (0.8, 0.25) in [0.5, 1] x [0, 0.5]
    offsets[6] = torch.tensor([0.4, 0.5])  # in [2/3, 1] x [0, 0.5]
    offsets[[12, 16]] = torch.tensor([0.2, 0.8])  # (0.1, 0.9) in [0, 0.5] x [0.5, 1]
    offsets[[11, 15]] = torch.tensor([0.6, 0.5])  # the first of the two points in [0.5, 1] x [0, 0.5]
    torch.testing.assert_close(batch["offset_targets"], offsets, rtol=0, atol=2 ** -23)  # float32 roundings
    assert batch["label_image"].tolist() == [0, 1, 1]
    assert batch["token_image"].tolist() == [0] * 10 + [1] * 8
    assert batch["high_res"].tolist() == [False] * 4 + [True] * 6 + [False] * 4 + [True] * 4
    torch.testing.assert_close(batch["cells"], torch.tensor(WIDE_CELLS + SQUARE_CELLS, dtype=torch.float32),
                               rtol=0, atol=0)
    # image 1's pooling indices point past image 0's 3 crops of 16 patches
    assert batch["patches"].shape[0] == 3 + 2
    shifted = torch.where(examples[1].pooling >= 0, examples[1].pooling.long() + 48, -1)
    assert torch.equal(batch["pooling"][10:], shifted)
    assert [p.tolist() for p in batch["label_points"]] == [[[0.8, 0.25]], [[0.1, 0.9]], [[0.8, 0.25], [0.9, 0.1]]]


def test_collate_vision_gives_a_token_shared_by_two_labels_the_later_labels_offset():
    """A 56x56 image (8 tokens: the cells above) with 'cats' at (0.8, 0.25) and 'birds' at (0.7, 0.3): both points
    lie in the top-right cell of each view (tokens 1 and 5, [0.5, 1] x [0, 0.5]). Both labels mark those tokens, and
    the tokens keep the later label's offset, ((0.7 - 0.5) / 0.5, 0.3 / 0.5) = (0.4, 0.6), as the label-by-label
    writes of the loader always did (collate_vision now writes every label at once)."""
    square = {"images": [black(56, 56)], "annotations": [answer(
        "pointing", '<points coords="1 1 800 250">cats</points> <points coords="1 1 700 300">birds</points>')]}
    examples = [training.VisionExample(square, 0, tiny_processor(), 16, True, True)]
    assert examples[0].labels == ["cats", "birds"] and examples[0].grid == SQUARE_GRID
    batch = training.collate_vision(examples)
    loc = torch.zeros(8, 2)
    loc[[1, 5], :] = 1
    assert torch.equal(batch["loc_targets"], loc)
    offsets = torch.full((8, 2), -1.0)
    offsets[[1, 5]] = torch.tensor([0.4, 0.6])
    torch.testing.assert_close(batch["offset_targets"], offsets, rtol=0, atol=2 ** -23)  # float32 roundings


# ---------------------------------------------------------------------------
# 3. The uint8 crops
# ---------------------------------------------------------------------------


def test_round_labels_pads_with_stand_in_labels_that_change_no_loss_or_gradient():
    """collate_vision(round_labels=...) (what a CUDA-graphed stage 1 trains on: a few shapes recur) pads the 3 labels
    of the two images above to 64 stand-ins of one token 0 and no image (label_image -1), their ids to 8 tokens, and
    their localisation targets with empty columns. The losses ignore them: the same losses and gradients as the
    exact batch, on a CPU where the text tower then computes 64 texts of 8 tokens as a GPU would. float32; the text
    tower's matmuls over more rows may sum in another order (a few ulps of values of order 1)."""
    from vision import VisionPretrainer
    processor = tiny_processor()
    records = [{"images": [black(100, 56)],
                "annotations": [answer("pointing", '<points coords="1 1 800 250">cats</points>')]},
               {"images": [black(56, 56)], "annotations": [answer(
                   "pointing", '<points coords="1 1 100 900">dogs</points> <points coords="1 1 800 250">cats</points>')]}]
    examples = [training.VisionExample(r, 0, processor, 16, False, True) for r in records]
    exact, rounded = training.collate_vision(examples), training.collate_vision(examples, round_labels=16)
    assert rounded["label_image"].tolist() == [0, 1, 1] + [-1] * 61
    assert rounded["label_ids"].shape == (64, 8) and rounded["label_lengths"][3:].tolist() == [1] * 61
    assert torch.equal(rounded["label_ids"][:3, :exact["label_ids"].shape[1]], exact["label_ids"])
    assert torch.equal(rounded["loc_targets"][:, :3], exact["loc_targets"]) and not rounded["loc_targets"][:, 3:].any()
    assert [p.tolist() for p in rounded["label_points"]] == [p.tolist() for p in exact["label_points"]]

    torch.manual_seed(0)
    pretrainer = VisionPretrainer(SigLIP2(SigLIP2Config.preset("tiny")), (1, 0), 1, 16, 16, use_sigmoid=False,
                                  use_loc=True, text_vocab_rows=64, use_position=True)
    results = []
    for batch in (exact, rounded):
        pretrainer.zero_grad()
        losses = pretrainer(training.vision_batch_to(batch, "cpu"))
        sum(losses.values()).backward()
        # (the ViT's blocks past the deepest one read get none: train_vision.py trims them)
        results.append((losses, {n: p.grad.clone() for n, p in pretrainer.named_parameters() if p.grad is not None}))
    (exact_losses, exact_grads), (rounded_losses, rounded_grads) = results
    assert sorted(rounded_losses) == ["loc", "offset", "position"]
    for name, value in exact_losses.items():
        torch.testing.assert_close(rounded_losses[name], value, rtol=1e-5, atol=1e-6)
    assert rounded_grads.keys() == exact_grads.keys() and "text.head.weight" in exact_grads
    for name, grad in exact_grads.items():
        torch.testing.assert_close(rounded_grads[name], grad, rtol=1e-5, atol=1e-6)
    # the read-out skips the stand-ins: one point list per real label, as validation pairs them with label_points
    with torch.no_grad():
        read = [pretrainer.read_out(pretrainer.token_embeddings(b["patches"], b["pooling"]), b, threshold=0.0)
                for b in (training.vision_batch_to(exact, "cpu"), training.vision_batch_to(rounded, "cpu"))]
    assert len(read[1]) == 3 and all(np.array_equal(a, b) for a, b in zip(*read))


def test_masked_l1_is_the_l1_over_the_rows_it_holds():
    """vision.masked_l1 (stage 1's offset and position losses, computed without a boolean index, so the step never
    waits on the GPU) against indexing the held rows out, the form it replaced; and with no row held, 0. float32
    sums of 5 numbers of order 1, in another order: a few ulps."""
    from vision import masked_l1
    generator = torch.Generator().manual_seed(0)
    predicted, target = torch.rand(7, 2, generator=generator), torch.rand(7, 2, generator=generator)
    holds = torch.tensor([1, 0, 0, 1, 1, 0, 1], dtype=torch.bool)
    expected = F.l1_loss(predicted[holds], target[holds], reduction="sum") / 4
    torch.testing.assert_close(masked_l1(predicted, target, holds.float()), expected, rtol=1e-6, atol=0)
    assert masked_l1(predicted, target, torch.zeros(7)).item() == 0.0


def test_uint8_round_trip_is_bit_exact(tiny_world):
    """The processor's values are (k - 127.5) / 127.5 for whole k in 0..255 (it rounds after resizing): to_uint8
    recovers k, from_uint8 redoes the processor's float32 steps, bit for bit. Every k, and real images: a synthetic
    world's PNG and seeded noise, at the released crop size (upscaled, so resizing makes in-between values)."""
    k = torch.arange(256, dtype=torch.float32)
    levels = (k - 127.5) / 127.5
    assert torch.equal(training.to_uint8(levels.clone()), k.to(torch.uint8))
    assert torch.equal(training.from_uint8(training.to_uint8(levels.clone())), levels)

    processor = data.Molmo2Processor(max_crops=4)
    noise = np.random.default_rng(0).integers(0, 256, size=(90, 130, 3), dtype=np.uint8)
    png = os.path.join(tiny_world, "synth_image", "train", "000002.png")
    for image in (png, noise):
        patches = processor.image(image).patches
        as_bytes = training.to_uint8(patches.clone())
        assert as_bytes.dtype == torch.uint8
        assert torch.equal(training.from_uint8(as_bytes), patches)
    assert training.to_uint8(processor.image(noise).patches.clone()).unique().numel() == 256


# ---------------------------------------------------------------------------
# 4. The loader: workers and resume
# ---------------------------------------------------------------------------

# images, and records this stage cannot use: image sets and videos (counted), damaged ones (skipped)
MIXTURE = {"image": (0.6, ["synth_image"]), "multi_image": (0.1, ["synth_multi"]),
           "video": (0.1, ["synth_video"]), "damaged": (0.2, ["damaged"])}


def vision_loader(world, workers):
    return training.VisionLoader(world, MIXTURE, "train", 2, tiny_processor(), 32, True, True, seed=0, grad_accum=2,
                           workers=workers)


def test_loader_workers_give_the_serial_batches_and_resume_exactly(tiny_world):
    """VisionLoader(workers=2) makes its examples in forked processes, a step ahead: every tensor of every batch,
    the skip counts and the state (before the keys read ahead) are the serial loader's; a loader restored from
    that state, with workers or without, continues with the same batches."""
    def met_bad_records(serial):
        assert serial.report.n_skipped > 0 and serial.not_used["not a single image"] > 0, serial.summary()

    assert_workers_match_serial(lambda workers: vision_loader(tiny_world, workers), 2, met_bad_records)


def test_batches_made_in_a_forked_process_are_the_serial_loaders(tiny_world):
    """StepsAhead(process=True), as a GPU run makes stage 1's batches: the child's loader, with its own two workers,
    sends every tensor (bytes through a socket) and the label points (pickled) of the serial loader's steps."""
    serial = vision_loader(tiny_world, 0)
    ahead = training.StepsAhead(vision_loader(tiny_world, 2), process=True)
    try:
        assert_same_steps([ahead.next_step() for _ in range(3)], [serial.next_step() for _ in range(3)])
        assert ahead.state_dict() == serial.state_dict()
    finally:
        ahead.close()


# ---------------------------------------------------------------------------
# 5. The script: resume after SIGKILL, and 2 DDP processes equal 1
# ---------------------------------------------------------------------------

# Every knob that shapes the run is pinned (the defaults are the real recipe's): 6 steps of 2 micro-batches of
# 2 images, a checkpoint every 2 steps, validation after steps 2 and 5.
STAGE1 = ["--model_preset=tiny", "--overlap_margins=(1, 1)", "--max_crops=2", "--batch_size=2", "--device=cpu",
          "--parallel=ddp", "--sigmoid_weight=1.0", "--loc_weight=1.0", "--scene_weight=1.0", "--scene_balanced=True",
          "--scene_digits=0.5", "--vit_init=big_vision", "--text_layers=1", "--text_max_len=32", "--embed_dim=16",
          "--lr=1e-3", "--warmup=2", "--weight_decay=0.05", "--grad_clip=1.0", "--max_steps=6", "--save_every=2",
          "--eval_every=3", "--eval_batches=1", "--log_every=1", "--seed=0", "--resume=True"]


def stage1_args(world, out_dir, *extra):
    return [f"--out_dir={out_dir}", f"--data_dir={world}", f"--data_mixture={MIXTURE!r}", *STAGE1, *extra]


def launch(command):
    """A run started in the background, on one thread, its output in files (a pipe nobody reads would stall it):
    several started before the first is finished share this machine's cores."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    return command, subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err, text=True, env=ONE_THREAD), out, err


def finish(started, returncode=0, stream="stdout"):
    """Waits for a started run -> its stdout (or stderr); fails naming it unless it exited with returncode (-9:
    SIGKILLed)."""
    command, process, out, err = started
    try:
        process.wait(timeout=TIMEOUT_S)
    finally:
        process.kill()
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
    assert process.returncode == returncode, f"{command}: rc {process.returncode}\n{stdout}\n{stderr}"
    return stdout if stream == "stdout" else stderr


def run_script(command):
    return finish(launch(command))


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def kind(record):
    return "val" if any(k.startswith("val_") for k in record) else "train"


def by_step(records):
    """{(kind, step): record}, the last line of a step counting (a step redone after a resume writes it again);
    the step's wall time left out."""
    return {(kind(r), r["step"]): {k: v for k, v in r.items() if k != "step_s"} for r in records}


def end_summary(stdout):
    """What the run read and skipped: the lines between 'done:' and 'ViT:'."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("done:"))
    end = next(i for i, line in enumerate(lines) if line.startswith("ViT:"))
    return lines[start + 1:end]


@pytest.mark.parametrize("name", ["window_means", "gathered_window_means"])  # the CPU's path and the GPU's
def test_window_means_averages_each_window_by_hand(name):
    """Two blocks' features of 2 crops x 3 patches and four windows worked by hand: two patches, one patch and
    padding, padding alone (zeros), one patch listed twice; and the gradient each patch gets back. float64, and
    every weight a power of two, so the sums are exact: compared for equality."""
    import vision

    window_means = getattr(vision, name)
    torch.manual_seed(0)
    blocks = [torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    pooling = torch.tensor([[0, 1], [5, -1], [-1, -1], [2, 2]])
    out = window_means(blocks, pooling)
    flat = torch.cat(blocks, -1).detach().reshape(6, 8)  # patch i of the 2 x 3, both blocks side by side
    assert torch.equal(out, torch.stack([(flat[0] + flat[1]) / 2, flat[5], torch.zeros(8, dtype=torch.float64),
                                         flat[2]]))
    upstream = torch.randn(4, 8, dtype=torch.float64)
    out.backward(upstream)
    expected = torch.zeros(6, 8, dtype=torch.float64)
    expected[0] = expected[1] = upstream[0] / 2
    expected[5] = upstream[1]
    expected[2] = upstream[3]  # listed twice at weight 1/2
    got = torch.cat([b.grad for b in blocks], -1).reshape(6, 8)
    assert torch.equal(got, expected)


@pytest.fixture(scope="module")
def reference_run(tiny_world, tmp_path_factory):
    """One process, grad_accum 2, loader workers 2, uninterrupted: (out_dir, stdout)."""
    out_dir = str(tmp_path_factory.mktemp("stage1_reference"))
    args = stage1_args(tiny_world, out_dir, "--grad_accum=2", "--loader_workers=2")
    return out_dir, run_script([sys.executable, "train_vision.py", *args])


def test_validation_reports_the_features_the_heads_read(tiny_world, reference_run):
    """The last validation comes after the last step, so its feature_std and feature_cos are those of the exported
    ViT: recomputed here from the saved weights on the validation's one batch (each token's window of patches
    averaged, the connector's blocks side by side), the hand-checked statistics of test_training.py."""
    from vision import window_means

    ref_dir, _ = reference_run
    val = [r for r in read_log(ref_dir) if kind(r) == "val"][-1]
    preset = Molmo2Config.preset("tiny")
    vit = training.load_vit(ref_dir, preset.vit).eval()
    loader = training.VisionLoader(tiny_world, MIXTURE, "val", 2, tiny_processor(), 32, True, True, seed=0,
                                   use_scene=True)
    batch = training.vision_batch_to(loader.next_step()[0], torch.device("cpu"))
    with torch.no_grad():
        features = window_means(vit(batch["patches"], list(preset.connector.vit_layers)), batch["pooling"])
    std, cos = training.image_feature_stats(features)
    # float32 on one thread, the same operations in the same order as the run's: only the float of the log's JSON
    assert val["val_feature_std"] == pytest.approx(std, rel=1e-6)
    assert val["val_feature_cos"] == pytest.approx(cos, rel=1e-6, abs=1e-6)


@pytest.fixture(scope="module")
def one_step_runs(tiny_world, tmp_path_factory):
    """One step from the same start (a ViT drawn at 84-px crops, vit_image_size; the tiny preset's are 56), no weight
    decay, no warmup: at lr 0, at lr 1e-3, with vit_lr_fan_in=16, with vit_lr=2.5e-4 and with muon_lr=0.02 ->
    {name: out_dir}, each with its final/ export and its ckpt.pt (the heads too)."""
    root = tmp_path_factory.mktemp("one_step")
    variants = {"start": ["--lr=0.0"], "plain": [], "scaled": ["--vit_lr_fan_in=16"], "vit_lr": ["--vit_lr=2.5e-4"],
                "muon": ["--muon_lr=0.02"]}
    started = [launch([sys.executable, "train_vision.py",
                      *stage1_args(tiny_world, str(root / name), "--max_steps=1", "--warmup=0", "--save_every=1",
                                   "--weight_decay=0.0", "--eval_every=0", "--resume=False", "--vit_image_size=84",
                                   *extra)])
               for name, extra in variants.items()]
    outs = [finish(run) for run in started]
    assert "ViT at lr 0.00025, heads at 0.001" in outs[3]
    assert "ViT matrices by Muon at 0.02, the rest AdamW at 0.001" in outs[4]
    return {name: root / name for name in variants}


def test_vit_lr_fan_in_scales_each_vit_matrix_first_step(one_step_runs):
    """One step from the same start, at lr 0, at lr, and at lr with vit_lr_fan_in=16: each ViT matrix moves
    min(1, 16 / fan-in) as far as without the switch (an Adam first step is the rate times g / (|g| + eps), so the
    step is linear in the rate), and every other tensor of the ViT moves exactly as without it."""
    runs = {name: load_safetensors(str(one_step_runs[name] / "final" / "model.safetensors"))
            for name in ("start", "plain", "scaled")}
    start, plain, scaled = runs["start"], runs["plain"], runs["scaled"]
    n_scaled = 0
    for key, w in start.items():
        step_plain, step_scaled = plain[key] - w, scaled[key] - w
        is_matrix = w.dim() >= 2 and "position_embedding" not in key
        scale = min(1.0, 16 / w[0].numel()) if is_matrix else 1.0  # fan-in: the patch embedding is saved as a conv
        if scale == 1.0:
            assert torch.equal(scaled[key], plain[key]), key
            continue
        n_scaled += 1
        assert step_plain.abs().max() > 0, key
        # float32 weights near 0.1-1 moved by ~1e-3: their differences keep ~4 significant digits
        torch.testing.assert_close(step_scaled, step_plain * scale, rtol=2e-3, atol=2e-6, msg=key)
    # the tiny ViT's blocks (fan-ins 32 and 64) and its patch embedding (588): every matrix it has
    assert n_scaled == sum(1 for k, w in start.items() if w.dim() >= 2 and "position_embedding" not in k) > 0


def test_vit_lr_moves_the_vit_at_its_own_rate_and_the_heads_at_lr(tiny_world, one_step_runs, tmp_path):
    """One step from the same start at lr 1e-3, without and with vit_lr=2.5e-4: every ViT tensor (matrices, norms,
    position table) moves a quarter as far (an Adam first step is linear in the rate, as above) and every head and
    text-tower tensor exactly as far. A second stage 1 that starts from the 84-px ViT keeps its crops (init_from
    loads a ViT at its own crop size)."""
    runs = {name: torch.load(str(one_step_runs[name] / "ckpt.pt"), weights_only=False)["model"]
            for name in ("start", "plain", "vit_lr")}
    start, plain, vit_lr = runs["start"], runs["plain"], runs["vit_lr"]
    moved = collections.Counter()
    for key, w in start.items():
        step_plain, step_vit_lr = plain[key] - w, vit_lr[key] - w
        if not key.startswith("vit."):
            assert torch.equal(vit_lr[key], plain[key]), key
            moved["heads"] += bool(step_plain.abs().max() > 0)
            continue
        moved["vit"] += 1
        assert step_plain.abs().max() > 0, key
        # float32 weights near 0.1-1 moved by ~1e-3: their differences keep ~4 significant digits
        torch.testing.assert_close(step_vit_lr, step_plain * 0.25, rtol=2e-3, atol=2e-6, msg=key)
    assert moved["vit"] > 0 and moved["heads"] > 0, moved
    out = finish(launch([sys.executable, "train_vision.py",
                         *stage1_args(tiny_world, str(tmp_path / "again"), "--max_steps=1", "--save_every=0",
                                      "--eval_every=0", "--resume=False", "--vit_init=gpt",
                                      f"--init_from={one_step_runs['vit_lr']}")]))
    assert "from " in out and json.load(open(tmp_path / "again" / "final" / "config.json"))["image_size"] == 84


def test_muon_lr_steps_each_vit_matrix_by_muon_and_everything_else_as_adamw(one_step_runs):
    """One step from the same start at lr 1e-3, without and with muon_lr=0.02: each ViT matrix (its patch embedding
    and its blocks', not its position table) moves by Muon's first step, -0.02 x sqrt(max(1, rows / cols)) x
    orthogonalised(G + 0.95 G), with G its gradient, which the momentum buffer holds after one step; every other
    tensor (norms, biases, tables, the heads and the text tower) moves as torch.optim.AdamW moved it."""
    runs = {name: torch.load(str(one_step_runs[name] / "ckpt.pt"), weights_only=False)
            for name in ("start", "plain", "muon")}
    start, plain, muon = (runs[name]["model"] for name in ("start", "plain", "muon"))
    groups, state = runs["muon"]["optimizer"]["param_groups"], runs["muon"]["optimizer"]["state"]
    matrices = [k for k, w in start.items() if k.startswith("vit.") and w.dim() >= 2 and k != "vit.positional_embedding"]
    muon_group = [g for g in groups if g["muon"]]
    assert len(muon_group) == 1 and len(muon_group[0]["params"]) == len(matrices) > 0
    for key, index in zip(matrices, muon_group[0]["params"]):
        grad = state[index]["momentum_buffer"]
        assert grad.shape == start[key].shape and grad.abs().max() > 0, key
        scale = 0.02 * max(1.0, grad.shape[0] / grad.shape[1]) ** 0.5
        want = start[key] - scale * training.orthogonalised(grad + 0.95 * grad)
        # float32: the run's orthogonalised on the same buffer, then one subtraction of a step ~1e-3 from weights < 1
        torch.testing.assert_close(muon[key], want, rtol=0, atol=1e-6, msg=key)
    for key in start:
        if key not in matrices:
            # the same AdamW first step written out (training.MuonAdamW) against torch's: a few float32 ulps
            torch.testing.assert_close(muon[key], plain[key], rtol=1e-6, atol=1e-7, msg=key)


# `python -c KILLED <where> <args>`: train_vision.py, SIGKILLed by itself at a chosen point, so the kill lands in
# the same place on a loaded machine as on an idle one. where = torch.save:n: half-way through writing the n-th
# checkpoint (part of the file written); clip:n: in the n-th step, after its backward, before its optimizer step.
KILLED = """
import os, runpy, signal, sys, torch
where, n = sys.argv[1].split(":")
calls = []
def dying(real):
    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(n):
            if where == "torch.save":
                with open(args[1], "wb") as f:
                    f.write(b"PK\\x03\\x04 a checkpoint cut off")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapper
if where == "torch.save":
    torch.save = dying(torch.save)
else:
    torch.nn.utils.clip_grad_norm_ = dying(torch.nn.utils.clip_grad_norm_)
sys.argv = ["train_vision.py", *sys.argv[2:]]
runpy.run_path("train_vision.py", run_name="__main__")
"""


def launch_killed(where, args):
    return launch([sys.executable, "-c", KILLED, where, *args])


def run_killed(where, args):
    return finish(launch_killed(where, args), returncode=-9)


def test_resume_after_sigkill_gives_the_uninterrupted_losses(tiny_world, reference_run, tmp_path):
    """Killed twice: while writing the checkpoint after step 3 (ckpt.pt stays the one after step 1), then in the
    middle of step 5 (after the checkpoint after step 3). Each resume redoes the steps after its checkpoint; the log's
    last line of each step, train and val, is the uninterrupted run's to the bit, and so are the exported ViT, the
    data state and the skip report. (The killed runs read serially, the reference with 2 workers.)"""
    ref_dir, ref_stdout = reference_run
    out_dir = str(tmp_path / "killed")
    args = stage1_args(tiny_world, out_dir, "--grad_accum=2", "--loader_workers=0")
    ckpt = os.path.join(out_dir, "ckpt.pt")

    run_killed("torch.save:2", args)
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    assert os.path.exists(ckpt + ".tmp")  # the cut-off write, never renamed over ckpt.pt
    first = read_log(out_dir)
    assert [(kind(r), r["step"]) for r in first] == [("train", 0), ("train", 1), ("train", 2), ("val", 2), ("train", 3)]

    stdout = run_killed("clip:4", args)  # resumed at step 2: its 4th step is step 5
    assert f"resumed from {ckpt} at step 2" in stdout
    assert torch.load(ckpt, weights_only=False)["step"] == 4
    second = read_log(out_dir)[len(first):]
    assert [(kind(r), r["step"]) for r in second] == [("train", 2), ("val", 2), ("train", 3), ("train", 4)]
    assert not os.path.exists(os.path.join(out_dir, "final"))

    stdout = run_script([sys.executable, "train_vision.py", *args])
    assert f"resumed from {ckpt} at step 4" in stdout
    third = read_log(out_dir)[len(first) + len(second):]
    assert [(kind(r), r["step"]) for r in third] == [("train", 4), ("train", 5), ("val", 5)]

    reference = read_log(ref_dir)
    assert len(by_step(reference)) == 8  # 6 train lines, 2 val lines
    assert by_step(read_log(out_dir)) == by_step(reference)  # exact floats
    final = load_safetensors(os.path.join(out_dir, "final", "model.safetensors"))
    ref_final = load_safetensors(os.path.join(ref_dir, "final", "model.safetensors"))
    assert final.keys() == ref_final.keys() and all(torch.equal(final[k], ref_final[k]) for k in final)
    ref_ckpt = torch.load(os.path.join(ref_dir, "ckpt.pt"), weights_only=False)
    assert torch.load(ckpt, weights_only=False)["data"] == ref_ckpt["data"]  # read ahead by workers, or not
    assert end_summary(stdout) == end_summary(ref_stdout)


def test_batch_echo_draws_a_batch_every_other_step_and_resumes_within_an_echo(tiny_world, tmp_path):
    """--batch_echo=2: 6 steps draw 3 batches, so the data state after them is that of a loader drawn 3 times here.
    Killed in step 4 (the 5th), after the checkpoint after step 2, which falls within an echo (step 3 trains on the
    batch of step 2): the resumed run draws that batch again, and its log from step 3 on and its exported ViT are the
    uninterrupted echo run's to the bit."""
    def run(name):
        return stage1_args(tiny_world, str(tmp_path / name), "--grad_accum=2", "--loader_workers=0", "--batch_echo=2",
                           "--save_every=3")

    whole, killed = run("whole"), run("killed")
    started = launch([sys.executable, "train_vision.py", *whole]), launch_killed("clip:5", killed)  # side by side
    finish(started[0])
    drawn = vision_loader(tiny_world, 0)
    for _ in range(3):
        drawn.next_step()
    whole_ckpt = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=False)
    assert whole_ckpt["step"] == 6 and whole_ckpt["data"][0]["samplers"] == drawn.state_dict()["samplers"]

    finish(started[1], returncode=-9)
    ckpt = tmp_path / "killed" / "ckpt.pt"
    assert torch.load(ckpt, weights_only=False)["step"] == 3
    stdout = run_script([sys.executable, "train_vision.py", *killed])
    assert f"resumed from {ckpt} at step 3" in stdout
    assert by_step(read_log(tmp_path / "killed")) == by_step(read_log(tmp_path / "whole"))  # exact floats
    final = load_safetensors(str(tmp_path / "killed" / "final" / "model.safetensors"))
    ref_final = load_safetensors(str(tmp_path / "whole" / "final" / "model.safetensors"))
    assert final.keys() == ref_final.keys() and all(torch.equal(final[k], ref_final[k]) for k in final)


def test_rerunning_a_finished_run_changes_nothing(tiny_world, reference_run, tmp_path):
    """A finished run's out_dir (its checkpoint is after the last step) run again: no step is redone, the log and
    the exported ViT stay as they were."""
    import shutil

    ref_dir, _ = reference_run
    out_dir = str(tmp_path / "again")
    shutil.copytree(ref_dir, out_dir)
    stdout = run_script([sys.executable, "train_vision.py", *stage1_args(tiny_world, out_dir, "--grad_accum=2")])
    assert f"resumed from {out_dir}/ckpt.pt at step 6" in stdout and "done: 0 steps" in stdout
    assert read_log(out_dir) == read_log(ref_dir)
    # every loss of the run is logged, and validation scores the scene head on the tokens that hold a shape
    val = [r for r in read_log(ref_dir) if kind(r) == "val"][-1]
    assert {"val_sigmoid", "val_loc", "val_offset", "val_scene", "val_kind_acc", "val_colour_acc", "val_x_tenths_acc",
            "val_y_tenths_acc"} <= set(val)
    assert 0.0 <= val["val_kind_acc"] <= 1.0 and val["val_scene"] > 0
    # and on each view's tokens alone: the overall accuracy is their token-weighted mean, so it lies between them
    for attribute in ("kind", "colour"):
        views = [val[f"val_{attribute}_high_res_acc"], val[f"val_{attribute}_low_res_acc"]]
        assert min(views) - 1e-12 <= val[f"val_{attribute}_acc"] <= max(views) + 1e-12
    final = load_safetensors(os.path.join(out_dir, "final", "model.safetensors"))
    ref_final = load_safetensors(os.path.join(ref_dir, "final", "model.safetensors"))
    assert final.keys() == ref_final.keys() and all(torch.equal(final[k], ref_final[k]) for k in final)


def test_ddp_two_processes_equal_one_with_grad_accum_two(tiny_world, reference_run, tmp_path):
    """2 gloo processes with 1 micro-batch each get the draws that 1 process with grad_accum 2 deals to its two
    micro-batches, so each micro-batch's forward is the same computation. Gradients: (loss / 2).backward() twice
    accumulates g0 / 2 + g1 / 2; DDP averages g0 and g1 as (g0 + g1) / 2. Halving is exact in binary floating point
    and a sum of two float32 numbers is one rounding either way, so the two are equal to the bit, and so are the
    clipped norms, AdamW's updates and the next steps' losses (the logged loss likewise: float32 v0 / 2 + v1 / 2
    against (v0 + v1) / 2). No tolerance is needed, and none is given: any difference is a bug."""
    ref_dir, _ = reference_run
    out_dir = str(tmp_path / "ddp")
    run_gloo_ranks(["train_vision.py", *stage1_args(tiny_world, out_dir, "--grad_accum=1", "--loader_workers=0")],
                   timeout=TIMEOUT_S)

    train = {key: r for key, r in by_step(read_log(out_dir)).items() if key[0] == "train"}
    ref_train = {key: r for key, r in by_step(read_log(ref_dir)).items() if key[0] == "train"}
    assert len(ref_train) == 6 and train == ref_train  # loss and its parts, lr, grad norm: exact floats
    final = load_safetensors(os.path.join(out_dir, "final", "model.safetensors"))
    ref_final = load_safetensors(os.path.join(ref_dir, "final", "model.safetensors"))
    assert final.keys() == ref_final.keys() and all(torch.equal(final[k], ref_final[k]) for k in final)
    # rank r's sampler is the reference's r-th micro-batch's
    ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=False)
    assert ckpt["world_size"] == 2
    rank_states = ckpt["data"]
    ref_state = torch.load(os.path.join(ref_dir, "ckpt.pt"), weights_only=False)["data"][0]
    assert [s["samplers"] for s in rank_states] == [[sampler] for sampler in ref_state["samplers"]]


# ---------------------------------------------------------------------------
# 6. The export: transformers reads it, and the next stage starts from it
# ---------------------------------------------------------------------------


def trained_vit(out_dir):
    """The ViT as the run left it, from its last checkpoint (not from the export under test)."""
    state = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=False)["model"]
    vit = SigLIP2(Molmo2Config.preset("tiny").vit)
    vit.load_state_dict({k.removeprefix("vit."): v for k, v in state.items() if k.startswith("vit.")})
    return vit.eval()


def test_export_gives_transformers_the_same_hidden_states(tiny_world, reference_run):
    """final/ loaded by transformers.SiglipVisionModel, fed the processor's crops of a world image as (N, 3, H, W)
    pixels: hidden_states[0] is our patch + position embedding and hidden_states[i + 1] block i's output. The two
    differ only in summation order (a Conv2d over (c, ph, pw) against our Linear over (ph, pw, c), and attention
    kernels on different layouts): float32 rounding of a few ulps of the largest value (measured: 4); allowed 16,
    i.e. 2^-19 of the state's largest magnitude."""
    from transformers import SiglipVisionModel
    from transformers.models.molmo2.image_processing_molmo2 import batch_pixels_to_patches

    ref_dir, _ = reference_run
    vit = trained_vit(ref_dir)
    hf = SiglipVisionModel.from_pretrained(os.path.join(ref_dir, "final")).eval()
    assert hf.config.num_hidden_layers == len(vit.layers) == 3  # the tiny preset reads blocks 2 and 0
    patches = tiny_processor().image(os.path.join(tiny_world, "synth_image", "val", "000000.png")).patches
    N, n, p = patches.shape[0], 4, 14  # (N, 16, 588): 4x4 patches of 14x14x3, each flattened (ph, pw, c)
    pixels = patches.view(N, n, n, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(N, 3, n * p, n * p)
    # transformers' own patching (Molmo2's image processor) takes those pixels back to our patches
    assert torch.equal(batch_pixels_to_patches(pixels.permute(0, 2, 3, 1), p), patches)
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
        ours = [vit.embed(patches)] + vit(patches, [0, 1, 2])
    assert len(theirs) == len(ours) == 4
    for i, (a, b) in enumerate(zip(theirs, ours)):
        scale = a.abs().max().item()
        assert (a - b).abs().max().item() <= 2 ** -19 * scale, f"hidden_states[{i}]"


def test_train_align_vit_from_starts_from_the_exported_vit(tiny_world, reference_run, tmp_path, monkeypatch):
    """train_align.py --vit_from=<stage-1 out_dir> --model_preset=tiny: a scratch Molmo2 whose ViT is the trained one,
    bit for bit, and (frozen in this stage) still is in the model it exports."""
    from model import Molmo2

    ref_dir, _ = reference_run
    out_dir = tmp_path / "align"
    args = [f"--out_dir={out_dir}", f"--vit_from={ref_dir}", "--model_preset=tiny", "--overlap_margins=(1, 1)",
            "--max_crops=2", "--max_row_crops=8", "--max_video_frames=4", "--max_seq_len=256", "--batch_size=1",
            "--device=cpu", "--max_steps=1", "--save_every=0", "--eval_every=0", f"--data_dir={tiny_world}",
            "--data_mixture={'image': (1.0, ['synth_image'])}"]
    monkeypatch.setattr(sys, "argv", ["train_align.py", *args])
    run = runpy.run_path(os.path.join(ROOT, "train_align.py"), run_name="__main__")
    trained = trained_vit(ref_dir).state_dict()
    for vit in (run["model"].vit, Molmo2.from_pretrained(str(out_dir / "final")).vit):
        state = vit.state_dict()
        assert state.keys() == trained.keys()
        assert all(torch.equal(state[k], trained[k]) for k in state)


# ---------------------------------------------------------------------------
# The scene loss: each token names the kind and colour of the shape whose centre it holds
# ---------------------------------------------------------------------------

def test_scene_targets_name_the_shape_whose_centre_lies_in_each_cell_by_hand():
    """Two cells, the image's left and right halves. A red circle's centre is in the left one; a blue star's and
    then a green square's (drawn later, so on top) in the right one. Classes are 1-based in the world's orders
    (kinds circle, square, triangle, star; colours red, green, blue, yellow), 0 where no centre lies."""
    assert training.scene_attributes() == {"kind": ("circle", "square", "triangle", "star"),
                                           "colour": ("red", "green", "blue", "yellow")}
    assert training.scene_classes() == (5, 5)
    cells = np.array([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.1]])
    scene = {"shapes": [{"kind": "circle", "colour": "red", "x": 0.25, "y": 0.5},
                        {"kind": "star", "colour": "blue", "x": 0.75, "y": 0.5},
                        {"kind": "square", "colour": "green", "x": 0.7, "y": 0.2}]}
    assert training.scene_targets(scene, cells).tolist() == [[1, 1], [2, 2], [0, 0]]


def test_scene_digits_are_the_first_digits_a_point_on_the_centre_is_written_with_by_hand():
    """scene_digits: the same cells and shapes, each token also naming the first digit of its centre's x and y on
    Molmo2's 0-1000 scale: the circle at (0.25, 0.5) is written "250 500" (digits 2, 5: classes 3, 6), the square at
    (0.7, 0.2) "700 200" (7, 2). A centre at 0.0996 is written 100 (digit 1, not the 0 of its tenth), one on the far
    edge 1000 (the last class, 9). The check reads the digits off the point tag the world's answers carry."""
    assert list(training.scene_attributes(digits=True)) == ["kind", "colour", "x_tenths", "y_tenths"]
    assert training.scene_classes(digits=True) == (5, 5, 11, 11)
    cells = np.array([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.1]])
    scene = {"shapes": [{"kind": "circle", "colour": "red", "x": 0.25, "y": 0.5},
                        {"kind": "star", "colour": "blue", "x": 0.75, "y": 0.5},
                        {"kind": "square", "colour": "green", "x": 0.7, "y": 0.2}]}
    assert training.scene_targets(scene, cells, digits=True).tolist() == [[1, 1, 3, 6], [2, 2, 8, 3], [0, 0, 0, 0]]
    edges = {"shapes": [{"kind": "star", "colour": "yellow", "x": 0.0996, "y": 1.0}]}
    assert data.image_points_tag([(0.0996, 1.0)], "s") == '<points coords="1 1 100 1000">s</points>'
    assert training.scene_targets(edges, cells[:1], digits=True).tolist() == [[4, 4, 2, 10]]


def test_loader_with_scene_digits_adds_the_digit_targets_to_the_same_tokens(tiny_world):
    """VisionLoader(scene_digits=True): each token's scene targets are the plain loader's kind and colour, then a
    digit class for x and y on exactly the tokens that hold a centre (0 on the rest; -1 for an image without a
    scene, as its kind and colour)."""
    plain, digits = (training.VisionLoader(tiny_world, MIXTURE, "val", 2, tiny_processor(), 32, True, True, seed=0,
                                           use_scene=True, scene_digits=d).next_step()[0]["scene_targets"]
                     for d in (False, True))
    assert plain.shape[1] == 2 and digits.shape == (plain.shape[0], 4)
    assert torch.equal(digits[:, :2], plain)
    holds = plain[:, 0] > 0
    assert holds.any() and (digits[holds, 2:] > 0).all()
    assert torch.equal(digits[~holds, 2:], plain[~holds, :1].expand(-1, 2))


def test_scene_weights_scale_each_attributes_cross_entropy_by_hand():
    """scene_weights (kind 1, colour 1, x digit 0.5, y digit 0.25): at a zero head each attribute's mean
    cross-entropy over the two known tokens is ln(its classes), so the loss is 2 ln 5 + 0.75 ln 11."""
    from vision import SigLIP2, SigLIP2Config, VisionPretrainer
    torch.manual_seed(0)
    vit = SigLIP2(SigLIP2Config.preset("tiny"))
    pretrainer = VisionPretrainer(vit, (1, 0), 1, 8, 16, use_sigmoid=False, use_loc=False, text_vocab_rows=64,
                                  scene_classes=(5, 5, 11, 11), scene_weights=(1.0, 1.0, 0.5, 0.25))
    with torch.no_grad():
        pretrainer.scene_head.weight.zero_()
        pretrainer.scene_head.bias.zero_()
    batch = {"scene_targets": torch.tensor([[1, 3, 4, 7], [0, 0, 0, 0], [-1, -1, -1, -1]])}
    # float32 log-sum-exp of numbers of order 1: a few ulps of the result
    by_hand = 2 * math.log(5) + 0.75 * math.log(11)
    assert pretrainer.scene_loss(torch.randn(3, 16), batch).item() == pytest.approx(by_hand, rel=1e-6)
    with pytest.raises(ValueError, match="one per attribute"):
        VisionPretrainer(vit, (1, 0), 1, 8, 16, False, False, 64, scene_classes=(5, 5), scene_weights=(1.0,))


def test_scene_loss_is_each_attributes_cross_entropy_over_the_tokens_with_a_scene_by_hand():
    """Three tokens, of which the last is of an image without a scene (-1: left out). With the head at 0 every
    class of each attribute has probability 1/5, so each known token adds ln 5 per attribute: the loss is
    (2 tokens x 2 attributes x ln 5) / 2 tokens = 2 ln 5. With a head that says kind class 1 with logit 3 (the
    rest 0), the first token, whose kind is 1, adds ln(e^3 + 4) - 3 for its kind instead."""
    from vision import SigLIP2, SigLIP2Config, VisionPretrainer
    torch.manual_seed(0)
    vit = SigLIP2(SigLIP2Config.preset("tiny"))
    pretrainer = VisionPretrainer(vit, (1, 0), 1, 8, 16, use_sigmoid=False, use_loc=False, text_vocab_rows=64,
                                  scene_classes=(5, 5))
    batch = {"scene_targets": torch.tensor([[1, 3], [0, 0], [-1, -1]])}
    with torch.no_grad():
        pretrainer.scene_head.weight.zero_()
        pretrainer.scene_head.bias.zero_()
    tokens = torch.randn(3, 16)
    # float32 log-sum-exp of numbers of order 1: a few ulps of the result
    assert pretrainer.scene_loss(tokens, batch).item() == pytest.approx(2 * math.log(5), rel=1e-6)
    with torch.no_grad():
        pretrainer.scene_head.bias[1] = 3.0  # the kind's class 1, for every token
    by_hand = (math.log(math.exp(3) + 4) - 3 + math.log(5)  # token 0: kind 1 (said), colour 3
               + math.log(math.exp(3) + 4) + math.log(5)) / 2  # token 1: kind 0 (nothing), colour 0
    assert pretrainer.scene_loss(tokens, batch).item() == pytest.approx(by_hand, rel=1e-6)
    assert VisionPretrainer(vit, (1, 0), 1, 8, 16, False, True, 64).scene_head is None  # off by default


def test_balanced_scene_loss_weighs_the_tokens_with_a_centre_as_much_as_those_without_by_hand():
    """scene_balanced: four tokens, one holding a centre (kind 1, colour 3), two holding none, one of an image without
    a scene. Per attribute the loss is the mean over the holding tokens plus the mean over the empty ones. At a zero
    head every cross-entropy is ln 5: 2 x 2 ln 5. With kind class 1 at logit 3, the holding token's kind costs
    ln(e^3 + 4) - 3 and each empty token's ln(e^3 + 4), where the unbalanced loss averages the three alike."""
    from vision import SigLIP2, SigLIP2Config, VisionPretrainer
    torch.manual_seed(0)
    vit = SigLIP2(SigLIP2Config.preset("tiny"))
    balanced, plain = (VisionPretrainer(vit, (1, 0), 1, 8, 16, False, False, 64, scene_classes=(5, 5),
                                        scene_balanced=b) for b in (True, False))
    batch = {"scene_targets": torch.tensor([[1, 3], [0, 0], [0, 0], [-1, -1]])}
    tokens = torch.randn(4, 16)
    for pretrainer in (balanced, plain):
        with torch.no_grad():
            pretrainer.scene_head.weight.zero_()
            pretrainer.scene_head.bias.zero_()
            pretrainer.scene_head.bias[1] = 3.0
    said, other = math.log(math.exp(3) + 4) - 3, math.log(math.exp(3) + 4)
    # float32 log-sum-exp of numbers of order 1: a few ulps of the result
    assert balanced.scene_loss(tokens, batch).item() == pytest.approx(said + other + 2 * math.log(5), rel=1e-6)
    assert plain.scene_loss(tokens, batch).item() == pytest.approx((said + 2 * other) / 3 + math.log(5), rel=1e-6)
    loss = balanced.scene_loss(tokens[:2], {"scene_targets": torch.full((2, 2), -1)})
    loss.backward()
    assert loss.item() == 0.0 and balanced.scene_head.weight.grad is not None


def test_scene_loss_without_scenes_is_zero_and_keeps_the_head_in_the_graph():
    """A micro-batch of real images (no scene) adds 0 but still reaches the head: DDP needs every weight used."""
    from vision import SigLIP2, SigLIP2Config, VisionPretrainer
    torch.manual_seed(0)
    pretrainer = VisionPretrainer(SigLIP2(SigLIP2Config.preset("tiny")), (1, 0), 1, 8, 16, False, False, 64,
                                  scene_classes=(5, 5))
    loss = pretrainer.scene_loss(torch.randn(2, 16), {"scene_targets": torch.full((2, 2), -1)})
    loss.backward()
    assert loss.item() == 0.0 and pretrainer.scene_head.weight.grad is not None


def test_scene_targets_reach_the_batch_only_for_records_with_a_scene():
    """collate_vision: a synthetic record's tokens carry its scene's classes, a record without a scene -1 (unknown,
    not 'no shape'); without use_scene no example has targets."""
    processor = tiny_processor()
    point = answer("pointing", '<points coords="1 1 250 500">red circles</points>')
    synthetic = {"images": [black(56, 56)], "annotations": [point],
                 "scene": {"shapes": [{"kind": "circle", "colour": "red", "x": 0.25, "y": 0.5}]}}
    real = {"images": [black(56, 56)], "annotations": [point]}
    examples = [training.VisionExample(r, 0, processor, 16, False, True, use_scene=True) for r in (synthetic, real)]
    batch = training.collate_vision(examples)
    m = examples[0].pooling.shape[0]
    expected = training.scene_targets(synthetic["scene"], examples[0].cells)
    assert (expected[:, 0] == 1).sum() == 2  # the centre lies in one cell of each view: global and high-res
    assert batch["scene_targets"][:m].tolist() == expected.tolist()
    assert (batch["scene_targets"][m:] == -1).all()
    assert training.VisionExample(synthetic, 0, processor, 16, False, True).scene_targets is None


# `python -c CHECKS <json list of argument lists>`: train_vision.py run once per argument list in one process (one
# torch import for all), each run's SystemExit message written to stdout after a marker line.
CHECKS = """
import json, runpy, sys
for args in json.loads(sys.argv[1]):
    sys.argv = ["train_vision.py", *args]
    print("== run", flush=True)
    try:
        runpy.run_path("train_vision.py", run_name="__main__")
    except SystemExit as e:
        print(f"exit: {e.code}", flush=True)
"""


def test_settings_are_checked_before_any_work(tmp_path):
    """vit_init names one of two initialisations, and only a ViT from scratch can take one: a ViT loaded from
    init_from would overwrite it, so asking for both is an error that says so; vit_lr_fan_in, vit_lr, muon_lr and
    batch_echo take only the values that mean something (muon_lr not beside AdamW's ViT rates); so does
    vit_image_size, which sizes a ViT from scratch only."""
    base = ["--model_preset=tiny", "--device=cpu", f"--out_dir={tmp_path}"]
    checks = [(["--vit_init=xavier"], "vit_init='xavier': expected 'gpt' or 'big_vision'"),
              (["--vit_init=big_vision", "--init_from=out/some_vit"],
               "vit_init='big_vision' draws a ViT from scratch, but init_from='out/some_vit' loads one"),
              (["--vit_position_std=0.5", "--init_from=out/some_vit"],
               "vit_position_std=0.5 changes a new ViT's start, but init_from='out/some_vit' loads one"),
              (["--vit_residual_scale=0.5", "--init_from=out/some_vit"],
               "vit_residual_scale=0.5 changes a new ViT's start, but init_from='out/some_vit' loads one"),
              (["--vit_lr_fan_in=-4"], "vit_lr_fan_in=-4: a fan-in (> 0), or 0 for every matrix at lr"),
              (["--vit_lr=-1e-4"], "vit_lr=-0.0001: the ViT's peak rate (> 0), or 0 for lr like the rest"),
              (["--vit_lr=1e-4", "--lr=0.0"], "vit_lr=0.0001 is a rate beside lr, but lr is 0: set lr for the heads"),
              (["--batch_echo=0"], "batch_echo=0: the steps each batch trains, a whole number >= 1"),
              (["--batch_echo=1.5"], "--batch_echo: batch_echo=1.5 is float, expected int (default 1)"),
              (["--vit_image_size=112", "--init_from=out/some_vit"],
               "vit_image_size=112 sizes a new ViT, but init_from='out/some_vit' loads one"),
              (["--vit_image_size=100"], "vit_image_size=100: a crop of whole 14-px patches"),
              (["--muon_lr=-0.02"], "muon_lr=-0.02: Muon's peak rate for the ViT's matrices (> 0), or 0 for AdamW"),
              (["--muon_lr=0.02", "--lr=0.0"], "muon_lr=0.02 is a rate beside lr, but lr is 0: set lr for the heads"),
              (["--muon_lr=0.02", "--vit_lr=1e-4"], "muon_lr=0.02 trains the ViT's matrices by Muon, but vit_lr")]
    result = subprocess.run([sys.executable, "-c", CHECKS, json.dumps([base + extra for extra, _ in checks])],
                            cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, env=ONE_THREAD)
    runs = result.stdout.split("== run\n")[1:]
    assert len(runs) == len(checks), result.stdout + result.stderr
    for run, (extra, message) in zip(runs, checks):
        assert run.startswith("exit: ") and message in run, (extra, run)
    assert not os.listdir(tmp_path)  # no run got as far as writing


def test_vit_position_std_and_residual_scale_change_only_their_weights(tiny_world, tmp_path):
    """vit_position_std redraws a new ViT's position embeddings at that std; vit_residual_scale multiplies each block's
    output projections (o_proj, fc2) by it; every other weight stays as the start drew it. One step at the warmup's
    lr of 0 keeps the start in ckpt.pt. The tiny ViT has 16 x 32 = 512 position weights: a sample std is within ~3%
    (1 / sqrt(2n)) of the true one, so 15% is five of those; gpt's start draws them at 0.02, far outside it. The
    scaled weights are the same float32 numbers times 0.5, a power of two: exact."""
    variants = {"start": [], "position": ["--vit_position_std=0.5"], "residual": ["--vit_residual_scale=0.5"]}
    started = [launch([sys.executable, "train_vision.py", *stage1_args(tiny_world, str(tmp_path / name)),
                      "--vit_init=gpt", "--max_steps=1", "--eval_every=0", *args]) for name, args in variants.items()]
    for run in started:
        finish(run)
    weights = {name: torch.load(tmp_path / name / "ckpt.pt", map_location="cpu", weights_only=False)["model"]
               for name in variants}
    start, position = weights["start"], "vit.positional_embedding"
    assert abs(start[position].std().item() - 0.02) < 0.15 * 0.02
    assert abs(weights["position"][position].std().item() - 0.5) < 0.15 * 0.5
    assert all(torch.equal(start[k], weights["position"][k]) for k in start if k != position)
    scaled = [k for k in start if k.startswith("vit.layers.") and k.endswith(("o_proj.weight", "fc2.weight"))]
    blocks = {k.split(".")[2] for k in start if k.startswith("vit.layers.")}
    assert len(blocks) >= 2 and len(scaled) == 2 * len(blocks)  # the text tower's blocks are not the ViT's
    assert all(torch.equal(weights["residual"][k], start[k] * 0.5) for k in scaled)
    assert all(torch.equal(start[k], weights["residual"][k]) for k in start if k not in scaled)


def test_init_heads_continues_a_runs_heads_as_well_as_its_vit(tiny_world, reference_run, tmp_path):
    """init_from a stage-1 run loads its ViT; init_heads=True also its heads and text tower, from its ckpt.pt. One step
    at the warmup's lr of 0 changes no weight, so the new run's checkpoint holds the reference run's every tensor with
    init_heads, and new heads without; a folder without a ckpt.pt is an error that says so."""
    ref_out, _ = reference_run
    ref = torch.load(os.path.join(ref_out, "ckpt.pt"), map_location="cpu", weights_only=False)["model"]
    started = {init_heads: launch([sys.executable, "train_vision.py",
                                  *stage1_args(tiny_world, str(tmp_path / f"heads_{init_heads}")), "--vit_init=gpt",
                                  f"--init_from={ref_out}", f"--init_heads={init_heads}", "--max_steps=1",
                                  "--eval_every=0"]) for init_heads in (True, False)}
    wrong = launch([sys.executable, "train_vision.py", *stage1_args(tiny_world, str(tmp_path / "x")), "--vit_init=gpt",
                   f"--init_from={ref_out}/final", "--init_heads=True"])
    for init_heads, run in started.items():
        finish(run)
        new = torch.load(tmp_path / f"heads_{init_heads}" / "ckpt.pt", map_location="cpu", weights_only=False)["model"]
        assert new.keys() == ref.keys()
        heads = [k for k in ref if not k.startswith("vit.")]
        assert len(heads) > 5 and all(torch.equal(new[k], ref[k]) for k in ref if k.startswith("vit."))
        assert all(torch.equal(new[k], ref[k]) for k in heads) == init_heads
    assert "init_heads=True needs init_from to be a stage-1 out_dir" in finish(wrong, returncode=1, stream="stderr")


def test_text_tower_rounded_shapes_give_each_text_its_own_embedding_and_gradient():
    """The GPU's rounded shapes (64 texts, 8 tokens) against the exact ones: every text is computed alone, so its
    embedding and the weights' gradients are the same math; float32, the matmuls over more rows may sum in another
    order: a few ulps of values near 1, and in a gradient, which sums products with the loss's weights (up to 15)
    over every token, ~1e-6 absolute where the terms cancel (seen: 1.2e-6 on a 2-core CPU, torch 2.14.1)."""
    from vision import TextTower
    torch.manual_seed(0)
    tower = TextTower(SigLIP2Config.preset("tiny"), n_layers=2, max_len=12, embed_dim=16, vocab_rows=100)
    ids = torch.randint(0, 1000, (5, 3))
    lengths = torch.tensor([3, 1, 2, 3, 2])
    outs, grads = [], []
    for rounded in (False, True):
        tower.zero_grad()
        out = tower(ids, lengths, round_shapes=rounded)
        (out * torch.arange(16.0)).sum().backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in tower.parameters()])
    assert outs[1].shape == (5, 16)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for rounded_grad, exact_grad in zip(*grads[::-1]):
        torch.testing.assert_close(rounded_grad, exact_grad, rtol=1e-5, atol=1e-5)


def test_scene_hits_score_each_view_alone_by_hand():
    """Three tokens that hold a centre, the first two of the high-res view. Kinds (4 + none): the head says class 1
    everywhere, the targets are 1, 2, 1: right, wrong, right. Colours: the head says 3, the targets 3, 3, 2."""
    kind_logits = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0]]).repeat(3, 1)
    colour_logits = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0]]).repeat(3, 1)
    targets = torch.tensor([[1, 3], [2, 3], [1, 2]])
    hits = training.scene_hits((kind_logits, colour_logits), targets, torch.tensor([True, True, False]))
    assert hits == {"kind": [True, False, True], "kind_high_res": [True, False], "kind_low_res": [True],
                    "colour": [True, True, False], "colour_high_res": [True, True], "colour_low_res": [False]}


def test_max_minutes_ends_stage_1_where_its_minutes_end(tiny_world, tmp_path, monkeypatch):
    """train_vision.py --max_minutes: after its 20 probe steps a 30-step run is cut to what its minutes hold (here 24,
    training.steps_within made to say so; tests/test_training.py checks the clock's part): its log ends at step 24
    and the steps after the cut follow the cosine to step 24, not to step 30."""
    out_dir = str(tmp_path / "vision")
    asked = []
    monkeypatch.setattr(training, "steps_within",
                        lambda minutes, seconds, times, done, top: asked.append((minutes, len(times), done, top)) or 24)
    monkeypatch.setattr(sys, "argv", ["train_vision.py", *stage1_args(tiny_world, out_dir, "--max_steps=30",
                                                                      "--max_minutes=5", "--warmup=0", "--eval_every=0",
                                                                      "--save_every=0", "--loader_workers=0")])
    run = runpy.run_path(os.path.join(ROOT, "train_vision.py"), run_name="__main__")
    assert asked == [(5.0, 20, 20, 30)] and run["max_steps"] == 24
    steps = {r["step"]: r for r in read_log(out_dir) if kind(r) == "train"}
    assert sorted(steps) == list(range(24))
    assert steps[19]["lr"] == pytest.approx(training.lr_at(19, 1e-3, 0, 30), rel=1e-12)  # before the cut
    assert steps[22]["lr"] == pytest.approx(training.lr_at(22, 1e-3, 0, 24), rel=1e-12)  # after it
