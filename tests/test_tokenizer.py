"""The tiktoken tokenizer against transformers' Qwen2Tokenizer built from the same BPE ranks."""

import pytest

import data

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 12:45pm, we'll see 1234567 items.",
    "def f(x):\n    return x ** 2  # square\n\n\tif x>=10:\r\n        pass\n",
    "北京是中国的首都。東京は日本の首都です。서울은 한국의 수도입니다.",
    "Emoji: 😀🎉👍🏽 family: 👨‍👩‍👧‍👦 flags: 🇫🇷🇯🇵",
    "   leading spaces, trailing spaces   \n\n\n   multiple\t\ttabs  \u00a0nbsp",
    "Café vs Cafe\u0301 (NFC folds the combining accent), ﬁ ligature, Ω ohm sign \u2126",
    "<|im_start|>user\nWhat is in <|image|>?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA cat.<|im_end|>",
    "<im_start><im_patch><im_patch><im_col><im_end><low_res_im_start><frame_start><frame_end><|video|>",
    "<points coords=\"1 1 900 400 2 911 800\">cat</points>\tThere are none.",
    "<|endoftext|>" + "x" * 50 + "<|endoftext|>",
    "URLs http://example.com/a?b=c&d=e and emails a.b@c.de; numbers 3.14159, -2e10, 1,000,000",
    "",
    " ",
    "\n",
]


def test_hello_world():
    assert data.get_tokenizer().encode("Hello, world!") == [9707, 11, 1879, 0]


def test_special_token_ids():
    t = data.get_tokenizer()
    assert t.encode("<|endoftext|><|im_start|><|im_end|><think></think>") == [151643, 151644, 151645, 151667, 151668]
    assert t.encode("<im_start><im_end><im_patch><im_col><low_res_im_start><|image|><im_low><frame_start><frame_end><|video|>") == list(range(151936, 151946))


@pytest.mark.parametrize("text", CORPUS)
def test_matches_transformers(hf_qwen_tokenizer, text):
    ours = data.get_tokenizer().encode(text)
    theirs = hf_qwen_tokenizer.encode(text, add_special_tokens=False)
    assert ours == theirs
    assert data.get_tokenizer().decode(ours) == hf_qwen_tokenizer.decode(theirs)


def test_special_as_text():
    t = data.get_tokenizer()
    ids = t.encode("<|im_end|>", allow_special=False)
    assert 151645 not in ids and t.decode(ids) == "<|im_end|>"


def test_checksum_guard(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(open(data.QWEN_RANKS_PATH, "rb").read()[:-10])
    with pytest.raises(ValueError, match="sha256"):
        data.load_qwen_ranks(str(bad))


def test_chat_template():
    t = data.get_tokenizer()
    s = t.chat([{"role": "user", "content": "hi"}])
    assert s == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="role"):
        t.chat([{"role": "robot", "content": "x"}])
