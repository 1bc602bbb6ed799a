"""Packing and collation: the attention mask on a hand-drawn case, the loss of packed examples equal to
their losses apart (our Qwen3 on text; transformers' Molmo2 on images, with its own masking as the
reference), message-tree branches equal to separate sequences, the batch vision tensors equal to
transformers' processor output, and the packer's budgets, skips and exact resume."""

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import model as model_lib

T, F_ = True, False  # short names for the hand-drawn mask


def image(seed, height, width):
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


def record(answers, images=(), prompt="What is shown?"):
    """One annotation per answer (several = a message tree)."""
    return {"id": "test", "images": list(images), "annotations": [
        {"style": "user_qa", "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": a}]}
        for a in answers]}


def example_with(branch_ids, is_vision):
    n = len(branch_ids)
    ids = torch.zeros(n, dtype=torch.long)
    return data.Example(ids, ids - 1, torch.zeros(n), torch.arange(n), torch.tensor(branch_ids),
                        torch.tensor(is_vision))


def test_attention_mask_hand_drawn():
    # row: example 0 = [BOS, vision, vision | branch 1: a, b | branch 2: c], example 1 = [x | y], one pad
    row = [example_with([0, 0, 0, 1, 1, 2], [F_, T, T, F_, F_, F_]), example_with([0, 1], [F_, F_])]
    expected = torch.tensor([
        # keys: BOS v   v   a   b   c   x   y   pad
        [T, F_, F_, F_, F_, F_, F_, F_, F_],  # BOS
        [T, T, T, F_, F_, F_, F_, F_, F_],  # vision sees the later vision token (bidirectional)
        [T, T, T, F_, F_, F_, F_, F_, F_],
        [T, T, T, T, F_, F_, F_, F_, F_],  # branch 1
        [T, T, T, T, T, F_, F_, F_, F_],
        [T, T, T, F_, F_, T, F_, F_, F_],  # branch 2: the prefix and itself, not branch 1
        [F_, F_, F_, F_, F_, F_, T, F_, F_],  # example 1 starts: nothing of example 0
        [F_, F_, F_, F_, F_, F_, T, T, F_],
        [F_, F_, F_, F_, F_, F_, F_, F_, T],  # padding sees itself only
    ])
    batch = data.collate([row], pad_to=9)
    assert torch.equal(batch["attn_mask"], expected[None, None])
    assert batch["example_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 1, 1, -1]]


def test_batch_attention_mask_is_collates_mask():
    """The mask the GPU trainers build from the (B, L) ids equals collate's, example by example (checked above by
    hand): rows of several examples with message trees, vision tokens and padding, and a row of padding only."""
    g = torch.Generator().manual_seed(0)

    def random_example():
        n_branches = int(torch.randint(1, 4, (1,), generator=g))
        branch_ids = [0] * int(torch.randint(1, 6, (1,), generator=g))
        for k in range(1, n_branches + 1):
            branch_ids += [k] * int(torch.randint(1, 4, (1,), generator=g))
        is_vision = (torch.rand(len(branch_ids), generator=g) < 0.4) & (torch.tensor(branch_ids) == 0)
        return example_with(branch_ids, is_vision.tolist())

    rows = [[random_example() for _ in range(n)] for n in (3, 1, 2, 0)]
    L = max(sum(len(ex) for ex in row) for row in rows) + 2
    batch = data.collate(rows, pad_to=L)
    without = data.collate(rows, pad_to=L, mask=False)
    assert "attn_mask" not in without
    made = data.batch_attention_mask(without["example_ids"], without["branch_ids"], without["mm_token_type_ids"])
    assert made.shape == (len(rows), 1, L, L) and torch.equal(made, batch["attn_mask"])



def random_rows(g, lengths, L):
    """Rows of random examples (a shared prefix with vision tokens, then 1-3 branches), each row filled up to about
    its length in `lengths`, padded to L: collated with their mask."""
    def random_example():
        branch_ids = [0] * int(torch.randint(4, 40, (1,), generator=g))
        for k in range(1, int(torch.randint(1, 4, (1,), generator=g)) + 1):
            branch_ids += [k] * int(torch.randint(2, 30, (1,), generator=g))
        is_vision = (torch.arange(len(branch_ids)) >= 1) & (torch.tensor(branch_ids) == 0)
        return example_with(branch_ids, is_vision.tolist())

    rows = []
    for length in lengths:
        row = []
        while sum(len(ex) for ex in row) < length:
            row.append(random_example())
        rows.append(row[:-1] if sum(len(ex) for ex in row) > L else row)
    return data.collate(rows, pad_to=L)


def test_key_blocks_attention_is_the_dense_masked_attention():
    """model.KeyBlocks gives SDPA only the key blocks each chunk of queries can see; the blocks it leaves out are
    masked for the whole chunk, so its output and gradients are the dense masked attention's. Float64, so the only
    difference is the summation order (~1e-15 here; 1e-12 leaves room). Rows of packed examples with trees, vision
    tokens and padding, grouped-query heads; a mask where every chunk needs most keys (causal) is left dense, and so
    is a length the chunks do not divide."""
    g = torch.Generator().manual_seed(0)
    L = 512
    mask = random_rows(g, (500, 300, 120), L)["attn_mask"]
    blocks = model_lib.KeyBlocks.plan(mask)
    assert blocks is not None and blocks.keys_per_chunk < L / 2  # the test covers a real cut, not the dense path
    assert len({keys.shape[1] for _, keys, _ in blocks.groups}) > 1  # and groups of chunks given different keys
    q = torch.randn(3, 4, L, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(3, 2, L, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    grad = torch.randn(3, 4, L, 16, generator=g, dtype=torch.float64)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    cut = blocks.attend(q, k, v)
    torch.testing.assert_close(cut, dense, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(cut, (q, k, v), grad), torch.autograd.grad(dense, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # a row of one chunk of queries (64 tokens): one group, still the dense attention
    one_chunk, q1, k1, v1 = mask[:1, :, :64, :128], q[:1, :, :64], k[:1, :, :128], v[:1, :, :128]
    one_dense = F.scaled_dot_product_attention(q1, k1, v1, attn_mask=one_chunk, enable_gqa=True)
    torch.testing.assert_close(model_lib.KeyBlocks.plan(one_chunk, most=1.0).attend(q1, k1, v1), one_dense, rtol=0,
                               atol=1e-12)
    causal = torch.ones(L, L, dtype=torch.bool).tril().expand(3, 1, L, L)
    assert model_lib.KeyBlocks.plan(causal) is None
    assert model_lib.KeyBlocks.plan(mask[..., :500, :500]) is None


def test_key_blocks_split_the_chunks_into_the_groups_of_least_padding():
    """KeyBlocks.split: runs of the chunks (sorted by the blocks each needs), each padded to its last chunk's need;
    the split it picks pads least. By hand for needs 1 1 2 5 5 8, runs of one chunk allowed: two runs pad least as
    1 1 2 | 5 5 8 (3 x 2 + 3 x 8 = 30, against 34 at 2 | 4 and 33 at 5 | 1), three as 1 1 2 | 5 5 | 8 (6 + 10 + 8 =
    24); with runs of at least two chunks (the default), 1 1 | 2 5 | 5 8 (2 + 10 + 16 = 28). Then against every
    split, on random needs."""
    split = model_lib.KeyBlocks.split
    assert split([1, 1, 2, 5, 5, 8], 2, least=1) == [(0, 3), (3, 6)]
    assert split([1, 1, 2, 5, 5, 8], 3, least=1) == [(0, 3), (3, 5), (5, 6)]
    assert split([1, 1, 2, 5, 5, 8], 3) == [(0, 2), (2, 4), (4, 6)]
    assert split([4, 7], 3, least=1) == [(0, 1), (1, 2)] and split([4, 7], 3) == [(0, 2)]
    assert split([4], 3) == [(0, 1)]  # a row of one chunk (64 tokens)

    def padded(counts, runs):
        return sum((end - start) * counts[end - 1] for start, end in runs)

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        counts = sorted(torch.randint(1, 9, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist())
        for groups, least in ((2, 1), (3, 1), (3, 2)):
            every = [list(zip((0, *cuts), (*cuts, len(counts))))
                     for cuts in itertools.combinations(range(1, len(counts)), groups - 1)]
            every = [runs for runs in every if all(end - start >= least for start, end in runs)]
            runs = split(counts, groups, least)
            if not every:  # too few chunks for that many runs of that length: fewer runs
                assert len(runs) < groups
                continue
            assert len(runs) == groups and runs[0][0] == 0 and runs[-1][1] == len(counts)
            assert all(a[1] == b[0] for a, b in zip(runs, runs[1:])) and all(e - s >= least for s, e in runs)
            assert padded(counts, runs) == min(padded(counts, r) for r in every)


@torch.no_grad()
def test_key_blocks_leave_each_tokens_loss_unchanged():
    """Qwen3 with key_blocks (train_joint.py's switch) on packed rows: each token's loss is the dense mask's, within
    float32's rounding of other summation orders (as the packing test above)."""
    torch.manual_seed(0)
    qwen = model_lib.Qwen3(model_lib.Qwen3Config.preset("tiny")).eval()
    g = torch.Generator().manual_seed(1)
    batch = random_rows(g, (500, 400), 512)
    batch["input_ids"] = torch.randint(0, 1000, batch["input_ids"].shape, generator=g)
    batch["targets"] = torch.randint(0, 1000, batch["targets"].shape, generator=g)
    assert model_lib.KeyBlocks.plan(batch["attn_mask"]) is not None
    dense = per_token_ce_qwen3(qwen, batch)
    qwen.key_blocks = True
    cut = per_token_ce_qwen3(qwen, batch)
    torch.testing.assert_close(cut, dense, atol=1e-5, rtol=1e-5)


def test_key_blocks_compiled_blocks_trace_once_for_every_row_length():
    """train_joint.py's joined rows change length every step; with key_blocks, run_layers marks the length (and
    KeyBlocks.plan the chunk count) dynamic, so the compiled blocks trace one graph at the first row and reuse it for
    a row of another length: error_on_recompile is set after the first call (without the marks the second row
    recompiles, ~22 s on a 2-core CPU with a cold cache). A backend that counts what dynamo hands it and runs the
    traced graph, the same float32 ops: each token's loss is the eager blocks' exactly."""
    torch._dynamo.reset()  # no graphs from the other tests
    model_lib.ready_for_compile()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    eager = model_lib.Qwen3(model_lib.Qwen3Config.preset("tiny")).eval()
    eager.key_blocks = True
    compiled = copy.deepcopy(eager)
    for block in compiled.layers:
        block.compile(backend=counting_backend)
    g = torch.Generator().manual_seed(2)
    rows = []
    for length, L in ((500, 512), (430, 448)):
        batch = random_rows(g, (length,), L)
        batch["input_ids"] = torch.randint(0, 1000, batch["input_ids"].shape, generator=g)
        batch["targets"] = torch.randint(0, 1000, batch["targets"].shape, generator=g)
        assert model_lib.KeyBlocks.plan(batch["attn_mask"]) is not None
        rows.append(batch)
    with torch.no_grad():
        assert torch.equal(per_token_ce_qwen3(compiled, rows[0]), per_token_ce_qwen3(eager, rows[0]))
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert torch.equal(per_token_ce_qwen3(compiled, rows[1]), per_token_ce_qwen3(eager, rows[1]))
    assert len(graphs) == 1


def per_token_ce_qwen3(qwen, batch):
    """Cross-entropy at every loss target, in row-major order."""
    h = qwen.run_layers(qwen.embed_tokens(batch["input_ids"]), batch["position_ids"], batch["attn_mask"])
    has_loss = batch["targets"] >= 0
    return F.cross_entropy(qwen.lm_logits(h[has_loss]).float(), batch["targets"][has_loss], reduction="none")


@torch.no_grad()
def test_packing_invariance_text_qwen3():
    torch.manual_seed(0)
    qwen = model_lib.Qwen3(model_lib.Qwen3Config.preset("tiny")).eval()
    a = data.format_example(record(["A short answer."]))
    b = data.format_example(record(["Another, somewhat longer answer with more tokens in it."], prompt="Hm?"))
    tree = data.format_example(record(["Yes.", "No, it is not."], prompt="Is it?"))
    branches = [data.format_example(record([answer], prompt="Is it?")) for answer in ("Yes.", "No, it is not.")]
    packed = data.collate([[a, tree], [b]], pad_to=len(a) + len(tree) + 3)
    apart = [data.collate([[ex]]) for ex in (a, *branches, b)]
    ce_packed = per_token_ce_qwen3(qwen, packed)
    ce_apart = torch.cat([per_token_ce_qwen3(qwen, batch) for batch in apart])
    assert ce_packed.shape == ce_apart.shape
    # float32 CE of a few units: rows of other lengths run other matmul shapes and attention sums (a few ulps)
    torch.testing.assert_close(ce_packed, ce_apart, atol=1e-5, rtol=1e-5)
    # weights: the same per token, except that each tree branch carries 1/sqrt(2) of its separate weight,
    # so the weighted CE sums of the branches are the separate sums / sqrt(2)
    w_packed = packed["loss_weights"][packed["targets"] >= 0]
    w_apart = torch.cat([batch["loss_weights"][batch["targets"] >= 0] for batch in apart])
    n_loss = [int((batch["targets"] >= 0).sum()) for batch in apart]
    scale = torch.cat([torch.full((n,), s) for n, s in zip(n_loss, (1, 2 ** -0.5, 2 ** -0.5, 1))])
    torch.testing.assert_close(w_packed, w_apart * scale)


def tiny_hf_molmo2():
    """A random transformers Molmo2 small enough for CPU, reading 84-px crops (6x6 patches)."""
    from transformers import Molmo2Config, Molmo2ForConditionalGeneration
    config = Molmo2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16, image_size=[84, 84], num_position_embeddings=36),
        adapter_config=dict(vision_feature_layer=[-1, -2], hidden_size=32, num_attention_heads=2,
                            num_key_value_heads=2, head_dim=16, intermediate_size=64, text_hidden_size=64),
        text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_hidden_layers=2, intermediate_size=128),
    )
    molmo2 = Molmo2ForConditionalGeneration(config).eval()

    def per_token_ce(batch, own_mask):
        vision = {k: batch[k] for k in VISION_KEYS if k in batch}
        masking = dict(attention_mask=batch["attn_mask"], position_ids=batch["position_ids"]) if own_mask else {}
        out = molmo2.model(input_ids=batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                           **masking, **vision)
        has_loss = batch["targets"] >= 0
        logits = molmo2.lm_head(out.last_hidden_state[has_loss])
        return F.cross_entropy(logits, batch["targets"][has_loss], reduction="none")
    return per_token_ce


def tiny_our_molmo2():
    """model.Molmo2 with the tiny Qwen3 and a tiny SigLIP2 reading 84-px crops."""
    import dataclasses
    import vision as vision_lib
    vit = dataclasses.replace(vision_lib.SigLIP2Config.preset("tiny"), image_size=84)
    molmo2 = model_lib.Molmo2(model_lib.Molmo2Config.join(model_lib.Qwen3Config.preset("tiny"), vit, (-2, -4))).eval()

    def per_token_ce(batch, own_mask):
        vision = {k: batch[k] for k in VISION_KEYS if k in batch}
        masking = dict(attn_mask=batch["attn_mask"], position_ids=batch["position_ids"]) if own_mask else {}
        has_loss = batch["targets"] >= 0
        logits = molmo2(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], logits_positions=has_loss,
                        **masking, **vision)
        return F.cross_entropy(logits, batch["targets"][has_loss], reduction="none")
    return per_token_ce


VISION_KEYS = ("pixel_values", "image_token_pooling", "image_grids", "image_num_crops")


@pytest.mark.parametrize("make_model", [tiny_hf_molmo2, tiny_our_molmo2], ids=["transformers", "ours"])
@torch.no_grad()
def test_packing_invariance_images_molmo2(make_model):
    """Packed rows with our mask and positions give each example the loss it gets alone, where the model
    builds its own mask (causal + bidirectional vision); tree branches the loss of separate sequences."""
    torch.manual_seed(0)
    per_token_ce = make_model()
    processor = data.Molmo2Processor(crop_size=84, overlap_margins=(1, 1), max_crops=4)
    pictures = [image(0, 40, 60), image(1, 70, 30), image(2, 30, 30)]
    one = data.format_example(record(["A red circle."], pictures[:1]), processor)
    text = data.format_example(record(["Only text here."]), processor)
    answers = ("Two images.", "The second branch answer.")
    tree = data.format_example(record(answers, pictures[1:]), processor)
    branches = [data.format_example(record([a], pictures[1:]), processor) for a in answers]
    packed = data.collate([[one, text], [tree]])  # images of two rows, a text example between them
    ce_packed = per_token_ce(packed, own_mask=True)
    ce_apart = torch.cat([per_token_ce(data.collate([[ex]]), own_mask=False) for ex in (one, text, *branches)])
    assert ce_packed.shape == ce_apart.shape
    # float32, as above: other row lengths, other summation orders
    torch.testing.assert_close(ce_packed, ce_apart, atol=1e-5, rtol=1e-5)


def test_batch_vision_tensors_match_transformers_processor():
    from transformers import Molmo2ImageProcessor
    pictures = [image(3, 50, 70), image(4, 60, 20), image(5, 30, 90)]
    examples = [data.format_example(record(["a"], pictures[:2])), data.format_example(record(["b"], pictures[2:]))]
    batch = data.collate([[examples[0]], [examples[1]]])
    ref = Molmo2ImageProcessor()(pictures, return_tensors="pt")
    for key in ("pixel_values", "image_token_pooling", "image_grids", "image_num_crops"):
        assert torch.equal(batch[key], ref[key]), key
    assert (batch["input_ids"] == data.IMAGE_PATCH_ID).sum() == len(ref["image_token_pooling"])


def fake_example(key, n=None):
    """A deterministic Example of a length and crop count drawn from its key; None for key % 11 == 5."""
    if key % 11 == 5:
        return None
    rng = np.random.default_rng(key)
    n, crops = n or int(rng.integers(5, 40)), int(rng.integers(0, 4))
    ids = torch.full((n,), key, dtype=torch.long)
    pixels = torch.zeros(crops, 4, 3) if crops else None
    return data.Example(ids, ids.clone(), torch.ones(n), torch.arange(n), torch.zeros(n, dtype=torch.long),
                        torch.zeros(n, dtype=torch.bool), pixel_values=pixels)


class KeyStream:
    """A stateful stream of keys, like MixtureSampler."""

    def __init__(self):
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        return self.i

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def row_keys(row):
    return [int(ex.input_ids[0]) for ex in row]


def test_packer_budgets_skips_and_order():
    def make(key):
        if key == 7:
            raise data.ExampleTooLong("key 7")
        return fake_example(key, n=100 if key == 9 else None)
    packer = data.Packer(iter(range(60)), make, max_seq_len=64, max_crops=4, lookahead=4)
    rows = list(packer)
    keys = [k for row in rows for k in row_keys(row)]
    assert all(sum(len(ex) for ex in row) <= 64 and sum(ex.n_crops for ex in row) <= 4 for row in rows)
    expected = [k for k in range(60) if k not in (7, 9) and k % 11 != 5]
    assert sorted(keys) == expected  # every usable example exactly once
    assert packer.skipped == {"too_long": 2, "unusable": 5}
    # a lookahead of 4 fills rows well
    assert sum(len(ex) for row in rows for ex in row) / (64 * len(rows)) > 0.8


@pytest.mark.parametrize("stateful", [True, False])
def test_packer_resumes_identically(stateful):
    def fresh():
        items = KeyStream() if stateful else iter(range(1, 1000))
        return data.Packer(items, fake_example, max_seq_len=64, max_crops=4, lookahead=5)
    packer = fresh()
    for _ in range(6):
        next(packer)
    state = copy.deepcopy(packer.state_dict())
    following = [row_keys(next(packer)) for _ in range(8)]
    resumed = fresh()
    resumed.load_state_dict(state)
    assert [row_keys(next(resumed)) for _ in range(8)] == following
    assert resumed.skipped == packer.skipped
