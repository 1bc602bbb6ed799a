"""
nanoMolmo2 under lmms-eval's standard benchmarks: an optional extra (`pip install lmms-eval`), needed by
this file alone.

    python tools/eval_lmms.py --model nanomolmo2 --model_args init_from=out/joint,batch_size=8 --tasks mme --limit 50

This file registers the model as "nanomolmo2" and hands the command line to lmms-eval's own CLI. The model
answers `generate_until` requests (the generative benchmarks): each request's images (or a video path) and
question go through the same prompt layout and batched generation as eval.py (sample.prompt_example,
sample.generate_answers); an `<image>` placeholder in the question is dropped, since the vision tokens come
first in Molmo2's layout. Likelihood requests (multiple choice by log-probability) are not supported.
"""

import os
import sys

import torch
from PIL import Image

# run as python tools/eval_lmms.py: the project's modules are in the folder above
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import sample  # noqa: E402

try:
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ImportError:
    raise ImportError("tools/eval_lmms.py needs lmms-eval, an optional extra: pip install lmms-eval") from None


@register_model("nanomolmo2")
class NanoMolmo2(lmms):
    def __init__(self, init_from=sample.DEFAULT_INIT_FROM, device=None, dtype="float32", batch_size=1,
                 max_new_tokens=256, **other_args):  # lmms-eval may pass settings we have no use for
        super().__init__()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.processor, _ = sample.load_model(init_from, device, getattr(torch, dtype))
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    def _record(self, visuals):
        """lmms-eval's visuals (PIL images, or a video path) -> a record with decoded media."""
        paths = [v for v in visuals if isinstance(v, str)]
        if paths:
            clip = data.load_video(paths[0], self.processor.max_frames, self.processor.max_fps, "uniform_last_frame")
            return {"video_frames": [Image.fromarray(f) for f in clip.frames], "video_times": clip.timestamps}
        return {"images": [v.convert("RGB") for v in visuals]} if visuals else {}

    def generate_until(self, requests):
        answers = [None] * len(requests)
        prepared = []  # (request index, prompt, gen_kwargs, is_video)
        for i, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            record = self._record(doc_to_visual(self.task_dict[task][split][doc_id]) or [])
            question = context.replace("<image>", "").strip()
            prompt = sample.prompt_example(record, [{"role": "user", "content": question}], "demo", self.processor)
            prepared.append((i, prompt, gen_kwargs, "video_frames" in record))
        # a batch shares its generation settings and holds images or a video, not both
        groups = {}
        for item in prepared:
            key = (repr(sorted(item[2].items())), item[3])
            groups.setdefault(key, []).append(item)
        for group in groups.values():
            gen_kwargs = group[0][2]
            for start in range(0, len(group), self.batch_size_per_gpu):
                chunk = group[start:start + self.batch_size_per_gpu]
                texts = sample.generate_answers(self.model, self.processor, [p for _, p, _, _ in chunk],
                                           int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                                           temperature=float(gen_kwargs.get("temperature", 0.0) or 0.0))
                for (i, _, _, _), text in zip(chunk, texts):
                    for stop in gen_kwargs.get("until", []) or []:
                        text = text.split(stop)[0] if stop else text
                    answers[i] = text
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError("nanomolmo2: likelihood requests are not supported; use generative tasks")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("nanomolmo2: multi-round generation is not supported")


if __name__ == "__main__":
    from lmms_eval.__main__ import cli_evaluate
    cli_evaluate()
