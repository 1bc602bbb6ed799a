"""serve.py (python sample.py --serve=True): the page driven in a real headless chromium over the DevTools protocol
(uploads a photo, asks, reads the drawn points back from a screenshot), each kind of bad input refused with its
message while the server goes on, and 50 requests from 4 clients answered exactly as each alone.

The server runs as the command line starts it, in a subprocess, on a tiny model trained here (about a second)
until it answers QUESTION about the photo with points on the photo's three discs: the oracle for where the dots
must be drawn is where the discs were painted."""

import base64
import http.client
import io
import json
import os
import queue
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data
import sample
import serve
from model import Molmo2, Molmo2Config
from training import MODEL_INPUTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
QUESTION = "Point to the discs."
DISC_COLOURS = [(200, 30, 40), (30, 60, 200), (20, 150, 60)]  # none near the page's orange dots (255, 110, 0)


def photo(path, seed):
    """A 'photo' drawn with PIL: a noisy sky-to-ground gradient and three discs -> their centres (x, y) in 0..1."""
    rng = np.random.default_rng(seed)
    sky = np.linspace([150, 190, 235], [90, 120, 70], 240)[:, None, :].repeat(320, axis=1)  # (240, 320, 3)
    pixels = np.clip(sky + rng.normal(0, 12, sky.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    centres = [(0.2 + 0.3 * k + rng.uniform(-0.05, 0.05), rng.uniform(0.3, 0.7)) for k in range(3)]
    for (x, y), colour in zip(centres, DISC_COLOURS):
        draw.ellipse((x * 320 - 18, y * 240 - 18, x * 320 + 18, y * 240 + 18), fill=colour)
    image.save(path, quality=92)
    return centres


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny kept-token model trained to answer QUESTION about photo A with points on its discs, saved as a
    training run's out_dir -> {run, photo, other_photo, answer}."""
    folder = tmp_path_factory.mktemp("serve")
    path, other = str(folder / "photo.jpg"), str(folder / "other.jpg")
    centres, _ = photo(path, seed=0), photo(other, seed=1)
    answer = data.pointing_answer(data.image_points_tag(centres, "discs"), len(centres), with_count=True)
    processor = data.Molmo2Processor(crop_size=56, overlap_margins=(1, 1), max_crops=2, max_frames=4)
    with open(path, "rb") as f:
        record = {"id": "photo", "image": ["photo.jpg"], "images": [Image.fromarray(data.load_image(f.read()))]}
    conversation = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer}]
    example = data.format_example({**record, "annotations": [{"style": "demo", "messages": conversation}]},
                                  processor, style_prefixes="sft", loss_weighting="none")
    clip = {"id": "clip", "video": "clip", "video_frames": record["images"] * 4, "video_times": [0.0, 0.5, 1.0, 1.5]}
    prompts = [sample.prompt_example(r, conversation[:1], "demo", processor)  # 2-image and video prompts' words too
               for r in ({**record, "images": record["images"] * 2, "image": ["a", "b"]}, clip)]
    kept = set(range(151643, 151936)) | {i for x in (example, *prompts) for i in x.input_ids.tolist() if i < 151936}
    torch.manual_seed(0)
    model = Molmo2(Molmo2Config.preset("tiny").keep_tokens(sorted(kept)))
    batch = data.collate([[example]])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    n_targets = int((batch["targets"] >= 0).sum())
    for _ in range(300):
        loss, _ = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, targets=batch["targets"],
                        loss_weights=batch["loss_weights"])
        optimizer.zero_grad()
        (loss / n_targets).backward()
        optimizer.step()
        if loss.item() / n_targets < 0.01:
            break
    model.eval()
    run = folder / "run"
    model.save_pretrained(str(run / "final"))
    data.save_processor_config(str(run / "final"), processor)
    prompt = sample.prompt_example(record, [{"role": "user", "content": QUESTION}], "demo", processor)
    with torch.no_grad():
        assert sample.generate_answers(model, processor, [prompt], 64)[0] == answer, "the tiny model did not learn it"
    return {"run": str(run), "photo": path, "other_photo": other, "answer": answer, "folder": folder}


