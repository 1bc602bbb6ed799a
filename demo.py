"""
The README's main job, on its embedded default: a 2-core CPU, no network, about 15 minutes
(`python demo.py --recipe=gpu`: the same on one GPU, with longer stages and a 6x larger world, in about 9 minutes).

1. generate the demo's synthetic world (data/demo/: up to 5 shapes an image, 5,000 training images; the GPU
   recipe's data/demo_gpu_60k/ has 60,000): shapes to count and point at, with held-out val and test splits
2. vision (stage 1): the small preset's ViT from scratch learns which of its pooled tokens hold the pointed
   shapes, where, and their kinds and colours (config/demo_vision.py); the GPU recipes first teach it the kinds
   of shape in an easy world of one large solid shape an image (data/easy, config/demo_gpu_vision_easy.py; the
   full recipe's ViT also with config/demo_full_vision_easy.py), then go on in the demo's world
3. align: a small nanoMolmo2 around that ViT, LLM at random; only the connector and the new token embeddings
   learn (config/demo_align.py)
4. joint: the connector and LLM learn counting, pointing, short questions and captions, the ViT
   frozen (config/demo_joint.py, config/demo_gpu_joint.py)
5. evaluate on the held-out test images with eval.py: counting accuracy and pointing F1
6. write out/demo/report.md: the numbers, the loss curves, how alike the image tokens became, and the test
   images with predicted and true points

Each step is the project's own command line, run as a subprocess and printed first, so it can be rerun or
changed by hand. A finished step is not redone (delete out/demo to start over).
"""

import json
import os
import shutil
import subprocess
import sys
import time

from configurator import configure

# -- knobs (override with --key=value) -------------------------------------------------------------------------
recipe = "cpu"  # cpu: this 2-core machine, ~15 min (config/demo_*.py) | gpu: one GPU, ~9 min: longer stages on
#   bigger batches (config/demo_gpu_*.py on top of them), into out/demo_gpu | full: the full nanomolmo2 preset on
#   one large GPU, ~9.5-9.7 min (config/demo_full_*.py on top of the GPU files; its ViT at 112-px crops, in the easy
#   world first too), into out/demo_full
minutes = 15.0  # cpu recipe: end within about this many minutes of `started`, on any CPU. Stage 1 and the joint
#   stage get --max_minutes (train_*.py cut their steps to what fits, their learning rates decaying to there): on a
#   CPU with bf16 matrix instructions every step fits; one ~4x slower runs fewer and learns less (BENCHMARKS.md "The
#   CPU demo in 15 minutes on a slower CPU"). 0: every step of the recipe, however long it takes
started = 0.0  # the Unix time those minutes count from: `make demo` passes the time it started, so that setting up
#   the venv counts too; 0 = when demo.py starts
# ----------------------------------------------------------------------------------------------------------------

