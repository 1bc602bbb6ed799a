"""
Ask nanoMolmo2 in a web page: drop pictures or a video, read the answer as it streams, see its points.

    python sample.py --serve=True                                     # http://127.0.0.1:8000
    python sample.py --serve=True --port=8080 --init_from=out/joint   # --host=0.0.0.0 lets other machines ask

Design choices:
- The standard library only: http.server's ThreadingHTTPServer, the page's multipart/form-data read by hand
  (read_multipart), the answer sent as server-sent events on the POST's own response (the page reads it with
  fetch as a stream). The page is one file, assets/serve.html.
- One model, loaded once by sample.py, which hands over itself (`sample`: its knobs are the page's defaults,
  its helpers check words and explain). Requests take a ticket and are answered one at a time in the order they
  came (Turns); a request that waits is told how many are ahead of it.
- The media go through sample.py's readers (data.load_image, data.load_video with sample's frame sampling), and
  the page gets back the pictures as the model got them (EXIF-rotated, the video's sampled frames): what the
  points are drawn on is what was asked about.
- Points are read with data.parse_points from the answer so far after every token; an unfinished coords="..."
  is cut after its last whole point, so dots appear as the model writes them, and a number being written is
  never read half-way ("72" of "720").
- Checked before anything is decoded: the request's size (Content-Length against max_upload_mb), each picture's
  size in pixels (read from its header: MAX_IMAGE_PIXELS), the settings and the question. A refusal is one line
  on the page; the server goes on.
- "Where it looked" is sample.py's --explain: an AttentionRecorder watches the generation, and the whole
  answer's attention to the image tokens becomes a heat map over each image (frame), as sample.looked_panels
  draws it; the page toggles it.
"""

import base64
import io
import itertools
import json
import os
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import data

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "serve.html")
MAX_IMAGE_PIXELS = 6000 * 6000  # per image or frame, checked from the header before decoding (a 36 MP photo)
MAX_FILES = 64  # images, or frames of one video, per request
MAX_NEW_TOKENS = 4096  # the most the page may ask for
PREVIEW_SIDE = 768  # long side of the pictures sent back to the page (points are in 0..1, any size will do)


class Refused(ValueError):
    """A request that cannot be answered: its message is shown on the page as it is; status is the HTTP code."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


# -- reading a request ------------------------------------------------------------------------------------------

def read_multipart(body, content_type):
    """A multipart/form-data body (what the page's FormData sends) -> (fields {name: str}, files [(name, bytes)])."""
    boundary = next((p.strip()[9:].strip('"') for p in content_type.split(";") if p.strip().startswith("boundary=")),
                    None)
    if not content_type.startswith("multipart/form-data") or not boundary:
        raise Refused(f"expected a multipart/form-data request (the page's form), got {content_type!r}")
    fields, files = {}, []
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):  # the closing boundary
            break
        head, sep, content = part[2:].partition(b"\r\n\r\n")  # part: \r\n headers \r\n\r\n content \r\n
        if not sep:
            raise Refused("malformed multipart request: a part has no blank line after its headers")
        disposition = next((line for line in head.decode("utf-8", "replace").split("\r\n")
                            if line.lower().startswith("content-disposition:")), "")
        params = dict(p.strip().split("=", 1) for p in disposition.split(";")[1:] if "=" in p)
        name, filename = params.get("name", "").strip('"'), params.get("filename")
        content = content[:-2]  # the \r\n before the next boundary
        if filename is not None:
            files.append((os.path.basename(filename.strip('"')) or "upload", content))
        else:
            fields[name] = content.decode("utf-8", "replace")
    return fields, files


