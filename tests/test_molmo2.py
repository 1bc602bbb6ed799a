"""Molmo2 against transformers' Molmo2ForConditionalGeneration: logits for the processor's outputs, both
checkpoint layouts, the save round trip, the attention mask rules and the full preset's size."""

import copy
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from transformers import (Molmo2Config as HFMolmo2Config, Molmo2ForConditionalGeneration, Molmo2ImageProcessor,
                          Molmo2Processor, Molmo2VideoProcessor)

import model as nano
from model import Molmo2, Molmo2Config
import vision
from vision import SigLIP2

CROP = 56  # 4x4 patches of 14 px: tiny crops keep the ViT cheap on CPU
TINY_HF_CONFIG = dict(
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, head_dim=8, image_size=[CROP, CROP]),
    adapter_config=dict(vision_feature_layer=[3, 1], hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                        head_dim=8, intermediate_size=48, text_hidden_size=64),
    text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                     intermediate_size=96, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
)
# float32 logits (magnitudes below 10) after a ViT, a connector and an LLM that sum in another order than
# transformers: tens of ulps (1e-6 each at 10); a mis-mapped weight moves them by orders of magnitude more
MAX_DIFF = 1e-4


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny random Molmo2 saved by transformers, with every parameter perturbed (biases and norms too) and
    a projector strong enough that the pixels move the logits by far more than the tolerance."""
    torch.manual_seed(0)
    hf = Molmo2ForConditionalGeneration(HFMolmo2Config(**TINY_HF_CONFIG)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        hf.model.multi_modal_projector.image_projector.down_proj.weight.mul_(20)
    path = tmp_path_factory.mktemp("hf_native")
    hf.save_pretrained(path)
    return hf, str(path)


@pytest.fixture(scope="module")
def ours(hf_model):
    return Molmo2.from_pretrained(hf_model[1]).eval()


@pytest.fixture(scope="module")
def processor(hf_qwen_tokenizer):
    """transformers' Molmo2Processor with the released settings (spec section 5), on small crops."""
    images = Molmo2ImageProcessor(size={"height": CROP, "width": CROP}, max_crops=4, overlap_margins=[1, 1])
    videos = Molmo2VideoProcessor(size={"height": CROP, "width": CROP}, do_rescale=True, do_normalize=True,
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Molmo2Processor(image_processor=images, video_processor=videos, tokenizer=hf_qwen_tokenizer,
                           image_use_col_tokens=True, use_single_crop_col_tokens=False,
                           use_single_crop_start_token=True, video_use_col_tokens=False,
                           use_frame_special_tokens=True)


def chat(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\nIt is"


def random_image(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def processor_inputs(processor, case: str) -> dict:
    rng = np.random.default_rng(0)
    if case == "one image":
        return processor(images=[random_image(rng, 90, 130)], text=chat("<|image|>What is this?"), return_tensors="pt")
    if case == "three images":
        images = [random_image(rng, 90, 130), random_image(rng, 200, 60), random_image(rng, 56, 56)]
        text = chat("Image 1<|image|>Image 2<|image|>Image 3<|image|>Compare them.")
        return processor(images=images, text=text, return_tensors="pt")
    if case == "two images":
        images = [random_image(rng, 150, 80), random_image(rng, 64, 100)]
        return processor(images=images, text=chat("Image 1<|image|>Image 2<|image|>Which is larger?"),
                         return_tensors="pt")
    if case == "two examples, padded":
        images = [random_image(rng, 70, 100), random_image(rng, 120, 90), random_image(rng, 60, 60)]
        texts = [chat("<|image|>Describe."), chat("Image 1<|image|>Image 2<|image|>Which one is brighter, and why?")]
        return processor(images=[images[:1], images[1:]], text=texts, padding=True, return_tensors="pt")
    if case == "video of 12 frames":
        video = rng.integers(0, 256, (12, 60, 80, 3), dtype=np.uint8)
        return processor(videos=[video], text=chat("<|video|>What happens?"), return_tensors="pt",
                         videos_kwargs=dict(do_sample_frames=False))
    if case == "text only":
        return processor(text=chat("Write a haiku about the sea."), return_tensors="pt")
    raise ValueError(case)


CASES = ["one image", "three images", "two examples, padded", "video of 12 frames", "text only"]


def max_logit_diff(hf, ours, inputs) -> float:
    with torch.no_grad():
        expected = hf(**inputs).logits
        got = ours(**inputs)
    assert got.shape == expected.shape == (*inputs["input_ids"].shape, 151936)
    valid = inputs["attention_mask"].bool()  # padded positions are nobody's business
    return (got[valid] - expected[valid]).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_native_checkpoint(hf_model, ours, processor, case):
    hf, _ = hf_model
    inputs = processor_inputs(processor, case)
    assert set(inputs) <= {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_token_pooling",
                           "image_grids", "image_num_crops", "pixel_values_videos", "video_token_pooling",
                           "video_grids"}
    assert max_logit_diff(hf, ours, inputs) <= MAX_DIFF


def native_to_released(native: dict, text_config: dict) -> dict:
    """Write transformers' tensors under the released checkpoints' names (Molmo2's own code), the layout
    of allenai/Molmo2-4B's model.safetensors.index.json."""
    renames = [
        ("model.language_model.layers.", "model.transformer.blocks."), ("model.language_model.norm.", "model.transformer.ln_f."),
        (".input_layernorm.", ".attn_norm."), (".post_attention_layernorm.", ".ff_norm."),
        ("model.language_model.", "model.transformer."), (".self_attn.o_proj.", ".self_attn.attn_out."),
        (".mlp.down_proj.", ".mlp.ff_out."),
        ("model.vision_tower.layers.", "model.vision_backbone.image_vit.transformer.resblocks."),
        ("model.vision_tower.", "model.vision_backbone.image_vit."),
        (".layer_norm1.", ".attention_norm."), (".layer_norm2.", ".ffn_norm."),
        (".mlp.fc1.", ".feed_forward.w1."), (".mlp.fc2.", ".feed_forward.w2."),
        ("model.multi_modal_projector.", "model.vision_backbone."),
        (".image_projector.gate_proj.", ".image_projector.w1."), (".image_projector.down_proj.", ".image_projector.w2."),
        (".image_projector.up_proj.", ".image_projector.w3."),
    ]
    released = {}
    for key, value in native.items():
        if key.startswith("model.language_model.layers.") and (".q_proj." in key or ".k_proj." in key or ".v_proj." in key):
            continue
        if key.startswith("model.language_model.layers.") and (".gate_proj." in key or ".up_proj." in key):
            continue
        if key == "model.language_model.embed_tokens.weight":
            released["model.transformer.wte.embedding"] = value[: text_config["vocab_size"]]
            released["model.transformer.wte.new_embedding"] = value[text_config["vocab_size"]:]
            continue
        if ".self_attn." in key and key.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            for proj, short in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
                key = key.replace(f".self_attn.{proj}.", f".attention.{short}.")
        if "image_pooling_2d." in key:
            for proj, short in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
                key = key.replace(f"image_pooling_2d.{proj}.", f"image_pooling_2d.{short}.")
        for old, new in renames:
            key = key.replace(old, new)
        released[key] = value
    for i in range(text_config["num_hidden_layers"]):
        layer = f"model.language_model.layers.{i}."
        released[f"model.transformer.blocks.{i}.self_attn.att_proj.weight"] = torch.cat(
            [native[layer + f"self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
        released[f"model.transformer.blocks.{i}.mlp.ff_proj.weight"] = torch.cat(
            [native[layer + "mlp.up_proj.weight"], native[layer + "mlp.gate_proj.weight"]])
    return released


@pytest.fixture(scope="module")
def released_checkpoint(hf_model, tmp_path_factory):
    """The tiny model written in the released layout with a hub-style config.json (vit_config declaring
    more ViT layers than stored, negative vit_layers, legacy key names), loaded back by transformers."""
    hf, _ = hf_model
    t = TINY_HF_CONFIG["text_config"]
    v = TINY_HF_CONFIG["vision_config"]
    a = TINY_HF_CONFIG["adapter_config"]
    config = {
        "architectures": ["Molmo2ForConditionalGeneration"], "model_type": "molmo2", "tie_word_embeddings": False,
        "image_patch_id": 151938, "image_start_token_id": 151936, "image_end_token_id": 151937,
        "image_col_id": 151939, "low_res_image_start_token_id": 151940, "frame_start_token_id": 151943,
        "frame_end_token_id": 151944, "use_frame_special_tokens": True,
        "text_config": {"model_type": "molmo2_text", "additional_vocab_size": 128, "vocab_size": 151936,
                        "hidden_size": t["hidden_size"], "intermediate_size": t["intermediate_size"],
                        "num_hidden_layers": t["num_hidden_layers"], "num_attention_heads": t["num_attention_heads"],
                        "num_key_value_heads": t["num_key_value_heads"], "head_dim": t["head_dim"],
                        "layer_norm_eps": 1e-6, "rope_theta": 1e6, "rope_scaling": None, "rope_scaling_layers": None,
                        "qk_norm_type": "qwen3", "qkv_bias": False, "norm_after": False, "use_qk_norm": True,
                        "max_position_embeddings": 36864, "hidden_act": "silu"},
        # 6 layers declared, vit_layers [-3, -5] = blocks 3 and 1: blocks 4 and 5 are not in the file
        "vit_config": {"model_type": "molmo2", "hidden_size": v["hidden_size"], "intermediate_size": v["intermediate_size"],
                       "num_hidden_layers": 6, "num_attention_heads": v["num_attention_heads"],
                       "num_key_value_heads": v["num_key_value_heads"], "head_dim": v["head_dim"],
                       "image_default_input_size": [CROP, CROP], "image_patch_size": 14, "image_num_pos": 16,
                       "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
        "adapter_config": {"model_type": "molmo2", "vit_layers": [-3, -5], "hidden_size": a["hidden_size"],
                           "num_attention_heads": a["num_attention_heads"], "num_key_value_heads": a["num_key_value_heads"],
                           "head_dim": a["head_dim"], "intermediate_size": a["intermediate_size"],
                           "text_hidden_size": a["text_hidden_size"], "hidden_act": "silu"},
    }
    path = tmp_path_factory.mktemp("released")
    with open(path / "config.json", "w") as f:
        json.dump(config, f)
    tensors = native_to_released(hf.state_dict(), config["text_config"])
    assert not any(k.startswith(("model.language_model", "model.vision_tower")) for k in tensors)
    nano.save_safetensors(tensors, str(path / "model.safetensors"))
    oracle = Molmo2ForConditionalGeneration.from_pretrained(path).eval()  # transformers' own reading
    assert oracle.config.vision_config.num_hidden_layers == 4
    return oracle, str(path)


@pytest.mark.parametrize("case", ["three images", "video of 12 frames"])
def test_logits_match_transformers_released_checkpoint(released_checkpoint, processor, case):
    oracle, path = released_checkpoint
    ours = Molmo2.from_pretrained(path).eval()
    assert len(ours.vit.layers) == 4 and ours.config.connector.vit_layers == (3, 1)
    assert max_logit_diff(oracle, ours, processor_inputs(processor, case)) <= MAX_DIFF


def test_save_pretrained_loads_in_transformers(hf_model, ours, processor, tmp_path):
    hf, _ = hf_model
    ours.save_pretrained(str(tmp_path))
    reloaded = Molmo2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    inputs = processor_inputs(processor, "three images")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, hf(**inputs).logits)  # same weights, same code
    assert max_logit_diff(reloaded, ours, inputs) <= MAX_DIFF


def test_from_parts_and_tied_head_round_trip(processor, tmp_path):
    # the align stage's start: a (tied, like Qwen3-0.6B) Qwen3 and a SigLIP2 of 4 blocks, fresh connector
    config = Molmo2Config.preset("tiny")
    torch.manual_seed(0)
    llm = nano.Qwen3(config.llm)
    vit = SigLIP2(nano.SigLIP2Config.preset("tiny"))
    model = Molmo2.from_parts(llm, vit, vit_layers=(-2, -4)).eval()
    assert model.llm is llm and model.vit is vit and len(vit.layers) == 3
    assert model.config.connector.vit_layers == (2, 0)
    model.save_pretrained(str(tmp_path))
    hf = Molmo2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    reloaded = Molmo2.from_pretrained(str(tmp_path)).eval()
    assert reloaded.config.llm.tie_word_embeddings == config.llm.tie_word_embeddings
    inputs = processor_inputs(processor, "one image")
    assert max_logit_diff(hf, model, inputs) <= MAX_DIFF
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs), model(**inputs))


def test_logits_positions_and_explicit_mask(ours, processor):
    inputs = processor_inputs(processor, "one image")
    with torch.no_grad():
        full = ours(**inputs)
        where = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
        where[0, -3:] = True
        # float32 logits below 10: a smaller matmul may round differently in the last bit (1e-6 at 8)
        assert torch.allclose(ours(**inputs, logits_positions=where), full[where], rtol=0, atol=1e-6)
        mask = ours.vision_attention_mask(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["attention_mask"])
        assert torch.equal(ours(**inputs, attn_mask=mask), full)
        # without mm_token_type_ids the vision tokens are found by id: same mask, same logits
        no_types = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
        assert torch.equal(ours(**no_types), full)


def test_generate_with_kv_cache_matches_full_recompute(ours, processor):
    # model.generate's prefill takes the processor's tensors; each cached greedy step must pick what a
    # full forward over prompt + tokens so far picks
    inputs = dict(processor_inputs(processor, "one image"))
    input_ids, attention_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    new = nano.generate(ours, input_ids, max_new_tokens=4, attention_mask=attention_mask, stop_ids=(), **inputs)
    assert new.shape == (1, 4)
    with torch.no_grad():
        for k in range(4):
            ids = torch.cat([input_ids, new[:, :k]], dim=1)
            types = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new[:, :k])], dim=1)
            last = torch.zeros_like(ids, dtype=torch.bool)
            last[:, -1] = True
            logits = ours(ids, **{**inputs, "mm_token_type_ids": types}, logits_positions=last)  # (1, vocab)
            assert logits[0].argmax() == new[0, k]


def test_vision_attention_mask_rules():
    # hand-worked: text, <low_res_im_start>, <im_patch> x2, <im_end>, text, text (pad)
    ids = torch.tensor([[151645, 151940, 151938, 151938, 151937, 100, 151643]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    model = Molmo2(Molmo2Config.preset("tiny"))
    mask = model.vision_attention_mask(ids, attention_mask=attention_mask)[0, 0]
    vision = [1, 2, 3, 4]
    for q in vision:
        for k in vision:
            assert mask[q, k], f"vision token {q} must see vision token {k}"
        assert not mask[q, 5] and mask[q, 0]  # never a later text token; earlier text yes
    for q in (0, 5):
        assert mask[q, : q + 1].all() and not mask[q, q + 1:].any(), f"text token {q}: causal"
    assert not mask[:6, 6].any()  # nobody sees padding
    # the same rule from the processor's token types
    types = torch.tensor([[0, 1, 1, 1, 1, 0, 0]])
    assert torch.equal(model.vision_attention_mask(ids, types, attention_mask)[0, 0], mask)


def test_vision_tokens_of_one_example_only():
    # two examples in a batch: the bidirectional block is per row
    ids = torch.tensor([[151938, 151938, 5, 6], [7, 151938, 151938, 8]])
    mask = Molmo2(Molmo2Config.preset("tiny")).vision_attention_mask(ids)[:, 0]
    assert mask[0, 0, 1] and mask[1, 1, 2] and not mask[1, 0, 1] and not mask[0, 2, 3]


def test_bad_inputs_name_the_input(ours, processor):
    inputs = dict(processor_inputs(processor, "one image"))
    ids = inputs["input_ids"].clone()
    ids[ids == 151938] = torch.tensor([100] + [151938] * (int((ids == 151938).sum()) - 1))  # one <im_patch> fewer
    inputs["input_ids"] = ids
    with pytest.raises(ValueError, match="<im_patch>"):
        ours(**inputs)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_preset_parameter_counts():
    with torch.device("meta"):
        model = Molmo2(Molmo2Config.preset("nanomolmo2"))
        qwen3 = nano.Qwen3(nano.Qwen3Config.preset("qwen3-0.6b"))
    # hand-worked: SigLIP2 so400m/14, 25 of its 27 blocks
    C, F, P = 1152, 4304, 729
    block = 2 * 2 * C + 4 * (C * C + C) + (C * F + F) + (F * C + C)
    vit = (588 * C + C) + P * C + 25 * block
    # pooling attention over 2 x 1152 channels, SwiGLU 1152 -> 3072 -> 1024
    connector = 3 * (2 * C * C + C) + (C * C + C) + 2 * C * 3072 + 3072 * 1024
    print(f"\nnanoMolmo2 parameters: ViT {count(model.vit) / 1e6:.1f}M, connector {count(model.connector) / 1e6:.1f}M, "
          f"LLM {count(model.llm) / 1e6:.1f}M (Qwen3-0.6B {count(qwen3) / 1e6:.1f}M), "
          f"new embeddings {model.new_embedding.numel() / 1e3:.0f}K, total {count(model) / 1e6:.1f}M")
    assert len(model.vit.layers) == 25
    assert count(model.vit) == vit
    assert count(model.connector) == connector
    assert 595e6 < count(qwen3) < 597e6 and count(model.llm) == count(qwen3)
    assert count(model) == count(qwen3) + vit + connector + 128 * 1024
    # transformers' Molmo2 of the same shape agrees on the vision tower and the adapter
    hf_config = json.loads(json.dumps(nano.molmo2_config_to_hf(model.config)))
    with torch.device("meta"):
        hf = Molmo2ForConditionalGeneration(HFMolmo2Config(**{k: v for k, v in hf_config.items() if k != "architectures"}))
    assert count(hf.model.vision_tower) == vit and count(hf.model.multi_modal_projector) == connector


def test_parameter_parts_cover_the_model_once():
    model = Molmo2(Molmo2Config.preset("tiny"))
    parts = model.param_parts()
    ids = [id(p) for params in parts.values() for p in params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    assert any(p is model.new_embedding for p in parts["connector"])
    assert len(model.blocks()) == len(model.vit.layers) + len(model.llm.layers)


def test_kept_tokens_are_the_full_models_rows(ours, processor, tmp_path):
    """A model keeping rows for some Qwen3 ids only (Molmo2Config.keep_tokens, for small models from scratch)
    is the full model restricted to those rows: the same logits there and -inf elsewhere, the cross-entropy of
    a softmax over the kept ids, greedy generation that picks among them, and a save/load round trip."""
    inputs = processor_inputs(processor, "one image")
    ids = inputs["input_ids"]
    kept = sorted(set(ids[ids < nano.QWEN3_VOCAB_SIZE].tolist()) | set(range(0, 400, 7)))
    small = Molmo2(ours.config.keep_tokens(kept))
    state = ours.state_dict()
    for name in ("llm.embed_tokens.weight", "llm.lm_head.weight"):
        if name in state:
            state[name] = state[name][kept]
    small.load_state_dict(state)
    rows = torch.tensor(kept)
    with torch.no_grad():
        full_logits, small_logits = ours(**inputs), small(**inputs)
        assert small_logits.shape == full_logits.shape
        # float32: a head of fewer rows is another matmul shape, rounded differently by a few ulps
        torch.testing.assert_close(small_logits[..., rows], full_logits[..., rows], rtol=0, atol=1e-5)
        others = torch.ones(full_logits.shape[-1], dtype=torch.bool)
        others[rows] = False
        assert torch.isneginf(small_logits[..., others]).all()

        # the loss: cross-entropy over the kept ids, from the full model's logits by hand
        targets = torch.full_like(ids, -1)
        text = ids[0] < nano.QWEN3_VOCAB_SIZE
        targets[0, :-1] = torch.where(text[1:], ids[0, 1:], -1)
        weights = (targets >= 0).float()
        loss_sum, ce_sum = small(**inputs, targets=targets, loss_weights=weights)
        has = targets >= 0
        log_probs = torch.log_softmax(full_logits[has][:, rows].double(), -1)
        hand = -log_probs.gather(1, torch.searchsorted(rows, targets[has])[:, None]).sum()
        # float32 logits against a float64 oracle: under 1e-3 per token (logits of a few units, float32 log-softmax)
        assert has.sum() > 10 and abs(ce_sum.item() - hand.item()) < 1e-3 * has.sum().item()

    # greedy generation: each new token is the full model's best among the kept ids (full recompute)
    prompt = dict(inputs)
    input_ids, attention_mask = prompt.pop("input_ids"), prompt.pop("attention_mask")
    new = nano.generate(small, input_ids, max_new_tokens=3, attention_mask=attention_mask, stop_ids=(), **prompt)
    with torch.no_grad():
        for k in range(3):
            seq = torch.cat([input_ids, new[:, :k]], dim=1)
            types = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(new[:, :k])], dim=1)
            logits = ours(seq, **{**prompt, "mm_token_type_ids": types})[0, -1]
            assert new[0, k] == rows[logits[rows].argmax()]

    small.save_pretrained(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["token_ids"] == kept
    loaded = Molmo2.from_pretrained(str(tmp_path))
    assert loaded.config.token_ids == tuple(kept)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), small_logits)

    missing = next(i for i in range(nano.QWEN3_VOCAB_SIZE) if i not in set(kept))
    bad = ids.clone()
    bad[0, -1] = missing
    with pytest.raises(ValueError, match=rf"input_ids: token ids \[{missing}\] are not among this model's"):
        small(**{**inputs, "input_ids": bad})
    targets[0, 0] = missing
    with pytest.raises(ValueError, match=rf"targets: token ids \[{missing}\]"):
        small(**inputs, targets=targets, loss_weights=weights)
    with pytest.raises(ValueError, match="increasing Qwen3 ids"):
        Molmo2Config(llm=small.config.llm, vit=small.config.vit, connector=small.config.connector,
                     token_ids=tuple(reversed(kept)))


def test_compiled_training_loss_and_gradients_match_eager(ours, processor):
    """The stage scripts' compile switch: the model under torch.compile (dynamo and AOTAutograd, the eager
    backend for speed) gives the eager loss and gradients; the fused loss runs eagerly inside it."""
    inputs = processor_inputs(processor, "one image")
    ids = inputs["input_ids"]
    targets = torch.full_like(ids, -1)
    text = ids[0] < nano.QWEN3_VOCAB_SIZE
    targets[0, :-1] = torch.where(text[1:], ids[0, 1:], -1)
    weights = (targets >= 0).float()
    model = copy.deepcopy(ours).train()
    results = []
    nano.ready_for_compile()  # what the stage scripts set before compiling
    for run in (model, torch.compile(model, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        loss, ce = run(**inputs, targets=targets, loss_weights=weights, z_loss=1e-4)
        loss.backward()
        results.append((loss.detach(), ce, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_e, ce_e, grads_e), (loss_c, ce_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(ce_c, ce_e)
    assert grads_e.keys() == grads_c.keys() and len(grads_e) > 20
    for name in grads_e:  # float32: compiled kernels may fuse and reorder sums (rtol 1e-4 = ~800 ulps)
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


def test_stacked_linears_give_each_linears_loss_and_gradients(ours, processor, monkeypatch):
    """vision.linears: the Linears that read one input (the ViT's and the LLM's q, k, v; the LLM's and the
    projector's gate, up) run as one matmul against their stacked weights on a GPU in training. Forced on here, on a
    CPU in float32: the loss and every parameter's gradient are the separate Linears' (the same products, summed by
    one larger matmul whose blocking may differ: float32 within 1e-5, ~80 ulps). A CPU and generation never stack
    (vision.stacks_linears), so the exact-logit tests above run the separate Linears."""
    inputs = processor_inputs(processor, "one image")
    ids = inputs["input_ids"]
    targets = torch.full_like(ids, -1)
    targets[0, :-1] = torch.where(ids[0, 1:] < nano.QWEN3_VOCAB_SIZE, ids[0, 1:], -1)
    model = copy.deepcopy(ours).train()
    calls = []
    results = []
    for stacked in (False, True):
        monkeypatch.setattr(vision, "stacks_linears", lambda x, stacked=stacked: calls.append(stacked) or stacked)
        model.zero_grad(set_to_none=True)
        loss, _ = model(**inputs, targets=targets, loss_weights=(targets >= 0).float())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    config = ours.config
    per_run = config.vit.num_hidden_layers + 2 * config.llm.num_hidden_layers + 1  # ViT attention, LLM attention
    #   and MLP, the projector
    assert calls.count(True) == calls.count(False) >= per_run
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 20
    for name in grads_a:  # an element that is a sum of larger terms of both signs keeps their rounding (the key
        #   bias's gradient is zero but for it): atol is 1e-5 of the largest gradient in the parameter's module
        module = name.rsplit(".", 2)[0] + "."
        scale = max(g.abs().max().item() for n, g in grads_a.items() if n.startswith(module) or n == name)
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_the_inference_scripts_start_without_torch_dynamo():
    """Importing torch._dynamo takes ~2 s of a process's start on a 2-core machine: the modules that sample, evaluate
    and serve leave it to ready_for_compile, which only a compiled run calls (a training run's optimizer imports it
    anyway)."""
    import subprocess
    import sys
    code = ("import sys, model, sample, eval, serve; "
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout[-500:]


def test_loading_a_checkpoint_draws_no_weights_and_imports_no_dynamo(tmp_path):
    """A model built to be loaded (model.weights_not_drawn: the meta device, the init draws skipped) costs no random
    draws: PyTorch's normal_ and randn on meta tensors import torch._dynamo (~2 s of a script's start). In a fresh
    process, loading a Molmo2 and a SigLIP2 leaves torch._dynamo unimported, the init functions as they were, and
    the weights those of the files. A model from scratch still draws every weight (the seed gives the same model)."""
    import subprocess
    import sys
    torch.manual_seed(0)
    model = Molmo2(Molmo2Config.preset("tiny"))
    model.save_pretrained(str(tmp_path / "molmo2"))
    nano.save_siglip(model.vit, str(tmp_path / "vit"))
    code = (f"import sys, torch, model; normal = torch.nn.init.normal_; "
            f"m = model.Molmo2.from_pretrained({str(tmp_path / 'molmo2')!r}); "
            f"v = model.load_siglip({str(tmp_path / 'vit')!r}); "
            f"torch.save((m.state_dict(), v.state_dict()), {str(tmp_path / 'loaded.pt')!r}); "
            "print(sorted(x for x in sys.modules if x.startswith('torch._dynamo')), torch.nn.init.normal_ is normal)")
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[] True", out.stdout[-500:]
    loaded, vit = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(vit[k], v) for k, v in model.vit.state_dict().items())
    torch.manual_seed(0)
    again = Molmo2(Molmo2Config.preset("tiny")).state_dict()
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())
    assert model.new_embedding.std().item() == pytest.approx(0.02, rel=0.1)  # 128 x 32 draws: ~1% std error


def test_compile_traces_the_forward_in_one_graph(ours, processor):
    """torch.compile sees the whole training forward as one graph for any image count (issue 16): host-side
    checks are skipped while compiling, the features are added by a gather of fixed shape, and the connector's
    count of windows is traced; only the fused loss head is left out, by design (model.ready_for_compile). The same
    with the from-scratch switches: position_bins (each token's place computed from the grids with static shapes)
    and a kept-token vocabulary (its rows looked up without the eager check of unknown ids)."""
    model = copy.deepcopy(ours).train()
    config = ours.config
    placed = Molmo2(dataclasses.replace(config, connector=dataclasses.replace(config.connector, position_bins=8)))
    placed.load_state_dict(ours.state_dict(), strict=False)
    ids = torch.cat([processor_inputs(processor, case)["input_ids"].flatten()
                     for case in ("one image", "three images")])
    kept = Molmo2(config.keep_tokens(sorted(set(ids[ids < nano.QWEN3_VOCAB_SIZE].tolist()))))
    nano.ready_for_compile()
    # every image count on Molmo2's own model; the switches' own parts on one count (each explain is ~6 s of tracing)
    for run, cases in ((model, ("one image", "three images")), (placed.train(), ("three images",)),
                       (kept.train(), ("three images",))):
        for case in cases:
            inputs = processor_inputs(processor, case)
            targets = torch.where(inputs["input_ids"] < nano.QWEN3_VOCAB_SIZE, inputs["input_ids"], -1)
            explained = torch._dynamo.explain(run)(**inputs, targets=targets, loss_weights=(targets >= 0).float())
            assert explained.graph_count == 1, [str(r.reason)[:200] for r in explained.break_reasons]
            assert all("loss_at_targets" in str(r.reason) for r in explained.break_reasons)


def test_compile_does_not_recompile_for_another_image_count(ours, processor):
    """torch.compile of the training forward (issue 16): one image compiles a graph, three images a second one
    with dynamic sizes (as dynamo does when a size changes), and then two images, other crops and another
    length reuse it: with error_on_recompile set, a further compile would raise. Dynamo's own eager backend: what
    recompiles is decided in tracing, before any backend runs."""
    torch._dynamo.reset()  # no graphs from the other tests
    nano.ready_for_compile()
    model = copy.deepcopy(ours).train()
    compiled = torch.compile(model, backend="eager")

    def run(case):
        inputs = processor_inputs(processor, case)
        targets = torch.where(inputs["input_ids"] < nano.QWEN3_VOCAB_SIZE, inputs["input_ids"], -1)
        return compiled(**inputs, targets=targets, loss_weights=(targets >= 0).float())[0]

    run("one image")
    run("three images")
    # config.patch, not monkeypatch: undoing a monkeypatch deletes the option from dynamo's config module
    with torch._dynamo.config.patch(error_on_recompile=True):
        loss = run("two images")
    assert torch.isfinite(loss)


def test_compile_marked_media_compiles_once_for_every_image_count(ours, processor):
    """The trainers' compile switch (issue 16): their rows are padded to max_seq_len and training.model_inputs(...,
    compiled=True) marks the media's counts dynamic, so the first batch's graph serves a batch of another image
    count too: error_on_recompile is set after the first call. Without the marks the second batch recompiles."""
    import training

    def padded(case, length=160):  # as the trainer's rows: padded with <|endoftext|>, no loss there
        inputs = dict(processor_inputs(processor, case))
        n = length - inputs["input_ids"].shape[1]
        assert n >= 0
        inputs["input_ids"] = torch.nn.functional.pad(inputs["input_ids"], (0, n), value=151643)
        inputs["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, n))
        return inputs

    def run(compiled, case, marked):
        inputs = padded(case)
        targets = torch.where(inputs["input_ids"] < nano.QWEN3_VOCAB_SIZE, inputs["input_ids"], -1)
        targets[inputs["input_ids"] == 151643] = -1
        return compiled(**training.model_inputs(inputs, compiled=marked), targets=targets,
                        loss_weights=(targets >= 0).float())[0]

    model = copy.deepcopy(ours).train()
    for marked in (True, False):
        torch._dynamo.reset()
        nano.ready_for_compile()
        compiled = torch.compile(model, backend="eager")
        run(compiled, "two images", marked)
        with torch._dynamo.config.patch(error_on_recompile=True):
            if marked:
                assert torch.isfinite(run(compiled, "three images", marked))
            else:
                with pytest.raises(Exception, match="[Rr]ecompil"):
                    run(compiled, "three images", marked)


def test_compile_each_block_traces_one_block_of_each_kind(ours, processor):
    """The trainers' compile_blocks switch (model.compile_each_block): every LLM block reuses the code traced for the
    first one, and every ViT block the ViT's, because a block's weights are the graph's inputs. A backend that
    counts what dynamo hands it: the first batch traces one graph per kind, the ViT's with the crop count already a
    size (SigLIP2.forward marks it), so a batch of other sizes (three images, a longer prompt) traces one more for
    the LLM alone, and a third batch none (error_on_recompile). The loss and the gradients are the eager model's:
    the same float32 ops, only traced."""
    torch._dynamo.reset()  # no graphs from the other tests
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def loss_and_grads(model, case):
        inputs = processor_inputs(processor, case)
        targets = torch.where(inputs["input_ids"] < nano.QWEN3_VOCAB_SIZE, inputs["input_ids"], -1)
        loss = model(**inputs, targets=targets, loss_weights=(targets >= 0).float())[0]
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        return loss, grads

    eager = copy.deepcopy(ours).train()
    compiled = copy.deepcopy(ours).train()
    nano.compile_each_block(compiled, backend=counting_backend)
    n_blocks = len(compiled.llm.layers) + len(compiled.vit.layers)
    for case in ("one image", "three images"):
        (loss, grads), (want, want_grads) = loss_and_grads(compiled, case), loss_and_grads(eager, case)
        assert torch.equal(loss, want), case
        assert all((g is None and w is None) or torch.equal(g, w) for g, w in zip(grads, want_grads)), case
        assert len(graphs) == (2 if case == "one image" else 3), [g.code[:300] for g in graphs]
    assert sum("layer_norm1" in g.code for g in graphs) == 1  # the ViT block's one graph, for any crop count
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.isfinite(loss_and_grads(compiled, "two images")[0])
    assert len(graphs) == 3 < n_blocks


def test_compiled_blocks_under_activation_checkpointing_give_the_eager_gradients(ours, processor):
    """compile_blocks is train_joint.py's default on one GPU, so `--activation_checkpointing=True` there recomputes
    compiled blocks in backward (torch.utils.checkpoint around each compiled block). Run as dynamo traced them (the
    same float32 ops in the same order), the loss and every gradient are the eager model's without checkpointing, to
    the bit: the recompute replays the block, not something else."""
    torch._dynamo.reset()
    inputs = processor_inputs(processor, "one image")
    targets = torch.where(inputs["input_ids"] < nano.QWEN3_VOCAB_SIZE, inputs["input_ids"], -1)
    results = []
    for checkpointed in (False, True):
        model = copy.deepcopy(ours).train()
        if checkpointed:
            model.llm.gradient_checkpointing = model.vit.gradient_checkpointing = True
            nano.compile_each_block(model, backend=lambda gm, example_inputs: gm.forward)  # dynamo's graph as traced
        loss = model(**inputs, targets=targets, loss_weights=(targets >= 0).float())[0]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_grads), (loss, grads) = results
    assert torch.equal(loss, want)
    assert grads.keys() == want_grads.keys() and len(grads) > 20
    assert all(torch.equal(grads[n], want_grads[n]) for n in grads), [n for n in grads
                                                                       if not torch.equal(grads[n], want_grads[n])]


def test_training_flops_count_what_each_part_computes():
    """The trainer's FLOP count (its MFU), by hand from the modules' own matmul weights: a part's weights cost 1 x
    its forward, 1 more where it trains (weight gradients) and 1 more where it or a part before it trains
    (activation gradients); attention's matmuls 1 x, or 3 x where gradients flow through them."""
    torch.manual_seed(0)
    model = Molmo2(Molmo2Config.preset("tiny"))
    c = model.config
    B, T, n_loss, n_crops, n_pooled = 2, 40, 7, 3, 12
    targets = torch.full((B, T), -1)
    targets.view(-1)[:n_loss] = 1
    batch = {"input_ids": torch.zeros(B, T, dtype=torch.long), "targets": targets,
             "pixel_values": torch.zeros(n_crops, c.vit.num_patches, c.vit.patch_dim),
             "image_token_pooling": torch.zeros(n_pooled, 4, dtype=torch.long)}

    def linear_weights(module):
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    head = (model.llm.lm_head or model.llm.embed_tokens).weight.numel()
    P, nv, nl = c.vit.num_patches, len(model.vit.layers), len(model.llm.layers)
    forward = {  # one forward's matmul FLOPs, 2 a weight a token
        "llm weights": 2 * linear_weights(model.llm.layers) * B * T + 2 * head * n_loss,
        "llm attention": 2 * 2 * nl * c.llm.num_attention_heads * c.llm.head_dim * T * B * T,
        "vit weights": 2 * linear_weights(model.vit) * n_crops * P,
        "vit attention": 2 * 2 * nv * c.vit.num_attention_heads * c.vit.head_dim * P * n_crops * P,
        "connector": 2 * sum(p.numel() for p in model.connector.parameters()) * n_pooled,
    }
    cases = {  # parts that train -> x forward for each entry above
        ("vit", "connector", "llm"): dict.fromkeys(forward, 3),
        ("connector", "llm"): {**dict.fromkeys(forward, 3), "vit weights": 1, "vit attention": 1},  # the demos
        ("connector",): {"llm weights": 2, "llm attention": 3, "vit weights": 1, "vit attention": 1, "connector": 3},
        (): dict.fromkeys(forward, 1),
    }
    for training, times in cases.items():
        for part, params in model.param_parts().items():
            for p in params:
                p.requires_grad_(part in training)
        expected = sum(times[k] * forward[k] for k in forward)
        # integer counts scaled by k / 6 in float64: exact to ~1e-16 relative, so 1e-12 leaves room and no more
        assert model.training_flops(batch) == pytest.approx(expected, rel=1e-12), training
