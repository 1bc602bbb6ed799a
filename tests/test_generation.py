"""Generation (model.generate) against transformers' Molmo2ForConditionalGeneration.generate, token for
token, plus the invariants of batching, stopping, streaming and sampling."""

import contextlib

import numpy as np
import pytest
import torch

import model as nano
from data import Molmo2Processor as OurProcessor
from test_molmo2 import hf_model, ours, processor, processor_inputs  # noqa: F401  (module fixtures reused)

N_NEW = 20


def prompt_inputs(processor, case):
    """The processor's inputs for a case, batches left-padded (generation's padding side)."""
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"
    try:
        return processor_inputs(processor, case)
    finally:
        processor.tokenizer.padding_side = side


def hf_greedy(hf, inputs, n_new=N_NEW):
    """transformers' greedy tokens after the prompt, never stopping early."""
    out = hf.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, eos_token_id=None,
                      pad_token_id=151643)
    return out[:, inputs["input_ids"].shape[1]:]


def our_greedy(model, inputs, n_new=N_NEW, **kwargs):
    inputs = dict(inputs)
    input_ids, attention_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    return nano.generate(model, input_ids, n_new, attention_mask=attention_mask, stop_ids=(), **inputs, **kwargs)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("case", ["one image", "three images", "video of 12 frames", "two examples, padded"])
def test_greedy_matches_transformers(hf_model, ours, processor, case, static):
    # static: the fixed-shape decode step that CUDA replays as a graph (DecodeStep), run eagerly here
    hf, _ = hf_model
    inputs = prompt_inputs(processor, case)
    expected = hf_greedy(hf, inputs)
    got = our_greedy(ours, inputs, static=static)
    assert got.shape == expected.shape == (inputs["input_ids"].shape[0], N_NEW)
    assert got.tolist() == expected.tolist()
    assert len(set(got[0].tolist())) > 3, "a degenerate model would hide mask and position bugs"


def test_bidirectional_vision_mask_survives_left_padding(ours, processor):
    # the padded row of a batch must see its image exactly as it does alone (the bug this guards: an
    # explicit causal mask at prefill replacing Molmo2's bidirectional vision mask)
    padded = prompt_inputs(processor, "two examples, padded")
    assert padded["attention_mask"][0].min() == 0, "row 0 is the shorter, left-padded prompt"
    n_pad = int((padded["attention_mask"][0] == 0).sum())
    n_crops = int(padded["image_num_crops"][0])
    n_tokens = int((padded["input_ids"][0] == 151938).sum())
    alone = {"input_ids": padded["input_ids"][:1, n_pad:], "attention_mask": padded["attention_mask"][:1, n_pad:],
             "mm_token_type_ids": padded["mm_token_type_ids"][:1, n_pad:],
             "pixel_values": padded["pixel_values"][:n_crops],
             "image_token_pooling": padded["image_token_pooling"][:n_tokens],
             "image_grids": padded["image_grids"][:1], "image_num_crops": padded["image_num_crops"][:1]}
    assert our_greedy(ours, padded)[0].tolist() == our_greedy(ours, alone)[0].tolist()


