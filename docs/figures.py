"""
Draws every figure of the chapters in docs/ with the project's own code (the processor, the model, the formatting,
the packer, sample.py's pictures), so a figure shows what the code does today.

    .venv/bin/python docs/figures.py --run=out/demo               # all figures into docs/figures/, as committed
    .venv/bin/python docs/figures.py                              # without a run: the figures of the code alone
    .venv/bin/python docs/figures.py --run=out/demo --check=200   # and measure where it looked on 200 test images
    .venv/bin/python docs/figures.py --relink=True                # point the docs' code links at today's lines

Design choices:
- One function per figure (fig_*), each returning its files and printing one line on what they show; FIGURES lists
  them in chapter order. What the chapters claim in numbers is in their python snippets, which tests/test_docs.py
  runs with the figure script itself, so neither can drift from the code.
- Figures that need a trained run (learning curves, where the model looked: RUN_FIGURES) read it from --run, a
  demo-shaped out_dir (vision/, align/, joint/ with log.jsonl, joint/final/); without one they are skipped with a
  note. No number about what a run reached is written into the docs: these figures are drawn from the run itself.
  Every other figure depends on the code alone (random models are seeded), and the test redraws it.
- --check=N is the measure behind "the model looks at what it counts": on N held-out counting questions of the
  demo world, the answer's mean attention per pooled token on the counted shapes' tokens against the background's.
- A link to code is written [`text`](../file.py#L123): --relink moves each to the first line that holds its text,
  and the test fails when a link's line no longer does.
"""

import math
import os
import random
import re
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import data  # noqa: E402
import prepare_data  # noqa: E402
import sample  # noqa: E402
import training  # noqa: E402
from configurator import configure  # noqa: E402
from model import Molmo2, Molmo2Config, causal_padding_mask  # noqa: E402

# -- knobs (override with --key=value) ---------------------------------------------------------------------------
out_dir = "docs/figures"  # where the figures go
run = ""  # a demo-shaped run (make demo's out/demo): learning curves from its logs, "where it looked" from its model
data_dir = "data/demo"  # the world whose held-out test images the run's model is asked about
check = 0  # with run: measure where it looked on this many held-out counting questions (0 = no measure)
max_new_tokens = 192  # the longest answer asked of the run's model (eval.py's for counting)
relink = False  # move every code link of docs/*.md to the line that holds its text, then stop
# ----------------------------------------------------------------------------------------------------------------

DOCS = os.path.join(ROOT, "docs")
# the demo's processor (config/demo_*.py): 112-px crops of 14-px patches, margins of 2 patches, up to 4 crops
DEMO_PROCESSOR = data.Molmo2Processor(crop_size=112, overlap_margins=(2, 2), max_crops=4, max_frames=8)
# the tests' processor: 56-px crops, so that a mask of a whole prompt fits in a picture
TINY_PROCESSOR = data.Molmo2Processor(crop_size=56, overlap_margins=(1, 1), max_crops=2, max_frames=4)


def scene(index, size=224, height=None, n_matching=3):
    """A scene of the demo world (up to 5 shapes) drawn at size x height -> (scene, PIL image, its annotations)."""
    rng = prepare_data._example_rng(0, "docs", "image", index)
    drawn = prepare_data.make_image_scene(rng, max_objects=5, n_matching=n_matching)
    return drawn, prepare_data.render_scene(drawn, size, height), prepare_data.image_annotations(rng, drawn)


def video_record(index=0, size=128):
    rng = prepare_data._example_rng(0, "docs", "video", index)
    drawn = prepare_data.make_video_scene(rng, n_frames=4)
    frames = [prepare_data.render_scene(drawn, size, positions=[s["track"][f] for s in drawn["shapes"]])
              for f in range(4)]
    return {"id": "video", "video": "video", "video_frames": frames, "video_times": drawn["frame_times"]}


def ask(record, question, processor):
    return sample.prompt_example(record, [{"role": "user", "content": question}], "demo", processor)


def said(paths, what):
    for path in paths:
        print(f"{path}: {what}")
    return paths


# ---------------------------------------------------------------------------------------------------------------
# 1. From pixels to tokens
# ---------------------------------------------------------------------------------------------------------------


def pca_colours(features):
    """(n, C) features -> (n, 3) uint8: their first three principal components, each stretched to 0..255."""
    x = features.double() - features.double().mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    y = x @ v[:3].T  # (n, 3)
    y = (y - y.min(0).values) / (y.max(0).values - y.min(0).values).clamp(min=1e-12)
    return (y * 255).round().to(torch.uint8).numpy()