WORLD = "data/demo"  # the CPU demo's world: up to 5 shapes an image (counts 0-5), 5,000 training images
# each recipe: its out_dir, its world (folder, training images) and, per stage, the config files applied in order
# (a GPU file overrides a few knobs of the CPU one: more and bigger steps). The GPU recipe's joint stage sees each of
# 10,000 images ~28 times and overfits them by step 1,500 (BENCHMARKS.md "The GPU demo"); in a world of 30,000 its
# validation loss turned up after 5,000 steps, in one of 60,000 (the recipe's) it fell to the end of 6,000
# (BENCHMARKS.md "Stage 1's step, made and launched"). The same val and test images (each split is drawn from its own
# seeds).
# The GPU recipe's stage 1 starts in an easy world (one large solid shape or none on plain grey, 10,000 images), where
# the ViT learns the kinds of shape it does not learn among the demo world's five small textured ones: its scene head
# then named 0.86 of the world's kinds after 2,400 steps of 64 images on it (0.91 at 128 images a step, the recipe
# now), against 0.62 after 2,000 steps of 64 from a random start and 0.30 in the one-part recipe before (BENCHMARKS.md
# "Stage 1 in two parts", "Stage 1 at 128 images a step").
# The CPU recipe's world asks 2 more counting or pointing questions of each training image, about other colours and
# kinds than its own question (prepare_data.py --extra_queries): a step's rows are longer (448 tokens, not 368), so
# ~2,500 joint steps fit where ~2,950 did, but each image teaches three point lists, not one. On this project's 2-core
# CPU the joint stage from one align checkpoint then counted 0.610 and pointed at F1 0.457 against 0.565 / 0.391
# without; over three seeds of a GPU replay of its minutes, 0.588 / 0.458 against 0.513 / 0.386 (BENCHMARKS.md "More
# questions an image"). The held-out splits are the same bytes with or without them. The GPU recipe's world asks them
# too: on one H200 (2026-12-06) its one command counted 0.915 and 0.930 with them (F1 0.946 / 0.930; two joint rates,
# one stage 1) where its last four runs without them had counted 0.855-0.910, and the joint stage from one align
# checkpoint 0.93 with them (at half the rates) against 0.84 without them (at the old; BENCHMARKS.md "Two more
# questions an image in the GPU recipe's world").
EXTRA_QUERIES = {"cpu": 2, "gpu": 2}
# The CPU recipe's world holds 5,000 training images, not 10,000: its joint stage's ~2,550 steps of 8 meet each image
# ~4 times, not twice. Replayed on one GPU (three seeds, the same stage 1 and steps) the smaller world counted 0.618
# and pointed at F1 0.574 against 0.582 / 0.533, its stage 1 naming 0.82 of the kinds against 0.80; and from ~step
# 625 on an image met again skips the frozen ViT (train_joint.py --vit_feature_cache), so more steps fit the
# minutes: at 2,850 steps the replays counted 0.685 / F1 0.629 (BENCHMARKS.md "A smaller world for the CPU demo").
CPU_TRAIN_IMAGES = 5_000
STAGES = ("vision", "align", "joint")
EASY_WORLD = ("data/easy", 10_000)  # and, per recipe, the config files its easy part adds to its stage-1 files
RECIPES = {
    "cpu": ("out/demo", (WORLD, CPU_TRAIN_IMAGES), {stage: [f"config/demo_{stage}.py"] for stage in STAGES}, None),
    "gpu": ("out/demo_gpu", ("data/demo_gpu_60k", 60_000),
            {stage: [f"config/demo_{stage}.py", f"config/demo_gpu_{stage}.py"] for stage in STAGES},
            (*EASY_WORLD, ["config/demo_gpu_vision_easy.py"])),
    # the full nanomolmo2 preset (so400m ViT, Qwen3-0.6B) from scratch on one GPU, in the GPU recipe's earlier world
    "full": ("out/demo_full", ("data/demo_gpu", 30_000),
             {stage: [f"config/demo_{stage}.py", f"config/demo_gpu_{stage}.py", f"config/demo_full_{stage}.py"]
              for stage in STAGES},
             (*EASY_WORLD, ["config/demo_gpu_vision_easy.py", "config/demo_full_vision_easy.py"])),
}
# eval.py's own default is the CPU in float32: there the small model answers the 400 test questions in seconds, but
# the full preset's 1B parameters would take most of the 10 minutes; it answers on the GPU it trained on
EVAL_ARGS = {"full": ["--device=cuda", "--dtype=bfloat16", "--batch_size=100"]}


