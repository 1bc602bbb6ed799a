"""The connector against transformers' Molmo2Adapter (attention-meanq pooling + SwiGLU projector)."""

import torch
import torch.nn.functional as F
from transformers import Molmo2AdapterConfig
from transformers.models.molmo2.modeling_molmo2 import Molmo2Adapter

import connector
from connector import Connector, ConnectorConfig, one_query_attention


def make_pair(vit_layers=(3, 1)):
    hf_config = Molmo2AdapterConfig(vision_feature_layer=list(vit_layers), hidden_size=32, num_attention_heads=4,
                                    num_key_value_heads=4, head_dim=8, intermediate_size=48, text_hidden_size=64)
    torch.manual_seed(0)
    hf = Molmo2Adapter(hf_config).eval()
    for p in hf.parameters():  # transformers zero-inits biases; random ones test the bias wiring too
        torch.nn.init.normal_(p, std=0.2)
    ours = Connector(ConnectorConfig(vit_layers=tuple(vit_layers), vit_hidden_size=32, hidden_size=32,
                                     num_attention_heads=4, head_dim=8, intermediate_size=48, llm_hidden_size=64))
    renames = {"image_pooling_2d.": "pooling.", "image_projector.": "projector."}
    state = {}
    for key, value in hf.state_dict().items():
        for old, new in renames.items():
            key = key.replace(old, new)
        state[key] = value
    ours.load_state_dict(state)
    return hf, ours


def float32_ulps(n, reference):
    """n float32 ulps of the largest value of reference: the slack two float32 implementations that order
    their sums differently need (the parity tests here measure 3 to 5)."""
    return n * torch.finfo(torch.float32).eps * reference.abs().max()


def test_pooling_matches_transformers_with_padding_and_empty_windows():
    hf, ours = make_pair()
    num_crops, num_patches = 3, 16
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(num_crops, num_patches, 32, generator=generator) for _ in range(2)]
    idx = torch.randint(0, num_crops * num_patches, (10, 4), generator=generator)
    idx[1, 3] = -1  # partial windows (crop edges, odd grids)
    idx[4, :2] = -1
    idx[7] = -1  # a window with no patch at all yields no token
    with torch.no_grad():
        expected = hf(torch.cat(features, dim=-1), idx).last_hidden_state
        got = ours(features, idx)
    assert got.shape == (9, 64) == expected.shape
    # the window with no patch is dropped before the pooling here and after it in transformers: the kernels see 9
    # windows against 10 and may sum in another order, a few float32 ulps of the output's magnitude
    assert (got - expected).abs().max() <= float32_ulps(16, expected)
    with torch.no_grad():  # without an empty window both run SDPA on the same windows, every op in the same order
        assert torch.equal(ours(features, idx[:7]), hf(torch.cat(features, dim=-1), idx[:7]).last_hidden_state)


def test_video_windows_3x3():
    hf, ours = make_pair(vit_layers=(2,))
    generator = torch.Generator().manual_seed(1)
    features = [torch.randn(4, 16, 32, generator=generator)]
    idx = torch.randint(0, 64, (6, 9), generator=generator)
    idx[:, ::4] = -1
    with torch.no_grad():
        expected = hf(features[0], idx).last_hidden_state
        got = ours(features, idx)
    assert torch.equal(got, expected)  # float32: the same kernels in the same order (above)


def test_padding_slots_are_ignored():
    # invariant: what a -1 slot would have pointed at cannot change the output
    _, ours = make_pair()
    generator = torch.Generator().manual_seed(2)
    features = [torch.randn(2, 16, 32, generator=generator) for _ in range(2)]
    idx = torch.tensor([[0, 1, -1, -1], [5, -1, 6, 7]])
    with torch.no_grad():
        a = ours(features, idx)
        features[0][0, 2:5] += 100.0  # patches 2..4 are not referenced
        b = ours(features, idx)
    assert torch.equal(a, b)


def test_bad_index_names_the_input():
    _, ours = make_pair()
    features = [torch.zeros(1, 16, 32) for _ in range(2)]
    try:
        ours(features, torch.tensor([[0, 1, 2, 16]]))
    except ValueError as e:
        assert "pooled_patches_idx" in str(e)
    else:
        raise AssertionError("out-of-range index accepted")


def test_image_windows_padded_to_video_width_pool_the_same():
    # a batch mixing images (2x2 windows) and video frames (3x3) can pass one index tensor: -1 slots are inert
    _, ours = make_pair()
    generator = torch.Generator().manual_seed(1)
    features = [torch.randn(2, 16, 32, generator=generator) for _ in range(2)]
    idx = torch.randint(0, 32, (5, 4), generator=generator)
    padded = torch.cat([idx, torch.full((5, 5), -1)], dim=1)
    with torch.no_grad():
        narrow, wide = ours(features, idx), ours(features, padded)
    # the same sums over 4 or 9 slots (5 masked) may be reduced in another order, and the result then passes
    # through float32 matmuls: a few float32 ulps of the output's magnitude, not exact equality
    assert (narrow - wide).abs().max() <= float32_ulps(16, narrow)


def test_one_query_attention_is_sdpa_written_out():
    # the bf16 path's attention (connector.py says why it is written out) against SDPA, both in float32
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(50, 1, 4, 8, generator=generator)
    k, v = torch.randn(2, 50, 9, 4, 8, generator=generator)
    valid = torch.rand(50, 9, generator=generator) > 0.4
    valid[:, 4] = True  # every window has a patch
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=valid[:, None, None, :]).squeeze(2)
    got = one_query_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), valid)  # bf16 in, float32 inside
    assert got.dtype == torch.float32
    reference = F.scaled_dot_product_attention(*(t.bfloat16().float().transpose(1, 2) for t in (q, k, v)),
                                               attn_mask=valid[:, None, None, :]).squeeze(2)
    # the same float32 arithmetic summed in another order: a few float32 ulps of the output's magnitude
    assert (got - reference).abs().max() <= float32_ulps(16, reference)
    assert not torch.equal(reference, expected)  # the bf16 inputs were rounded: a check that could fail above


def test_bf16_connector_pools_through_one_query_attention(monkeypatch):
    _, ours = make_pair()
    calls = []

    def counted(*args):
        calls.append(args[1].dtype)
        return one_query_attention(*args)
    monkeypatch.setattr(connector, "one_query_attention", counted)
    generator = torch.Generator().manual_seed(4)
    features = [torch.randn(3, 16, 32, generator=generator) for _ in range(2)]
    idx = torch.randint(0, 48, (10, 4), generator=generator)
    idx[2, 1:] = -1
    with torch.no_grad():
        want = ours(features, idx)  # float32: SDPA
        assert calls == []
        got = ours.to(torch.bfloat16)([f.bfloat16() for f in features], idx)
    assert calls == [torch.bfloat16] and got.dtype == torch.bfloat16
    # bf16 keeps 8 bits: the features, the weights, the projections, the pooled vector and the projector's two
    # layers each round once, ~2^-8 of their magnitude each; a head or slot out of place would be off by ~1
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 8 * 2 ** -8
