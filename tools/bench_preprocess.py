"""
Preprocessing speed: data.Molmo2Processor next to transformers' Molmo2Processor on the same inputs, same run.

  python tools/bench_preprocess.py            # needs transformers==5.23.0, torchvision and PyAV (requirements-test.txt)

- images: the full processor call (text + one 640x480 photo, 8-crop budget -> 2x2 crops + global crop), from a
  PIL image and from a JPEG file (transformers decodes files with torchvision, we with pillow).
- video: 2-fps sampling of a 60 s 640x480 30-fps clip (1,800 frames -> 120), as an mp4 file (decode + sample +
  preprocess) and as a (frames, fps) array. transformers reads files with torchcodec, which is not installed
  here, so its file path is its own PyAV reader (transformers.video_utils.load_video(backend="pyav")) with its
  video processor's sampler, then its processor on the sampled frames.
Rates are per CPU core: torch runs one thread and time is the process's CPU time (time.process_time), so other
load on the machine barely moves them. Each figure is the best of `repeats` runs.
"""

import os
import sys
import tempfile
import time
from functools import partial

import numpy as np
import torch
from PIL import Image

# run as python tools/bench_preprocess.py: the project's modules are in the folder above
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
from configurator import configure  # noqa: E402

# -- knobs (override with --key=value) -------------------------------------------------------------------------
repeats = 5  # each timing is the best of this many calls
video_seconds, video_fps, video_size = 60, 30, (480, 640)  # the clip decoded and preprocessed
# ----------------------------------------------------------------------------------------------------------------


def cpu_seconds(fn, repeats):
    """Best CPU time of `repeats` calls of fn (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def photo(height, width, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(height, width)
    img = np.stack([128 + 100 * np.sin(3 * x + 2 * y + p) for p in rng.uniform(0, 6, 3)], axis=-1)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def hf_processor():
    """transformers' Molmo2Processor with the released settings (tests/test_processor.py builds it), on the
    Qwen2Tokenizer that tests/conftest.py builds from the same BPE ranks."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from test_processor import hf_processor as build

    vocab, merges = TikTokenConverter().extract_vocab_merges_from_model(data.QWEN_RANKS_PATH)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    specials = sorted(data.SPECIAL_TOKENS.items(), key=lambda kv: kv[1])
    added = lambda names: tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in names],
                                               special_tokens=True)
    added([t for t, i in specials if i < data.MOLMO2_FIRST_ID])
    added([f"<|unused_{i}|>" for i in range(len(tokenizer), data.MOLMO2_FIRST_ID)])
    added([t for t, i in specials if i >= data.MOLMO2_FIRST_ID])
    return build(tokenizer)


def write_mp4(path, seconds, fps, size):
    import av

    base = photo(*size)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for t in range(seconds * fps):
            frame = np.roll(base, 4 * t, axis=1)  # a panning shot
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main():
    torch.set_num_threads(1)
    from transformers.video_utils import load_video as hf_load_video

    ours, hf = data.Molmo2Processor(), hf_processor()
    rows = []

    image = Image.fromarray(photo(480, 640))
    text = "<|image|>Describe this image."
    assert ours(text=text, images=[image])["image_num_crops"].tolist() == [5]
    t_ours = cpu_seconds(lambda: ours(text=text, images=[image]), repeats)
    t_hf = cpu_seconds(lambda: hf(text=text, images=[image], return_tensors="pt"), repeats)
    rows.append(("image 640x480 PIL, 8-crop budget (5 crops)", "images/s/core", 1 / t_ours, 1 / t_hf))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "photo.jpg")
        image.save(path, quality=90)
        t_ours = cpu_seconds(lambda: ours(text=text, images=[path]), repeats)
        t_hf = cpu_seconds(lambda: hf(text=text, images=[path], return_tensors="pt"), repeats)  # torchvision decode
        rows.append(("image 640x480 JPEG file (decode included)", "images/s/core", 1 / t_ours, 1 / t_hf))

    n_source = video_seconds * video_fps
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        write_mp4(path, video_seconds, video_fps, video_size)
        n_sampled = ours(text="<|video|>", videos=[path])["video_grids"][0, 0].item()

        def hf_file():
            sampler = partial(hf.video_processor.sample_frames, num_frames=128, max_fps=2)
            frames, metadata = hf_load_video(path, backend="pyav", sample_indices_fn=sampler)
            return hf(text="<|video|>", videos=[torch.from_numpy(frames)], video_metadata=[metadata],
                      do_sample_frames=False, return_tensors="pt")

        file_repeats = max(1, repeats // 2)
        t_ours = cpu_seconds(lambda: ours(text="<|video|>", videos=[path]), file_repeats)
        t_hf = cpu_seconds(hf_file, file_repeats)
        rows.append((f"mp4 {video_seconds} s {video_size[1]}x{video_size[0]} @{video_fps} -> {n_sampled} frames",
                     "frames/s/core (sampled)", n_sampled / t_ours, n_sampled / t_hf))
        rows.append(("  same, counted in source frames decoded", "frames/s/core (source)",
                     n_source / t_ours, n_source / t_hf))

    # the array path: identical frames broadcast to 1,800 (memory-light; the work does not depend on content)
    frames = np.broadcast_to(photo(*video_size)[None], (n_source, *video_size, 3))
    t_ours = cpu_seconds(lambda: ours(text="<|video|>", videos=[(frames, float(video_fps))]), repeats)
    frames_tensor = torch.from_numpy(np.ascontiguousarray(frames[:1])).expand(n_source, -1, -1, -1)  # same view
    metadata = [{"fps": float(video_fps), "total_num_frames": n_source}]
    t_hf = cpu_seconds(lambda: hf(text="<|video|>", videos=[frames_tensor], video_metadata=metadata,
                                  return_tensors="pt"), repeats)
    rows.append((f"array {n_source} frames {video_size[1]}x{video_size[0]} @{video_fps} -> {n_sampled}",
                 "frames/s/core (sampled)", n_sampled / t_ours, n_sampled / t_hf))

    # the training loaders' crops (no transformers counterpart): the processor stopping at the 0..255 levels, against
    # its floats turned back into them
    import training
    levels = training.levels_processor(ours)
    t_levels = cpu_seconds(lambda: levels.image(image), repeats)
    t_floats = cpu_seconds(lambda: training.to_uint8(ours.image(image).patches), repeats)

    print(f"torch {torch.__version__}, 1 thread, CPU time, best of {repeats}; {os.cpu_count()} CPUs visible")
    print(f"{'case':58s} {'unit':26s} {'ours':>9s} {'transformers':>13s} {'ratio':>6s}")
    for case, unit, mine, theirs in rows:
        print(f"{case:58s} {unit:26s} {mine:9.1f} {theirs:13.1f} {mine / theirs:6.2f}")
    print(f"the loaders' crops of a 640x480 photo as uint8 levels: {1 / t_levels:.1f} images/s/core straight from the "
          f"processor (pixel_levels), {1 / t_floats:.1f} through its floats and to_uint8")


if __name__ == "__main__":
    configure(globals())
    main()