def demo_steps(recipe="cpu"):
    """[(name, command line after `python`, the file that shows it is done)] of a recipe."""
    import prepare_data
    if recipe not in RECIPES:
        raise SystemExit(f"demo: recipe={recipe!r}: expected one of {sorted(RECIPES)}")
    out, (world, n_train), files, easy = RECIPES[recipe]
    configs = {stage: [*stage_files, f"--data_dir={world}"] for stage, stage_files in files.items()}
    steps = [("demo world", ["prepare_data.py", "--dataset=synthetic", f"--out={world}", "--max_objects=5",
                             f"--train_images={n_train}", f"--extra_queries={EXTRA_QUERIES.get(recipe, 0)}"],
              f"{world}/{prepare_data.WORLD_FILE}")]
    if easy:  # stage 1's first part, in the easy world; the second part starts from its ViT
        easy_world, n_easy, easy_files = easy
        steps += [
            ("easy world", ["prepare_data.py", "--dataset=synthetic", f"--out={easy_world}", "--shape_style=big_solid",
                            "--max_objects=1", f"--train_images={n_easy}"], f"{easy_world}/{prepare_data.WORLD_FILE}"),
            ("vision, easy world", ["train_vision.py", *files["vision"], *easy_files,
                                    f"--data_dir={easy_world}", f"--out_dir={out}/vision_easy"],
             f"{out}/vision_easy/final/config.json")]
        configs["vision"].append(f"--init_from={out}/vision_easy")
    return steps + [
        ("vision", ["train_vision.py", *configs["vision"], f"--out_dir={out}/vision"],
         f"{out}/vision/final/config.json"),
        ("align", ["train_align.py", *configs["align"], f"--out_dir={out}/align", f"--vit_from={out}/vision"],
         f"{out}/align/final/config.json"),
        ("joint", ["train_joint.py", *configs["joint"], f"--out_dir={out}/joint", f"--init_from={out}/align"],
         f"{out}/joint/final/config.json"),
        ("evaluate", ["eval.py", f"--init_from={out}/joint", "--split=test", f"--data_dir={world}",
                      "--datasets=['synth_image']", "--tasks=['counting', 'pointing']", f"--out_dir={out}/eval",
                      *EVAL_ARGS.get(recipe, [])],
         f"{out}/eval/metrics.json"),
    ]


STEPS = demo_steps("cpu")  # the CPU demo's steps (tests/test_readme.py runs them shortened)


# how the report names each group of counting questions (prepare_data.query_asks_about)
QUESTION_FORMS = {"colour": 'a colour ("How many red shapes are there?")', "kind": 'a kind ("Count the circles.")',
                  "colour and kind": 'both ("How many red circles can you see?")', "nothing": "every shape"}


# what the report says under that table: why a kind is the hardest to count, for the CPU recipe and the GPU ones
KIND_HARDEST = ("A colour is the easiest thing for the ViT to see, a kind of shape the hardest: the world's shapes are "
              "one or two\npatches wide in the high-resolution crops. ")
KINDS_NOTE = {
    True: KIND_HARDEST + """This stage 1 names the kinds too (train_vision.py's scene
loss), its ViT's matrices learning by Muon: under AdamW the CPU's 9,600-19,200 images named no more kinds than chance,
under Muon a 2-core CPU's ~16,000 names 0.65-0.82 of them, and a GPU recipe, which first shows the ViT one large shape
an image, 0.97. A count of n shapes of a kind needs every one of them named, so the LLM counts the kinds below the
colours (0.36-0.63 on a 2-core CPU; BENCHMARKS.md "Stage 1 by Muon", "Stage 1 at 48 images a step", "Stage 1 in two
parts").""",
    False: KIND_HARDEST + """This recipe's stage 1 also learns the kinds (train_vision.py's scene
loss), in a world of one large shape an image first (BENCHMARKS.md "Stage 1 in two parts").""",
}


def commonest_count_share(test_jsonl):
    """How often the commonest true count occurs among the test images: what a model that never looks scores."""
    import collections

    import prepare_data
    with open(test_jsonl) as f:
        scenes = [json.loads(line)["scene"] for line in f if line.strip()]
    counts = collections.Counter(sum(prepare_data.shape_matches(shape, scene["query"]) for shape in scene["shapes"])
                                 for scene in scenes)
    return counts.most_common(1)[0][1] / len(scenes)