def reader(stream):
    """A queue that receives the stream's lines as they come (from a thread: readline alone cannot time out)."""
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
    return lines


def wait_for_line(lines, pattern, seen, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.time()))
        except queue.Empty:
            break
        seen.append(line)
        if m := re.search(pattern, line):
            return m
    raise AssertionError(f"no line matching {pattern!r} in {timeout} s; got:\n{''.join(seen)}")


@pytest.fixture(scope="module")
def server(trained):
    """`python sample.py --serve=True` on the trained model, any free port, a 1 MB upload limit -> its URL."""
    process = subprocess.Popen([sys.executable, "sample.py", "--serve=True", "--port=0", "--max_new_tokens=64",
                                f"--init_from={trained['run']}", "--max_upload_mb=1"], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    printed = []
    lines = reader(process.stdout)
    url = wait_for_line(lines, r"ask it at (http://\S+/)", printed, timeout=120).group(1)
    yield {"url": url, "lines": lines, "printed": printed}
    process.terminate()
    process.wait(timeout=30)


# -- a headless chromium, driven over the DevTools protocol (a websocket, written here on a plain socket) --------

class DevTools:
    """One page of chromium: send(method, **params) -> its result, over a websocket (RFC 6455: the client masks
    its frames; the browser's come unmasked, maybe fragmented)."""

    def __init__(self, ws_url):
        host, port, path = re.match(r"ws://([^:/]+):(\d+)(/.*)", ws_url).groups()
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.next_id = 0

    def _read(self, n):
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "chromium closed the DevTools connection"
            out += chunk
        return out

    def _message(self):
        payload = b""
        while True:
            first, second = self._read(2)
            n = second & 0x7F
            if n >= 126:  # the length follows in 2 or 8 bytes
                n = struct.unpack(">H" if n == 126 else ">Q", self._read(2 if n == 126 else 8))[0]
            payload += self._read(n)
            if first & 0x80:  # FIN
                return json.loads(payload)

    def send(self, method, **params):
        self.next_id += 1
        text = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        n = len(text)
        length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 \
            else bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(bytes([0x81]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text)))
        while True:
            message = self._message()
            if message.get("id") == self.next_id:
                assert "error" not in message, message["error"]
                return message["result"]

    def evaluate(self, expression):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait(self, expression, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"waited {timeout} s for {expression}")


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    """The server's page open in headless chromium."""
    assert CHROMIUM, "chromium is not installed: `apt-get install -y chromium` (.ci/run installs it)"
    profile = tmp_path_factory.mktemp("chromium")
    browser = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port = wait_for_line(reader(browser.stderr), r"DevTools listening on ws://[^:]+:(\d+)/", [], timeout=60).group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
        target = next(t for t in json.load(response) if t["type"] == "page")
    tab = DevTools(target["webSocketDebuggerUrl"])
    tab.send("Emulation.setDeviceMetricsOverride", width=1100, height=900, deviceScaleFactor=1, mobile=False)
    tab.send("Page.navigate", url=server["url"])
    tab.wait("document.body && document.body.dataset.ready === '1'")
    yield tab
    browser.terminate()
    browser.wait(timeout=30)


def ask_on_page(tab, question, paths=(), explain=False):
    """Choose the files in the page's file input (as a person would), type the question, click Ask (greedy), wait for
    the end -> (state 'done' | 'error', the answer or the error shown)."""
    node = tab.send("DOM.querySelector", nodeId=tab.send("DOM.getDocument")["root"]["nodeId"], selector="#files")
    tab.send("DOM.setFileInputFiles", files=[os.path.abspath(p) for p in paths], nodeId=node["nodeId"])
    tab.evaluate(f"document.getElementById('greedy').checked = true; document.getElementById('explain').checked = "
                 f"{json.dumps(explain)}")
    tab.evaluate(f"document.getElementById('question').value = {json.dumps(question)};"
                 "document.getElementById('go').click()")
    state = tab.wait("['done', 'error'].includes(document.getElementById('status').dataset.state) && "
                     "document.getElementById('status').dataset.state")
    shown = "answer" if state == "done" else "error"
    return state, tab.evaluate(f"document.getElementById({shown!r}).textContent")