def probe(name, blob):
    """Look at a file's header only -> ('image' | 'animation' | 'video', its file suffix for the readers). Refuses a
    file that is empty, neither an image nor a video, or larger than MAX_IMAGE_PIXELS (before it is decoded)."""
    if not blob:
        raise Refused(f"{name!r}: empty file")
    try:
        with Image.open(io.BytesIO(blob)) as image:  # reads the header; pixels are decoded only by load()
            kind, (width, height) = "animation" if getattr(image, "n_frames", 1) > 1 else "image", image.size
            suffix = "." + image.format.lower()  # GIF, WEBP or PNG (APNG): data.load_video reads these with pillow
    except UnidentifiedImageError:
        (kind, width, height), suffix = ("video", *video_size(name, blob)), os.path.splitext(name)[1].lower()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise Refused(f"image {name!r}: cannot decode ({e})") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise Refused(f"{name!r}: {width} x {height} pixels is too large; the limit is "
                      f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels per image or frame (resize it first)")
    return kind, suffix


def video_size(name, blob):
    """(width, height) of a video file's first video stream, through PyAV (optional: a video file needs it)."""
    try:
        import av
    except ImportError:
        raise Refused(f"{name!r}: not an image file, and reading video files needs PyAV (pip install av)") from None
    try:
        with av.open(io.BytesIO(blob)) as container:
            streams = container.streams.video
            if not streams or not streams[0].codec_context.width:
                raise Refused(f"{name!r}: neither an image nor a video (no picture in it)")
            return streams[0].codec_context.width, streams[0].codec_context.height
    except av.FFmpegError:
        raise Refused(f"{name!r}: neither an image nor a video (cannot identify its format)") from None


def read_media(files, frames_fps, processor):
    """Uploaded files -> a record as sample.media_record makes from paths: several images, or one video (a video
    file, an animated GIF / WebP / PNG, or the images as its frames when frames_fps is given)."""
    if not files:
        return {"id": "text"}
    if len(files) > MAX_FILES:
        raise Refused(f"{len(files)} files: at most {MAX_FILES} images (or frames) per question")
    probed = [probe(name, blob) for name, blob in files]
    moving = [name for (name, _), (kind, _) in zip(files, probed) if kind != "image"]
    if moving and len(files) > 1:
        raise Refused(f"{moving[0]!r} is a video: ask about one video, or about several still images")
    try:
        if moving:
            return video_record(*files[0], probed[0][1], processor)
        images = [data.load_image(blob, name=name) for name, blob in files]
        if frames_fps:
            if len({image.shape for image in images}) > 1:
                raise Refused("the frames differ in size: a video's frames must all have one size")
            clip = data.load_video((np.stack(images), frames_fps), processor.max_frames, processor.max_fps,
                                   "uniform_last_frame", name=f"{len(images)} frames")
            return clip_record(f"{len(images)} frames", clip)
        return {"id": ", ".join(name for name, _ in files), "image": [name for name, _ in files],
                "images": [Image.fromarray(image) for image in images]}
    except (data.MediaError, ImportError) as e:  # ImportError: a video file without PyAV
        raise Refused(str(e)) from None


def video_record(name, blob, suffix, processor):
    """One uploaded video file -> its record, sampled as sample.py samples a --video (data.load_video reads paths,
    and picks its reader by the suffix, so the file goes through a temporary folder)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "upload" + (suffix if suffix.isascii() and len(suffix) < 8 else ""))
        with open(path, "wb") as f:
            f.write(blob)
        clip = data.load_video(path, processor.max_frames, processor.max_fps, "uniform_last_frame", name=name)
    return clip_record(name, clip)


def clip_record(name, clip):
    return {"id": name, "video": name, "video_frames": [Image.fromarray(f) for f in clip.frames],
            "video_times": clip.timestamps}


def default_settings(sample):
    """The page's settings at first: sample.py's knobs (a temperature to start from when greedy is unticked)."""
    return {"greedy": sample.temperature == 0, "temperature": sample.temperature or 1.0, "top_k": sample.top_k,
            "top_p": sample.top_p, "max_new_tokens": sample.max_new_tokens, "seed": sample.seed, "explain": False}


def read_settings(fields, sample):
    """The page's generation settings (a JSON object; a missing one is sample.py's knob) -> a dict, checked."""
    try:
        given = json.loads(fields.get("settings") or "{}")
    except json.JSONDecodeError as e:
        raise Refused(f"settings: not JSON ({e})") from None
    defaults = default_settings(sample)
    settings = {**defaults, **{k: v for k, v in given.items() if k in defaults and v not in (None, "")}}

    def number(key, kind, low, high):
        try:
            value = kind(settings[key])
        except (TypeError, ValueError):
            value = None
        if value is None or not low <= value <= high or (kind is int and float(settings[key]) != value):
            raise Refused(f"{key}: expected {'a whole number' if kind is int else 'a number'} from {low} to {high}, "
                          f"got {settings[key]!r}")
        return value

    checked = {"temperature": number("temperature", float, 0.0, 10.0), "top_k": number("top_k", int, 0, 1 << 20),
               "top_p": number("top_p", float, 1e-6, 1.0), "seed": number("seed", int, 0, 2 ** 63 - 1),
               "max_new_tokens": number("max_new_tokens", int, 1, MAX_NEW_TOKENS)}
    if bool(settings["greedy"]):
        checked["temperature"] = 0.0
    return {**checked, "explain": bool(settings["explain"])}


# -- what the page is sent --------------------------------------------------------------------------------------

def picture_url(image, side=PREVIEW_SIDE):
    """A PIL image -> a JPEG data: URL, shrunk to `side` on its long side."""
    image = image.convert("RGB")
    image.thumbnail((side, side), Image.BILINEAR)  # shrinks only
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def media_for_page(record):
    """The pictures of a record as the page shows them: [{url, width, height, label}]."""
    if "video_frames" in record:
        return [{"url": picture_url(f), "width": f.width, "height": f.height, "label": f"t = {t:.1f} s"}
                for f, t in zip(record["video_frames"], record["video_times"])]
    images = record.get("images", [])
    return [{"url": picture_url(image), "width": image.width, "height": image.height,
             "label": f"image {k}" if len(images) > 1 else name}
            for k, (image, name) in enumerate(zip(images, record.get("image", [])), 1)]


def readable_so_far(text):
    """The answer so far, with an unfinished coords="... cut after its last whole point and closed, so that
    data.parse_points reads the points written so far and no number half-written."""
    start = text.rfind('coords="')
    if start < 0 or '"' in text[start + len('coords="'):]:
        return text
    start += len('coords="')
    coords = text[start:]
    cut = max(coords.rfind(" "), coords.rfind(";"), coords.rfind("\t"), 0)
    return text[:start] + coords[:cut] + '">'


def points_for_page(parsed, record):
    """data.parse_points' points -> [{media, tag, kind, label, id, x, y}]: media is the index of the image (or the
    video frame, by its time) the point is on, None when the media have no such image or frame; x, y in 0..1."""
    times = {data.frame_key(t): m for m, t in enumerate(record.get("video_times", []))}
    n_images = len(record.get("images", []))
    points = []
    for t, tag in enumerate(parsed.tags):
        for p in tag.points:
            if "video_frames" in record:
                media = times.get(data.frame_key(p.frame))
            else:
                media = 0 if n_images == 1 else int(p.frame) - 1 if 1 <= int(p.frame) <= n_images else None
            points.append({"media": media, "tag": t, "kind": tag.kind, "label": tag.label, "id": p.id,
                           "x": p.x, "y": p.y, "frame": p.frame})
    return points


def looked_for_page(sample, processor, record, example, answer_ids, recorder):
    """'Where it looked' for the whole answer: a heat map over each image (frame), as sample.looked_panels draws
    one (attention per pixel from the pooled tokens' windows; one scale, from least to most, over all of them)."""
    images = record.get("video_frames") or record.get("images")
    if not images or not answer_ids:
        return []
    sizes = [image.size for image in images]
    columns = torch.nonzero(example.input_ids == data.IMAGE_PATCH_ID)[:, 0]  # where the pooled tokens sit
    weights = np.mean([row[0, columns].numpy() for row in recorder.rows()[:len(answer_ids)]], axis=0)
    _, tokens, views = sample.vision_layout(example, sizes, processor)
    scales = [min(1.0, PREVIEW_SIDE / max(size)) for size in sizes]
    maps = sample.heat_maps(tokens, views, sizes, weights, scales)
    low, high = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
    return [picture_url(sample.overlay_heat(sample.fit(image, max(heat.shape)), (heat - low) / max(high - low, 1e-30)))
            for image, heat in zip(images, maps)]


# -- answering, one request at a time ---------------------------------------------------------------------------

class Turns:
    """Requests are answered one at a time, in the order they came: each takes a ticket and waits to be called."""

    def __init__(self):
        self.called = threading.Condition()
        self.issued = self.serving = 0

    @contextmanager
    def turn(self, on_wait):
        """Wait for this request's turn; on_wait(n_ahead) is told first. The turn passes on however this ends."""
        with self.called:
            ticket, self.issued = self.issued, self.issued + 1
        try:
            try:
                on_wait(ticket - self.serving)
            finally:
                with self.called:
                    self.called.wait_for(lambda: self.serving == ticket)
            yield ticket
        finally:
            with self.called:
                self.serving += 1
                self.called.notify_all()


class Asker:
    """The model, its processor, the sample.py that loaded them, and the one-at-a-time queue in front of them."""

    def __init__(self, sample, model, processor, model_dir):
        self.sample, self.model, self.processor, self.model_dir = sample, model, processor, model_dir
        self.turns = Turns()
        n_params = sum(p.numel() for p in model.parameters())
        self.info = {"model": model_dir, "parameters": n_params, "max_upload_mb": sample.max_upload_mb,
                     "max_image_pixels": MAX_IMAGE_PIXELS, "video_fps": sample.video_fps,
                     "suggestions": self.suggestions(), **default_settings(sample)}

    def suggestions(self):
        """Questions to click: sample.py's default prompts, or for a kept-token model the questions of the synthetic
        world it has every word for."""
        if self.model.config.token_ids is None:
            return list(dict.fromkeys(self.sample.DEFAULT_PROMPTS.values()))
        return [q for q in self.sample.world_questions("image")
                if not self.sample.unknown_words(self.model, self.processor, q)][:8]

    def answer(self, number, record, question, settings, send):
        """Answer one question, in its turn: send(event, payload) is called with 'media', 'queued', 'token', 'points',
        'looked' and 'done' (data in the page's terms); raises Refused for a question the model cannot read."""
        sample, model, processor = self.sample, self.model, self.processor
        send("media", {"pictures": media_for_page(record), "video": "video_frames" in record})
        asked = time.time()
        with self.turns.turn(lambda ahead: send("queued", {"ahead": ahead})), torch.no_grad():
            started = time.time()
            example = sample.prompt_example(record, [{"role": "user", "content": question}], sample.style, processor)
            self.check_words(example, record)
            streamer = sample.Streamer(processor.tokenizer)
            streamer.show = PageShow(record, send)  # to the page, not printed
            recorder = sample.AttentionRecorder(model.llm, sample.explain_layers) if settings["explain"] else None
            generator = torch.Generator(device=sample.device).manual_seed(settings["seed"])
            with recorder or nullcontext():
                answer = sample.generate_answers(model, processor, [example], settings["max_new_tokens"],
                                                 settings["temperature"], settings["top_k"] or None,
                                                 settings["top_p"] if settings["top_p"] < 1 else None,
                                                 on_token=streamer, generator=generator)[0]
            finished = time.time()
            print(f"[{number}] {len(streamer.ids)} tokens in {finished - started:.1f}s (waited "
                  f"{started - asked:.1f}s)", flush=True)
            if recorder:
                send("looked", {"pictures": looked_for_page(sample, processor, record, example, streamer.ids,
                                                            recorder)})
            parsed = data.parse_points(answer)
            send("done", {"answer": answer, "points": points_for_page(parsed, record), "dropped": parsed.dropped,
                          "n_tokens": len(streamer.ids), "seconds": finished - started, "waited": started - asked,
                          "started": started, "finished": finished})

    def check_words(self, example, record):
        """Refuse a prompt with tokens a kept-token model (--vocab=data) has no rows for, as sample.ask does: naming
        them, with the questions and words it does know."""
        model, processor = self.model, self.processor
        unknown = self.sample.unknown_tokens(model, example.input_ids)
        if unknown:
            words = ", ".join(repr(processor.tokenizer.decode([i])) for i in unknown)
            raise Refused("\n".join([f"this model knows only the {len(model.config.token_ids)} tokens of its training "
                                     f"data; not {words}",
                                     *self.sample.what_it_knows(model, processor, self.sample.media_kind(record))]))


class PageShow:
    """sample.Streamer's show for the page: sends the answer's new text as it comes, and the points read so far
    whenever they change."""

    def __init__(self, record, send):
        self.record, self.send, self.points = record, send, []

    def __call__(self, new, text):
        self.send("token", {"text": new})
        points = points_for_page(data.parse_points(readable_so_far(text)), self.record)
        if points != self.points:
            self.points = points
            self.send("points", {"points": points})


# -- the web server ---------------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    """GET / (the page), GET /info (the model and the default settings), POST /ask (the answer, as events)."""

    server_version = "nanoMolmo2"

    def do_GET(self):
        if self.path == "/":
            with open(PAGE, "rb") as f:
                self.reply(200, "text/html; charset=utf-8", f.read())
        elif self.path == "/info":
            self.reply(200, "application/json", json.dumps(self.server.asker.info).encode())
        else:
            self.refuse(Refused(f"no page at {self.path}", 404))

    def do_POST(self):
        asker = self.server.asker
        number = next(self.server.numbers)
        try:
            if self.path != "/ask":
                raise Refused(f"no page at {self.path}", 404)
            fields, files = read_multipart(self.read_body(asker.sample.max_upload_mb),
                                           self.headers.get("Content-Type", ""))
            question = fields.get("question", "").strip()
            if not question:
                raise Refused("the question is empty: type what you want to know")
            settings = read_settings(fields, asker.sample)
            try:
                frames_fps = float(fields.get("frames_fps") or 0)
            except ValueError:
                raise Refused(f"frames_fps: expected a number, got {fields['frames_fps']!r}") from None
            names = ", ".join(name for name, _ in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            print(f"[{number}] {names or 'no media'}: {question[:60]!r}", flush=True)
            record = read_media(files, frames_fps, asker.processor)
        except Refused as e:
            print(f"[{number}] refused: {str(e).splitlines()[0]}", flush=True)
            return self.refuse(e)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def send(event, payload):
            self.wfile.write(f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode())

        try:
            asker.answer(number, record, question, settings, send)
        except Refused as e:
            print(f"[{number}] refused: {str(e).splitlines()[0]}", flush=True)
            send("error", {"error": str(e)})
        except (BrokenPipeError, ConnectionResetError):
            print(f"[{number}] the page went away; stopped", flush=True)
        except Exception as e:  # a bug: say so on the page and here, and go on serving
            traceback.print_exc()
            send("error", {"error": f"the server failed on this request: {type(e).__name__}: {e}"})

    def read_body(self, limit_mb):
        """The request's body, refused (and read to its end, so the browser sees the answer) when over limit_mb."""
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit_mb * 1e6:
            for start in range(0, length, 1 << 20):
                self.rfile.read(min(1 << 20, length - start))
            raise Refused(f"the request is {length / 1e6:.1f} MB; the limit is {limit_mb:g} MB (--max_upload_mb)", 413)
        return self.rfile.read(length)

    def refuse(self, error):
        self.reply(error.status, "application/json", json.dumps({"error": str(error)}).encode())

    def reply(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # progress is printed per request above; not every GET
        pass


def make_server(sample, model, processor, model_dir, host, port):
    """The web server (not yet serving) for a loaded model; port 0 = any free port."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.asker = Asker(sample, model, processor, model_dir)
    server.numbers = itertools.count(1)  # request numbers for the printed progress
    return server


def serve(sample, model, processor, model_dir):
    """Serve the page at sample.host:sample.port until Ctrl-C. sample: the sample.py module that loaded the model
    (its knobs are the page's defaults)."""
    server = make_server(sample, model, processor, model_dir, sample.host, sample.port)
    host, port = server.server_address[:2]
    print(f"model: {model_dir} ({server.asker.info['parameters'] / 1e6:.1f}M parameters)")
    print(f"ask it at http://{host}:{port}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