def counting_by_query(predictions_jsonl, test_jsonl):
    """eval.py's counting answers on the test images, by what each question names (prepare_data.query_asks_about)
    -> [(names, questions, counted right)], in the order colour, kind, colour and kind (the kinds that occur)."""
    import collections

    import prepare_data
    with open(test_jsonl) as f:
        queries = {r["id"]: r["scene"]["query"] for r in map(json.loads, filter(str.strip, f))}
    asked, right = collections.Counter(), collections.Counter()
    with open(predictions_jsonl) as f:
        for p in map(json.loads, filter(str.strip, f)):
            if p["task"] == "counting":
                about = prepare_data.query_asks_about(queries[p["id"]])
                asked[about] += 1
                right[about] += p["scores"]["correct"] == 1.0
    order = ("colour", "kind", "colour and kind", "nothing")
    return [(about, asked[about], right[about]) for about in sorted(asked, key=order.index)]


def last_validation(log_jsonl, key):
    """A stage's last validation record that holds key (training.logged_steps reads the log), or None: a stage run
    without validations."""
    from training import logged_steps
    return next((r for r in reversed(logged_steps(log_jsonl)[1].values()) if key in r), None)


def flags(args):
    """A step's command's --key=value arguments as {key: value} (the script, args[0], left out)."""
    return dict(a[2:].split("=", 1) for a in args[1:] if a.startswith("--"))


def steps_ran(steps):
    """[(stage, steps it ran, steps its command set)] for each training stage among a recipe's steps, read off its
    last checkpoint (train_*.py saves one at its last step; max_minutes may end a stage before its max_steps, and the
    checkpoint's config keeps the max_steps the command set). A stage without a checkpoint (save_every=0) is left
    out."""
    import torch
    rows = []
    for name, args, _ in steps:
        out_dir = flags(args).get("out_dir")
        if args[0].startswith("train_") and out_dir and os.path.isfile(f"{out_dir}/ckpt.pt"):
            # mapped, not read: the full recipe's checkpoint holds ~1B parameters and their AdamW moments, and only
            # two numbers of it are wanted here
            ckpt = torch.load(f"{out_dir}/ckpt.pt", map_location="cpu", weights_only=False, mmap=True)
            rows.append((name, ckpt["step"], ckpt["config"]["max_steps"]))
    return rows


def steps_note(rows):
    """What the report says of stages that ran out of minutes before their steps ("" where none did)."""
    import textwrap
    short = [f"{name} ran {ran:,} of its {planned:,} steps" for name, ran, planned in rows if ran < planned]
    if not short:
        return ""
    return "\n" + textwrap.fill(
        f"The minutes ran out before the steps: {', '.join(short)}, its learning rates decaying to where it ended "
        "(max_minutes). Runs of fewer steps have scored lower (README.md, \"The CPU demo as it runs now\": of its "
        "draws of this demo on a 2-core Xeon, those of fewer than 2,900 joint steps counted and pointed lower on "
        "average).", width=115) + "\n"


