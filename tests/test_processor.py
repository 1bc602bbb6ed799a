"""data.py section 2 against transformers' Molmo2Processor (the oracle), with the released settings:
identical input_ids / attention_mask / mm_token_type_ids, pixel values within 1e-5, identical pooling indices,
grids and crop counts. Plus bad-input handling and hand-worked facts (token layout, frame sampling).

The images are synthetic "photographs" (smooth gradients + noise + shapes) in several PIL modes; videos are
arrays and files written here (mp4 / webm through PyAV, GIF / WebP / APNG through pillow, a folder of PNGs).
Lossy files are compared with transformers fed the frames transformers' own PyAV reader (or PyAV/pillow
directly, where transformers has no reader) decodes from the same file, so both sides see the same pixels."""

import copy
import io
import sys

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Molmo2ImageProcessor, Molmo2VideoProcessor
from transformers import Molmo2Processor as HFMolmo2Processor
from transformers.video_utils import load_video as hf_load_video

import data


# --- oracle and helpers -------------------------------------------------------------------------------------


def hf_processor(tokenizer, max_frames=128, crop_size=378, overlap_margins=(4, 4)):
    """transformers' processor with the released settings (Molmo2's processor_config.json): max_crops 8,
    num_frames 128, max_fps 2, video rescale + normalize on, single-crop view without <im_col>, BOS <|im_end|>,
    left padding."""
    tok = copy.deepcopy(tokenizer)
    tok.bos_token = tok.eos_token = "<|im_end|>"
    tok.padding_side = "left"
    size = {"height": crop_size, "width": crop_size}
    images = Molmo2ImageProcessor(size=size, max_crops=8, overlap_margins=list(overlap_margins), patch_size=14,
                                  pooling_size=[2, 2], do_convert_rgb=True)
    videos = Molmo2VideoProcessor(size=size, num_frames=max_frames, max_fps=2, patch_size=14, pooling_size=[3, 3],
                                  do_rescale=True, do_normalize=True, do_convert_rgb=True)
    return HFMolmo2Processor(images, videos, tok, image_use_col_tokens=True, use_single_crop_col_tokens=False,
                             use_single_crop_start_token=True, video_use_col_tokens=False,
                             use_frame_special_tokens=True)


@pytest.fixture(scope="module")
def hf(hf_qwen_tokenizer):
    return hf_processor(hf_qwen_tokenizer)


@pytest.fixture(scope="module")
def ours():
    return data.Molmo2Processor()


def assert_same(ours_out, hf_out):
    hf_out = {k: v for k, v in hf_out.items()}
    assert set(ours_out) == set(hf_out)
    for key, theirs in hf_out.items():
        mine = ours_out[key]
        assert mine.shape == theirs.shape, (key, mine.shape, theirs.shape)
        assert mine.dtype == theirs.dtype, (key, mine.dtype, theirs.dtype)
        if theirs.dtype.is_floating_point:
            # float32 pixels in [-1, 1] (an ulp is at most 1.2e-7): the same resize and normalisation in another
            # order differ by a few ulps; one pixel rounded to the next 0..255 level would differ by 2/255
            assert (mine - theirs).abs().max().item() <= 1e-5, key
        else:
            assert torch.equal(mine, theirs), key


