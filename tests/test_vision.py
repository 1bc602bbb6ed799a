"""Our SigLIP2 against transformers' SiglipVisionModel, layer by layer, and its checkpoint loading."""

import pytest
import torch
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel
from transformers.models.molmo2.image_processing_molmo2 import batch_pixels_to_patches

from model import load_siglip
import vision
from vision import FeatureCache, SigLIP2, attend, siglip_config_from_hf, siglip_state_dict_from_hf

TINY_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   image_size=56, patch_size=14)


def random_siglip(seed=0):
    torch.manual_seed(seed)
    hf = SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP)).eval()
    with torch.no_grad():  # perturb every parameter: non-trivial LayerNorm affine and biases too
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


def pixels(n, seed=0):
    """Normalised pixels as the processor produces them, in [-1, 1]."""
    return torch.rand(n, 3, 56, 56, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def float32_ulps(n, reference):
    """n float32 ulps of the largest value of reference: transformers and we order the sums of LayerNorm,
    attention and the MLP differently (measured: 3 to 5 per hidden state of magnitude 3 to 7)."""
    return n * torch.finfo(torch.float32).eps * reference.abs().max()


def hf_and_our_hidden_states(hf, vit, images):
    """images (N, 3, H, W) -> (transformers' hidden_states, ours for every block)."""
    with torch.no_grad():
        expected = hf(pixel_values=images, output_hidden_states=True).hidden_states
        # Molmo2's processor flattens each 14x14 patch as (ph, pw, c): its own helper is the oracle here
        patches = batch_pixels_to_patches(images.permute(0, 2, 3, 1), 14)
        ours = [vit.embed(patches)] + vit(patches, list(range(len(vit.layers))))
    return expected, ours


def test_every_layer_matches_transformers():
    hf = random_siglip()
    vit = SigLIP2(siglip_config_from_hf(hf.config.to_dict()))
    vit.load_state_dict(siglip_state_dict_from_hf(hf.state_dict(), vit.config))
    expected, ours = hf_and_our_hidden_states(hf, vit, pixels(2))
    assert len(expected) == len(ours) == 4
    for i, (e, o) in enumerate(zip(expected, ours)):
        assert (e - o).abs().max() <= float32_ulps(16, e), f"hidden state {i}"


def test_stops_after_deepest_layer_asked():
    hf = random_siglip()
    vit = SigLIP2(siglip_config_from_hf(hf.config.to_dict()))
    vit.load_state_dict(siglip_state_dict_from_hf(hf.state_dict(), vit.config))
    ran = []
    for i, block in enumerate(vit.layers):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    out = vit(torch.zeros(1, 16, 588), [1, 0])
    assert ran == [0, 1] and len(out) == 2


def test_from_pretrained_vision_model_layout(tmp_path):
    hf = random_siglip(seed=1)
    hf.save_pretrained(tmp_path)
    vit = load_siglip(str(tmp_path))
    assert vit.config.num_hidden_layers == 3 and vit.config.image_size == 56
    expected, ours = hf_and_our_hidden_states(hf, vit, pixels(1))
    assert all((e - o).abs().max() <= float32_ulps(16, e) for e, o in zip(expected, ours))


def test_from_pretrained_full_siglip_layout_keeps_first_layers(tmp_path):
    # google/siglip2-so400m-patch14-384 is a SiglipModel checkpoint (vision + text towers, nested config)
    torch.manual_seed(2)
    full = SiglipModel(SiglipConfig(vision_config=TINY_SIGLIP, text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100)))
    full.save_pretrained(tmp_path)
    vit = load_siglip(str(tmp_path), num_layers=2)
    assert len(vit.layers) == 2
    expected, ours = hf_and_our_hidden_states(full.vision_model.eval(), vit, pixels(1))
    assert all((e - o).abs().max() <= float32_ulps(16, e) for e, o in zip(expected[:3], ours))


def test_bad_input_shape_names_the_input():
    vit = SigLIP2(siglip_config_from_hf(SiglipVisionConfig(**TINY_SIGLIP).to_dict()))
    try:
        vit(torch.zeros(1, 9, 588), [0])
    except ValueError as e:
        assert "vision input" in str(e)
    else:
        raise AssertionError("wrong patch count accepted")


