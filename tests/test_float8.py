"""train_joint.py's float8 (vision.Float8Matmul, Float8Linear; Float8RowwiseMatmul for float8_rowwise) on a CPU, whose
torch._scaled_mm computes what a GPU's float8 tensor cores compute: each matmul against float64 arithmetic on the
same float8 operands, the rounding into float8 against its format's step, and the switch leaving evaluation exactly
as it was."""

import pytest
import torch
import torch.nn as nn

from model import Molmo2, Molmo2Config
import vision
from vision import (FLOAT8_LARGEST, Float8Linear, Float8Matmul, Float8RowwiseMatmul, float8_linears, to_float8,
                    to_float8_rows)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MANTISSA_BITS = {E4M3: 3, E5M2: 2}
SMALLEST_NORMAL = {E4M3: 2.0 ** -6, E5M2: 2.0 ** -14}


def randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def largest_error(got, want):
    """got's largest difference from want (float64), relative to want's largest magnitude."""
    return ((got.double().reshape(want.shape) - want).abs().max() / want.abs().max()).item()


def matmul_run(matmul):
    """matmul (a float8 Function) on 50 tokens (not a multiple of 16: the tensorwise weight gradient's padding runs),
    64 in, 48 out, a bias, under bf16 autocast as a GPU trains, then backward from a bf16 gradient:
    (x, weight, bias, grad, y), their gradients filled in."""
    x = randn(2, 25, 64, seed=1).requires_grad_()
    weight = randn(48, 64, seed=2, scale=0.1).requires_grad_()
    bias = randn(48, seed=3).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the output in autocast's dtype
        y = matmul.apply(x, weight, bias)
    grad = randn(2, 25, 48, seed=4).to(torch.bfloat16)
    y.backward(grad)
    return x, weight, bias, grad, y


def test_to_float8_maps_the_largest_magnitude_onto_the_formats_largest_and_rounds_to_the_nearest():
    t = randn(300, 40, seed=0, scale=3.0)
    for dtype in (E4M3, E5M2):
        q, inverse = to_float8(t, dtype)
        assert q.dtype == dtype and inverse.dtype == torch.float32 and inverse.shape == ()
        assert q.float().abs().max().item() == FLOAT8_LARGEST[dtype]
        # round to nearest: within half a step of the format (2^-(mantissa+1) of the value) where it is normal; the
        # float32 scaling before and after adds a few float32 ulps (1e-6 relative covers them)
        normal = q.float().abs() >= SMALLEST_NORMAL[dtype]
        relative = ((q.float() * inverse - t).abs() / t.abs())[normal]
        assert normal.float().mean() > 0.99
        assert relative.max().item() <= 2.0 ** -(MANTISSA_BITS[dtype] + 1) * (1 + 1e-6)
        assert relative.max().item() > 2.0 ** -(MANTISSA_BITS[dtype] + 3)  # it rounded: not float32 in disguise


def test_to_float8_rows_scales_each_row_onto_the_formats_largest():
    t = randn(300, 40, seed=0, scale=3.0) * torch.logspace(-3, 3, 300).unsqueeze(1)  # rows 6 decades apart
    q, inverse = to_float8_rows(t)
    assert q.dtype == E4M3 and inverse.dtype == torch.float32 and inverse.shape == (300, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((300,), FLOAT8_LARGEST[E4M3]))
    normal = q.float().abs() >= SMALLEST_NORMAL[E4M3]  # each row's own scale keeps its small rows normal too
    relative = ((q.float() * inverse - t).abs() / t.abs())[normal]
    assert normal.float().mean() > 0.99
    assert relative.max().item() <= 2.0 ** -(MANTISSA_BITS[E4M3] + 1) * (1 + 1e-6)


def test_the_three_matmuls_are_float64_arithmetic_on_the_float8_operands():
    x, weight, bias, grad, y = matmul_run(Float8Matmul)

    xq, x_scale = to_float8(x.detach().reshape(50, 64), E4M3)
    wq, w_scale = to_float8(weight.detach(), E4M3)
    gq, g_scale = to_float8(grad.reshape(50, 48), E5M2)
    xd, wd, gd = ((q.double() * s.double()) for q, s in ((xq, x_scale), (wq, w_scale), (gq, g_scale)))
    want_y = xd @ wd.T + bias.detach().to(torch.bfloat16).double()
    want_gx, want_gw = gd @ wd, gd.T @ xd

    # y and x's gradient come out in bf16: one rounding of 2^-9 relative, two at most (the bias added after) 2^-8
    assert y.dtype == torch.bfloat16 and y.shape == (2, 25, 48)
    assert largest_error(y, want_y) <= 2.0 ** -8
    assert largest_error(x.grad, want_gx) <= 2.0 ** -8
    # (the bf16 gradient of a bf16 output, as under a GPU's autocast); the weight's gradient in float32: the
    # products of float8 numbers are exact, 50 of them summed in float32
    assert weight.grad.dtype == torch.float32
    assert largest_error(weight.grad, want_gw) <= 50 * torch.finfo(torch.float32).eps
    # the bias's gradient summed over the 50 tokens in float32 and kept so (vision.bias_gradient): the
    # roundings of 50 float32 additions
    assert largest_error(bias.grad, grad.double().sum((0, 1))) <= 50 * torch.finfo(torch.float32).eps