def fig_journey(out):
    """One image through the ViT and the connector of the run's model (--run), else of the small preset at random
    (seeded): each stage's tensor of the global crop squeezed to colours (its first three principal components)."""
    if run:
        model, processor, _ = sample.load_model(os.path.join(run, "joint"))
    else:
        torch.manual_seed(0)
        model, processor = Molmo2(Molmo2Config.preset("small")).eval(), DEMO_PROCESSOR
    _, image, _ = scene(1)
    example = ask({"id": "x", "images": [image]}, "How many?", processor)
    crops, pooling = example.pixel_values, example.image_token_pooling
    layers = model.config.connector.vit_layers
    caught = {}
    hooks = [model.connector.pooling.register_forward_hook(lambda m, a, o: caught.update(pooled=o)),
             model.connector.projector.register_forward_hook(lambda m, a, o: caught.update(projected=o))]
    with torch.no_grad():
        features = model.vit(crops, layers)  # one (n_crops, P, C) per layer read
        model.connector(features, pooling)
    for hook in hooks:
        hook.remove()
    n = math.isqrt(crops.shape[1])
    low_h, low_w = example.image_grids[0, :2].tolist()
    scale = 26

    def grid(colours, h, w):
        return Image.fromarray(colours.reshape(h, w, 3)).resize((w * scale, h * scale), Image.NEAREST)

    size = n * scale
    panels = [(Image.fromarray(sample.crop_pixels(crops[0], processor.patch_size)).resize((size, size), Image.NEAREST),
               f"pixels {tuple(crops.shape)}")]
    for layer, f in zip(layers, features):
        panels.append((grid(pca_colours(f[0]), n, n), f"ViT block {layer}: {tuple(f.shape)}"))
    joined = torch.cat(features, -1)
    panels.append((grid(pca_colours(joined[0]), n, n), f"blocks joined: {tuple(joined.shape)}"))
    for key, what in (("pooled", "pooled"), ("projected", "projected to the LLM")):
        tokens = caught[key][:low_h * low_w]
        panels.append((grid(pca_colours(tokens), low_h, low_w).resize((size, size), Image.NEAREST),
                       f"{what}: {tuple(caught[key].shape)}"))
    whose = f"{os.path.relpath(os.path.abspath(run), ROOT)}/joint" if run else "the small preset at random"
    path = sample.save_panels(os.path.join(out, "journey.png"), panels, columns=6,
                         title=f"one image on its way to the LLM ({whose}; colours: each tensor's first three "
                               "principal components)",
                         note=f"{crops.shape[0]} crops of {n}x{n} patches -> {caught['projected'].shape[0]} tokens, "
                              "added at the prompt's <im_patch> tokens; shown: the global crop")
    return said([path], "an image's global crop through the ViT's blocks, joined, pooled and projected, with shapes")


def fig_crops(out):
    """A wide image under the released settings (378-px crops, margins of 4 patches, up to 8 crops)."""
    _, image, _ = scene(2, 1000, 420)
    processor = data.Molmo2Processor()
    example = ask({"id": "x", "images": [image]}, "How many?", processor)
    crops, _, views = sample.vision_layout(example, [image.size], processor)
    path = sample.picture_crops(crops, example.pixel_values, views, [image], processor.patch_size,
                                os.path.join(out, "crops.png"), "a 1000x420 image under Molmo2's released settings")
    return said([path], "how a wide image is tiled into overlapping 378-px crops plus a global crop")


def fig_pooling(out):
    _, image, _ = scene(1)
    example = ask({"id": "x", "images": [image]}, "How many?", DEMO_PROCESSOR)
    crops, tokens, views = sample.vision_layout(example, [image.size], DEMO_PROCESSOR)
    path = sample.picture_pooling(crops, tokens, example.pixel_values, views, DEMO_PROCESSOR.patch_size,
                                  DEMO_PROCESSOR.image_pooling, os.path.join(out, "pooling.png"),
                                  "the demo's 224-px image: 14-px patches pooled 2x2, one LLM token per window")
    return said([path], "the patch grid and the pooling windows of the global crop and of the stitched crops, numbered")


def fig_layouts(out):
    tokenizer = DEMO_PROCESSOR.tokenizer
    one, two = scene(1)[1], scene(3)[1]
    prompts = {"layout_image.png": ("one image", ask({"id": "x", "images": [one]}, "How many red shapes?",
                                                     DEMO_PROCESSOR)),
               "layout_images.png": ("two images", ask({"id": "x", "images": [one, two]}, "Which has more?",
                                                       DEMO_PROCESSOR)),
               "layout_video.png": ("a video of 4 frames", ask(video_record(), "Track the shapes.", DEMO_PROCESSOR))}
    paths = [sample.picture_tokens(example.input_ids, tokenizer, os.path.join(out, name), f"the prompt for {what}")
             for name, (what, example) in prompts.items()]
    return said(paths, "the token layout of a prompt with one image, two images and a video")


