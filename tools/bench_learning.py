"""
Does the model learn to see? Several from-scratch joint runs side by side, each evaluated on held-out images.

    python tools/bench_learning.py                                            # the default runs, on the GPU
    python tools/bench_learning.py --runs="{'b16': '--batch_size=16 --max_steps=3000'}" --train_seconds=400
    python tools/bench_learning.py assets/bench/runs_see_b3.py --gpus=4 --data_dir=data/demo   # a run list from a file

Every run is `train_joint.py config/demo_joint.py --init_from=scratch <its arguments>` in its own process, all at
once (small models leave a GPU mostly idle, so several share it; with gpus=N the runs are dealt over N GPUs).
A run still going after train_seconds is stopped and its last checkpoint (save_every) is exported and
evaluated instead, so a table row can stand for fewer steps than asked: the `steps` column says how many.
Then `eval.py` counts and points on the first n_eval held-out test images. The table gives, per run, the
validation loss with the real crops and with the crops rotated by one place at each validation step: equal
numbers mean the model does not use its images. With curve=True every checkpoint a run saves is kept and
evaluated too: a second table, curve.json and charts of held-out accuracy against steps.
Results: BENCHMARKS.md, 'Does the model learn to see?'.
"""

import json
import os
import subprocess
import sys
import time

# run as python tools/bench_learning.py: the project's modules are in the folder above
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configurator import configure  # noqa: E402

# -- knobs (override with --key=value) -------------------------------------------------------------------------
runs = {  # name -> extra train_joint.py arguments
    "batch4": "--max_steps=2000 --lr_vit=5e-4 --lr_connector=1e-3",
    "batch16_all_styles": "--max_steps=3000 --batch_size=16 --lr_vit=5e-4 --lr_connector=1e-3 "
                          "--styles=('point_count','pointing','short_answer','long_caption')",
    "batch16_short_answers": "--max_steps=3000 --batch_size=16 --lr_vit=5e-4 --lr_connector=1e-3 "
                             "--styles=('short_answer',)",
}
train_seconds = 400  # each run's wall-clock budget
n_eval = 100  # held-out test images per task
curve = False  # also keep every checkpoint a run saves and evaluate each: held-out accuracy against steps
device = "cuda"
gpus = 1  # spread the runs over this many GPUs of the machine, round robin (each run on one)
out_dir = "out/bench_learning"
data_dir = "data"
# ----------------------------------------------------------------------------------------------------------------


KEPT_TOKENS = {}  # (data_dir, mixture) -> the token ids its records use


def export_checkpoint(ckpt_path, final_dir):
    """A resumable checkpoint (a run cut off by the time limit, or a kept earlier one) -> final_dir, as
    train_joint.py would export it. Returns the checkpoint's step."""
    import torch

    import data
    from model import Molmo2, Molmo2Config
    from training import Dist, export_final
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    config = ckpt["config"]
    model_config = Molmo2Config.preset(config["model_preset"])
    if config.get("vocab", "full") == "data":  # same data: same kept tokens (reading them is slow: done once)
        key = (config["data_dir"], repr(config["data_mixture"]))
        if key not in KEPT_TOKENS:
            KEPT_TOKENS[key] = data.record_token_ids(config["data_dir"], config["data_mixture"])
        model_config = model_config.keep_tokens(KEPT_TOKENS[key])
    model = Molmo2(model_config)
    model.load_state_dict(ckpt["model"])
    processor = data.Molmo2Processor(max_crops=config["max_crops"], max_frames=config["max_video_frames"],
                                     crop_size=model.config.vit.image_size, patch_size=model.config.vit.patch_size,
                                     overlap_margins=config["overlap_margins"])
    export_final(model, model, None, Dist("cpu"), final_dir, processor)
    return ckpt["step"]


def keep_new_checkpoints(run_dirs, seen):
    """Hard-link each run's ckpt.pt under a new name whenever a save has replaced it (saves rename a new file
    over the old one, so the link keeps the earlier checkpoint whole)."""
    for run_dir in run_dirs:
        path = os.path.join(run_dir, "ckpt.pt")
        try:
            inode = os.stat(path).st_ino
        except FileNotFoundError:
            continue
        kept = seen.setdefault(run_dir, [])
        if inode not in kept:
            kept.append(inode)
            os.link(path, os.path.join(run_dir, f"kept_{len(kept)}.pt"))


def evaluate(model_dir, index, knobs, log_path):
    """Start eval.py (counting and pointing on the first n_eval test images) on model_dir (a run's out_dir, or
    a dir holding final/); its results go to model_dir/eval_test. Returns the process."""
    return subprocess.Popen(
        [sys.executable, "eval.py", f"--init_from={model_dir}", "--split=test", f"--data_dir={knobs['data_dir']}",
         "--datasets=['synth_image']", "--tasks=['counting','pointing']", f"--max_examples={knobs['n_eval']}",
         f"--device={knobs['device']}", "--n_show=4"],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=run_env(index, knobs))