def test_the_rowwise_matmuls_are_float64_arithmetic_on_the_float8_operands_and_the_weight_gradient_bf16():
    x, weight, bias, grad, y = matmul_run(Float8RowwiseMatmul)

    xq, x_scale = to_float8_rows(x.detach().reshape(50, 64))
    wq, w_scale = to_float8_rows(weight.detach())
    gq, g_scale = to_float8_rows(grad.reshape(50, 48))
    wtq, wt_scale = to_float8_rows(weight.detach().t().contiguous())  # a scale for each input's column
    xd, wd, gd, wtd = ((q.double() * s.double()) for q, s in
                       ((xq, x_scale), (wq, w_scale), (gq, g_scale), (wtq, wt_scale)))
    want_y = xd @ wd.T + bias.detach().to(torch.bfloat16).double()
    want_gx = gd @ wtd.T
    # the weight's gradient: bf16 operands (x as autocast keeps it), as nn.Linear's under autocast
    want_gw = grad.reshape(50, 48).double().T @ x.detach().reshape(50, 64).to(torch.bfloat16).double()

    # bf16 outputs: one rounding of 2^-9 relative, two at most (the bias added after) 2^-8
    assert y.dtype == torch.bfloat16 and y.shape == (2, 25, 48)
    assert largest_error(y, want_y) <= 2.0 ** -8
    assert largest_error(x.grad, want_gx) <= 2.0 ** -8
    assert weight.grad.dtype == torch.float32 and largest_error(weight.grad, want_gw) <= 2.0 ** -8
    assert largest_error(bias.grad, grad.double().sum((0, 1))) <= 50 * torch.finfo(torch.float32).eps


def test_stacked_rowwise_linears_equal_them_one_by_one(monkeypatch):
    """vision.linears' one matmul against stacked weights (a GPU's training path): row scales belong to a token of x
    and to an output of a weight, so stacking changes none of them."""
    layers = [nn.Linear(64, n) for n in (32, 16, 16)]
    for seed, layer in enumerate(layers):
        layer.weight.data = randn(*layer.weight.shape, seed=10 + seed, scale=0.1)
        layer.bias.data = randn(layer.out_features, seed=20 + seed)
    float8_linears(*layers, rowwise=True)
    x = randn(30, 64, seed=8)
    alone = [layer(x) for layer in layers]
    monkeypatch.setattr(vision, "stacks_linears", lambda x: True)
    stacked = vision.linears(x, *layers)
    for a, b in zip(alone, stacked):
        # the same float8 products summed in float32, then one bf16 rounding (2^-9 relative to the largest)
        assert largest_error(b, a.double()) <= 2.0 ** -9


@pytest.mark.parametrize("matmul", [Float8Matmul, Float8RowwiseMatmul])
def test_a_frozen_weight_gets_no_gradient_and_costs_no_matmul(matmul):
    x = randn(20, 32, seed=5).requires_grad_()
    weight = randn(16, 32, seed=6)
    matmul.apply(x, weight, None).float().sum().backward()
    assert weight.grad is None and x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("matmul", [Float8Matmul, Float8RowwiseMatmul])
def test_a_frozen_weight_beside_a_learning_bias_gives_the_bias_its_gradient(matmul):
    x = randn(20, 32, seed=5).requires_grad_()
    weight, bias = randn(16, 32, seed=6), torch.zeros(16, requires_grad=True)
    matmul.apply(x, weight, bias).float().sum().backward()
    # the output's gradient is all ones, so each bias's is the 20 tokens' count, exact in any float
    assert weight.grad is None and torch.equal(bias.grad, torch.full((16,), 20.0))