def screenshot(tab):
    shot = tab.send("Page.captureScreenshot", format="png")["data"]
    return Image.open(io.BytesIO(base64.b64decode(shot))).convert("RGB")


def test_the_page_streams_the_answer_and_draws_its_points_on_the_photo(trained, page, tmp_path):
    state, answer = ask_on_page(page, QUESTION, [trained["photo"]])
    assert (state, answer) == ("done", trained["answer"])
    points = data.parse_points(answer).points
    assert len(points) == 3
    box = page.evaluate("(() => { const r = document.querySelector('#media canvas').getBoundingClientRect();"
                        "return [r.left, r.top, r.width, r.height]; })()")
    shot = screenshot(page)
    shot.save(tmp_path / "page.png")
    original = np.asarray(Image.open(trained["photo"]).convert("RGB"), dtype=int)
    left, top, width, height = box
    for p in points:  # the centre of each dot is the page's orange, where the photo has a disc and no orange
        drawn = np.asarray(shot.getpixel((round(left + p.x * width), round(top + p.y * height))), dtype=int)
        assert np.abs(drawn - sample.PRED_COLOR).max() <= 6, (p, drawn)
        under = original[min(round(p.y * 240), 239), min(round(p.x * 320), 319)]
        assert np.abs(under - sample.PRED_COLOR).max() > 60
    corner = np.asarray(shot.getpixel((round(left + 3), round(top + 3))), dtype=int)
    assert np.abs(corner - sample.PRED_COLOR).max() > 60  # no dot where the answer puts none
    listed = page.evaluate("document.getElementById('pointlist').textContent")
    assert f"x={points[0].x * 320:.1f} y={points[0].y * 240:.1f}" in listed  # in pixels of the 320 x 240 photo


def test_where_it_looked_is_a_toggle_over_the_photo(trained, page):
    state, answer = ask_on_page(page, QUESTION, [trained["photo"]], explain=True)
    assert (state, answer) == ("done", trained["answer"])
    page.wait("!document.getElementById('heatrow').hidden")
    read = "document.querySelector('#media canvas').toDataURL()"
    with_heat = page.evaluate(read)
    page.evaluate("document.getElementById('showheat').click()")
    assert page.evaluate(read) != with_heat  # unticked: the photo again