def photo(height, width, seed=0):
    """A photograph-like RGB uint8 array: smooth colour gradients, a few flat shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y /= max(height - 1, 1)
    x /= max(width - 1, 1)
    phase = rng.uniform(0, 6, 3)
    img = np.stack([128 + 100 * np.sin(3 * x + 2 * y + p) for p in phase], axis=-1)  # (H, W, 3)
    for _ in range(4):  # discs and boxes
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        disc = (y - cy) ** 2 + (x - cx) ** 2 < r * r
        box = (abs(y - cy) < r) & (abs(x - cx) < r / 2)
        mask = disc if rng.uniform() < 0.5 else box
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def in_mode(pixels, mode):
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        alpha = np.linspace(0, 255, pixels.shape[1], dtype=np.uint8)[None, :].repeat(pixels.shape[0], 0)
        image.putalpha(Image.fromarray(alpha))
    elif mode == "I;16":
        # 16-bit grey spanning 0..65535 (PIL, hence transformers, clips it at 255 when converting to RGB)
        grey = np.asarray(image.convert("L")).astype(np.uint16) * 257
        image = Image.fromarray(grey)
        assert image.mode == "I;16"
    elif mode == "P":
        image = image.quantize(64)
    elif mode == "PA":  # palette with a transparent entry
        image = image.quantize(16)
        image.info["transparency"] = 3
    else:
        image = image.convert(mode)
    return image


# --- images -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,size", [
    ("RGB", (480, 640)), ("L", (500, 333)), ("P", (375, 500)), ("PA", (200, 260)), ("RGBA", (300, 300)),
    ("LA", (120, 90)), ("CMYK", (384, 256)), ("I;16", (150, 200)), ("1", (64, 96)), ("YCbCr", (240, 320)),
])
def test_image_modes_match_transformers(ours, hf, mode, size):
    image = in_mode(photo(*size, seed=len(mode)), mode)
    text = "<|image|>Describe this image."
    assert_same(ours(text=text, images=[image]), hf(text=text, images=[image], return_tensors="pt"))


def test_exif_rotated_jpeg_file(ours, hf, tmp_path):
    """A JPEG whose pixels are stored sideways with EXIF orientation 6: read from its path it comes out upright,
    exactly as transformers' processor sees the upright image."""
    pixels = photo(240, 320, seed=7)
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(path, quality=90, exif=exif)
    upright = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270))
    assert data.load_image(str(path)).shape == (320, 240, 3)
    assert np.array_equal(data.load_image(str(path)), upright)
    text = "<|image|>What is this?"
    theirs = hf(text=text, images=[Image.fromarray(upright)], return_tensors="pt")
    assert_same(ours(text=text, images=[str(path)]), theirs)


def test_png_file_and_bytes_match_the_pil_image(ours, tmp_path):
    image = in_mode(photo(100, 150, seed=3), "RGBA")
    path = tmp_path / "x.png"
    image.save(path)
    by_pil = ours(text="<|image|>", images=[image])
    by_path = ours(text="<|image|>", images=[str(path)])
    by_bytes = ours(text="<|image|>", images=[path.read_bytes()])
    for key in by_pil:
        assert torch.equal(by_pil[key], by_path[key]) and torch.equal(by_pil[key], by_bytes[key]), key


@pytest.mark.parametrize("height,width", [
    (1, 1), (2, 3), (14, 14), (111, 113), (112, 112), (113, 500), (378, 378), (379, 645), (480, 640),
    (300, 4000), (4000, 300), (1, 4000),
])
def test_image_sizes_match_transformers(ours, hf, height, width):
    image = Image.fromarray(photo(height, width, seed=height + width))
    text = "<|image|>Caption:"
    assert_same(ours(text=text, images=[image]), hf(text=text, images=[image], return_tensors="pt"))


def test_numpy_images_match_transformers(ours, hf):
    pixels = photo(90, 120, seed=5)
    text = "<|image|>"
    assert_same(ours(text=text, images=[pixels]), hf(text=text, images=[pixels], return_tensors="pt"))


@pytest.mark.parametrize("n_images", [1, 2, 5])
def test_several_images_in_one_prompt(ours, hf, n_images):
    images = [Image.fromarray(photo(60 + 70 * i, 200 - 25 * i, seed=i)) for i in range(n_images)]
    text = data.vision_prefix(n_images) + "<|im_start|>user\nWhat differs?<|im_end|>\n<|im_start|>assistant\n"
    assert_same(ours(text=text, images=images), hf(text=text, images=images, return_tensors="pt"))


def test_batch_of_texts_is_left_padded_like_transformers(ours, hf):
    images = [Image.fromarray(photo(50, 80, seed=i)) for i in range(3)]
    texts = ["Image 1<|image|>Image 2<|image|>Compare them.", "<|image|>Hi"]
    assert_same(ours(text=texts, images=images), hf(text=texts, images=images, padding=True, return_tensors="pt"))