# ---------------------------------------------------------------------------------------------------------------
# 2. Masks
# ---------------------------------------------------------------------------------------------------------------


def fig_masks(out):
    tokenizer = TINY_PROCESSOR.tokenizer
    _, image, annotations = scene(4, 120, 90)
    record = {"id": "x", "images": [image], "annotations": annotations[3:5]}  # two short questions: a message tree
    tree = data.format_example(record, TINY_PROCESSOR)
    text = data.format_example({"id": "t", "annotations": annotations[3:4]}, TINY_PROCESSOR)
    one = data.format_example({**record, "annotations": annotations[3:4]}, TINY_PROCESSOR)
    torch.manual_seed(0)
    model = Molmo2(Molmo2Config.preset("tiny"))
    packed = data.collate([[one, text]])
    ids = {"text": text.input_ids, "one": one.input_ids, "packed": packed["input_ids"][0], "tree": tree.input_ids}
    masks = {"text": causal_padding_mask(torch.ones(1, len(text)), len(text))[0, 0],
             "one": model.vision_attention_mask(one.input_ids[None], one.is_vision[None].long())[0, 0],
             "packed": packed["attn_mask"][0, 0],
             "tree": data.example_attention_mask(tree.branch_ids, tree.is_vision)}
    captions = {"text": "text alone: causal", "one": "an image: its tokens see each other both ways",
                "packed": "two examples packed in one row: blind to each other",
                "tree": "a message tree: two answers share the image, not each other"}
    panels = [(sample.mask_image(masks[k], ids[k], max_side=300)[0], f"{captions[k]} ({len(ids[k])} tokens)")
              for k in masks]
    path = sample.save_panels(os.path.join(out, "masks.png"), panels, columns=2,
                         title="who may attend to whom (row: query, column: key; white: may attend)",
                         note="edges: token kinds (purple/blue: vision tokens, grey: chat template, white: text)")
    return said([path], "the four attention masks: causal text, bidirectional vision, packing, message trees")


# ---------------------------------------------------------------------------------------------------------------
# 3. The objective
# ---------------------------------------------------------------------------------------------------------------


def fig_loss_weights(out):
    tokenizer = TINY_PROCESSOR.tokenizer
    _, image, annotations = scene(5, 120, 90, n_matching=2)
    record = {"id": "x", "images": [image], "annotations": [annotations[0], annotations[1], annotations[3]]}
    example = data.format_example(record, TINY_PROCESSOR)
    has_loss = example.targets >= 0
    shown = torch.where(has_loss, example.targets, example.input_ids)  # a loss token where it is predicted
    branch_colours = [(255, 150, 60), (90, 170, 240), (110, 200, 110)]
    colours = [branch_colours[int(b) - 1] if loss else (225, 225, 225)
               for b, loss in zip(example.branch_ids, has_loss)]
    legend = []
    for k, annotation in enumerate(record["annotations"], 1):
        in_branch = (example.branch_ids == k) & has_loss
        weight = float(example.loss_weights[in_branch][0])
        n = int(in_branch.sum())
        what = f"{annotation['style']}: {n} loss tokens x {weight:.3f} = {weight * n:.2f}"
        legend.append((branch_colours[k - 1], what))
    legend.append(((225, 225, 225), "no loss: the image, the prompts, the template"))
    strip = sample.token_strip(shown, tokenizer, width=1000, colours=colours, legend=legend)
    path = sample.save_panels(os.path.join(out, "loss_weights.png"), [(strip, "each loss token shown where it is "
                                                                         "predicted, coloured by its annotation")],
                         title="one image, three annotations (a message tree): the loss weight of every token")
    return said([path], "the loss weight of each token of a three-annotation example (data.format_example, 'sft')")


def fig_weighting(out):
    """The total weight a conversation of n answer tokens gets under each rule, from data.format_example."""
    tokenizer = data.get_tokenizer()
    curves = {"every token weighs 1 (sum = n)": [], "Molmo2: 2/sqrt(n) per token (sum = 2 sqrt(n))": [],
              "a flat 0.2 per token (grounding)": []}
    for n in [1, 2, 4, 8, 16, 32, 64, 128, 256]:
        answer = " a" * (n - 1)  # n - 1 tokens, and the closing <|im_end|>
        assert len(tokenizer.encode(answer)) == n - 1
        for (name, points), (style, weighting) in zip(curves.items(), [("short_answer", "none"),
                                                                      ("short_answer", "sqrt"), ("pointing", "sft")]):
            record = {"id": "t", "annotations": [{"style": style, "messages": [
                {"role": "user", "content": "Say a."}, {"role": "assistant", "content": answer or "a"}]}]}
            example = data.format_example(record, loss_weighting=weighting)
            points.append((n, float(example.loss_weights.sum())))
    path = training.plot_curves(curves, os.path.join(out, "weighting.png"), title="what one conversation weighs in the loss",
                         xlabel="answer tokens n", ylabel="sum of its loss weights")
    return said([path], "a conversation's total loss weight against its length under the three weighting rules")