def bad_files(folder, photo_path):
    """name -> path of each kind of bad upload."""
    with open(photo_path, "rb") as f:
        jpeg = f.read()
    files = {"notes.txt": b"these are words, not pixels\n" * 20, "cut.jpg": jpeg[:len(jpeg) // 2],
             "huge.bin": np.random.default_rng(0).integers(0, 256, 1_500_000, dtype=np.uint8).tobytes()}
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    Image.new("1", (10_000, 10_000)).save(folder / "huge.png")  # 100 megapixels in 12 kB
    return {name: folder / name for name in (*files, "huge.png")}


def test_bad_input_gets_its_message_on_the_page_and_the_server_goes_on(trained, page, tmp_path):
    bad = bad_files(tmp_path, trained["photo"])
    cases = [([bad["notes.txt"]], QUESTION, "'notes.txt': neither an image nor a video"),
             ([bad["cut.jpg"]], QUESTION, "image 'cut.jpg': cannot decode (image file is truncated"),
             ([bad["huge.png"]], QUESTION, "'huge.png': 10000 x 10000 pixels is too large; the limit is 36 megapixels"),
             ([trained["photo"]], "   ", "the question is empty"),
             ([bad["huge.bin"]], QUESTION, "the request is 1.5 MB; the limit is 1 MB (--max_upload_mb)")]
    for paths, question, message in cases:
        state, shown = ask_on_page(page, question, paths)
        assert state == "error" and message in shown, (message, shown)
    assert ask_on_page(page, QUESTION, [trained["photo"]]) == ("done", trained["answer"])


# -- the same over plain HTTP: the load test, videos, words the model lacks ------------------------------------

def post(url, question, files=(), frames_fps=None, **settings):
    """POST /ask as the page does -> (events [(name, payload)], or {'error': ...} with the status)."""
    boundary = "nanomolmo2-test-boundary"
    parts = [("question", None, question.encode()), ("settings", None, json.dumps(settings).encode())]
    parts += [("frames_fps", None, str(frames_fps).encode())] if frames_fps else []
    for path in files:
        with open(path, "rb") as f:
            parts.append(("media", os.path.basename(path), f.read()))
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
                    + (f'; filename="{filename}"'.encode() if filename else b"") + b"\r\n\r\n" + content + b"\r\n"
                    for name, filename, content in parts) + f"--{boundary}--\r\n".encode()
    host, port = re.match(r"http://([^:]+):(\d+)/", url).groups()
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    connection.request("POST", "/ask", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    if response.status != 200:
        return response.status, json.loads(text)
    blocks = [block for block in text.split("\n\n") if block.strip()]
    events = [(re.search(r"^event: (.*)$", b, re.M).group(1), json.loads(re.search(r"^data: (.*)$", b, re.M).group(1)))
              for b in blocks]
    return 200, events


def answer_of(events):
    (name, payload), = [(n, p) for n, p in events if n in ("done", "error")]
    return payload["answer"] if name == "done" else payload["error"]


def test_fifty_requests_from_four_clients_each_as_alone(trained, server):
    photo, other = trained["photo"], trained["other_photo"]
    sampled = [{"greedy": False, "temperature": 3.0, "top_k": 50 if seed > 2 else 0, "top_p": 0.9 if seed > 3 else 1,
                "seed": seed} for seed in range(5)]  # hot: the trained answer is all the model would write greedily
    requests = [([photo], {}), ([other], {}), ([photo, other], {})] + [([photo], s) for s in sampled]
    alone = [answer_of(post(server["url"], QUESTION, files, max_new_tokens=20, **s)[1]) for files, s in requests]
    assert alone[0] == trained["answer"][:len(alone[0])] and len(set(alone)) >= 5
    jobs = queue.Queue()
    for k in range(50):
        jobs.put(k % len(requests))
    results, t0 = [], time.time()

    def client():
        while True:
            try:
                k = jobs.get_nowait()
            except queue.Empty:
                return
            status, events = post(server["url"], QUESTION, requests[k][0], max_new_tokens=20, **requests[k][1])
            results.append((k, status, events))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(timeout=120)
    seconds = time.time() - t0
    assert len(results) == 50 and seconds < 60
    assert all(status == 200 and answer_of(events) == alone[k] for k, status, events in results)
    spans = sorted((p["started"], p["finished"]) for _, _, events in results for n, p in events if n == "done")
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))  # one at a time
    assert any(p["ahead"] > 0 for _, _, events in results for n, p in events if n == "queued")  # they did queue
    print(f"50 requests from 4 clients in {seconds:.1f} s")