def test_eval_crop_budget(ours, hf):
    image = Image.fromarray(photo(900, 1400, seed=11))
    mine = ours(text="<|image|>", images=[image], max_crops=data.MAX_CROPS_EVAL)
    assert_same(mine, hf(text="<|image|>", images=[image], max_crops=24, return_tensors="pt"))
    assert mine["image_num_crops"].item() > 9  # more than the training budget allows


def test_small_crops_match_transformers(hf_qwen_tokenizer):
    """A tiny preset (56-px crops of 14-px patches, margins of 1 patch) is transformers' math at other sizes."""
    ours = data.Molmo2Processor(crop_size=56, overlap_margins=(1, 1))
    hf = hf_processor(hf_qwen_tokenizer, crop_size=56, overlap_margins=(1, 1))
    image = Image.fromarray(photo(70, 150, seed=2))
    video = photo(40, 60, seed=3)[None].repeat(5, 0)
    mine = ours(text="<|image|><|video|>x", images=[image], videos=[(video, 4.0)])
    theirs = hf(text="<|image|><|video|>x", images=[image], videos=[torch.from_numpy(video)],
                video_metadata=[{"fps": 4.0, "total_num_frames": 5}], return_tensors="pt")
    assert_same(mine, theirs)
    assert mine["pixel_values"].shape[1:] == (16, 588)