def test_big_vision_init_draws_siglips_scales():
    """init_big_vision, the small preset's ViT (width 128, patches of 14 x 14 x 3 = 588 values): block matrices
    Xavier-uniform, inside +-sqrt(6 / (fan_in + fan_out)) with std that bound / sqrt(3); the patch embedding a normal
    truncated at +-2 std with variance 1 / 588; position embeddings of std 1 / sqrt(128); biases 0, LayerNorms 1 and 0.
    Tolerances: the std of n draws is off by about 1 / sqrt(2n) (0.6% for a 128 x 128 matrix): 3% is 5 such errors."""
    from vision import SigLIP2Config
    torch.manual_seed(0)
    vit = SigLIP2(SigLIP2Config.preset("small")).init_big_vision()
    for name, w in [("q_proj", vit.layers[0].self_attn.q_proj.weight), ("fc1", vit.layers[1].mlp.fc1.weight),
                    ("fc2", vit.layers[2].mlp.fc2.weight)]:
        bound = (6 / sum(w.shape)) ** 0.5
        assert w.abs().max() <= bound, name
        assert abs(w.std().item() / (bound / 3 ** 0.5) - 1) < 0.03, name
    w = vit.patch_embedding.weight
    assert w.shape == (128, 588)
    std = 588 ** -0.5 / 0.87962566103423978
    assert w.abs().max() <= 2 * std
    assert abs(w.var().item() * 588 - 1) < 0.03  # 75,264 draws
    assert abs(vit.positional_embedding.std().item() * 128 ** 0.5 - 1) < 0.04  # 8,192 draws
    assert all(not b.any() for n, b in vit.named_parameters() if n.endswith("bias") and "layer_norm" not in n)
    assert all(p.eq(1).all() for n, p in vit.named_parameters() if n.endswith("layer_norm1.weight"))
    # the default init is GPT's std 0.02: the two differ where it matters, in the queries and keys
    assert abs(SigLIP2(SigLIP2Config.preset("small")).layers[0].self_attn.q_proj.weight.std().item() - 0.02) < 0.001


