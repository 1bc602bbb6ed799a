"""The CPU demo's joint step with the LLM's attention dense and over its key blocks (train_joint.py key_blocks,
model.KeyBlocks), alternated batch by batch in one process: a slow CPU's speed drifts from one minute to the next, and
two runs one after the other measure the drift as much as the switch. The model is the align checkpoint's, its blocks
compiled and its matmuls in bf16 where the CPU has them, as config/demo_joint.py trains; the batches are the joint
stage's first (rows of 448, 8 a step). It prints the keys each chunk of queries was given against the dense row, each
switch's median forward and backward (no optimizer step: the same in both), and the losses of the first batch, which
must agree to bf16's rounding. BENCHMARKS.md "Attention over the key blocks" holds a run's numbers.

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
    model = training.build_model(align, "small")
    model_lib.compile_each_block(model)
    autocast = training.step_autocast(torch.device("cpu"), "bfloat16", "auto")
    loader = training.TrainLoader(
        data_dir, config["data_mixture"], "train", config["batch_size"], config["max_seq_len"], config["max_crops"],
        None, None, model.config.vit.image_size, model.config.vit.patch_size, config["overlap_margins"], "sft",
        config["loss_weighting"], 1337, styles=config["styles"])
    batches = [training.batch_to(loader.next_step()[0], torch.device("cpu")) for _ in range(12)]
    kept = [model_lib.KeyBlocks.plan(b["attn_mask"]).keys.shape[1] / b["attn_mask"].shape[-1] for b in batches]
    print(f"keys a chunk is given: {min(kept):.2f}-{max(kept):.2f} of the row's "
          f"{batches[0]['attn_mask'].shape[-1]} (mean {statistics.mean(kept):.2f})")

    def step(batch, on):
        model.llm.key_blocks = on
        start = time.perf_counter()
        with autocast:
            loss_sum, _ = model(**training.model_inputs(batch), targets=batch["targets"],
                                loss_weights=batch["loss_weights"])
            loss = loss_sum / batch["loss_weights"].sum()  # train_joint.py's, z_loss 0
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start, loss.item()

    losses = {on: [step(b, on)[1] for b in batches[:4]][0] for on in (False, True)}  # compiles both ways first
    times = {False: [], True: []}
    for r in range(rounds):
        for batch in batches:
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                times[on].append(step(batch, on)[0])
    for on in (False, True):
        print(f"key_blocks={on}: median {statistics.median(times[on]) * 1e3:.1f} ms a forward and backward "
              f"({len(times[on])} steps), first batch's loss {losses[on]:.5f}")


if __name__ == "__main__":
    main(*sys.argv[1:3], *(int(a) for a in sys.argv[3:4]))