# ---------------------------------------------------------------------------------------------------------------
# 4. The stages
# ---------------------------------------------------------------------------------------------------------------


def knob_defaults(script):
    """The literal values a stage script's knob block assigns, read from its source (nothing is run)."""
    import ast
    values = {}
    with open(os.path.join(ROOT, script)) as f:
        for node in ast.parse(f.read()).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                names = target.elts if isinstance(target, ast.Tuple) else [target]
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                value = value if isinstance(target, ast.Tuple) else (value,)
                values.update({name.id: v for name, v in zip(names, value) if isinstance(name, ast.Name)})
    return values


def fig_stages(out):
    """Which part learns in which stage, and at what peak learning rate, read from the scripts' own defaults and
    the joint stage's recipes (training.default_recipe)."""
    from training import MOLMO2_SFT_RECIPE, default_recipe
    vision, align = knob_defaults("train_vision.py"), knob_defaults("train_align.py")
    _, scratch = default_recipe({"llm": "scratch", "vit": "out/vision", "preset": "small"})
    sizes = {}
    for preset in ("small", "nanomolmo2"):
        with torch.device("meta"):
            model = Molmo2(Molmo2Config.preset(preset))
        sizes[preset] = {part: model.num_params(part) for part in ("vit", "connector", "llm")}
    columns = ["1. train_vision.py\n", "2. train_align.py\n", "3. train_joint.py\nLLM from scratch",
               "3. train_joint.py\npretrained Qwen3"]
    rates = {"vit": [vision["lr"], align["lr_vit"], scratch["lr_vit"], MOLMO2_SFT_RECIPE["lr_vit"]],
             "connector": [None, align["lr_connector"], scratch["lr_connector"], MOLMO2_SFT_RECIPE["lr_connector"]],
             "llm": [None, align["lr_llm"], scratch["lr_llm"], MOLMO2_SFT_RECIPE["lr_llm"]]}
    names = {"vit": "ViT", "connector": "connector + 128 new embeddings", "llm": "LLM (Qwen3)"}
    font, bold = sample._font(13), sample._font(14)
    label_w, cell_w, cell_h, top = 300, 190, 46, 50
    image = Image.new("RGB", (label_w + cell_w * len(columns) + 20, top + cell_h * 4 + 40), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for c, column in enumerate(columns):
        for k, line in enumerate(column.split("\n")):
            draw.text((label_w + (c + 0.5) * cell_w, top - 26 + 16 * k), line, fill=(0, 0, 0), font=font, anchor="ms")
    rows = list(rates.items()) + [("heads", [vision["lr"], None, None, None])]
    for r, (part, lrs) in enumerate(rows):
        y = top + r * cell_h
        if part == "heads":
            label, detail = "stage 1's heads and text tower", "thrown away after stage 1"
        else:
            label = names[part]
            detail = f"small {sizes['small'][part] / 1e6:.1f}M, full {sizes['nanomolmo2'][part] / 1e6:.1f}M"
        draw.text((10, y + 8), label, fill=(0, 0, 0), font=bold)
        draw.text((10, y + 26), detail, fill=(90, 90, 90), font=font)
        for c, lr in enumerate(lrs):
            box = (label_w + c * cell_w + 2, y + 2, label_w + (c + 1) * cell_w - 2, y + cell_h - 2)
            fill, text = ((245, 245, 245), "not in this stage") if lr is None else \
                ((200, 200, 200), "frozen") if lr == 0 else ((120, 200, 130), f"learns, peak lr {lr:g}")
            draw.rectangle(box, fill=fill)
            draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), text, fill=(0, 0, 0), font=font, anchor="mm")
    draw.text((10, image.height - 24), "learning rates: the scripts' defaults and training.default_recipe "
                                       "(config/demo_*.py set their own)", fill=(90, 90, 90), font=font)
    path = os.path.join(out, "stages.png")
    image.save(path)
    return said([path], "which parts learn in each stage, with the peak learning rates the scripts start from")


