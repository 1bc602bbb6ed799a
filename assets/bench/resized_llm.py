"""Run a stage script with the `small` preset's LLM resized (and nothing else changed): what a wider or deeper LLM
buys at the same CPU minutes (BENCHMARKS.md "The CPU demo on a CPU with AMX"). The heads stay 32 wide, with half as
many key-value heads.

    LLM=256,1024,4 python assets/bench/resized_llm.py train_align.py config/demo_align.py ...   # width, MLP, blocks

Only a model built from the preset changes (init_from=scratch, as the align stage's); later stages read its size
from the checkpoint.
"""

import os
import runpy
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from model import Qwen3Config  # noqa: E402

width, mlp, blocks = (int(x) for x in os.environ.get("LLM", "128,512,4").split(","))
preset = Qwen3Config.preset


def resized(name):
    if name != "small":
        return preset(name)
    return Qwen3Config(hidden_size=width, intermediate_size=mlp, num_hidden_layers=blocks,
                       num_attention_heads=width // 32, num_key_value_heads=max(1, width // 64), head_dim=32)


Qwen3Config.preset = staticmethod(resized)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
