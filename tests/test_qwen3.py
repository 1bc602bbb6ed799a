"""Qwen3 in model.py against transformers' Qwen3ForCausalLM (the oracle), plus KV-cache and FLOP checks."""

import pytest
import torch
from transformers import Qwen3Config as HFQwen3Config, Qwen3ForCausalLM

from model import Qwen3, Qwen3Config, generate, load_safetensors, save_safetensors


def hf_tiny(tied, seed=0):
    torch.manual_seed(seed)
    cfg = HFQwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                        tie_word_embeddings=tied, attn_implementation="eager")
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms too, so a wrongly mapped norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def pair(request, tmp_path_factory):
    hf = hf_tiny(request.param)
    d = tmp_path_factory.mktemp("qwen3")
    hf.save_pretrained(d)
    ours = Qwen3.from_pretrained(str(d)).eval()
    return hf, ours


def test_logits_match(pair):
    hf, ours = pair
    ids = torch.randint(0, 300, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape == (2, 37, 300)
    # float32 logits of magnitude ~0.7, sums ordered differently from transformers' (measured: 4 ulps)
    assert (got - ref).abs().max() <= 16 * torch.finfo(torch.float32).eps * ref.abs().max()


def test_greedy_generation_matches(pair):
    hf, ours = pair
    ids = torch.randint(0, 300, (1, 11), generator=torch.Generator().manual_seed(2))
    ref = hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 11:]
    got = generate(ours, ids, max_new_tokens=32, stop_ids=())
    assert got.tolist() == ref.tolist()


def test_batched_generation_equals_alone(pair):
    _, ours = pair
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 300, (1, 9), generator=g), torch.randint(0, 300, (1, 4), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 5), torch.ones(1, 4)], 1)]).long()
    both = generate(ours, batch, 12, attention_mask=mask, stop_ids=())
    assert both[0].tolist() == generate(ours, a, 12, stop_ids=())[0].tolist()
    assert both[1].tolist() == generate(ours, b, 12, stop_ids=())[0].tolist()


def test_kv_cache_matches_full_forward(pair):
    _, ours = pair
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.make_kv_cache(2, 32)
        pieces = [ours(ids[:, :7], kv_cache=cache), ours(ids[:, 7:12], kv_cache=cache)]  # prefill + chunk
        pieces += [ours(ids[:, t:t + 1], kv_cache=cache) for t in range(12, 20)]  # token by token
    # float32: attention over a cache and over the whole sequence sum in other orders (measured: 4 ulps)
    assert (torch.cat(pieces, 1) - full).abs().max() <= 16 * torch.finfo(torch.float32).eps * full.abs().max()


def test_save_pretrained_round_trip(pair, tmp_path):
    hf, ours = pair
    ours.save_pretrained(str(tmp_path))
    hf2 = Qwen3ForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(hf2(ids).logits, hf(ids).logits)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    hf = hf_tiny(True)
    hf.save_pretrained(tmp_path)
    state = load_safetensors(str(tmp_path / "model.safetensors"))
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_safetensors(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors \['layers.1.mlp.up_proj.weight'\].*unexpected tensors \['layers.1.mlp.extra.weight'\]"):
        Qwen3.from_pretrained(str(tmp_path))


def test_unknown_directory_or_hub_id():
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        Qwen3.from_pretrained("no-such-dir")


def test_safetensors_dtypes_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 4, generator=generator).bfloat16(), "b": torch.arange(5),
               "c": torch.randn(2, generator=generator).half(),
               "d": torch.tensor([True, False]), "e": torch.zeros(0)}
    save_safetensors(tensors, str(tmp_path / "x.safetensors"))
    back = load_safetensors(str(tmp_path / "x.safetensors"))
    from safetensors.torch import load_file  # the reference reader
    ref = load_file(str(tmp_path / "x.safetensors"))
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t) and torch.equal(ref[k], t)


def test_loaded_tensors_map_the_file_but_never_write_it(tmp_path):
    """load_safetensors maps the file copy-on-write: a tensor written to after loading leaves the file as it was
    (the reference reader still reads the saved values), a file saved again in its place (save_safetensors
    replaces it) leaves the tensors loaded before as they were, and a file cut short names the tensor that runs
    past its end."""
    from safetensors.torch import load_file  # the reference reader
    path = str(tmp_path / "x.safetensors")
    a, b = torch.arange(12, dtype=torch.float32).reshape(3, 4), torch.arange(6, dtype=torch.int64)
    save_safetensors({"a": a, "b": b}, path)
    loaded = load_safetensors(path)
    loaded["a"].mul_(-1)
    assert torch.equal(load_file(path)["a"], a) and torch.equal(load_safetensors(path)["a"], a)
    kept = load_safetensors(path)
    save_safetensors({"a": a + 100, "b": b}, path)
    assert torch.equal(kept["a"], a) and torch.equal(load_safetensors(path)["a"], a + 100)
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "wb") as f:
        f.write(whole[:-8])  # b's last element gone
    with pytest.raises(ValueError, match="tensor b runs past the end of the file"):
        load_safetensors(path)


def test_full_preset_parameter_count():
    with torch.device("meta"):
        model = Qwen3(Qwen3Config.preset("qwen3-0.6b"))
    n = model.num_params()
    # embedding 151936*1024 + 28 layers * (q 1024*2048 + k,v 2*1024*1024 + o 2048*1024 + mlp 3*1024*3072
    # + norms 2*1024 + 2*128) + final norm 1024
    expected = 151936 * 1024 + 28 * (2 * 1024 * 2048 + 2 * 1024 * 1024 + 3 * 1024 * 3072 + 2 * 1024 + 2 * 128) + 1024
    print(f"Qwen3-0.6B parameters: {n:,}")
    assert n == expected == 596_049_920


def test_flops_per_token_hand_worked():
    cfg = Qwen3Config(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=4, tie_word_embeddings=True)
    model = Qwen3(cfg)
    # matmul weights per layer: q 8*8, k 8*4, v 8*4, o 8*8, mlp 3*8*16 = 64+32+32+64+384 = 576; two layers
    # 1152; tied head 10*8 = 80 -> 1232 weights -> 6*1232 = 7392. Attention: 12 * 2 layers * 2 heads * 4 * T.
    assert model.flops_per_token(seq_len=100) == 7392 + 12 * 2 * 2 * 4 * 100


def test_residual_dropout_only_where_asked():
    torch.manual_seed(0)
    cfg = Qwen3Config.preset("tiny")
    cfg.response_dropout = 0.5  # resid_dropout stays 0: prompt tokens are never dropped
    model = Qwen3(cfg).train()
    x = torch.randn(2, 10, cfg.hidden_size)
    response = torch.zeros(2, 10, dtype=torch.bool)
    response[:, 6:] = True
    h1 = model.run_layers(x, response_mask=response)
    h2 = model.run_layers(x, response_mask=response)
    # causal: tokens before the first response token never see a dropped branch
    assert torch.equal(h1[:, :6], h2[:, :6]) and not torch.equal(h1[:, 6:], h2[:, 6:])
    model.eval()
    assert torch.equal(model.run_layers(x, response_mask=response), model.run_layers(x, response_mask=response))
