"""Formatting records into examples (chat layout, style prefixes, loss weights, message trees) and packing
them into rows (isolation, positions, the attention mask, resume). The vision tokens come from a stand-in
for the processor: a short block of Molmo2's vision tokens."""

import itertools
import math
import random

import torch
import torch.nn.functional as F

import data

VISION_BLOCK = [data.IMAGE_LOW_RES_START_ID] + [data.IMAGE_PATCH_ID] * 4 + [data.IMAGE_END_ID]


def _vision_tokens(record):
    return (list(VISION_BLOCK), {"n_crops": 2}) if "image" in record else ([], None)


def _qa(style, question, answer):
    return {"style": style, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _record(*annotations, image=True):
    record = {"annotations": list(annotations)}
    if image:
        record["image"] = ["x.png"]
    return record


def test_layout_matches_qwen_chat_text_tokenized_by_transformers(hf_qwen_tokenizer):
    tok = data.get_tokenizer()
    answer = 'Counting the <points coords="1 1 500 500">red circles</points> shows a total of 1.'
    ex = data.format_example(_record(_qa("point_count", "How many red circles are there?", answer)), tok,
                             _vision_tokens, prefix_mode="sft")
    vision = "<low_res_im_start>" + "<im_patch>" * 4 + "<im_end>"
    text = (f"<|im_end|>{vision}<|im_start|>user\nHow many red circles are there?<|im_end|>\n"
            f"<|im_start|>assistant\n{answer}<|im_end|>")
    assert ex["input_ids"] == hf_qwen_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ex["is_vision"] == [t in data.VISION_TOKEN_IDS for t in ex["input_ids"]]
    assert sum(ex["is_vision"]) == 6 and ex["position_ids"] == list(range(len(ex["input_ids"])))
    # the loss is on the answer and its <|im_end|>, predicted from the position before each
    answer_ids = hf_qwen_tokenizer(answer, add_special_tokens=False)["input_ids"] + [data.IM_END_ID]
    targets = [t for t, w in zip(ex["target_ids"], ex["loss_weights"]) if w > 0]
    assert targets == answer_ids
    assert all(w == 0.2 for w in ex["loss_weights"] if w > 0)  # point_count: flat 0.2


def test_special_token_text_in_a_message_stays_text():
    tok = data.get_tokenizer()
    ex = data.format_example(_record(_qa("short_answer", "say <|im_end|>", "ok"), image=False), tok)
    assert ex["input_ids"].count(data.IM_END_ID) == 3  # BOS, end of the user turn, end of the answer


def test_loss_weights_follow_the_sqrt_scheme():
    tok = data.get_tokenizer()
    record = _record(_qa("short_answer", "How many?", "3"), _qa("short_answer", "Colour?", "dark blue"),
                     _qa("pointing", "Point.", "There are none."), _qa("video_long_caption", "Describe.", "A cat."))
    ex = data.format_example(record, tok, _vision_tokens)
    for branch, want in ((3, 0.2), (4, 0.1)):
        assert {w for w, b in zip(ex["loss_weights"], ex["branch_ids"]) if b == branch} == {0.0, want}
    for branch, answer in ((1, "3"), (2, "dark blue")):
        n = len(tok.encode(answer)) + 1  # + <|im_end|>
        weights = [w for w, b in zip(ex["loss_weights"], ex["branch_ids"]) if b == branch and w > 0]
        assert len(weights) == n
        assert weights == [2 / math.sqrt(n) / math.sqrt(4)] * n  # 4 branches in the tree
    flat = data.format_example(record, tok, _vision_tokens, weighting="none")
    assert {w for w in flat["loss_weights"]} == {0.0, 1.0}


def test_message_tree_positions_restart_and_targets_stay_in_branch():
    tok = data.get_tokenizer()
    record = _record(_qa("short_answer", "A?", "yes"), _qa("short_answer", "B?", "no"))
    ex = data.format_example(record, tok, _vision_tokens)
    shared = 1 + len(VISION_BLOCK)
    assert ex["branch_ids"][:shared] == [0] * shared
    for branch in (1, 2):
        idx = [i for i, b in enumerate(ex["branch_ids"]) if b == branch]
        assert [ex["position_ids"][i] for i in idx] == list(range(shared, shared + len(idx)))
        ids = [ex["input_ids"][i] for i in idx]
        assert [ex["target_ids"][i] for i in idx] == ids[1:] + [-1]
    # max_tokens keeps the branches that fit, and the sqrt weights count only those
    only_one = data.format_example(record, tok, _vision_tokens, max_tokens=shared + len(idx))
    assert set(only_one["branch_ids"]) == {0, 1}
    assert max(only_one["loss_weights"]) == 2 / math.sqrt(2)  # "yes" + <|im_end|>, one branch
    assert data.format_example(record, tok, _vision_tokens, max_tokens=shared + 3) is None


def test_multi_turn_and_system_messages():
    tok = data.get_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye?"},
                {"role": "assistant", "content": "Bye"}]
    ex = data.format_example({"annotations": [{"style": "text_sft", "messages": messages}]}, tok, prefix_mode="sft")
    assert tok.decode(ex["input_ids"]) == (
        "<|im_end|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\nBye<|im_end|>")
    trained = [t for t, w in zip(ex["target_ids"], ex["loss_weights"]) if w > 0]
    assert tok.decode(trained) == "Hello<|im_end|>Bye<|im_end|>"


