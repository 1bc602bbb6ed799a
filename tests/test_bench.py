"""tools/bench.py end to end on CPU with the tiny preset: every section prints every row of its table, with
sane numbers, transformers' side of the comparison runs on the same weights, and train_joint.py runs on a small
synthetic world beside our model alone on the same batches. No timing is asserted."""

import gzip
import json
import math
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_tiny_cpu_prints_every_row(tmp_path):
    # started from the repository root as a user would; few tokens, small batches, one timed step each
    args = ["--model_preset=tiny", "--device=cpu", "--steps=1", "--warmup=0", "--caption_tokens=12",
            "--batch_images=2", "--new_tokens=3", "--decode_batches=(1, 2)", "--scaling_crops=(1, 3)",
            "--scaling_frames=(2,)", "--scaling_rows=(256,)", "--profile=True", "--profile_trace=True",
            f"--out_dir={tmp_path}",
            "--decode_paths=('eager', 'static')",  # compiling the decode step takes minutes on a CPU
            "--trainer_images=16", "--trainer_batch_size=2", "--trainer_seq_len=256"]
    result = subprocess.run([sys.executable, "tools/bench.py", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    lines = out.splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line, below in zip(lines, lines[1:] + [""]) if line.startswith("| ") and not below.startswith("|---")}
    expected = ["transformers Molmo2, train mode", "nanoMolmo2 model alone", "model alone, the same batches",
                "train_joint.py, data included",
                "prefill, batch 1", "decode, batch 1, ms/token", "decode, batch 1, new tokens/s", "prefill, batch 2",
                "decode, batch 2, ms/token", "decode, batch 2, new tokens/s", "decode, batch 2, ms/token, no per-token",
                "image of 1 crops", "image of 3 crops",
                "video of 2 frames", "packed row of 256 tokens"]
    for name in expected:
        assert any(key.startswith(name) for key in rows), f"no row {name!r} in:\n{out}"

    def number(cell):
        return float(re.sub(r"[,x%]", "", cell))

    for key, cells in rows.items():
        if key.startswith(("model alone", "train_joint.py")):  # median ms, tokens/s, MFU, ratio to the model alone
            assert number(cells[0]) > 0 and number(cells[1]) > 0 and number(cells[3]) > 0, (key, cells)
        elif key.startswith(("transformers", "nanoMolmo2")):  # ms, tokens/s, images/s, MFU, peak (-), ratio
            assert number(cells[0]) > 0 and number(cells[1]) > 0 and number(cells[5]) > 0, (key, cells)
        elif key.endswith("no per-token sync"):  # a whole call less a prefill timed in another: noise can cross 0
            assert cells[3] == "-" and all(math.isfinite(number(c)) for c in cells[:3]), (key, cells)
        elif key.startswith(("prefill", "decode")):  # transformers, eager, static, compiled (not run: -), ratio
            assert cells[3] == "-" and all(number(c) > 0 for c in cells[:3] + cells[4:]), (key, cells)
        else:  # tokens, crops, ms/step, tokens/s, MFU, peak (-)
            assert number(cells[0]) > 0 and int(cells[1]) >= 1 and number(cells[2]) > 0, (key, cells)
    # the train batch counts what the trainer counts: 2 photos, 5 crops each
    assert "2 photos 640x480 (10 crops)" in out
    assert "The trainer: train_joint.py on the synthetic world, 2 rows of 256 tokens a step" in out
    assert (tmp_path / "bench.md").read_text().count("### ") == 4
    assert (tmp_path / "profile_train.txt").exists() and (tmp_path / "profile_generate_static.txt").exists()
    assert not (tmp_path / "profile_generate_compiled.txt").exists()
    for who in ("ours", "transformers"):  # the prefill's profile at each batch, its summary line first
        for B in (1, 2):
            text = (tmp_path / f"profile_prefill_b{B}_{who}.txt").read_text()
            assert text.startswith(f"prefill_b{B}_{who}: ") and "ms a call" in text, text[:200]
    with gzip.open(tmp_path / "profile_train.json.gz", "rt") as f:  # the timeline, as ui.perfetto.dev reads it
        events = json.load(f)["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)