def run_env(index, knobs):
    """The environment of the index-th run: two CPU threads, and its GPU when the runs share several."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    if knobs["gpus"] > 1:
        env["CUDA_VISIBLE_DEVICES"] = str(index % knobs["gpus"])
    return env


def run_one(index, name, args, knobs):
    """Start one run's training; returns the process (its output goes to {out_dir}/{name}.log)."""
    run_dir = os.path.join(knobs["out_dir"], name)
    command = [sys.executable, "train_joint.py", "config/demo_joint.py", "--init_from=scratch", f"--out_dir={run_dir}",
               f"--data_dir={knobs['data_dir']}", f"--device={knobs['device']}", "--save_every=250", "--eval_every=250",
               "--log_every=50", "--resume=False", *args.split()]
    log = open(os.path.join(knobs["out_dir"], f"{name}.log"), "w")
    print(f"[{name}] {' '.join(command[1:])}", flush=True)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=run_env(index, knobs))


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


def plot_curve(points, out_dir):
    """{run: [(step, counting accuracy, pointing F1), ...]} -> out_dir/curve.json and one chart per metric;
    returns the chart paths."""
    from training import plot_curves
    with open(os.path.join(out_dir, "curve.json"), "w") as f:
        json.dump(points, f, indent=1)
    paths = []
    for column, metric in ((1, "counting accuracy"), (2, "pointing F1")):
        path = os.path.join(out_dir, f"curve_{metric.split()[0]}.png")
        plot_curves({name: [(p[0], p[column]) for p in row] for name, row in points.items()}, path,
                    title=f"held-out {metric} against training steps", ylabel=metric)
        paths.append(path)
    return paths


def main(knobs):
    """knobs: configure's dict of this module's knobs after the command line."""
    os.makedirs(knobs["out_dir"], exist_ok=True)
    if not os.path.exists(os.path.join(knobs["data_dir"], "synth_image", "test.jsonl")):
        subprocess.run([sys.executable, "prepare_data.py", "--dataset=synthetic", f"--out={knobs['data_dir']}"], check=True)
    t0 = time.time()
    procs = {name: run_one(i, name, args, knobs) for i, (name, args) in enumerate(knobs["runs"].items())}
    run_dirs = [os.path.join(knobs["out_dir"], name) for name in procs]
    seen = {}
    while any(proc.poll() is None for proc in procs.values()) and time.time() - t0 < knobs["train_seconds"]:
        if knobs["curve"]:
            keep_new_checkpoints(run_dirs, seen)
        time.sleep(0.5)
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    evals, evaluated_step = {}, {}
    for i, name in enumerate(procs):
        run_dir = os.path.join(knobs["out_dir"], name)
        if not os.path.exists(os.path.join(run_dir, "final", "config.json")):
            if not os.path.exists(os.path.join(run_dir, "ckpt.pt")):
                print(f"[{name}] stopped before its first checkpoint: no row (see {run_dir}.log)")
                continue
            evaluated_step[name] = export_checkpoint(os.path.join(run_dir, "ckpt.pt"), os.path.join(run_dir, "final"))
            print(f"[{name}] stopped by the time limit; evaluating its checkpoint of step {evaluated_step[name]}")
        else:
            with open(os.path.join(run_dir, "log.jsonl")) as f:
                evaluated_step[name] = max(json.loads(line)["step"] for line in f) + 1
        evals[name] = evaluate(run_dir, i, knobs, os.path.join(knobs["out_dir"], f"{name}.eval.log"))
    curve = {}  # name -> [(step, eval process, model dir)]
    for i, name in enumerate(procs):
        for k in range(1, len(seen.get(run_dirs[i], [])) + 1):
            model_dir = os.path.join(run_dirs[i], f"kept_{k}")
            step = export_checkpoint(os.path.join(run_dirs[i], f"kept_{k}.pt"), os.path.join(model_dir, "final"))
            if step < evaluated_step.get(name, 0):  # (the last kept one can be the final model itself)
                curve.setdefault(name, []).append(
                    (step, evaluate(model_dir, i, knobs, os.path.join(model_dir, "eval.log")), model_dir))
    failed = [name for name, proc in evals.items() if proc.wait() != 0]
    print("\n| run | arguments | steps | train loss | val loss real/rotated crops at step | counting acc. | pointing F1 |")
    print("|---|---|---:|---:|---|---:|---:|")
    for name in evals:
        if name not in failed:
            print(table_row(name, knobs, evaluated_step[name]))
    if curve:
        points = {}  # name -> [(step, counting accuracy, pointing F1)], the final model's last
        for name, kept in curve.items():
            for step, proc, model_dir in kept + [(evaluated_step[name], evals[name], os.path.join(knobs["out_dir"], name))]:
                if proc.wait() != 0:
                    failed.append(f"{name} step {step}")
                    continue
                with open(os.path.join(model_dir, "eval_test", "metrics.json")) as f:
                    metrics = json.load(f)
                points.setdefault(name, []).append((step, metrics["counting_accuracy"], metrics["pointing_f1"]))
        print("\n| run | counting acc. / pointing F1 at step |\n|---|---|")
        for name, row in points.items():
            print(f"| {name} | {' '.join(f'{step}: {count:.3f} / {f1:.3f}' for step, count, f1 in row)} |")
        print("curves: " + ", ".join(plot_curve(points, knobs["out_dir"])))
    if failed:
        raise SystemExit(f"evaluation failed for {failed}: see {knobs['out_dir']}/<run>.eval.log")


if __name__ == "__main__":
    main(configure(globals()))
