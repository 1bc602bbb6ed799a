"""
Ask nanoMolmo2 about images or a video; see its points.

    python sample.py --image cat.jpg                                   # the default prompt
    python sample.py --image cat.jpg --prompt="Point to the eyes."
    python sample.py --image a.png --image b.png --prompt="Which image has more red circles?"
    python sample.py --video=clip.mp4 --prompt="Track the ball."       # or an animated GIF, or a frame folder
    python sample.py --init_from=allenai/Molmo2-4B --image cat.jpg     # a hub id, a model dir, or a training out_dir
    python sample.py --image cat.jpg --interactive=True                # keep the model loaded, ask again and again

Design choices:
- nanoGPT-style knobs below, overridden by configurator (--key=value). --image and --video also take the
  space-separated form (`--image cat.jpg`), and --image may repeat; those two are read here, before the
  configurator sees the rest of the command line.
- The prompt is laid out exactly as training lays out a record (eval.prompt_example -> data.format_example),
  with the processor settings the checkpoint was trained with (processor.json next to it; see
  data.load_processor). `style` adds the training style prefix ("pointing", "short_answer", ...); the
  default, "demo", has none.
- The answer is streamed as it is generated. When it holds points or tracks they are printed in pixels
  and drawn: a PNG per image, an animated GIF for a video (eval.draw_points / eval.save_video_gif), named
  answer<k> with k one past the highest already in out_dir, so a run never overwrites an earlier one's. What
  could not be read, or names a frame or image the media do not have, is said, never silently left out.
- A model from scratch with kept tokens (--vocab=data) has rows only for its training data's words. A question
  with other words is refused naming them, with questions of the synthetic world it does have every word
  for (data.py section 3d, drawn here) and the words it knows; a default prompt it lacks words for is
  replaced by such a question.
- With no --init_from, the model is out/joint, or make demo's out/demo/joint where out/joint has none.
- A video file (mp4, webm, ...) needs PyAV (`pip install av`); GIFs and frame folders do not.
"""

import os
import random
import re
import sys
import time

import torch
from PIL import Image

import data
import eval as E
from configurator import configure

# -- knobs (override with --key=value) ---------------------------------------------------------------------------
init_from = E.DEFAULT_INIT_FROM  # a training out_dir (holding final/), a model directory, or a hub id; where
#   out/joint holds none, make demo's out/demo/joint
prompt = ""  # default: DEFAULT_PROMPTS for the media given (for a kept-token model, a question it knows)
style = "demo"  # the training style whose prefix the prompt gets (e.g. pointing, short_answer); demo = none
video_fps = 2.0  # frames per second of a folder of frames
max_crops = 0  # crops per image; 0 = as the checkpoint was trained
max_new_tokens = 384
temperature = 0.0  # 0 = greedy
top_k = 0  # 0 = off
top_p = 1.0  # 1.0 = off
seed = 1337
interactive = False  # ask several questions about the same media (":image x.jpg" / ":video y.gif" switches)
out_dir = "out/sample"  # where pictures of the points go (answer<k>.png, k counting on from earlier runs)
device = "cpu"
dtype = "float32"
# ----------------------------------------------------------------------------------------------------------------

DEFAULT_PROMPTS = {"image": "Describe this image in detail.", "images": "Describe these images.",
                   "video": "Describe this video.", "text": "Hello! What can you do?"}
MEDIA_FLAGS = ("--image", "--video")


def split_media_args(argv):
    """Take --image / --video values out of argv (as --image=x or --image x; --image may repeat) ->
    (images, videos, the rest for the configurator)."""
    media = {"--image": [], "--video": []}
    rest, i = [], 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in MEDIA_FLAGS:
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise SystemExit(f"{flag}: expected a path after it ({flag} cat.jpg or {flag}=cat.jpg)")
                i += 1
                value = argv[i]
            media[flag].append(value)
        else:
            rest.append(argv[i])
        i += 1
    if len(media["--video"]) > 1 or (media["--video"] and media["--image"]):
        raise SystemExit("give several --image, or one --video (a prompt holds at most one video, and no images then)")
    return media["--image"], media["--video"], rest


def media_record(images, video, processor):
    """Paths -> a record (data.py section 3b's shape) holding the decoded media, as format_example reads it."""
    if video:
        source = (video, video_fps) if os.path.isdir(video) else video
        clip = data.load_video(source, processor.max_frames, processor.max_fps, "uniform_last_frame", name=video)
        return {"id": video, "video": video, "video_frames": [Image.fromarray(f) for f in clip.frames],
                "video_times": clip.timestamps}
    if not images:
        return {"id": "text"}
    return {"id": ", ".join(images), "image": list(images),
            "images": [Image.fromarray(data.load_image(path)) for path in images]}


