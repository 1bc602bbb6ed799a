"""Where a token of compiled decoding goes on a GPU: the full preset (random bf16 weights), one 640x480 photo's prompt,
128 new tokens through generate(static=True, compile=True), the third run under torch.profiler. Prints the decode's
span per token, the GPU's busy share of it, and each kernel's time per token (the graph replays only, not the
prefill). Writes decode_profile.txt to the folder given (default out/decode_profile).

    python assets/bench/decode_profile.py [OUT_DIR]
"""
import collections
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import data  # noqa: E402
import model as nano  # noqa: E402

N_NEW = 128


def main(out):
    if not torch.cuda.is_available():
        raise SystemExit("decode_profile: needs a CUDA GPU (it profiles the CUDA-graph replays of decoding)")
    os.makedirs(out, exist_ok=True)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg = nano.Molmo2Config.preset("nanomolmo2")
    m = nano.Molmo2(cfg).to(dev).to(torch.bfloat16).eval()
    processor = data.Molmo2Processor(crop_size=cfg.vit.image_size, max_crops=4, patch_size=cfg.vit.patch_size,
                                     overlap_margins=(4, 4))
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    prompt = "<|image|><|im_start|>user\nDescribe this image.<|im_end|>\n<|im_start|>assistant\n"
    inputs = {k: v.to(dev, torch.bfloat16) if v.is_floating_point() else v.to(dev)
              for k, v in processor(text=[prompt], images=[image]).items()}
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")

    def generate():
        return nano.generate(m, ids, N_NEW, attention_mask=mask, stop_ids=(), static=True, compile=True, **inputs)

    for _ in range(2):  # compiles, captures the graph
        generate()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate()
        torch.cuda.synchronize()
    trace = os.path.join(out, "decode_trace.json")
    prof.export_chrome_trace(trace)
    events = json.load(open(trace))["traceEvents"]
    os.remove(trace)  # ~100 MB; the table below is what is kept
    replays = sorted(e["ts"] for e in events if e.get("name") == "cudaGraphLaunch")
    if not replays:
        raise SystemExit("decode_profile: no CUDA graph replay in the trace")
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e
                      and e["ts"] >= replays[0]), key=lambda e: e["ts"])
    n = len(replays)
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]  # us
    busy = sum(e["dur"] for e in kernels)
    lines = [f"decode: {span / n:.0f} us a token over {n} replays, the GPU busy {busy / n:.0f} us of it "
             f"({100 * busy / span:.0f}%), {len(kernels) / n:.1f} kernels a token",
             "us/token  kernels/token  us each  kernel"]
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e["name"][:100]][0] += 1
        by_name[e["name"][:100]][1] += e["dur"]
    for name, (count, total) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:30]:
        lines.append(f"{total / n:8.1f} {count / n:14.1f} {total / count:8.2f}  {name}")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "decode_profile.txt"), "w") as f:
        f.write(text)
    print(text, end="")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/decode_profile")