def test_attend_runs_cpu_bf16_attention_in_float32():
    """vision.attend on a CPU: under bf16 autocast (float32 inputs) and with bf16 inputs it computes in float32 and
    returns bf16, so it equals the float32 kernel's output rounded once to bf16, exactly (the same float32 arithmetic,
    one rounding); autocast's own bf16 kernel rounds q, k, v, the scores and the output and differs. Gradients too.
    float32 and float64 inputs outside autocast go to the kernel untouched."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 64, 64, generator=g) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    plain = torch.nn.functional.scaled_dot_product_attention

    def grads(fn, *xs):
        xs = [x.detach().requires_grad_() for x in xs]
        out = fn(*xs)
        out.float().square().sum().backward()
        return out, [x.grad for x in xs]

    # reference: float32 throughout on inputs already rounded to bf16 (what a bf16 model hands it)
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    ref, ref_grads = grads(lambda a, b, c: plain(a.float(), b.float(), c.float(), attn_mask=mask).bfloat16(),
                           qb, kb, vb)
    out, out_grads = grads(lambda a, b, c: attend(a, b, c, attn_mask=mask), qb, kb, vb)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    for got, want in zip(out_grads, ref_grads):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, attn_mask=mask)
        autocast_kernel = plain(q, k, v, attn_mask=mask)
    want = plain(q, k, v, attn_mask=mask).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    assert autocast_kernel.dtype == torch.bfloat16 and not torch.equal(autocast_kernel, want)  # what attend avoids

    for dtype in (torch.float32, torch.float64):
        a, b, c = (x.to(dtype) for x in (q, k, v))
        assert torch.equal(attend(a, b, c, attn_mask=mask), plain(a, b, c, attn_mask=mask))


def test_attend_differentiates_unmasked_cpu_bf16_attention_by_the_math_backend_in_bf16(monkeypatch):
    """Stage 1's crops on a CPU under bf16 autocast (no mask, gradients wanted, eager): vision.attend hands them to
    SDPA's math backend with bf16 products (vision.math_bf16). Against float64 on the same bf16-rounded inputs, its
    output is within 4 bf16 roundings (unit roundoff 2^-8) at the values' scale (the scores, the probabilities, the
    products, the output), its gradients within 8 at theirs (the backward rounds twice as often); it is not the
    float32 kernel's answer (so that path did not run), and it leaves the global switch as it found it. Without
    gradients, or with CPU_MATH_BF16 off, the float32 kernel's answer rounded once, exactly."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, generator=g) for _ in range(3))
    plain = torch.nn.functional.scaled_dot_product_attention
    rounded = [x.bfloat16().double().requires_grad_() for x in (q, k, v)]
    want = plain(*rounded)
    want.square().sum().backward()
    float32_kernel = plain(q, k, v).bfloat16()  # the float32 path: autocast's float32 inputs as they are
    unit = 2.0 ** -8

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(*leaves)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    assert (out.double() - want).abs().max() <= 4 * unit * v.bfloat16().abs().max()
    for leaf, ref in zip(leaves, rounded):
        assert (leaf.grad.double() - ref.grad).abs().max() <= 8 * unit * ref.grad.abs().max()
    assert not torch.equal(out, float32_kernel)
    assert not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(attend(*leaves), float32_kernel)
    monkeypatch.setattr(vision, "CPU_MATH_BF16", False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(attend(*leaves), float32_kernel)


def test_cast_once_casts_a_shared_input_once_and_changes_no_value(monkeypatch):
    """vision.cast_once under CPU bf16 autocast: the ViT's attention, the LLM's attention and its MLP read their input
    through several Linears, which autocast would each cast to bf16; cast once first, their outputs are bit for bit
    what autocast's own casts give (the same float32 -> bf16 rounding), with two fewer float32 -> bf16 copies in the
    attentions and one fewer in the MLP (counted below autocast by a dispatch mode). The input's gradient then sums
    the branches in bf16, not float32: equal within bf16's 2^-8 per addition. Outside autocast it is x itself."""
    import model as llm_model
    import vision
    from torch.utils._python_dispatch import TorchDispatchMode
    from model import Attention, MLP, Qwen3Config, rope_cos_sin

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16 \
                    and args[0].dtype == torch.float32:
                self.n += 1
            return func(*args, **kwargs)

    torch.manual_seed(0)
    config = Qwen3Config.preset("tiny")
    cos, sin = rope_cos_sin(torch.arange(12)[None], config.head_dim, config.rope_theta, torch.float32)
    modules = {"vit attention": (vision.SelfAttention(vision.SigLIP2Config(**TINY_SIGLIP)), 32, (), 2),
               "llm attention": (Attention(config), config.hidden_size, (cos, sin), 2),
               "llm mlp": (MLP(config), config.hidden_size, (), 1)}
    x0 = torch.randn(2, 12, 64)
    for name, (module, width, extra, fewer) in modules.items():
        runs = {}
        for once in (True, False):
            if not once:  # what autocast alone does
                for where in (vision, llm_model):
                    monkeypatch.setattr(where, "cast_once", lambda x: x)
            x = x0[..., :width].clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16), Casts() as casts:
                # x * 1, not x: autocast caches the casts of leaf tensors that need gradients (the weights), and a
                # model's activations are not leaves
                out = module(x * 1, *extra)
            out.float().square().sum().backward()
            runs[once] = out, x.grad, casts.n
            monkeypatch.undo()
        (out, grad, n), (want, want_grad, n_want) = runs[True], runs[False]
        assert torch.equal(out, want), name
        assert n == n_want - fewer, (name, n, n_want)
        torch.testing.assert_close(grad, want_grad, rtol=2 ** -6, atol=2 ** -6 * float(want_grad.abs().max()))
    assert vision.cast_once(x0) is x0


def frozen_vit(seed=0):
    hf = random_siglip(seed)
    vit = SigLIP2(siglip_config_from_hf(hf.config.to_dict()))
    vit.load_state_dict(siglip_state_dict_from_hf(hf.state_dict(), vit.config))
    return vit.eval().requires_grad_(False)