class Streamer:
    """Prints the answer as tokens come: decodes all tokens so far and prints what is new (a character split
    over several byte-level tokens shows once it is whole)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, step, ids):
        token = int(ids[0])
        if token in (data.IM_END_ID, data.ENDOFTEXT_ID):
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special=True)
        if not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text


def next_picture_stem():
    """out_dir/answer<k>, k one past the highest k of the pictures already there."""
    taken = [int(m.group(1)) for name in (os.listdir(out_dir) if os.path.isdir(out_dir) else [])
             if (m := re.match(r"answer(\d+)[._]", name))]
    return os.path.join(out_dir, f"answer{max(taken, default=0) + 1}")


def show_points(answer, record, stem):
    """Print the answer's points in pixels and draw them; say what could not be read and which points name a
    frame or image the media do not have. Returns the paths of the pictures written."""
    parsed = data.parse_points(answer)
    if parsed.dropped:
        print(f"dropped {len(parsed.dropped)} unreadable part(s) of the answer's points:")
        for problem in parsed.dropped:
            print(f"  {problem}")
    if not parsed.points or not (record.get("images") or record.get("video_frames")):
        if parsed.dropped:
            print("no points left to draw")
        return []
    os.makedirs(out_dir, exist_ok=True)
    if "video_frames" in record:
        return [show_video_points(parsed, record, stem)]
    images = record["images"]
    for tag in parsed.tags:
        print(f"{tag.kind} '{tag.label}':")
        for p in tag.points:
            width, height = images[min(max(int(p.frame), 1), len(images)) - 1].size
            where = f"image {int(p.frame)}  " if len(images) > 1 else ""
            print(f"  {where}id {p.id}  x={p.x * width:.1f}  y={p.y * height:.1f}")
    if len(images) > 1:
        elsewhere = [p for p in parsed.points if not 1 <= int(p.frame) <= len(images)]
        if elsewhere:
            print(f"{len(elsewhere)} point(s) name an image other than 1..{len(images)}: not drawn")
    paths = []
    for k, image in enumerate(images, 1):
        mine = [p for p in parsed.points if len(images) == 1 or int(p.frame) == k]
        path = f"{stem}.png" if len(images) == 1 else f"{stem}_image{k}.png"
        E.draw_points(image, [(p.x * image.width, p.y * image.height) for p in mine], path=path)
        paths.append(path)
    return paths


def show_video_points(parsed, record, stem):
    """Print a video answer's points in pixels and draw them on their frames in a GIF; returns its path."""
    width, height = record["video_frames"][0].size
    for tag in parsed.tags:
        print(f"{tag.kind} '{tag.label}':")
        for p in tag.points:
            print(f"  t={float(p.frame):.1f}s  id {p.id}  x={p.x * width:.1f}  y={p.y * height:.1f}")
    times = {E.frame_key(t) for t in record["video_times"]}
    elsewhere = [p for p in parsed.points if E.frame_key(p.frame) not in times]
    if elsewhere:
        print(f"{len(elsewhere)} point(s) at times with no frame (the frames are at "
              f"{', '.join(f'{t:.1f}' for t in record['video_times'])} s): not drawn")
    pred = [(float(p.frame), p.x * width, p.y * height) for p in parsed.points]
    if any(tag.kind == "tracks" for tag in parsed.tags):
        tracks = {}
        for p, (t, x, y) in zip(parsed.points, pred):
            tracks.setdefault(p.id, []).append((t, x, y))
        pred = tracks
    return E.save_video_gif(f"{stem}.gif", record["video_frames"], record["video_times"], pred)


def media_kind(record):
    """'video' | 'images' (several) | 'image' | 'text': the key of DEFAULT_PROMPTS for the record's media."""
    if "video_frames" in record:
        return "video"
    n_images = len(record.get("images", ()))
    return "images" if n_images > 1 else "image" if n_images else "text"


def world_questions(kind, n_scenes=4):
    """Questions of the synthetic world (data.py section 3d) about a few scenes drawn with a fixed seed: for
    `kind` media first, then the other kinds'."""
    rng = random.Random(0)
    draw = {"image": lambda: data.image_annotations(rng, data.make_image_scene(rng, max_objects=5)),
            "images": lambda: data.multi_image_annotations(rng, data.multi_image_scenes(rng, max_objects=5)),
            "video": lambda: data.video_annotations(rng, data.make_video_scene(rng))}
    order = [kind] * (kind in draw) + [k for k in draw if k != kind]
    questions = [a["messages"][-2]["content"] for k in order for _ in range(n_scenes) for a in draw[k]()]
    return list(dict.fromkeys(questions))


