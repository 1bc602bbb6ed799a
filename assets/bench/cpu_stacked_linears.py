"""The CPU demo's small LLM (Qwen3 "small": 4 blocks of width 128) forward and backward over 8 rows of 448 tokens
under bf16 autocast, each Linear its own matmul against the Linears that read one input stacked (vision.linears,
which stacks only on a GPU: here forced on), eagerly and with each block compiled (or one of the two); ms a step,
in alternating pairs (3 by default; BENCHMARKS.md "Linears that read one input as one matmul").

    python assets/bench/cpu_stacked_linears.py                 # eager and compiled, 3 pairs each
    python assets/bench/cpu_stacked_linears.py compiled 6      # compiled only, 6 pairs
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import model as nano  # noqa: E402
import vision  # noqa: E402


REPEATS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
COMPILED = (False, True) if len(sys.argv) < 2 else (sys.argv[1] == "compiled",)


def main():
    torch.manual_seed(0)
    cfg = nano.Qwen3Config.preset("small")
    llm = nano.Qwen3(cfg).train()
    x = torch.randn(8, 448, cfg.hidden_size, requires_grad=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = llm.run_layers(x)
        y.float().pow(2).mean().backward()

    separate = vision.stacks_linears
    for compiled in COMPILED:
        if compiled:  # as model.compile_each_block does to a Molmo2's blocks
            nano.ready_for_compile()
            for block in llm.layers:
                block.compile()
        for stacked in (False, True) * REPEATS:
            vision.stacks_linears = (lambda t: True) if stacked else separate
            torch._dynamo.reset()
            for _ in range(3):
                step()
            start = time.perf_counter()
            for _ in range(10):
                step()
            print(f"{'compiled' if compiled else 'eager'}, {'stacked' if stacked else 'separate'}: "
                  f"{(time.perf_counter() - start) / 10 * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
