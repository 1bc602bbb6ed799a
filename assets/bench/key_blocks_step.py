"""The CPU demo's joint step with the LLM's attention dense and over its key blocks (train_joint.py key_blocks,
model.KeyBlocks: the chunks of queries in one group, or in KeyBlocks.GROUPS by the keys they need), and with the
batch's rows joined into one (join_rows, training.TrainLoader), alternated batch by batch in one process: a slow
CPU's speed drifts from one minute to the next, and two runs one after the other measure the drift as much as the
switch. The model is the align checkpoint's, its blocks compiled and its matmuls in bf16 where the CPU has them, as
config/demo_joint.py trains; the batches are the joint stage's first 12 (8 examples each, in rows of 448 or joined).
It prints the lengths and the keys each chunk of queries is given, each variant's median forward and backward (no
optimizer step: the same in all), and the losses of the first batch, which must agree to bf16's rounding.
BENCHMARKS.md "Attention over the key blocks, and the rows joined" holds a run's numbers.

    python assets/bench/key_blocks_step.py [out/demo/align] [data/demo] [rounds]    # after make demo's align stage
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import model as model_lib  # noqa: E402
import training  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def main(align="out/demo/align", data_dir="data/demo", rounds=4):
    config = {}
    with open(os.path.join(ROOT, "config", "demo_joint.py")) as f:
        exec(f.read(), config)  # the demo's knobs: plain assignments
    training.keep_freed_memory()  # as the training scripts do on a CPU
    model = training.build_model(align, "small")
    model_lib.compile_each_block(model)
    autocast = training.step_autocast(torch.device("cpu"), "bfloat16", "auto")

    def batches(join_rows):  # the joint stage's first batches, the same examples either way
        loader = training.TrainLoader(
            data_dir, config["data_mixture"], "train", config["batch_size"], config["max_seq_len"],
            config["max_crops"], None, None, model.config.vit.image_size, model.config.vit.patch_size,
            config["overlap_margins"], "sft", config["loss_weighting"], 1337, styles=config["styles"],
            join_rows=join_rows)
        return [training.batch_to(loader.next_step()[0], torch.device("cpu")) for _ in range(12)]

    rows, joined = batches(False), batches(True)
    for name, made in (("rows of", rows), ("one joined row of", joined)):
        for groups in (1, model_lib.KeyBlocks.GROUPS):
            kept = [model_lib.KeyBlocks.plan(b["attn_mask"], groups=groups).keys_per_chunk for b in made]
            lengths = [b["attn_mask"].shape[-1] for b in made]
            print(f"{len(made[0]['input_ids'])} {name} {min(lengths)}-{max(lengths)} tokens: keys a chunk is given "
                  f"{min(kept):.0f}-{max(kept):.0f} on average, in {groups} group(s) of chunks")
    groups_default = model_lib.KeyBlocks.GROUPS
    # (batches, key blocks, groups of chunks)
    variants = {"rows, dense mask": (rows, False, 0), "rows, key blocks": (rows, True, groups_default),
                "joined, key blocks in one group": (joined, True, 1),
                f"joined, key blocks in {groups_default} groups": (joined, True, groups_default)}

    def step(batch, on, groups):
        model.llm.key_blocks = on
        model_lib.KeyBlocks.GROUPS = groups or groups_default
        start = time.perf_counter()
        with autocast:
            loss_sum, _ = model(**training.model_inputs(batch), targets=batch["targets"],
                                loss_weights=batch["loss_weights"])
            loss = loss_sum / batch["loss_weights"].sum()  # train_joint.py's, z_loss 0
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start, loss.item()

    # compiles every variant first (a new length is one recompile, after which it is dynamic)
    losses = {name: [step(b, on, groups)[1] for b in made[:4]][0] for name, (made, on, groups) in variants.items()}
    times = {name: [] for name in variants}
    order = list(variants)
    for r in range(rounds):
        for i in range(len(rows)):
            for name in (order if r % 2 == 0 else order[::-1]):
                made, on, groups = variants[name]
                times[name].append(step(made[i], on, groups)[0])
    for name in variants:
        print(f"{name}: median {statistics.median(times[name]) * 1e3:.1f} ms a forward and backward "
              f"({len(times[name])} steps), first batch's loss {losses[name]:.5f}")


if __name__ == "__main__":
    main(*sys.argv[1:3], *(int(a) for a in sys.argv[3:4]))