def preflight(recipe):
    """What this machine means for the recipe, said before its first step: the GPU recipes need a CUDA GPU (on a
    CPU they would run for hours), and the CPU recipe's ~15 minutes assume a CPU with AMX's bf16 matrix instructions
    (with AVX512-BF16 alone they hold half to nine tenths of its steps, without either about a quarter)."""
    import torch

    from training import cpu_has_amx, cpu_has_bf16_matmul
    if torch.cuda.is_available():
        return
    if recipe != "cpu":
        raise SystemExit(f"demo: recipe={recipe!r} trains on a CUDA GPU, and this machine has none "
                         "(torch.cuda.is_available() is False); the CPU recipe is `python demo.py`")
    has_bf16 = cpu_has_bf16_matmul()
    if has_bf16 and not cpu_has_amx():
        fewer = (f"its {minutes:g} minutes hold fewer of the recipe's steps (a 2-core AMD EPYC: 286-365 of stage "
                 "1's 400, 1,265-2,909 of the joint stage's 3,300, as fast as it ran that hour), and it learns less: "
                 "there `make demo` counted 0.42-0.67 where every step (--minutes=0) counted 0.575-0.705"
                 if minutes else "the stages take ~1.5-2x as long as on one with AMX")
        print("demo: this CPU has AVX512-BF16 but no AMX, so its bf16 products run several times slower than on a "
              f"CPU with AMX (a 2-core one: 290-410 GFLOP/s against ~2,400): {fewer}. BENCHMARKS.md \"The world of "
              "2,500 on the slower CPU\"", flush=True)
    elif not has_bf16:
        fewer = (f"to end within its {minutes:g} minutes, stage 1 and the joint stage run the steps that fit and "
                 "learn less (--minutes=0: all of them)" if minutes else "the stages take ~3-4x longer (--minutes=0)")
        print("demo: this CPU has no bf16 matrix instructions (AVX512-BF16 or AMX), so the stages run in float32, ~4x "
              "slower than on a CPU with them (a 2-core machine without them took 1.3-1.5 s a joint step against "
              f"0.30-0.37 s): {fewer}. BENCHMARKS.md \"The CPU demo in 15 minutes on a slower CPU\"", flush=True)


# the cpu recipe's minutes: what stage 1's and the joint stage's --max_minutes leave for the rest
AFTER_S = 60  # evaluation, the report, and each stage's start and export, which its max_minutes does not count
AFTER_BASE_S = 20  # where the align stage ran in the same command, the joint stage keeps back this plus the align
#   stage's seconds instead (at most AFTER_S): both scale with the CPU's speed (on this project's AMX CPU the align
#   stage took 11 s and the rest ~19; on one ~4x slower, 29-34 s and 30-36), so a fast CPU trains ~30 s more and a
#   slow one keeps its margin
ALIGN_S = 40  # the align stage (34 s on the slowest CPU measured)
VISION_SHARE = 0.25  # of the minutes left for stage 1 and the joint stage, stage 1's at most (it takes ~18% of them
#   on a CPU with bf16 matrix instructions, so it is cut only on a slower one)


def stage_minutes(name, seconds_left, align_s=None):
    """--max_minutes for a stage of the cpu recipe that starts with seconds_left of the demo's minutes, or None for
    a stage that runs its steps whatever the time (the world, align, evaluation: short and fixed). align_s: how long
    the align stage took, where it ran in this command (the joint stage then keeps AFTER_BASE_S + align_s back)."""
    if name == "vision":
        seconds_left = VISION_SHARE * (seconds_left - ALIGN_S - AFTER_S)
    elif name == "joint":
        seconds_left -= AFTER_S if align_s is None else min(AFTER_S, AFTER_BASE_S + align_s)
    else:
        return None
    return max(seconds_left / 60, 0.1)  # at the least the 20 steps before the first fit (training.StepBudget)


def is_done(args, done_marker):
    """A step is done when the file that shows it exists; a world (prepare_data.py's WORLD_FILE) only when it was made
    with the content knobs this step asks for (a world from before its extra questions is made again). Its size is
    not compared: a world made smaller on purpose (tests/test_readme.py) is still that world."""
    import prepare_data
    if not os.path.exists(done_marker):
        return False
    if os.path.basename(done_marker) != prepare_data.WORLD_FILE:
        return True
    with open(done_marker) as f:
        made = json.load(f)
    asked = flags(args)
    return all(str(made.get(k)) == asked[k] for k in prepare_data.WORLD_CONTENT if k in asked)


JOINT_PROCESSES = 2  # the CPU recipe's joint stage as this many DDP processes (gloo), each with its share of the
#   cores and of the step's rows. One process of two threads left a core waiting while the other ran the step's
#   serial Python and small ops (~20% of its time in the OpenMP spin); on this project's 2-core AMD CPU two processes
#   fitted 2,398-2,462 joint steps in the demo's minutes where one had fitted 2,148-2,214 in four draws, and
#   2,544-2,736 with each training image dealt to one process, whose ViT feature cache then holds it
#   (training._DrawKeys; BENCHMARKS.md "Two processes on the two cores", "Each record to one rank")