def crops(n, seed):
    return torch.rand(n, 16, 588, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_take_rows_is_advanced_indexing_with_its_gradients():
    """take_rows (index_select) against PyTorch's own x[index]: the same rows, and the same gradients bit for bit
    where at most one nonzero gradient reaches a row, as where the model uses it; where several do, their sums."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 7, generator=gen)
    index = torch.randint(0, 50, (4, 6), generator=gen)
    index[0] = index[1]  # rows gathered twice: a zero gradient on one of the copies, as a text token's
    grad_out = torch.randn(4, 6, 3, 7, generator=gen)
    grad_out[0] = 0.0
    grads = []
    for gather in (lambda t: t[index], lambda t: vision.take_rows(t, index)):
        leaf = x.clone().requires_grad_()
        out = gather(leaf)
        out.backward(grad_out)
        grads.append((out.detach(), leaf.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and grads[1][0].shape == (4, 6, 3, 7)
    assert torch.equal(grads[0][1], grads[1][1])
    # several nonzero gradients into one row: ones, so each sum is its row's count exactly in any order
    leaf = x.clone().requires_grad_()
    vision.take_rows(leaf, index).backward(torch.ones(4, 6, 3, 7))
    counts = torch.bincount(index.flatten(), minlength=50).float()
    torch.testing.assert_close(leaf.grad, counts[:, None, None].expand(50, 3, 7), rtol=0, atol=0)


def test_feature_cache_gives_the_vits_features_and_skips_crops_met_before():
    vit = frozen_vit()
    first, new = crops(3, seed=1), crops(1, seed=2)
    expected_first = vit.encode(first, [2, 0])
    expected_new = vit.encode(new, [2, 0])
    vit.feature_cache = FeatureCache(max_bytes=2**20)
    ran = []
    vit.layers[0].register_forward_hook(lambda module, args, out: ran.append(args[0].shape[0]))
    out = vit(first, [2, 0])
    # all three new: computed as one batch, the same batch as without the cache, so the same floats
    assert all(torch.equal(o, e) for o, e in zip(out, expected_first))
    again = vit(torch.cat([first[2:], new, first[:1]]), [2, 0])  # two crops met before, in another order, one new
    assert ran == [3, 1]  # the second call ran the ViT on the new crop alone
    for o, e_first, e_new in zip(again, expected_first, expected_new):
        assert torch.equal(o[0], e_first[2]) and torch.equal(o[2], e_first[0])
        assert torch.equal(o[1], e_new[0])  # computed alone: a batch of one, as expected_new was
    assert (vit.feature_cache.hits, vit.feature_cache.misses) == (2, 4)
    other_layers = vit(first[:1], [1])  # other blocks asked for: other keys, not block 2's features
    assert torch.equal(other_layers[0], vit.encode(first[:1], [1])[0]) and ran[-1] == 1


def test_feature_cache_keeps_float32_and_autocast_features_apart():
    """The same crops under CPU bf16 autocast are other work (bf16 products): the cache runs the ViT on them again and
    answers each mode with its own features, never the other's."""
    vit = frozen_vit()
    batch = crops(2, seed=5)
    expected_fp32 = vit.encode(batch, [2])[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_bf16 = vit.encode(batch, [2])[0]
    assert not torch.equal(expected_fp32, expected_bf16.float())  # the two modes differ, so a mix-up would show
    vit.feature_cache = FeatureCache(max_bytes=2**20)
    assert torch.equal(vit(batch, [2])[0], expected_fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(vit(batch, [2])[0], expected_bf16)  # computed: the float32 features are not its
        assert torch.equal(vit(batch, [2])[0], expected_bf16)  # kept
    assert torch.equal(vit(batch, [2])[0], expected_fp32)
    assert (vit.feature_cache.hits, vit.feature_cache.misses) == (4, 4)


def test_feature_cache_keeps_at_most_max_bytes_and_still_answers():
    vit = frozen_vit()
    batch = crops(3, seed=3)
    expected = vit.encode(batch, [2])
    one_crop = expected[0][0].numel() * expected[0].element_size()
    vit.feature_cache = FeatureCache(max_bytes=2 * one_crop)
    assert torch.equal(vit(batch, [2])[0], expected[0])
    assert len(vit.feature_cache.store) == 2 and vit.feature_cache.bytes == 2 * one_crop
    again = vit(batch, [2])[0]
    assert torch.equal(again[:2], expected[0][:2])  # kept
    assert torch.equal(again[2], vit.encode(batch[2:], [2])[0][0])  # not kept: computed again, alone
    assert (vit.feature_cache.hits, vit.feature_cache.misses) == (2, 4)


def test_feature_cache_refuses_a_vit_that_learns():
    vit = frozen_vit().requires_grad_(True)
    vit.feature_cache = FeatureCache(max_bytes=2**20)
    with pytest.raises(ValueError, match="the ViT learns"):
        vit(crops(1, seed=4), [0])
    with torch.no_grad():  # no gradient taken (validation, generation): its features are what they are now
        assert len(vit(crops(1, seed=4), [0])) == 1