def test_style_prefixes():
    rng = random.Random(0)
    assert data.style_prefix("user_qa", "x", "sft", rng) == ""  # demo style
    assert data.style_prefix("short_answer", "x", "sft", rng) == "short_answer:"
    assert data.style_prefix("pointing", "x" * 900, "pretrain", rng) == "pointing:"
    hints = [data.style_prefix("long_caption", "x" * 1245, "pretrain", rng) for _ in range(2000)]
    plain = sum(h == "long_caption:" for h in hints)
    assert 150 < plain < 250  # dropped 10% of the time
    lengths = [int(h.split()[1][:-1]) for h in hints if h != "long_caption:"]
    assert min(lengths) >= (1245 - 5 * 25) // 15 and max(lengths) <= (1245 + 5 * 25) // 15
    assert abs(sum(lengths) / len(lengths) - 1245 / 15) < 1.0  # 83, the spec's example


# --- packing and the attention mask -----------------------------------------------------------------

def _toy_attention(ids, positions, mask):
    """One attention layer over token + position embeddings: outputs depend on exactly what each query
    may see and on positions, so equal outputs mean equal visibility and positions."""
    g = torch.Generator().manual_seed(0)
    tokens, pos = torch.randn(160000, 16, generator=g), torch.randn(64, 16, generator=g)
    x = tokens[ids] + pos[positions]  # (B, T, 16)
    return F.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None], attn_mask=mask)[:, 0]  # (B, T, 16)


def _standalone_mask(is_vision):
    T = len(is_vision)
    v = torch.tensor(is_vision)
    return (torch.ones(T, T, dtype=torch.bool).tril() | (v[:, None] & v[None, :]))[None, None]  # (1, 1, T, T)


def test_packed_tree_rows_equal_separate_runs():
    tok = data.get_tokenizer()
    examples = [
        data.format_example(_record(_qa("short_answer", "A?", "yes"), _qa("pointing", "B?", "There are none.")), tok, _vision_tokens),
        data.format_example(_record(_qa("text_sft", "Hi", "Hello"), image=False), tok),
        data.format_example(_record(_qa("long_caption", "Describe.", "Red circles.")), tok, _vision_tokens),
    ]
    batch = data.collate([[("a", examples[0]), ("b", examples[1])], [("c", examples[2])]], pad_to=64)
    assert batch["attention_mask"].shape == (2, 1, 64, 64)
    packed = _toy_attention(batch["input_ids"], batch["position_ids"], batch["attention_mask"])
    row_of, start = {0: (0, 0), 1: (0, len(examples[0]["input_ids"])), 2: (1, 0)}, None
    for e, example in enumerate(examples):
        row, start = row_of[e]
        shared = [i for i, b in enumerate(example["branch_ids"]) if b == 0]
        for branch in sorted(set(example["branch_ids"]) - {0}):
            idx = shared + [i for i, b in enumerate(example["branch_ids"]) if b == branch]
            ids = torch.tensor([[example["input_ids"][i] for i in idx]])
            alone = _toy_attention(ids, torch.arange(len(idx))[None], _standalone_mask([example["is_vision"][i] for i in idx]))
            assert torch.allclose(packed[row, [start + i for i in idx]], alone[0], atol=1e-5), (e, branch)
    mask = batch["attention_mask"][0, 0]
    n0 = len(examples[0]["input_ids"])
    assert not mask[n0:, :n0].any() and not mask[:n0, n0:].any()  # packed examples never meet
    assert mask[1, 6] and mask[6, 1]  # vision tokens see each other both ways
    assert batch["loss_weights"][1, len(examples[2]["input_ids"]):].eq(0).all()


def _examples(n, seed=0):
    rng = random.Random(seed)
    out = []
    for k in range(n):
        length = rng.randint(5, 40)
        out.append((k, {"input_ids": [1] * length, "n_crops": rng.randint(0, 4)}))
    return out


def test_packer_fills_rows_within_budgets_and_keeps_every_example():
    packer = data.Packer(max_seq_len=64, max_crops=6, pool_size=6)
    stream, seen, rows = iter(_examples(300)), [], []
    for key, example in stream:
        packer.push(key, example)
        if packer.ready():
            rows.append(packer.pop_row())
    while packer.pool:
        rows.append(packer.pop_row())
    for row in rows:
        assert sum(len(ex["input_ids"]) for _, ex in row) <= 64 and sum(ex["n_crops"] for _, ex in row) <= 6
        seen += [key for key, _ in row]
    assert sorted(seen) == list(range(300))
    fill = sum(len(ex["input_ids"]) for row in rows for _, ex in row) / (64 * len(rows))
    assert fill > 0.75


def test_packer_resumes_from_its_keys():
    examples = dict(_examples(200, seed=1))

    def run(packer, keys, n_rows):
        rows = []
        while len(rows) < n_rows:
            while not packer.ready():
                k = next(keys)
                packer.push(k, examples[k])
            rows.append([key for key, _ in packer.pop_row()])
        return rows

    reference = run(data.Packer(64, 6, pool_size=5), iter(range(200)), 30)
    keys = iter(range(200))
    first = data.Packer(64, 6, pool_size=5)
    head = run(first, keys, 12)
    state = first.state_dict()
    resumed = data.Packer(64, 6, pool_size=5)
    resumed.load_state_dict(state, rebuild=examples.__getitem__)
    assert head + run(resumed, keys, 18) == reference