def test_batched_prompts_of_different_lengths_equal_each_alone(ours):
    # our processor, images of different shapes (different numbers of crops and vision tokens), left-padded
    proc = OurProcessor(crop_size=56, max_crops=4, overlap_margins=(1, 1))
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(60, 200, 3), (150, 90, 3), (56, 56, 3)]]
    texts = ["<|image|><|im_start|>user\nPoint to the cat.<|im_end|>\n<|im_start|>assistant\n",
             "<|image|><|im_start|>user\nA much longer question about what the picture shows?<|im_end|>\n"
             "<|im_start|>assistant\n",
             "<|image|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    batch = proc(text=texts, images=images)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3
    together = our_greedy(ours, batch, n_new=12)
    for text, image, row in zip(texts, images, together):
        assert our_greedy(ours, proc(text=text, images=[image]), n_new=12)[0].tolist() == row.tolist()


@pytest.mark.parametrize("static", [False, True, "compiled", "compiled, batch 1"],
                         ids=["eager", "static", "compiled", "compiled_batch1"])
def test_qwen3_batched_greedy_matches_transformers(tmp_path, static):
    # the text-only path through the same generate: left-padded batch vs transformers' batch. compiled: the
    # static step through torch.compile (inductor), generate's compile switch; at batch 1 (the padded row alone)
    # the compiled step writes its attention out (model.one_token_attention)
    from test_qwen3 import hf_tiny
    hf = hf_tiny(tied=False)
    hf.save_pretrained(tmp_path)
    ours_llm = nano.Qwen3.from_pretrained(str(tmp_path)).eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 300, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    ids[1, :4], mask[1, :4] = 0, 0
    if static == "compiled, batch 1":
        ids, mask = ids[1:], mask[1:]
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[:, 10:]
    torch._dynamo.reset()  # no graphs from other tests
    got = nano.generate(ours_llm, ids, 16, attention_mask=mask, stop_ids=(), static=bool(static),
                        compile=str(static).startswith("compiled"))
    assert got.tolist() == expected.tolist()


def test_compiled_prefill_traces_one_block_for_every_layer(ours, processor):
    # generate(compile=True)'s prefill (Qwen3.compiled_blocks): every LLM block runs the one graph traced for the first,
    # each reading and writing its own layer's cache (KVCache.layer). A backend that runs dynamo's graph as traced
    # gives the eager prefill's logits and cache to the bit: only the tracing is checked here (inductor's kernels,
    # which round otherwise, run in the compiled Qwen3 test above, against transformers' tokens)
    torch._dynamo.reset()  # no graphs from other tests
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    inputs = dict(prompt_inputs(processor, "two examples, padded"))
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")

    def prefill(compiled):
        cache = ours.make_kv_cache(ids.shape[0], ids.shape[1] + 4)
        with ours.llm.compiled_blocks(backend=counting_backend) if compiled else contextlib.nullcontext():
            logits = ours(ids, position_ids=nano.padded_position_ids(mask), attention_mask=mask, kv_cache=cache,
                          **inputs)
        return logits, cache

    with torch.no_grad():
        (logits, cache), (want, want_cache) = prefill(True), prefill(False)
    assert torch.equal(logits, want)
    assert all(torch.equal(a, b) for a, b in zip(cache.k + cache.v, want_cache.k + want_cache.v))
    assert cache.pos == want_cache.pos == ids.shape[1]
    assert len(graphs) == 1 < len(ours.llm.layers)
    assert ours.llm.compiled_block is None  # eager again after the prefill


def test_stop_tokens_streaming_and_padding(ours, processor):
    inputs = prompt_inputs(processor, "two examples, padded")
    free = our_greedy(ours, inputs, n_new=12)
    stop_id = int(free[0, 3])  # row 0 stops at its 4th token (or earlier, if it occurs before)
    first = free[0].tolist().index(stop_id)
    streamed = []
    rest = dict(inputs)
    input_ids, attention_mask = rest.pop("input_ids"), rest.pop("attention_mask")
    got = nano.generate(ours, input_ids, 12, attention_mask=attention_mask, stop_ids=(stop_id,),
                        on_token=lambda step, ids: streamed.append((step, ids.clone())), **rest)
    assert torch.equal(torch.stack([ids for _, ids in streamed], 1), got)
    assert [step for step, _ in streamed] == list(range(got.shape[1]))
    assert got[0, :first + 1].tolist() == free[0, :first + 1].tolist()
    assert (got[0, first + 1:] == stop_id).all()  # a finished row pads with the (first) stop id
    row1 = free[1].tolist()
    if stop_id in row1:  # both rows stopped: generation ends early
        assert got.shape[1] == max(first, row1.index(stop_id)) + 1
    else:
        assert got.shape[1] == 12 and got[1].tolist() == row1


def test_static_decode_equals_eager_with_stops(ours):
    # rows that stop early leave the eager batch but stay in the static one: the same tokens and padding
    proc = OurProcessor(crop_size=56, max_crops=4, overlap_margins=(1, 1))
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(60, 200, 3), (56, 56, 3)]]
    texts = ["<|image|><|im_start|>user\nWhat is it?<|im_end|>\n<|im_start|>assistant\n",
             "<|image|><|im_start|>user\nA longer question about the picture?<|im_end|>\n<|im_start|>assistant\n"]
    batch = dict(proc(text=texts, images=images))
    input_ids, attention_mask = batch.pop("input_ids"), batch.pop("attention_mask")
    free = nano.generate(ours, input_ids, 16, attention_mask=attention_mask, stop_ids=(), **batch)
    stops = (int(free[0, 2]), int(free[1, 9]))  # row 0 stops early, row 1 later (or as soon as it meets one)
    runs = [nano.generate(ours, input_ids, 16, attention_mask=attention_mask, stop_ids=stops, static=static, **batch)
            for static in (False, True)]
    assert runs[0].tolist() == runs[1].tolist()
    assert runs[0].shape[1] < 16 or not set(stops) & set(free[1].tolist())