@pytest.mark.parametrize("height,width", [(224, 224), (480, 640), (100, 700)])
def test_pixel_levels_are_the_whole_values_the_patches_are_made_from(ours, height, width):
    """pixel_levels=True (the training loaders') gives each patch value as the 0..255 level the processor rounds
    to before normalising: training.from_uint8 makes the same float32 patches from them, bit for bit, and
    training.to_uint8 of the float patches gives them back; for images and for video frames."""
    import training
    levels = training.levels_processor(ours)
    assert levels.pixel_levels and not ours.pixel_levels  # a copy: the processor itself still gives floats
    image = photo(height, width, seed=height)
    frames = (moving_video(5, height // 4, width // 4, seed=width), 10.0)
    for a, b in ((ours.image(image), levels.image(image)), (ours.video(frames)[0], levels.video(frames)[0])):
        assert a.patches.dtype == torch.float32 and b.patches.dtype == torch.uint8
        assert torch.equal(training.from_uint8(b.patches), a.patches)
        assert torch.equal(training.to_uint8(a.patches), b.patches)
        assert torch.equal(a.token_pooling, b.token_pooling) and a.grid == b.grid


def test_image_token_layout_by_hand():
    """640x480 at 8 crops: 2x2 crops -> 46x46 patches -> 23x23 tokens; global 27x27 -> 14x14 (padded)."""
    x = data.preprocess_image(photo(480, 640))
    assert x.grid == (14, 14, 23, 23)
    assert x.patches.shape == (5, 729, 588)
    assert x.token_pooling.shape == (196 + 23 * 23, 4)
    assert x.token_pooling[0].tolist() == [0, 1, 27, 28]
    assert x.token_pooling[13].tolist() == [26, -1, 53, -1]  # the global grid's odd 27th column, padded
    assert x.token_pooling[195].tolist() == [728, -1, -1, -1]
    # first high-res token: crop 1 (after the global crop), its top-left 2x2 patches
    assert x.token_pooling[196].tolist() == [729, 730, 756, 757]
    ids = data.image_token_ids(x.grid)
    assert ids[0] == data.IMAGE_LOW_RES_START_ID and ids[197] == data.IMAGE_END_ID
    assert ids[198] == data.IMAGE_START_ID and ids[-1] == data.IMAGE_END_ID
    assert ids[1:197] == [data.IMAGE_PATCH_ID] * 196
    assert ids[199:199 + 24] == [data.IMAGE_PATCH_ID] * 23 + [data.IMAGE_COL_ID]
    assert len(ids) == 198 + 2 + 23 * 24
    # pixel values: the global crop's first patch is the top-left 14x14 of the resized image, in [-1, 1]
    assert -1 <= x.patches.min() and x.patches.max() <= 1


def test_vision_prefix_matches_molmo2_chat_template():
    assert data.vision_prefix(1) == "<|image|>"
    assert data.vision_prefix(3) == "Image 1<|image|>Image 2<|image|>Image 3<|image|>"
    assert data.vision_prefix(0, 1) == "<|video|>"


# --- video --------------------------------------------------------------------------------------------------


def moving_video(n_frames, height=48, width=64, seed=0):
    """(T, H, W, 3) uint8: a photo background with a square moving across it."""
    rng = np.random.default_rng(seed)
    base = photo(height, width, seed=seed)
    frames = np.repeat(base[None], n_frames, 0)
    for t in range(n_frames):
        y, x = (3 * t) % (height - 8), (5 * t) % (width - 8)
        frames[t, y:y + 8, x:x + 8] = rng.integers(0, 256, 3)
    return frames


@pytest.mark.parametrize("n_frames,fps", [(1, 30.0), (3, 1.0), (3, 24.0), (50, 10.0), (50, 2.0), (300, 30.0),
                                          (300, 29.97), (300, 1.5), (7, 3.5)])
def test_video_arrays_match_transformers(ours, hf, n_frames, fps):
    frames = moving_video(n_frames, seed=n_frames)
    text = "<|video|>What happens?"
    theirs = hf(text=text, videos=[torch.from_numpy(frames)], return_tensors="pt",
                video_metadata=[{"fps": fps, "total_num_frames": n_frames}])
    assert_same(ours(text=text, videos=[(frames, fps)]), theirs)


def test_video_timestamps_by_hand():
    """50 frames at 10 fps = 5 s: 10 frames at 2 fps, every 5th, timestamps 0.0 .. 4.5."""
    clip = data.load_video((moving_video(50), 10.0))
    assert clip.frame_indices.tolist() == list(range(0, 50, 5))
    assert [f"{t:.1f}" for t in clip.timestamps] == [f"{0.5 * i:.1f}" for i in range(10)]
    x = data.preprocess_video(clip.frames)
    assert x.grid == (10, 9, 9) and x.patches.shape == (10, 729, 588) and x.token_pooling.shape == (810, 9)
    assert x.token_pooling[81].tolist() == [729 + i for i in (0, 1, 2, 27, 28, 29, 54, 55, 56)]
    ids = data.video_token_ids(x.grid, clip.timestamps)
    tok = data.get_tokenizer()
    frame = [data.FRAME_START_ID] + [data.IMAGE_PATCH_ID] * 81 + [data.FRAME_END_ID]
    first_two = tok.encode("0.0 ") + frame + tok.encode(" 0.5 ") + frame
    assert ids[:len(first_two)] == first_two
    assert len(ids) == 10 * len(frame) + len(tok.encode("0.0 ")) + 9 * len(tok.encode(" 0.5 "))
    assert tok.decode(ids).replace("<im_patch>", "").startswith("0.0 <frame_start><frame_end> 0.5 <frame_start>")


def test_uniform_last_frame_sampling_by_hand():
    """Molmo2's training sampler: at most 2 fps plus the last frame while the video fits in max_frames,
    else max_frames evenly spaced from first to last."""
    sample = lambda n, fps, **kw: data.sample_frame_indices(n, fps, sampling="uniform_last_frame", **kw).tolist()
    assert sample(300, 30.0) == list(range(0, 286, 15)) + [299]  # 10 s: 20 frames at 2 fps + the last
    assert sample(1000, 10.0) == np.linspace(0, 999, 128).astype(int).tolist()  # 100 s > 63.5 s
    assert sample(2, 30.0) == [0, 1]
    assert sample(10, 1.0) == list(range(10))  # never faster than the video
    assert sample(30, 10.0, max_frames=4) == [0, 9, 19, 29]  # 3 s > 1.5 s: 4 frames first..last
    ours = data.Molmo2Processor(frame_sampling="uniform_last_frame")
    clip = data.load_video((moving_video(30), 10.0), sampling="uniform_last_frame")
    assert [f"{t:.1f}" for t in clip.timestamps] == ["0.0", "0.5", "1.0", "1.5", "2.0", "2.5", "2.9"]
    out = ours(text="<|video|>", videos=[(moving_video(30), 10.0)])
    assert out["video_grids"].tolist() == [[7, 9, 9]]


def write_pyav(path, frames, fps, codec, pix_fmt="yuv420p"):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if not len(frames):
            container.start_encoding()  # write the header of a video with no frames


def decode_pyav(path):
    """All frames and the average frame rate, straight from PyAV: the oracle's input for containers whose
    header lacks a frame count (transformers' own PyAV reader needs one)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate)


@pytest.mark.parametrize("n_frames,fps", [(1, 10), (3, 24), (50, 10), (75, 30), (300, 30), (300, 5)])
def test_mp4_file_matches_transformers(ours, hf, tmp_path, n_frames, fps):
    path = tmp_path / "clip.mp4"
    write_pyav(path, moving_video(n_frames, seed=1), fps, "libx264")
    frames, metadata = hf_load_video(str(path), backend="pyav")  # transformers' PyAV reader, all frames
    assert len(frames) == n_frames
    text = "<|video|>Describe."
    theirs = hf(text=text, videos=[torch.from_numpy(frames)], return_tensors="pt",
                video_metadata=[{"fps": metadata.fps, "total_num_frames": len(frames)}])
    assert_same(ours(text=text, videos=[str(path)]), theirs)


def test_webm_file_matches_transformers(ours, hf, tmp_path):
    path = tmp_path / "clip.webm"
    write_pyav(path, moving_video(12, seed=2), 6, "libvpx-vp9")
    frames, fps = decode_pyav(path)
    theirs = hf(text="<|video|>", videos=[torch.from_numpy(frames)], return_tensors="pt",
                video_metadata=[{"fps": fps, "total_num_frames": len(frames)}])
    assert_same(ours(text="<|video|>", videos=[str(path)]), theirs)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_image_files_match_transformers(ours, hf, tmp_path, fmt):
    """Animated GIF / WebP / APNG, 23 frames of 100 ms = 10 fps, read by pillow. The oracle gets the frames
    pillow decodes (WebP is lossy, GIF paletted) and the fps their stored durations give."""
    path = tmp_path / f"anim.{fmt.lower()}"
    frames = [Image.fromarray(f) for f in moving_video(23, seed=4)]
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=False)
    with Image.open(path) as image:
        assert image.n_frames == 23
        decoded, durations = [], []
        for i in range(23):
            image.seek(i)
            decoded.append(np.asarray(image.convert("RGB")))
            durations.append(image.info["duration"])
    assert durations == [100] * 23
    decoded = np.stack(decoded)
    theirs = hf(text="<|video|>", videos=[torch.from_numpy(decoded)], return_tensors="pt",
                video_metadata=[{"fps": 10.0, "total_num_frames": 23}])
    assert_same(ours(text="<|video|>", videos=[str(path)]), theirs)


def test_folder_of_frames(ours, hf, tmp_path):
    frames = moving_video(11, seed=5)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"frame_{i:04d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    theirs = hf(text="<|video|>", videos=[torch.from_numpy(frames)], return_tensors="pt",
                video_metadata=[{"fps": 5.0, "total_num_frames": 11}])
    assert_same(ours(text="<|video|>", videos=[(str(tmp_path), 5.0)]), theirs)


def test_image_and_video_in_one_batch(ours, hf):
    image = Image.fromarray(photo(120, 160, seed=9))
    frames = moving_video(20, seed=9)
    texts = ["<|image|>What is it?", "<|video|>And this?"]
    theirs = hf(text=texts, images=[image], videos=[torch.from_numpy(frames)], padding=True, return_tensors="pt",
                video_metadata=[{"fps": 4.0, "total_num_frames": 20}])
    assert_same(ours(text=texts, images=[image], videos=[(frames, 4.0)]), theirs)


# --- bad input ----------------------------------------------------------------------------------------------


def bad_files(tmp_path):
    """name -> path of an unusable file, and what its error should mention."""
    good = io.BytesIO()
    Image.fromarray(photo(64, 64)).save(good, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not a picture\n")
    return {
        "truncated.jpg": "cannot decode",
        "empty.jpg": "empty file",
        "text.png": "not an image file",
        "missing.jpg": "no such file",
    }


def test_bad_image_files_raise_media_error_naming_the_file(tmp_path):
    for name, problem in bad_files(tmp_path).items():
        path = str(tmp_path / name)
        with pytest.raises(data.MediaError) as err:
            data.load_image(path)
        assert path in str(err.value) and problem in str(err.value), str(err.value)
        assert err.value.source == path


def test_images_with_a_zero_side_raise_media_error(ours):
    for image in [np.zeros((0, 10, 3), np.uint8), np.zeros((7, 0, 3), np.uint8), Image.new("RGB", (0, 5))]:
        with pytest.raises(data.MediaError, match=r"images\[1\].*zero side"):
            ours(text="<|image|><|image|>", images=[photo(8, 8), image])


def test_bad_videos_raise_media_error_naming_the_input(tmp_path):
    empty_mp4 = tmp_path / "no_frames.mp4"
    write_pyav(empty_mp4, np.zeros((0, 16, 16, 3), np.uint8), 10, "libx264")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mkv").write_text("not a video")
    (tmp_path / "frames").mkdir()
    cases = {
        str(empty_mp4): "no frames",
        str(tmp_path / "empty.mp4"): "empty file",
        str(tmp_path / "text.mkv"): "cannot decode",
        str(tmp_path / "missing.mp4"): "no such file",
        str(tmp_path / "missing.gif"): "no such file",
        (str(tmp_path / "frames"), 2.0): "no image files",
    }
    for source, problem in cases.items():
        with pytest.raises(data.MediaError) as err:
            data.load_video(source)
        name = source[0] if isinstance(source, tuple) else source
        assert name in str(err.value) and problem in str(err.value), str(err.value)
    with pytest.raises(data.MediaError, match=r"videos\[0\].*no frames"):
        data.Molmo2Processor()(text="<|video|>", videos=[(np.zeros((0, 8, 8, 3), np.uint8), 30.0)])


def test_a_bad_item_costs_only_itself(ours, tmp_path):
    """Processing a batch item by item: the bad files raise MediaError, the good ones come out exactly as
    they do alone, and the processor stays usable."""
    problems = bad_files(tmp_path)
    good = [Image.fromarray(photo(40 + 10 * i, 50, seed=i)) for i in range(3)]
    alone = [ours(text="<|image|>", images=[g]) for g in good]
    items = [good[0], str(tmp_path / "truncated.jpg"), good[1], str(tmp_path / "text.png"), good[2]]
    results, failed = [], []
    for item in items:
        try:
            results.append(ours(text="<|image|>", images=[item]))
        except data.MediaError as e:
            failed.append(e.source)
    assert failed == [str(tmp_path / "truncated.jpg"), str(tmp_path / "text.png")]
    for got, want in zip(results, alone):
        for key in want:
            assert torch.equal(got[key], want[key])
    with pytest.raises(data.MediaError, match="truncated.jpg"):
        ours(text="<|image|><|image|>", images=[good[0], str(tmp_path / "truncated.jpg")])


def test_missing_pyav_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    write_pyav(path, moving_video(3), 10, "libx264")
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    with pytest.raises(ImportError, match="pip install av"):
        data.load_video(str(path))


def test_placeholder_count_must_match(ours):
    with pytest.raises(ValueError, match="placeholders"):
        ours(text="no placeholder", images=[photo(8, 8)])
    with pytest.raises(ValueError, match="at most one"):
        ours(text="<|video|><|video|>", videos=[(moving_video(2), 2.0), (moving_video(2), 2.0)])