def test_a_video_as_a_gif_as_frames_and_as_mp4(trained, server, tmp_path):
    frames = [Image.open(trained["photo"]).convert("RGB").rotate(5 * k) for k in range(6)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=250, loop=0)
    paths = []
    for k, frame in enumerate(frames):
        paths.append(tmp_path / f"frame{k}.png")
        frame.save(paths[-1])
    import av  # in requirements-test.txt: reading mp4 needs it
    with av.open(str(tmp_path / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    for files, fps in (([tmp_path / "clip.gif"], None), (paths, 2.0), ([tmp_path / "clip.mp4"], None)):
        status, events = post(server["url"], "Point to the discs.", files, frames_fps=fps, max_new_tokens=4)
        assert status == 200, events
        media = next(p for n, p in events if n == "media")
        assert media["video"] and len(media["pictures"]) == 4  # the processor's max_frames, sampled
        assert [p["label"] for p in media["pictures"]][:1] == ["t = 0.0 s"] and answer_of(events)
    status, refused = post(server["url"], QUESTION, [tmp_path / "clip.gif", trained["photo"]])
    assert status == 400
    assert "'clip.gif' is a video: ask about one video, or about several still images" in refused["error"]


def test_a_question_with_words_the_model_lacks_names_them(server, trained):
    status, events = post(server["url"], "Point to the giraffes.", [trained["photo"]])
    assert status == 200 and "knows only the" in answer_of(events) and "not ' gir'" in answer_of(events)
    status, refused = post(server["url"], QUESTION, [trained["photo"]], top_p=2)
    assert status == 400 and refused["error"] == "top_p: expected a number from 1e-06 to 1.0, got 2"


def test_listens_on_127_0_0_1_and_prints_its_url_and_progress(trained, server):
    import sample
    assert sample.host == "127.0.0.1" and server["url"].startswith("http://127.0.0.1:")
    assert post(server["url"], QUESTION, [trained["photo"]], max_new_tokens=2)[0] == 200
    wait_for_line(server["lines"], r"\[\d+\] photo.jpg: 'Point to the discs.'", server["printed"], timeout=10)
    wait_for_line(server["lines"], r"\[\d+\] 2 tokens in \d+\.\ds \(waited", server["printed"], timeout=10)


def test_the_answer_streams_token_by_token_and_points_come_as_written(trained, server):
    status, events = post(server["url"], QUESTION, [trained["photo"]])
    names = [name for name, _ in events]
    assert status == 200 and names[:2] == ["media", "queued"] and names[-1] == "done"
    assert "".join(p["text"] for n, p in events if n == "token") == trained["answer"]
    assert names.count("token") > 20  # a token at a time
    counts = [len(p["points"]) for n, p in events if n == "points"]
    assert counts[:3] == [1, 2, 3] and names.index("points") < names.index("done")  # each dot as its point is written
    points = data.parse_points(trained["answer"]).points
    assert [(p["x"], p["y"], p["media"]) for p in events[-1][1]["points"]] == [(p.x, p.y, 0) for p in points]


def test_turns_answer_in_the_order_of_arrival():
    turns, arrived, answered = serve.Turns(), [threading.Event() for _ in range(5)], []
    first_holds = threading.Event()

    def request(k, fail_while_waiting=False):
        def on_wait(ahead):
            arrived[k].set()
            if fail_while_waiting:  # the page went away while it waited: the turn must still pass on
                raise BrokenPipeError
        try:
            with turns.turn(on_wait):
                answered.append(k)
                first_holds.wait(10) if k == 0 else None
        except BrokenPipeError:
            pass

    threads = []
    for k in range(5):  # each takes its ticket before the next one starts
        threads.append(threading.Thread(target=request, args=(k, k == 2)))
        threads[-1].start()
        assert arrived[k].wait(10)
    first_holds.set()
    for thread in threads:
        thread.join(10)
    assert answered == [0, 1, 3, 4] and turns.serving == turns.issued == 5


def test_points_are_read_only_once_whole():
    text = 'Counting the <points coords="1 1 313 720 2 60'
    assert [(p.x, p.y) for p in data.parse_points(serve.readable_so_far(text)).points] == [(0.313, 0.72)]
    assert serve.readable_so_far('<points coords="1 1 313 72') == '<points coords="1 1 313">'  # no "72" of "720"
    done = 'Counting the <points coords="1 1 313 720">discs</points> shows a total of 1.'
    assert serve.readable_so_far(done) == done