def test_right_padding_is_refused(ours):
    ids = torch.tensor([[5, 6, 7], [5, 6, 151643]])
    with pytest.raises(ValueError, match="left-padded"):
        nano.generate(ours, ids, 2, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))


def test_causal_padding_mask_hand_worked():
    # two cached keys (the first one padding) and two new tokens
    mask = nano.causal_padding_mask(torch.tensor([[0, 1, 1, 1]]), T=2)[0, 0]
    assert mask.tolist() == [[False, True, True, False], [False, True, True, True]]
    # a padding query still sees itself (no empty softmax row)
    assert nano.causal_padding_mask(torch.tensor([[0, 0, 1]]), T=3)[0, 0].tolist() == [
        [True, False, False], [False, True, False], [False, False, True]]


def test_one_token_attention_equals_sdpa():
    # the compiled decode step's attention, against SDPA on the same cache: 2 rows, 4 key/value heads of 3 query heads
    # each, 10 slots of which row 0 has left padding (slot 0) and both have unused slots at the end (8, 9)
    g = torch.Generator().manual_seed(0)
    B, h, groups, L, d = 2, 4, 3, 10, 16
    q = torch.randn(B, h, groups, d, generator=g)
    k, v = torch.randn(B, h, L, d, generator=g), torch.randn(B, h, L, d, generator=g)
    key_mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    key_mask[..., 8:] = False
    key_mask[0, ..., 0] = False
    k[..., 8:, :] = 1e4  # what the unused slots hold must not matter
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    # float32 both ways, the sums in another order: float32's default tolerances
    torch.testing.assert_close(nano.one_token_attention(q, k, v, key_mask), expected)
    # bf16 in, bf16 out (float32 inside): one rounding of the float32 result
    low = nano.one_token_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), key_mask)
    assert low.dtype == torch.bfloat16
    exact = nano.one_token_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), key_mask)
    torch.testing.assert_close(low, exact.bfloat16(), rtol=0, atol=0)


def test_sample_next_rules():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert nano.sample_next(logits[:1]).item() == 3  # greedy
    assert set(nano.sample_next(logits, 1.0, top_k=1, generator=g).tolist()) == {3}
    assert set(nano.sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {2, 3}
    # probabilities e^k / sum: 0.032, 0.087, 0.237, 0.644; top_p 0.7 keeps {3, 2} (0.644 < 0.7 <= 0.881)
    assert set(nano.sample_next(logits, 1.0, top_p=0.7, generator=g).tolist()) == {2, 3}
    assert set(nano.sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {3}
    # temperature: frequencies follow softmax(logits / T)
    draws = nano.sample_next(logits, 2.0, generator=g)
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0, 3.0]) / 2, 0)
    # frequencies of 2000 seeded draws: their standard deviation is at most sqrt(0.25 / 2000) = 0.011
    assert torch.allclose(torch.bincount(draws, minlength=4) / 2000, expected, atol=0.04)
    # the same generator seed gives the same draws
    a = nano.sample_next(logits, 1.0, generator=torch.Generator().manual_seed(5))
    b = nano.sample_next(logits, 1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