def read_log(path):
    import json
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fig_curves(out):
    """The learning curves of a demo-shaped run (--run), drawn from its logs."""
    logs = {stage: os.path.join(run, stage, "log.jsonl") for stage in ("vision", "align", "joint")}
    if not run or not all(os.path.isfile(p) for p in logs.values()):
        print(f"(curves: skipped; --run=<a demo-shaped out_dir with {', '.join(s + '/log.jsonl' for s in logs)}> "
              "draws them)")
        return []
    rows = {stage: read_log(path) for stage, path in logs.items()}
    train = {stage: [(r["step"], r["loss"]) for r in rows[stage] if "loss" in r] for stage in rows}
    vision_val = {key: [(r["step"], r[key]) for r in rows["vision"] if key in r] for key in ("val_loc", "val_offset")}
    joint_val = {"real crops": [(r["step"], r["val_loss"]) for r in rows["joint"] if "val_loss" in r],
                 "each crop moved to the next image": [(r["step"], r["val_loss_crops_shuffled"])
                                                       for r in rows["joint"] if "val_loss_crops_shuffled" in r]}
    parts = [({"stage 1 training loss": train["vision"], **{f"validation {k}": v for k, v in vision_val.items()}},
              "1. vision"), ({"align": train["align"], "joint": train["joint"]}, "2-3. align and joint: training loss"),
             (joint_val, "3. joint: validation loss")]
    panels = []
    for k, (curves, title) in enumerate(parts):
        piece = os.path.join(out, f"_curve{k}.png")
        training.plot_curves({name: points for name, points in curves.items() if points}, piece, title=title,
                      size=(520, 360))
        panels.append((Image.open(piece).copy(), ""))
        os.remove(piece)
    path = sample.save_panels(os.path.join(out, "curves.png"), panels, columns=3,
                         title=f"the learning curves of {os.path.relpath(os.path.abspath(run), ROOT)}")
    return said([path], "the run's three stages: stage 1's losses, align and joint training loss, and the joint "
                        "validation loss with the real crops and with the crops moved")


# ---------------------------------------------------------------------------------------------------------------
# 5. Data
# ---------------------------------------------------------------------------------------------------------------


def fig_world(out):
    panels = []
    for index in range(4):
        drawn, image, annotations = scene(10 + index, n_matching=None)
        question, answer = (m["content"] for m in annotations[1]["messages"])
        parsed = data.parse_points(answer)
        shown = sample.fit(image, 224)
        draw = ImageDraw.Draw(shown)
        for p in parsed.points:
            sample._ring(draw, (p.x * shown.width, p.y * shown.height), 5, sample.TRUE_COLOR)
        panels.append((shown, f"{question} {parsed.count}"))
    path = sample.save_panels(os.path.join(out, "world.png"), panels, columns=4,
                         title="the demo world: counting questions, their answers and true points (rings)")
    return said([path], "four scenes of the demo world with their counting questions and true points")


def fig_points_text(out):
    tokenizer = data.get_tokenizer()
    drawn, image, annotations = scene(3)
    answer = annotations[1]["messages"][1]["content"]
    ids = tokenizer.encode(answer)
    spans = sample.point_token_spans(ids, tokenizer)
    colours = [(238, 238, 238)] * len(ids)
    dots = []
    for k, (_, x, y, span) in enumerate(spans):
        for i in span:
            colours[i] = sample.TRACK_COLORS[k % len(sample.TRACK_COLORS)]
        dots.append((x * image.width, y * image.height))
    shown, factor = sample.upscale(image, 320)
    draw = ImageDraw.Draw(shown)
    for k, (x, y) in enumerate(dots):
        sample._dot(draw, (x * factor, y * factor), 7, sample.TRACK_COLORS[k % len(sample.TRACK_COLORS)])
    legend = [(sample.TRACK_COLORS[k % len(sample.TRACK_COLORS)], f"point {k + 1}: id x y on 0..1000") for k in range(len(spans))]
    strip = sample.token_strip(torch.tensor(ids), tokenizer, width=700, colours=colours, legend=legend)
    path = sample.save_panels(os.path.join(out, "points_text.png"), [(shown, "the image"), (strip, answer[:90])],
                         columns=2, title="points as text: each point is written as digit tokens")
    return said([path], "a counting answer's points, drawn and as the tokens that write them")


