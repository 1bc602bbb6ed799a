"""train_joint.py --compile_blocks=True under FSDP2, against eager FSDP2: two gloo processes on this CPU, the tiny
preset, a few steps each way. The compiled run's blocks go through dynamo and are run as traced (the aot_eager
backend: the same ops in the same order), so any difference from the eager run is the compiling's and not inductor's
float rounding: the losses, gradient norms and final weights must be equal to the bit. (A check kept out of the test
suite for its ~26 s; BENCHMARKS.md "Everything side by side with transformers, the blocks compiled".)

    python prepare_data.py --dataset=synthetic --out=data/fsdp_check --train_images=64
    python assets/bench/compile_blocks_fsdp.py --data_dir=data/fsdp_check
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from configurator import configure  # noqa: E402
from model import load_safetensors  # noqa: E402

data_dir = "data/fsdp_check"  # a synthetic world (prepare_data.py --dataset=synthetic)
out_dir = "out/compile_blocks_fsdp"
max_steps = 3
configure(globals())

# train_joint.py with each block compiled by dynamo and run as traced graphs
TRACED_BLOCKS = f"""
import runpy, sys
sys.path.insert(0, {ROOT!r})
import model
compile_each_block = model.compile_each_block
model.compile_each_block = lambda m, **kwargs: compile_each_block(m, backend="aot_eager")
sys.argv = ["train_joint.py", *sys.argv[1:]]
runpy.run_path("train_joint.py", run_name="__main__")
"""
ARGS = ["--model_preset=tiny", "--overlap_margins=(1, 1)", "--max_crops=2", "--max_row_crops=8",
        "--max_video_frames=4", "--max_seq_len=256", "--batch_size=1", "--device=cpu", f"--data_dir={data_dir}",
        "--data_mixture={'image': (1.0, ['synth_image'])}", f"--max_steps={max_steps}", "--eval_every=0",
        "--save_every=0", "--resid_dropout=0.0", "--vocab=data", "--parallel=fsdp", "--log_every=1", "--resume=False"]


def run(name, program, extra=()):
    """Two processes of train_joint.py (through torchrun) -> (its logged steps, its exported weights)."""
    folder = os.path.join(out_dir, name)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *program,
               f"--out_dir={folder}", *ARGS, *extra]
    print(" ".join(command[:6]), "...", flush=True)
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(folder, "log.jsonl")) as f:
        steps = [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, f) if "grad_norm" in r]
    return steps, load_safetensors(os.path.join(folder, "final", "model.safetensors"))


os.makedirs(out_dir, exist_ok=True)
driver = os.path.join(out_dir, "traced_blocks.py")  # torchrun runs a file, not -c
with open(driver, "w") as f:
    f.write(TRACED_BLOCKS)
eager_steps, eager_weights = run("eager", ["train_joint.py"])
steps, weights = run("traced", [os.path.abspath(driver)], ["--compile_blocks=True"])
same_weights = weights.keys() == eager_weights.keys() and all(weights[k].equal(eager_weights[k]) for k in weights)
for (step, loss, grad), (_, loss_c, grad_c) in zip(eager_steps, steps):
    print(f"step {step}: loss {loss!r} eager, {loss_c!r} compiled | grad norm {grad!r}, {grad_c!r}")
print(f"steps equal: {steps == eager_steps and len(steps) == max_steps} | final weights equal: {same_weights}")
sys.exit(0 if steps == eager_steps and same_weights else 1)