def unknown_words(model, processor, question):
    """The tokens of `question` (decoded, in order) that the model has no rows for; [] when it has them all."""
    example = E.prompt_example({"id": "text"}, [{"role": "user", "content": question}], style, processor)
    return [processor.tokenizer.decode([i]) for i in E.unknown_tokens(model, example.input_ids)]


def what_it_knows(model, processor, kind, n_questions=6, n_words=150):
    """Lines for a kept-token model: questions of the synthetic world it has every word for, and its words."""
    questions = [q for q in world_questions(kind) if not unknown_words(model, processor, q)][:n_questions]
    lines = ["questions from the synthetic world that it has every word for:"] if questions else []
    lines += [f"  {q}" for q in questions]
    pieces = {processor.tokenizer.decode([i]) for i in model.config.token_ids}
    # whole words: a token that starts with a space, or a capitalised one that starts a sentence ("How")
    words = sorted({w.strip() for w in pieces if re.fullmatch(r" [A-Za-z]{2,}|[A-Z][a-z]+", w)}, key=str.lower)
    more = f" ... and {len(words) - n_words} more" if len(words) > n_words else ""
    lines.append(f"the {len(words)} words it knows: {', '.join(words[:n_words])}{more}")
    return lines


def ask(model, processor, record, question, n):
    """Answer one question about the record's media, streaming; draw the points. Returns the answer."""
    messages = [{"role": "user", "content": question}]
    example = E.prompt_example(record, messages, style, processor)
    unknown = E.unknown_tokens(model, example.input_ids)  # --vocab=data: the model has rows for its data's tokens only
    if unknown:
        words = ", ".join(repr(processor.tokenizer.decode([i])) for i in unknown)
        raise ValueError("\n".join([f"this model knows only the {len(model.config.token_ids)} tokens of its training "
                                     f"data; not {words}", *what_it_knows(model, processor, media_kind(record))]))
    generator = torch.Generator(device=device).manual_seed(seed + n)
    streamer = Streamer(processor.tokenizer)
    t0 = time.time()
    answer = E.generate_answers(model, processor, [example], max_new_tokens, temperature, top_k or None,
                                top_p if top_p < 1.0 else None, on_token=streamer, generator=generator)[0]
    print(f"\n({len(streamer.ids)} tokens in {time.time() - t0:.1f}s)")
    for path in show_points(answer, record, next_picture_stem()):
        print(f"points drawn: {path}")
    return answer


def default_prompt(record, model, processor):
    """DEFAULT_PROMPTS for the media; for a kept-token model without its words, the first world question it knows."""
    prompt = DEFAULT_PROMPTS[media_kind(record)]
    if model.config.token_ids is None or not unknown_words(model, processor, prompt):
        return prompt
    return next((q for q in world_questions(media_kind(record)) if not unknown_words(model, processor, q)), prompt)


def interact(model, processor, record):
    print("ask a question; ':image a.jpg [b.jpg ...]' or ':video clip.gif' changes the media; ':quit' or an "
          "empty line ends")
    n = 1
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line or line == ":quit":
            break
        if line.startswith((":image ", ":video ")):
            kind, *paths = line.split()
            try:
                record = media_record(paths if kind == ":image" else [], paths[0] if kind == ":video" else "",
                                      processor)
            except (data.MediaError, ImportError, IndexError) as e:
                print(f"cannot use {' '.join(paths)}: {e}")
            continue
        try:
            ask(model, processor, record, line, n)
        except ValueError as e:
            print(e)
            continue
        n += 1


if __name__ == "__main__":
    images, videos, rest = split_media_args(sys.argv[1:])
    configure(globals(), rest)
    torch.set_grad_enabled(False)
    init_from = E.or_demo(init_from, E.DEFAULT_INIT_FROM, E.DEMO_INIT_FROM, E.local_model_dir)
    try:
        model, processor, model_dir = E.load_model(init_from, device, getattr(torch, dtype))
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    processor.max_crops = max_crops or processor.max_crops
    try:
        record = media_record(images, videos[0] if videos else "", processor)
    except (data.MediaError, ImportError) as e:  # ImportError: a video file without PyAV installed
        raise SystemExit(str(e)) from None
    print(f"model: {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    if interactive:
        interact(model, processor, record)
    else:
        question = prompt or default_prompt(record, model, processor)
        print(f"> {question}")
        try:
            ask(model, processor, record, question, 1)
        except ValueError as e:
            raise SystemExit(str(e)) from None
