"""Where the full preset's train step goes, as a picture (BENCHMARKS.md "The output head's softmax compiled"): one
bar a profiled step, its GPU time by kind (training.kernel_kinds) end to end, then the time the GPU waited on the
host (the profiled call's wall time less its busy time), against two lines: 2x transformers' step in the same call
and 40% MFU. Reads the profiles' summaries that tools/bench.py --profile writes (their first lines, as kept in
assets/bench/speed_1206/kinds.txt).

    python assets/bench/plot_step_kinds.py    # -> assets/bench/speed_1206/step_kinds.png
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from PIL import Image, ImageDraw  # noqa: E402

from configurator import configure  # noqa: E402
from sample import _font  # noqa: E402
from training import KERNEL_KINDS  # noqa: E402

kinds_file = "assets/bench/speed_1206/kinds.txt"
out = "assets/bench/speed_1206/step_kinds.png"
steps = ("train", "train_compiled_blocks", "train_cuda_graph", "step_head_as_before_fp32_weights_fresh",
         "train_cuda_graph_fresh")  # the profiles drawn, top to bottom
labels = ("eager", "each block compiled", "as a CUDA graph", "graph, fresh gradients, the head as before",
          "graph, fresh gradients, the head compiled")
transformers_ms = 283.6  # transformers' step in the same call (bench_head.log)
step_tflop = 54.14  # Molmo2.training_flops of the bench's batch
peak_tflops = 989.0
configure(globals())

ORDER = [kind for kind, _ in KERNEL_KINDS] + ["other elementwise"]
COLOURS = dict(zip(ORDER, [(214, 96, 77), (67, 147, 195), (146, 104, 180), (102, 189, 99), (253, 174, 97),
                           (166, 206, 227), (255, 217, 47), (189, 189, 189)]))
HEAD = re.compile(r"^(\w+): ([\d.]+) ms a call, the GPU busy ([\d.]+) ms")
KIND = re.compile(r"^  (.+?)\s+([\d.]+) ms\s+[\d,]+ kernels$")


def read(path):
    """{profile name: (wall ms, busy ms, {kind: ms})} from the profiles' summaries in path."""
    found, name = {}, None
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if head := HEAD.match(line):
                name, wall, busy = head.groups()
                found[name] = (float(wall), float(busy), {})
            elif name and (kind_line := KIND.match(line)):
                kind, ms = kind_line.groups()
                found[name][2][kind] = float(ms)
    return found


def main():
    profiles = read(kinds_file)
    missing = [s for s in steps if s not in profiles]
    if missing:
        raise SystemExit(f"{kinds_file}: no profile named {missing}")
    width, bar, gap, left, top = 1000, 34, 22, 300, 60
    height = top + len(steps) * (bar + gap) + 150
    scale = (width - left - 80) / max(profiles[s][0] for s in steps)  # pixels a ms
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font, title_font = _font(13), _font(17)
    draw.text((20, 15), "The full preset's train step on one H100: the GPU's time by kind, then its wait on the host",
              fill=(0, 0, 0), font=title_font)
    for i, (name, label) in enumerate(zip(steps, labels)):
        wall, busy, kinds = profiles[name]
        y = top + i * (bar + gap)
        draw.text((left - 10, y + bar / 2), label, fill=(0, 0, 0), font=font, anchor="rm")
        x = left
        for kind in ORDER:
            w = kinds.get(kind, 0.0) * scale
            draw.rectangle((x, y, x + w, y + bar), fill=COLOURS[kind], outline=(255, 255, 255))
            x += w
        draw.rectangle((x, y, left + wall * scale, y + bar), outline=(120, 120, 120))  # the host's share
        draw.text((left + wall * scale + 6, y + bar / 2), f"{wall:.0f} ms", fill=(0, 0, 0), font=font, anchor="lm")
    bottom = top + len(steps) * (bar + gap) - gap / 2
    mfu_ms = step_tflop / (0.4 * peak_tflops) * 1e3
    for ms, text, side in ((transformers_ms / 2, f"2x transformers ({transformers_ms / 2:.0f} ms)", 1),
                           (mfu_ms, f"40% MFU ({mfu_ms:.0f} ms)", -1)):  # the lower one's label on the left
        x = left + ms * scale
        draw.line((x, top - 12, x, bottom), fill=(0, 0, 0), width=1)
        draw.text((x + 4 * side, top - 8), text, fill=(0, 0, 0), font=font, anchor="lb" if side > 0 else "rb")
    for ms in range(0, int(max(profiles[s][0] for s in steps)) + 1, 50):
        x = left + ms * scale
        draw.line((x, bottom, x, bottom + 5), fill=(0, 0, 0))
        draw.text((x, bottom + 8), f"{ms}", fill=(0, 0, 0), font=font, anchor="mt")
    draw.text((left, bottom + 26), "ms a step (profiled)", fill=(0, 0, 0), font=font)
    y = bottom + 52
    for i, kind in enumerate(ORDER + ["the GPU waits on the host"]):
        x = 20 + (i % 3) * 320
        yy = y + (i // 3) * 22
        if kind in COLOURS:
            draw.rectangle((x, yy, x + 14, yy + 14), fill=COLOURS[kind])
        else:
            draw.rectangle((x, yy, x + 14, yy + 14), outline=(120, 120, 120))
        draw.text((x + 20, yy + 7), kind, fill=(0, 0, 0), font=font, anchor="lm")
    image.save(out)
    print(f"{out}: {len(steps)} steps drawn")


if __name__ == "__main__":
    main()
