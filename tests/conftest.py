"""Shared fixtures. The reference implementations (transformers==5.23.0, torchvision) are imported here
unconditionally: a CI machine without them fails loudly instead of skipping the parity tests."""

import os
import sys

import pytest
import torch
import torchvision  # noqa: F401  (transformers' Molmo2 image processor needs it)
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

assert transformers.__version__ == "5.23.0", f"tests need transformers==5.23.0, found {transformers.__version__}"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def hf_qwen_tokenizer(tmp_path_factory):
    """transformers' Qwen2Tokenizer (used by Qwen3) built from the BPE ranks, with Qwen3's and Molmo2's
    special tokens: the oracle for our tiktoken tokenizer and for the processor's input_ids."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from tokenizers import AddedToken

    import data

    vocab, merges = TikTokenConverter().extract_vocab_merges_from_model(data.QWEN_RANKS_PATH)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    specials = sorted(data.SPECIAL_TOKENS.items(), key=lambda kv: kv[1])
    qwen = [AddedToken(t, special=True, normalized=False) for t, i in specials if i < data.MOLMO2_FIRST_ID]
    tok.add_tokens(qwen, special_tokens=True)
    # the ids between 151669 and 151935 are unused rows of Qwen3's embedding table; Molmo2's tokens
    # start at 151936, so pad the added-token table up to there before adding them
    pad = [AddedToken(f"<|unused_{i}|>", special=True, normalized=False) for i in range(len(tok), data.MOLMO2_FIRST_ID)]
    tok.add_tokens(pad, special_tokens=True)
    molmo = [AddedToken(t, special=True, normalized=False) for t, i in specials if i >= data.MOLMO2_FIRST_ID]
    tok.add_tokens(molmo, special_tokens=True)
    for t, i in specials:
        assert tok.convert_tokens_to_ids(t) == i, (t, i, tok.convert_tokens_to_ids(t))
    return tok


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A tiny synthetic world for the training stages: synth_image (12 train records, 2 val), synth_multi and
    synth_video (3 train, 1 val each), 56-px images and 4-frame 56-px videos, at most 3 shapes; and 'damaged' (train
    and val alike), one good image record among a malformed line, a missing image and an image that does not
    decode. Returns its folder."""
    import json

    import prepare_data

    root = str(tmp_path_factory.mktemp("tiny_world"))
    sizes = {"train": {"image": 12, "multi": 3, "video": 3}, "val": {"image": 2, "multi": 1, "video": 1}}
    prepare_data.generate_synthetic_world(root, seed=0, sizes=sizes, image_size=56, video_size=56, max_objects=3,
                                          max_video_objects=2, n_frames=4)
    damaged = os.path.join(root, "damaged")
    os.makedirs(damaged)
    with open(os.path.join(root, "synth_image", "train.jsonl")) as f:
        good = json.loads(f.readline())
    good["image"] = os.path.join(root, "synth_image", good["image"])
    with open(os.path.join(damaged, "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature and nothing decodable
    lines = ['{"image": "a.png", "annotations": [',  # cut off mid-line
             json.dumps({**good, "image": "nowhere.png"}),
             json.dumps({**good, "image": "broken.png"}),
             json.dumps(good)]
    for split in ("train", "val"):
        with open(os.path.join(damaged, f"{split}.jsonl"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return root


def assert_same_steps(steps_a, steps_b):
    """Two lists of steps (each a list of micro-batch dicts) hold the same batches: equal keys, tensors equal in dtype
    and value, lists of arrays (stage 1's label points) equal element by element."""
    import numpy as np
    for step_a, step_b in zip(steps_a, steps_b, strict=True):
        for batch_a, batch_b in zip(step_a, step_b, strict=True):
            assert batch_a.keys() == batch_b.keys()
            for key in batch_a:
                a, b = batch_a[key], batch_b[key]
                if torch.is_tensor(a):
                    assert a.dtype == b.dtype and torch.equal(a, b), key
                else:
                    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)), key


def assert_workers_match_serial(make_loader, micro_batches, check_counts):
    """A loader with 2 forked workers (make_loader(2)) against the serial one (make_loader(0)): the same first 3 steps
    of micro_batches micro-batches each, state and summary (check_counts(serial) also asks that the bad records were
    met); 3 more steps alike; and a loader restored from that state, with workers or without, continues with the same
    3 steps."""
    serial, workers = make_loader(0), make_loader(2)
    try:
        steps = [serial.next_step() for _ in range(3)]
        assert all(len(step) == micro_batches for step in steps)
        assert_same_steps([workers.next_step() for _ in range(3)], steps)
        state = workers.state_dict()
        assert state == serial.state_dict()
        assert workers.summary() == serial.summary()
        check_counts(serial)
        later = [serial.next_step() for _ in range(3)]
        assert_same_steps([workers.next_step() for _ in range(3)], later)
    finally:
        workers.close()
    for n_workers in (2, 0):
        resumed = make_loader(n_workers)
        try:
            resumed.load_state_dict(state)
            assert_same_steps([resumed.next_step() for _ in range(3)], later)
            assert resumed.summary() == serial.summary()
        finally:
            resumed.close()


def run_gloo_ranks(argv, n=2, timeout=300):
    """argv (what follows `python`, run from the repository) as the n processes of one job on this machine, as torchrun
    would start them (RANK, WORLD_SIZE, a free port; one thread each) -> their outputs. Fails with every output unless
    all exit 0; a stuck job is killed after timeout seconds."""
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = []
    try:
        for rank in range(n):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port)}
            ranks.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outputs = [p.communicate(timeout=timeout)[0] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in ranks] == [0] * n, "\n".join(outputs)
    return outputs
