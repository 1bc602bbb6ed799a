"""Stage 1's attention on a CPU in bf16: the float32 flash kernel (vision.attend's way there before) against SDPA's math
backend with its products in bf16 (vision.math_bf16, where vision.CPU_MATH_BF16 is on).

1. The attention alone at stage 1's crops (160 crops x 4 heads x 64 patches x 32), forward and backward, both ways
   alternated in this process, and each way's largest difference from float64 on the same bf16 inputs.
2. `train_vision.py config/demo_vision.py` itself for `steps` steps, the attention switched at every step (this CPU's
   speed drifts by minutes, so two runs one after the other measure the drift as much as the switch): the median of
   the logged step times of each way.
3. With --learning_steps=N (the recipe's 600): the learning, by two whole runs of N steps, one each way (stage 1
   repeats to the digit on a CPU), validated at N/2 and N: the kinds its scene head names, and the counting and F1
   read off its localisation head. BENCHMARKS.md "Stage 1's attention in bf16" has all three.

    python assets/bench/stage1_attention.py [--steps=120] [--learning_steps=600] [--data_dir=data/demo]
"""

import json
import os
import runpy
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import training  # noqa: E402
import vision  # noqa: E402
from configurator import configure  # noqa: E402

# -- knobs (override with --key=value) -------------------------------------------------------------------------
steps = 120  # train_vision.py's steps, the attention switched at each (the first 10 untimed)
learning_steps = 0  # > 0: two whole runs of this many steps, one each way (~4 minutes each at 600 here)
data_dir = "data/demo"
out_dir = "/tmp/stage1_attention"
configure(globals())
# ----------------------------------------------------------------------------------------------------------------

training.keep_freed_memory()  # as the training scripts do on a CPU
torch.set_num_threads(os.cpu_count())
WAYS = {False: "flash kernel, float32", True: "math backend, bf16 products"}  # vision.CPU_MATH_BF16 -> its name


def attention_alone(rounds=3, reps=15):
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(160, 4, 64, 32, generator=g).bfloat16() for _ in range(4))
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    times, errors = {on: [] for on in WAYS}, {}
    for _ in range(rounds):
        for on in WAYS:
            vision.CPU_MATH_BF16 = on
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            for i in range(reps + 3):  # the first 3 untimed
                start = time.perf_counter()
                out = vision.attend(*leaves)
                out.backward(grad)
                if i >= 3:
                    times[on].append(time.perf_counter() - start)
            errors[on] = (out.double() - want).abs().max().item()
    vision.CPU_MATH_BF16 = True
    for on, name in WAYS.items():
        print(f"attention alone, {name}: {statistics.median(times[on]) * 1e3:.1f} ms forward and backward "
              f"(median of {len(times[on])}), largest difference from float64 {errors[on]:.2e}", flush=True)


def train_vision(*args):
    """train_vision.py with config/demo_vision.py in this process, with these extra arguments."""
    argv = sys.argv
    sys.argv = ["train_vision.py", os.path.join(ROOT, "config", "demo_vision.py"), f"--data_dir={data_dir}",
                "--save_every=0", *args]
    try:
        runpy.run_path(os.path.join(ROOT, "train_vision.py"), run_name="__main__")
    finally:
        sys.argv = argv


def stage1_alternated():
    """train_vision.py in this process, vision.CPU_MATH_BF16 flipped after every step (StepBudget.fit runs once a
    step): even steps run the math backend, odd ones the flash kernel."""
    fit = training.StepBudget.fit

    def flipping(self, done, *args):
        vision.CPU_MATH_BF16 = done % 2 == 0  # for step `done`, the next one
        return fit(self, done, *args)

    training.StepBudget.fit = flipping
    vision.CPU_MATH_BF16 = True  # step 0
    try:
        train_vision(f"--out_dir={out_dir}", f"--max_steps={steps}", "--eval_every=0", "--log_every=20")
    finally:
        training.StepBudget.fit, vision.CPU_MATH_BF16 = fit, True
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        logged = [json.loads(line) for line in f][-steps:]
    for on, name in WAYS.items():
        seconds = [r["step_s"] for r in logged if r["step"] >= 10 and (r["step"] % 2 == 0) == on]
        print(f"stage 1's step, {name}: median {statistics.median(seconds) * 1e3:.0f} ms ({len(seconds)} steps)",
              flush=True)


def learning():
    for on in (True, False):
        vision.CPU_MATH_BF16 = on
        print(f"== {learning_steps} steps, CPU_MATH_BF16={on}", flush=True)
        train_vision(f"--out_dir={out_dir}_learning_{int(on)}", f"--max_steps={learning_steps}",
                     f"--eval_every={learning_steps // 2}", "--log_every=100")
    vision.CPU_MATH_BF16 = True


attention_alone()
stage1_alternated()
if learning_steps:
    learning()