def test_float8_linears_change_only_the_blocks_and_leave_evaluation_exact():
    torch.manual_seed(0)
    model = Molmo2(Molmo2Config.preset("tiny")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = randn(3, model.config.llm.hidden_size, seed=7)
    block = model.llm.layers[0].mlp
    with torch.no_grad():
        plain = block(x)
    n = float8_linears(*model.vit.layers, *model.llm.layers)
    # each ViT block: q, k, v, o and the MLP's two; each LLM block: q, k, v, o and gate, up, down
    assert n == 6 * len(model.vit.layers) + 7 * len(model.llm.layers)
    assert all(type(m) is nn.Linear for m in model.connector.modules() if isinstance(m, nn.Linear))
    assert type(block.down_proj) is Float8Linear and isinstance(block.down_proj, nn.Linear)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():  # no gradients: nn.Linear's own arithmetic, bit for bit
        assert torch.equal(block(x), plain)
    trained = block(x)  # gradients on: float8 (the output in x's float32, no autocast here)
    assert trained.dtype == torch.float32 and not torch.equal(trained, plain)
    # three float8 matmuls in a row (gate, up, then down on their product), each operand within 2^-4 of itself
    # (e4m3), the output rounded to bf16: within a few of those steps of the largest value, well inside 0.1
    assert ((trained.float() - plain).abs().max() / plain.abs().max()).item() < 0.1


@pytest.mark.parametrize("rowwise", [False, True])
def test_train_joint_in_float8_follows_the_same_run_in_float32(tiny_world, tmp_path, monkeypatch, capsys, rowwise):
    """train_joint.py --float8=True (and --float8_rowwise=True), three steps from the same start on the same batches
    (no dropout), against the run without it: each operand's float8 rounding is at most 2^-4 (e4m3) or 2^-3 (e5m2)
    of itself and independent from element to element, so a loss summed over many such products moves far less
    (3e-4 relative here, 1e-4 by rows; 2^-9 the bound) and the gradient norm a little more (1.5% here, 0.7% by
    rows; 2^-4 the bound)."""
    from test_training import TINY, mixture_args, read_log, run_stage_in_process

    args = [*TINY, *mixture_args(tiny_world), "--max_steps=3", "--save_every=0", "--resid_dropout=0.0",
            "--lr_connector=3e-3", "--lr_vit=2e-3", "--lr_llm=1e-3", "--warmup_llm=0", "--warmup_connector=0"]
    run_stage_in_process("train_joint.py", [f"--out_dir={tmp_path / 'float32'}", *args], monkeypatch)
    float8_args = ["--float8=True", f"--float8_rowwise={rowwise}"]
    run_stage_in_process("train_joint.py", [f"--out_dir={tmp_path / 'float8'}", *args, *float8_args], monkeypatch)
    said = "float8: the blocks' 32 Linears multiply in float8" + ", scaled a row at a time" * rowwise
    assert said in capsys.readouterr().out  # 3 ViT + 2 LLM blocks
    plain, float8 = read_log(tmp_path / "float32"), read_log(tmp_path / "float8")
    assert len(plain) == len(float8) == 3
    for a, b in zip(plain, float8):
        assert b["loss"] != a["loss"] and b["loss"] == pytest.approx(a["loss"], rel=2 ** -9)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2 ** -4)


def test_float8_rowwise_alone_is_refused_by_name(tiny_world, tmp_path, monkeypatch):
    from test_training import TINY, mixture_args, run_stage_in_process

    args = [*TINY, *mixture_args(tiny_world), "--max_steps=1", f"--out_dir={tmp_path}", "--float8_rowwise=True"]
    with pytest.raises(SystemExit, match="float8_rowwise=True says how to scale float8=True's matmuls"):
        run_stage_in_process("train_joint.py", args, monkeypatch)


@pytest.mark.parametrize("rowwise", [False, True])
def test_a_compiled_block_in_float8_is_one_graph_and_computes_what_eager_does(rowwise, monkeypatch):
    """A SigLIP2 block as compile_each_block compiles it for a GPU (its q, k, v stacked, bf16 autocast), here with
    inductor's CPU code: no graph break (a torch.cat of float8 tensors once broke it), and, within rounding, the forward
    and gradients of the block run eagerly. Inductor skips some of eager's bf16 roundings before a cast, which can move
    an element to the neighbouring float8 value, up to one e5m2 step (2^-3) of it: every output and gradient stays
    within 2^-3 of its largest value (0.066 at most here). The key bias's gradient is left out: softmax ignores a
    constant added to a query's every score, so its true value is 0 and both runs hold only rounding noise."""
    from vision import Block, SigLIP2Config

    monkeypatch.setattr(vision, "stacks_linears", lambda x: torch.is_grad_enabled())
    torch.manual_seed(0)
    block = Block(SigLIP2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16))
    float8_linears(block, rowwise=rowwise)
    x = randn(2, 24, 64, seed=9)

    def run(module):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(xi)
        y.float().square().mean().backward()
        grads = {name: p.grad for name, p in block.named_parameters() if name != "self_attn.k_proj.bias"}
        block.zero_grad(set_to_none=True)
        return {"y": y.detach(), "x": xi.grad, **grads}

    eager = run(block)
    torch._dynamo.reset()
    compiled = run(torch.compile(block, fullgraph=True))
    assert eager.keys() == compiled.keys() and len(eager) == 17
    for name, a in eager.items():
        assert largest_error(compiled[name], a.double()) < 2.0 ** -3, name
