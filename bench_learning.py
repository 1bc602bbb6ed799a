"""
Does the model learn to see? Several from-scratch joint runs side by side, each evaluated on held-out images.

    python bench_learning.py                                            # the default runs, on the GPU
    python bench_learning.py --runs="{'b16': '--batch_size=16 --max_steps=3000'}" --train_seconds=400

Every run is `train_joint.py config/demo_joint.py --init_from=scratch <its arguments>` in its own process, all at
once on one device (small models leave a GPU mostly idle, so several share it). A run still going after
train_seconds is stopped and its last checkpoint (save_every) is exported and evaluated instead, so a table
row can stand for fewer steps than asked: the `steps` column says how many. Then `eval.py` counts and points
on the first n_eval held-out test images. The table gives, per run, the validation loss with the real crops
and with the crops rotated by one place at each validation step: equal numbers mean the model does not use
its images. Results: BENCHMARKS.md, 'Does the model learn to see?'.
"""

import json
import os
import subprocess
import sys
import time

from configurator import configure

KNOBS = dict(
    runs={  # name -> extra train_joint.py arguments
        "batch4": "--max_steps=2000 --lr_vit=5e-4 --lr_connector=1e-3",
        "batch16_all_styles": "--max_steps=3000 --batch_size=16 --lr_vit=5e-4 --lr_connector=1e-3 "
                              "--styles=('point_count','pointing','short_answer','long_caption')",
        "batch16_short_answers": "--max_steps=3000 --batch_size=16 --lr_vit=5e-4 --lr_connector=1e-3 "
                                 "--styles=('short_answer',)",
    },
    train_seconds=400,  # each run's wall-clock budget
    n_eval=100,  # held-out test images per task
    device="cuda",
    out_dir="out/bench_learning",
    data_dir="data",
)


def export_checkpoint(run_dir):
    """A run cut off by the time limit: its last checkpoint -> run_dir/final, as train_joint.py would export it."""
    import torch

    import data
    from training import Dist, build_model, export_final
    ckpt = torch.load(os.path.join(run_dir, "ckpt.pt"), map_location="cpu", weights_only=False)
    config = ckpt["config"]
    model = build_model("scratch", config["model_preset"], vocab=config.get("vocab", "full"),
                        data_dir=config["data_dir"], mixture=config["data_mixture"])  # same data: same kept tokens
    model.load_state_dict(ckpt["model"])
    processor = data.Molmo2Processor(max_crops=config["max_crops"], max_frames=config["max_video_frames"],
                                     crop_size=model.config.vit.image_size, patch_size=model.config.vit.patch_size,
                                     overlap_margins=config["overlap_margins"])
    export_final(model, model, None, Dist("cpu"), os.path.join(run_dir, "final"), processor)
    return ckpt["step"]


def run_one(name, args, knobs):
    """Start one run's training; returns the process (its output goes to {out_dir}/{name}.log)."""
    run_dir = os.path.join(knobs["out_dir"], name)
    command = [sys.executable, "train_joint.py", "config/demo_joint.py", "--init_from=scratch", f"--out_dir={run_dir}",
               f"--data_dir={knobs['data_dir']}", f"--device={knobs['device']}", "--save_every=250", "--eval_every=250",
               "--log_every=50", "--resume=False", *args.split()]
    log = open(os.path.join(knobs["out_dir"], f"{name}.log"), "w")
    print(f"[{name}] {' '.join(command[1:])}", flush=True)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2"})


def table_row(name, knobs, step):
    run_dir = os.path.join(knobs["out_dir"], name)
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    loss = next(r["loss"] for r in reversed(records) if "loss" in r and r["step"] == step - 1)
    vals = " ".join(f"{r['step'] + 1}: {r['val_loss']:.3f}/{r['val_loss_crops_shuffled']:.3f}"
                    for r in records if "val_loss" in r and r["step"] < step)
    with open(os.path.join(run_dir, "eval_test", "metrics.json")) as f:
        metrics = json.load(f)
    return (f"| {name} | {knobs['runs'][name]} | {step} | {loss:.3f} | {vals} | "
            f"{metrics['counting_accuracy']:.3f} | {metrics['pointing_f1']:.3f} |")


def main(argv=None):
    knobs = dict(KNOBS)
    configure(knobs, argv)
    os.makedirs(knobs["out_dir"], exist_ok=True)
    if not os.path.exists(os.path.join(knobs["data_dir"], "synth_image", "test.jsonl")):
        subprocess.run([sys.executable, "prepare_data.py", "synthetic", "--out", knobs["data_dir"]], check=True)
    t0 = time.time()
    procs = {name: run_one(name, args, knobs) for name, args in knobs["runs"].items()}
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(1.0, knobs["train_seconds"] - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()
    evals, evaluated_step = {}, {}
    for name in procs:
        run_dir = os.path.join(knobs["out_dir"], name)
        if not os.path.exists(os.path.join(run_dir, "final", "config.json")):
            if not os.path.exists(os.path.join(run_dir, "ckpt.pt")):
                print(f"[{name}] stopped before its first checkpoint: no row (see {run_dir}.log)")
                continue
            evaluated_step[name] = export_checkpoint(run_dir)
            print(f"[{name}] stopped by the time limit; evaluating its checkpoint of step {evaluated_step[name]}")
        else:
            with open(os.path.join(run_dir, "log.jsonl")) as f:
                evaluated_step[name] = max(json.loads(line)["step"] for line in f) + 1
        evals[name] = subprocess.Popen(
            [sys.executable, "eval.py", f"--init_from={run_dir}", "--split=test", f"--data_dir={knobs['data_dir']}",
             "--datasets=['synth_image']", "--tasks=['counting','pointing']", f"--max_examples={knobs['n_eval']}",
             f"--device={knobs['device']}", "--n_show=4"],
            stdout=open(os.path.join(knobs["out_dir"], f"{name}.eval.log"), "w"), stderr=subprocess.STDOUT)
    failed = [name for name, proc in evals.items() if proc.wait() != 0]
    print("\n| run | arguments | steps | train loss | val loss real/rotated crops at step | counting acc. | pointing F1 |")
    print("|---|---|---:|---:|---|---:|---:|")
    for name in evals:
        if name not in failed:
            print(table_row(name, knobs, evaluated_step[name]))
    if failed:
        raise SystemExit(f"evaluation failed for {failed}: see {knobs['out_dir']}/<run>.eval.log")


if __name__ == "__main__":
    main()