def fig_mixture(out):
    panels = []
    for name in ("mix_pretrain", "mix_sft"):
        mixture = runpy.run_path(os.path.join(ROOT, "config", f"{name}.py"))["data_mixture"]
        used = {group: share for group, (share, datasets) in mixture.items() if datasets}
        total = sum(used.values())
        font = sample._font(13)
        image = Image.new("RGB", (700, 30 + 26 * len(used)), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        for k, (group, share) in enumerate(sorted(used.items(), key=lambda kv: -kv[1])):
            y = 10 + 26 * k
            draw.text((10, y + 10), group, fill=(0, 0, 0), font=font, anchor="lm")
            draw.rectangle((150, y + 2, 150 + 330 * share / total, y + 20), fill=training.PLOT_COLORS[k % len(training.PLOT_COLORS)])
            draw.text((156 + 330 * share / total, y + 10), f"{share / total:.0%}  ({', '.join(mixture[group][1][:2])}"
                      f"{', ...' if len(mixture[group][1]) > 2 else ''})", fill=(0, 0, 0), font=font, anchor="lm")
        panels.append((image, f"config/{name}.py"))
    path = sample.save_panels(os.path.join(out, "mixture.png"), panels, columns=1,
                         title="the data mixtures: share of draws per group",
                         note="groups with no dataset prepare_data.py can build are left out, the rest scaled up")
    return said([path], "the pretraining and SFT mixtures' groups and shares, read from config/mix_*.py")


# ---------------------------------------------------------------------------------------------------------------
# 6. Efficient training
# ---------------------------------------------------------------------------------------------------------------


def demo_examples(n=12):
    """n training examples of the demo world, formatted as train_joint formats them (varied lengths)."""
    rng = random.Random(0)
    examples = []
    for index in range(n):
        _, image, annotations = scene(20 + index, n_matching=None)
        keep = rng.sample(annotations, rng.randint(1, len(annotations)))
        examples.append(data.format_example({"id": str(index), "images": [image], "annotations": keep}, DEMO_PROCESSOR))
    return examples


def fig_packing(out, max_seq_len=512):
    examples = demo_examples()
    packed = list(data.Packer(iter(range(len(examples))), lambda i: examples[i], max_seq_len))
    padded = [[example] for example in examples]
    panels = []
    for rows, what in ((padded, "one example a row, padded"), (packed, f"packed into rows of {max_seq_len}")):
        width = max_seq_len if rows is packed else max(len(e) for e in examples)
        scale, row_h = 1.2, 16
        image = Image.new("RGB", (int(width * scale) + 20, len(rows) * (row_h + 3) + 10), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        for r, row in enumerate(rows):
            x, y = 10, 5 + r * (row_h + 3)
            draw.rectangle((x, y, x + width * scale, y + row_h), fill=(225, 225, 225))
            for example in row:
                k = next(i for i, e in enumerate(examples) if e is example)
                draw.rectangle((x, y, x + len(example) * scale - 1, y + row_h), fill=training.PLOT_COLORS[k % 10])
                x += len(example) * scale
        padding = 1 - sum(len(e) for e in examples) / (len(rows) * width)
        panels.append((image, f"{what}: {len(rows)} rows, {padding:.0%} padding"))
    path = sample.save_panels(os.path.join(out, "packing.png"), panels, columns=2,
                         title=f"{len(examples)} training examples of the demo world (colour: example, grey: padding)")
    return said([path], "the same examples padded one a row against packed by data.Packer")


def state_bytes_per_gpu(n_params, gpus, sharded):
    """Bytes of model state per GPU under AdamW with float32 master weights: 4 (weights) + 4 (gradients) + 8 (two
    moments) per parameter; FSDP shards all three over the GPUs, DDP keeps a full copy on each."""
    return {part: per * n_params / (gpus if sharded else 1)
            for part, per in (("weights", 4), ("gradients", 4), ("AdamW moments", 8))}


def fig_memory(out):
    with torch.device("meta"):
        model = Molmo2(Molmo2Config.preset("nanomolmo2"))
    n = model.num_params()
    setups = [(f"{kind} x{g}", g, kind == "FSDP") for kind in ("DDP", "FSDP") for g in (1, 2, 4)]
    width, height, left, bottom = 720, 380, 70, 50
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = sample._font(13)
    top_gib = 16 * n / 2 ** 30 * 1.1
    colours = {"weights": training.PLOT_COLORS[0], "gradients": training.PLOT_COLORS[1], "AdamW moments": training.PLOT_COLORS[2]}
    bar = (width - left - 160) / len(setups)
    for gib in range(0, int(top_gib) + 1, 4):
        y = height - bottom - gib / top_gib * (height - bottom - 30)
        draw.line((left, y, left + bar * len(setups), y), fill=(225, 225, 225))
        draw.text((left - 8, y), f"{gib} GiB", fill=(0, 0, 0), font=font, anchor="rm")
    for k, (name, gpus, sharded) in enumerate(setups):
        parts = state_bytes_per_gpu(n, gpus, sharded)
        base = 0.0
        x0 = left + k * bar + 8
        for part, value in parts.items():
            gib = value / 2 ** 30
            y0 = height - bottom - (base + gib) / top_gib * (height - bottom - 30)
            y1 = height - bottom - base / top_gib * (height - bottom - 30)
            draw.rectangle((x0, y0, x0 + bar - 16, y1), fill=colours[part])
            base += gib
        draw.text((x0 + (bar - 16) / 2, height - bottom + 6), name, fill=(0, 0, 0), font=font, anchor="ma")
        draw.text((x0 + (bar - 16) / 2, y0 - 4), f"{base:.1f}", fill=(0, 0, 0), font=font, anchor="md")
    for k, (part, colour) in enumerate(colours.items()):
        draw.rectangle((width - 150, 40 + 20 * k, width - 138, 52 + 20 * k), fill=colour)
        draw.text((width - 132, 46 + 20 * k), part, fill=(0, 0, 0), font=font, anchor="lm")
    path = sample.save_panels(os.path.join(out, "memory.png"), [(image, f"nanomolmo2: {n / 1e6:.1f}M parameters, "
                                                                   "float32 weights, gradients and AdamW moments")],
                         title="model state per GPU (activations come on top, and shrink with checkpointing)")
    return said([path], "the model state per GPU of the full preset under DDP and FSDP on 1, 2 and 4 GPUs")


# ---------------------------------------------------------------------------------------------------------------
# 7. Generation
# ---------------------------------------------------------------------------------------------------------------


def fig_kv_cache(out, n_new=10):
    """The whole attention pattern of generation: the prompt's mask (computed in one prefill pass, its keys and
    values cached), then one row per new token, which reads every cached key and adds its own."""
    torch.manual_seed(0)
    model = Molmo2(Molmo2Config.preset("tiny")).eval()
    _, image, _ = scene(4, 120, 90)
    example = ask({"id": "x", "images": [image]}, "How many?", TINY_PROCESSOR)
    batch = sample.collate_prompts([example])
    input_ids, attention_mask = batch.pop("input_ids"), batch.pop("attention_mask")
    with sample.AttentionRecorder(model.llm) as recorder:
        from model import generate
        generate(model, input_ids, n_new, attention_mask=attention_mask, stop_ids=(), **batch)
    prompt = recorder.prompt_mask[0]
    T = prompt.shape[0]
    S = T + n_new - 1  # the last new token is sampled, never fed back
    scale = max(1, 640 // S)
    picture = np.full((S, S, 3), 35, dtype=np.uint8)
    picture[:T, :T][prompt.numpy()] = (255, 255, 255)
    for i, row in enumerate(recorder.rows()[1:], T):  # decoding steps: the query of token i sees keys 0..i
        picture[i, :row.shape[1]] = (150, 205, 255)
    is_vision = torch.tensor([k in ("low_start", "start", "global", "patch", "col", "end")
                              for k in sample.token_kinds(example.input_ids)])
    block = torch.nonzero(is_vision)[:, 0]
    image = Image.fromarray(picture).resize((S * scale, S * scale), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    a, b = int(block[0]) * scale, (int(block[-1]) + 1) * scale
    draw.rectangle((a, a, b - 1, b - 1), outline=(255, 60, 60), width=2)
    draw.line((0, T * scale, S * scale, T * scale), fill=(255, 160, 0), width=2)
    path = sample.save_panels(os.path.join(out, "kv_cache.png"), [(image, f"{T} prompt tokens, then {n_new - 1} new ones "
                                                                     "fed back")],
                         title="generation: the prefill (white) and one row per new token (blue)",
                         note="red: the vision tokens, both ways, all in the prompt; orange: decoding starts")
    return said([path], "the attention of a whole generation: the prompt's mask, then one cached-key row per token")


def fig_looked(out, n_images=4):
    """Where the run's model looked while answering counting questions about held-out test images."""
    if not run or not os.path.isfile(os.path.join(run, "joint", "final", "config.json")):
        print("(looked: skipped; --run=<a demo-shaped out_dir with joint/final/> draws where its model looked)")
        return []
    model, processor, _ = sample.load_model(os.path.join(run, "joint"))
    records = counting_records(n_images)
    panels = []
    for record, question in records:
        looked = look(model, processor, record, question)
        count = data.parse_points(looked["answer"]).count
        entry = (f"answered {'?' if count is None else count}: {question}", looked["weights"], [])
        panels += sample.looked_panels([entry], looked["tokens"], looked["views"], looked["sizes"], record["images"],
                                       height=224)
    path = sample.save_panels(os.path.join(out, "looked.png"), panels, columns=4,
                         title=f"where {os.path.relpath(os.path.abspath(run), ROOT)}/joint looked while counting "
                               "(attention to the image tokens, mean over the answer's tokens, heads and layers)",
                         note="each panel from its least (dark) to its most (bright); above it, the count the model "
                              "answered and the question")
    return said([path], "where the run's model looked while answering counting questions about held-out images")


def counting_records(n):
    """The first n held-out test images of the world with a counting question -> [(record, question)]."""
    path = os.path.join(data_dir, "synth_image", "test.jsonl")
    records = data.RecordFile(path)
    chosen = []
    for record in records:
        counting = [a for a in record["annotations"] if a["style"] == "point_count"]
        if counting:
            chosen.append((record, counting[0]["messages"][0]["content"]))
        if len(chosen) == n:
            break
    return chosen


def look(model, processor, record, question):
    """Ask greedily while recording attention -> dict(answer, weights: the answer's mean attention per pooled token,
    tokens, views, sizes)."""
    example = ask(record, question, processor)
    with sample.AttentionRecorder(model.llm) as recorder:
        answer = sample.generate_answers(model, processor, [example], max_new_tokens)[0]
    rows = recorder.rows()
    n_answer = len(processor.tokenizer.encode(answer)) if answer else 1
    columns = torch.nonzero(example.input_ids == data.IMAGE_PATCH_ID)[:, 0]
    weights = torch.stack([row[0, columns] for row in rows[:max(1, min(n_answer, len(rows)))]]).mean(0).numpy()
    sizes = [image.size for image in record["images"]]
    _, tokens, views = sample.vision_layout(example, sizes, processor)
    return {"answer": answer, "weights": weights, "tokens": tokens, "views": views, "sizes": sizes}


def looked_at_shapes(model, processor, n):
    """The measure behind "it looks at what it counts": over n held-out counting questions, the answer's mean
    attention per pooled token on the tokens of the counted shapes and on the background's
    (sample.attention_on_shapes) -> dict(shapes, background, higher: the share of images where the shapes got more,
    n: images with both kinds of token)."""
    on, off, higher = [], [], 0
    for record, question in counting_records(n):
        scene_ = record["scene"]
        matches = [prepare_data.shape_matches(s, scene_["query"]) for s in scene_["shapes"]]
        counted = [(s["x"], s["y"], s["radius"]) for s, match in zip(scene_["shapes"], matches) if match]
        others = [(s["x"], s["y"], s["radius"]) for s, match in zip(scene_["shapes"], matches) if not match]
        if not counted:
            continue
        looked = look(model, processor, record, question)
        shapes, background = sample.attention_on_shapes(looked["tokens"], looked["views"], looked["sizes"],
                                                        looked["weights"], counted, others)
        if math.isnan(shapes) or math.isnan(background):
            continue
        on.append(shapes)
        off.append(background)
        higher += shapes > background
    return {"shapes": float(np.mean(on)), "background": float(np.mean(off)), "higher": higher / len(on), "n": len(on)}


# ---------------------------------------------------------------------------------------------------------------
# Links from the docs to the code
# ---------------------------------------------------------------------------------------------------------------

CODE_LINK = re.compile(r"\[`([^`]+)`\]\(\.\./([\w./-]+)#L(\d+)\)")


def code_links(markdown):
    """[(text, file, line)] of every [`text`](../file#Lline) link of a chapter."""
    return [(m.group(1), m.group(2), int(m.group(3))) for m in CODE_LINK.finditer(markdown)]


def line_of(text, path):
    """The 1-based number of the first line of the file at `path` (from the repository root) holding `text`."""
    with open(os.path.join(ROOT, path)) as f:
        return next((i for i, line in enumerate(f, 1) if text in line), None)


def relink_docs():
    for name in sorted(os.listdir(DOCS)):
        if not name.endswith(".md"):
            continue
        path = os.path.join(DOCS, name)
        with open(path) as f:
            markdown = f.read()

        def moved(m):
            line = line_of(m.group(1), m.group(2))
            if line is None:
                raise SystemExit(f"docs/{name}: no line of {m.group(2)} holds {m.group(1)!r}")
            return f"[`{m.group(1)}`](../{m.group(2)}#L{line})"

        relinked = CODE_LINK.sub(moved, markdown)  # before the file is opened for writing: a missing text stops here
        with open(path, "w") as f:
            f.write(relinked)
        print(f"docs/{name}: {len(code_links(markdown))} links")


RUN_FIGURES = ("curves.png", "looked.png")  # drawn only from a run
RUN_DRAWN = ("journey.png",)  # drawn from the run's model when there is one
FIGURES = [fig_journey, fig_crops, fig_pooling, fig_layouts, fig_masks, fig_loss_weights, fig_weighting, fig_stages,
           fig_curves, fig_world, fig_points_text, fig_mixture, fig_packing, fig_memory, fig_kv_cache, fig_looked]


def main():
    torch.set_grad_enabled(False)
    if relink:
        relink_docs()
        return
    os.makedirs(out_dir, exist_ok=True)
    for figure in FIGURES:
        figure(out_dir)
    if check:
        if not run:
            raise SystemExit("--check needs --run=<a demo-shaped out_dir with joint/final/>")
        model, processor, _ = sample.load_model(os.path.join(run, "joint"))
        measured = looked_at_shapes(model, processor, check)
        print(f"where it looked, over {measured['n']} held-out counting questions with counted shapes: mean attention "
              f"per token {measured['shapes']:.5f} on the counted shapes, {measured['background']:.5f} on the "
              f"background ({measured['shapes'] / measured['background']:.2f}x); the shapes got more in "
              f"{measured['higher']:.0%} of the images")


if __name__ == "__main__":
    configure(globals())
    main()