def joint_launch(args, cores):
    """The CPU recipe's joint step (the command after `python`) -> (the command to run, its environment): under
    torch.distributed.run as JOINT_PROCESSES processes of cores // JOINT_PROCESSES threads each, each with its share
    of config/demo_joint.py's rows a step (batch_size is per process), so a step trains the same rows; as it is on a
    machine with fewer cores than that."""
    import runpy
    n = JOINT_PROCESSES
    if cores < n:
        return args, None
    config_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), args[1])  # args: the script, its config
    rows = runpy.run_path(config_file)["batch_size"]
    if rows % n:
        raise SystemExit(f"demo: {args[1]}'s batch_size {rows} does not split over {n} processes")
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    return [*launch, *args, f"--batch_size={rows // n}"], {**os.environ, "OMP_NUM_THREADS": str(cores // n)}


def main(recipe="cpu"):
    out, (world, _), _, _ = RECIPES[recipe]
    t0 = time.time()
    clock_start = started or t0
    steps = demo_steps(recipe)
    took = {}  # seconds of each step run in this command
    if not all(is_done(args, done_marker) for _, args, done_marker in steps):
        preflight(recipe)
    for name, args, done_marker in steps:
        if is_done(args, done_marker):
            print(f"== {name}: already done ({done_marker})", flush=True)
            continue
        budget = (stage_minutes(name, minutes * 60 - (time.time() - clock_start), took.get("align"))
                  if minutes and recipe == "cpu" else None)
        if budget is not None:
            args = [*args, f"--max_minutes={budget:.2f}"]
        env = None
        if recipe == "cpu" and name == "joint":
            from training import usable_cores
            args, env = joint_launch(args, usable_cores())
        print(f"\n== {name}: {' '.join(args)}", flush=True)
        t = time.time()
        if subprocess.run([sys.executable] + args, env=env).returncode != 0:
            raise SystemExit(f"demo: step '{name}' failed (command: {' '.join(args)})")
        took[name] = time.time() - t
        print(f"== {name}: {took[name]:.0f} s", flush=True)

    with open(f"{out}/eval/metrics.json") as f:
        metrics = json.load(f)
    # the pictures next to the report; readout.png and answers.png are drawn only by stages that validated
    for picture in ("vision/loss.png", "align/loss.png", "joint/loss.png", "vision/readout.png",
                    "joint/image_features.png", "joint/answers.png"):
        if os.path.isfile(f"{out}/{picture}"):
            shutil.copy(f"{out}/{picture}", f"{out}/{picture.replace('/', '_')}")
    counting, pointing = metrics["counting_accuracy"], metrics["pointing_f1"]
    val = last_validation(f"{out}/joint/log.jsonl", "val_loss")
    readout = last_validation(f"{out}/vision/log.jsonl", "val_point_f1")
    losses = f"{val['val_loss']:.4f} / {val['val_loss_crops_shuffled']:.4f}" if val else "not measured (no validation)"
    stage1 = f"{readout['val_count_acc']:.3f} / {readout['val_point_f1']:.3f}" if readout else "not measured"
    from model import QWEN3_VOCAB_SIZE
    with open(f"{out}/joint/final/config.json") as f:
        config = json.load(f)
    n_tokens = len(config.get("token_ids", [])) or QWEN3_VOCAB_SIZE  # a full-vocabulary model
    llm, vit = config["text_config"], config["vision_config"]
    size = "A small" if recipe != "full" else "The full"
    parts = (f"SigLIP2-style ViT {vit['hidden_size']} wide x {vit['num_hidden_layers']} blocks at "
             f"{vit['image_size'][0]} px, Qwen3-style LLM {llm['hidden_size']} wide x "
             f"{llm['num_hidden_layers']} blocks")
    where = "this machine's CPU" if recipe == "cpu" else "one GPU"
    guess = commonest_count_share(f"{world}/synth_image/test.jsonl")
    by_query = "\n".join(f"| {QUESTION_FORMS[about]} | {n} | {k / n:.3f} |" for about, n, k in
                         counting_by_query(f"{out}/eval/predictions.jsonl", f"{world}/synth_image/test.jsonl"))
    since = f", {(time.time() - started) / 60:.1f} since `make demo` started (the set-up included)" if started else ""
    ran = steps_ran(steps)
    ran_row = (f"| steps each stage ran, of those its command set: {' / '.join(name for name, _, _ in ran)} | "
               f"{' / '.join(f'{r:,} of {p:,}' for _, r, p in ran)} |\n" if ran else "")
    report = f"""# nanoMolmo2 demo

{size} nanoMolmo2 ({parts} with rows for the {n_tokens:,} Qwen3 tokens the world uses) trained from scratch
on the demo's synthetic world (up to 5 shapes an image), on {where}, in three stages (vision
pretraining, connector alignment, joint training), then asked to count and point on the held-out test images.

| held-out test images | value |
|---|---|
| counting accuracy (exact final count) | {counting:.3f} |
| the same, always answering the commonest count | {guess:.3f} |
| pointing F1 (a point counts inside the shape's radius) | {pointing:.3f} |
| validation loss with the real crops / with each crop moved to the next image | {losses} |
| stage 1 alone, read off its localisation head (validation images): counting / pointing F1 | {stage1} |
{ran_row}
The validation losses say what the images are worth to the model: when the two are equal it answers without
looking. The stage 1 row is what stage 1's ViT knows before any LLM reads it: the gap between it and the first
rows is what the LLM has yet to learn to say.
{steps_note(ran)}
Counting, by what the question names:

| the test's counting questions name | questions | counted right |
|---|---:|---:|
{by_query}

{KINDS_NOTE[recipe == "cpu"]}

Total time {(time.time() - t0) / 60:.1f} min{since} (steps already done earlier not counted). Full tables and
predictions: [eval/report.md](eval/report.md).

## Loss curves

![stage 1: vision pretraining](vision_loss.png)

Stage 1 alone, no LLM: the counts and points read straight off its localisation head on validation images.

![stage 1 read-out](vision_readout.png)

![align stage](align_loss.png)

![joint stage](joint_loss.png)

At each validation the joint stage also answers validation questions (counting and pointing; its `eval_answers`),
greedily, scored as eval.py scores the test images: the model learning to answer, step by step.

![answers during training](joint_answers.png)

## What the LLM receives from the images

The mean cosine between the image tokens of each training batch, as the connector hands them to the LLM.
Near 1, every image token points the same way and, after the LLM's first RMSNorm, they all look alike: the
picture carries little information. Training from scratch drifts there within tens of steps (BENCHMARKS.md,
"Does the model learn to see?").

![image features](joint_image_features.png)

## Test images: predicted (filled) and true (rings) points

![counting](eval/counting_synth_image_test.png)

![pointing](eval/pointing_synth_image_test.png)

Ask the model yourself: `.venv/bin/python sample.py --init_from={out}/joint --image={world}/synth_image/test/000001.png
--prompt="Point to the red shapes."`
"""
    with open(f"{out}/report.md", "w") as f:
        f.write(report)
    print(f"\ncounting accuracy {counting:.3f} (commonest count: {guess:.3f}) | pointing F1 {pointing:.3f} on "
          "held-out test images | "
          f"validation loss with the real crops / with them moved to the next image: {losses}")
    print(f"report: {out}/report.md | {(time.time() - t0) / 60:.1f} min{since}")


if __name__ == "__main__":
    configure(globals())
    main(recipe)
