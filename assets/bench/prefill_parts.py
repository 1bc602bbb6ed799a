"""Where our eager prefill's time goes (BENCHMARKS.md "The pooling attention written out"): CUDA events around the
ViT, the connector and the LLM's first layer (the other 27 alike) in a prefill of one 640x480 photo's prompt
(generate with one new token), random full-preset weights in bf16, at batch 1 and 16; then the same with the ViT's
blocks compiled (the only part that can be: the LLM's blocks write a KV cache). Median ms of 10 calls. One GPU.

    python assets/bench/prefill_parts.py
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import model as nano  # noqa: E402
from configurator import configure  # noqa: E402

batches = (1, 16)
calls = 10
configure(globals())

if not torch.cuda.is_available():
    raise SystemExit("prefill_parts.py times CUDA events: it needs a GPU")
dev = torch.device("cuda")
cfg = nano.Molmo2Config.preset("nanomolmo2")
torch.manual_seed(0)
model = nano.Molmo2(cfg).to(dev).to(torch.bfloat16).eval()
processor = data.Molmo2Processor(crop_size=cfg.vit.image_size, max_crops=4, patch_size=cfg.vit.patch_size,
                                 overlap_margins=(4, 4))  # as tools/bench.py's generate section
image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
prompt = "<|image|><|im_start|>user\nDescribe this image.<|im_end|>\n<|im_start|>assistant\n"

spans = {}  # part -> [[start event, end event], ...]


def time_part(name, module):
    def before(_module, _args):
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        spans.setdefault(name, []).append([start, None])

    def after(_module, _args, _out):
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        spans[name][-1][1] = end
    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)


time_part("ViT", model.vit)
time_part("connector", model.connector)
time_part("LLM layer 0", model.llm.layers[0])


def prefill_ms(B):
    inputs = {k: v.to(dev, torch.bfloat16) if v.is_floating_point() else v.to(dev)
              for k, v in processor(text=[prompt] * B, images=[image] * B).items()}
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")

    def prefill():
        nano.generate(model, ids, 1, attention_mask=mask, stop_ids=(), static=False, **inputs)
    for _ in range(3):
        prefill()
    torch.cuda.synchronize()
    spans.clear()
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        prefill()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    parts = {name: float(np.median([a.elapsed_time(b) for a, b in pairs])) for name, pairs in spans.items()}
    return float(np.median(times)) * 1e3, parts, ids.shape[1]


for label in ("eager", "ViT blocks compiled"):
    if label != "eager":
        nano.ready_for_compile()
        for block in model.vit.layers:
            block.compile()
    for B in batches:
        ms, parts, T = prefill_ms(B)
        print(f"{label:20s} batch {B:2d} ({T} tokens): prefill {ms:.1f} ms | "
              + " | ".join(f"{name} {value:.1f} ms" for name, value in parts.items()), flush=True)
