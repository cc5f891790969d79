"""sysopt.precision: recipes, the low-precision linear (numerics per GEMM), delayed scaling, overflow
detection, convert() and precision='auto'."""

import copy
import importlib
import logging
import os
from dataclasses import replace

os.environ["TRITON_INTERPRET"] = "1"  # for the one test that runs the layer on the Triton kernels

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import sysopt.precision as P  # noqa: E402
from sysopt import kernels  # noqa: E402
from sysopt.hardware.profile import Calibration, CPUInfo, GPUInfo, HardwareProfile, MatmulPoint  # noqa: E402
from sysopt.kernels.formats import MANTISSA_BITS, MIN_NORMAL_EXP, QMAX  # noqa: E402
from sysopt.precision import scaling  # noqa: E402

DTYPE_OF = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "int8": torch.int8}


def _layer(recipe, in_features=96, out_features=80, seed=0):
    torch.manual_seed(seed)
    return P.LowPrecisionLinear.from_linear(nn.Linear(in_features, out_features), recipe)


def _elementwise_error(t: torch.Tensor, fmt: str, pow2: bool) -> torch.Tensor:
    """Upper bound on |t - dequant(quant(t))| per element for format `fmt`, valid for any scaling group
    (a group's amax is at most the tensor's) and for power-of-two scales (at most 2x larger)."""
    a = t.abs().double()
    if fmt == "high":
        return torch.zeros_like(a)
    if fmt == "bf16":
        return a * 2.0**-9
    dtype = DTYPE_OF[fmt]
    scale = a.max() / QMAX[dtype] * (2 if pow2 else 1)
    fp32_rounding = a * 2.0**-22
    if dtype == torch.int8:
        return scale / 2 + fp32_rounding
    m, e = MANTISSA_BITS[dtype], MIN_NORMAL_EXP[dtype]
    return torch.maximum(a * 2.0 ** -(m + 1), scale * 2.0 ** (e - m - 1)) + fp32_rounding


def _gemm_bound(a, b, formats, pow2):
    """|low(a @ b.T) - a @ b.T| <= Ea|b| + |a|Eb + EaEb + fp32 accumulation (+ bf16 output rounding)."""
    ea, eb = _elementwise_error(a, formats[0], pow2), _elementwise_error(b, formats[1], pow2)
    aa, bb = a.abs().double(), b.abs().double()
    bound = ea @ bb.t() + aa @ eb.t() + ea @ eb.t() + a.shape[1] * 2.0**-23 * (aa @ bb.t())
    if formats[0] == "bf16":
        bound += (a.double() @ b.double().t()).abs() * 2.0**-8
    return bound


@pytest.mark.parametrize("name", sorted(P.RECIPES))
def test_linear_forward_backward_within_format_bounds(name):
    recipe = P.recipe(name)
    layer = _layer(recipe)
    x = (torch.randn(2, 30, 96) * torch.linspace(0.1, 10, 96)).requires_grad_()
    dy = torch.randn(2, 30, 80)
    y = layer(x)
    y.backward(dy)
    w, x2, dy2 = layer.weight.detach(), x.detach().reshape(-1, 96), dy.reshape(-1, 80)
    pow2 = recipe.power_of_two_scales
    checks = {
        "forward": (y.detach().reshape(-1, 80) - layer.bias.detach(), x2 @ w.t(), x2, w),
        "grad_input": (x.grad.reshape(-1, 96), dy2 @ w, dy2, w.t()),
        "grad_weight": (layer.weight.grad, dy2.t() @ x2, dy2.t(), x2.t()),
    }
    for gemm, (got, exact, a, b) in checks.items():
        err = (got.double() - exact.double()).abs()
        bound = _gemm_bound(a, b, getattr(recipe, gemm), pow2)
        assert (err <= bound).all(), f"{name} {gemm}: max excess {(err - bound).max().item():.3g}"
        if recipe.is_low_precision(gemm):
            assert err.max() > 0, f"{name} {gemm} was not quantised"
    assert torch.equal(layer.bias.grad, dy2.sum(0))
    assert P.check_finite(layer)


def _spy(monkeypatch):
    """Record the dtypes of every scaled GEMM the layer runs."""
    calls = []
    real = kernels.scaled_mm

    def spy(a, a_scale, b, b_scale, **kw):
        calls.append((tuple(a.shape), tuple(b.shape), a.dtype, b.dtype))
        return real(a, a_scale, b, b_scale, **kw)

    monkeypatch.setattr(kernels, "scaled_mm", spy)
    return calls


@pytest.mark.parametrize("name", sorted(P.RECIPES))
def test_recipe_gemm_formats_are_honoured(name, monkeypatch):
    recipe = P.recipe(name)
    calls = _spy(monkeypatch)
    layer = _layer(recipe, 64, 48)
    x = torch.randn(20, 64, requires_grad=True)
    layer(x).backward(torch.randn(20, 48))
    shapes = {
        "forward": ((20, 64), (48, 64)),
        "grad_input": ((20, 48), (64, 48)),
        "grad_weight": ((48, 20), (64, 20)),
    }
    expected = [
        (*shapes[g], DTYPE_OF[getattr(recipe, g)[0]], DTYPE_OF[getattr(recipe, g)[1]])
        for g in P.GEMMS
        if recipe.is_low_precision(g)
    ]
    assert calls == expected


def test_int8_rowwise_grad_weight_is_high_precision():
    """SwitchBack: the grad-weight GEMM takes no int8 path; given the same grad-output it equals the fp32
    GEMM exactly (grad_weight='high'), or the bf16 GEMM (the named recipe) to its output rounding."""
    x = torch.randn(40, 96)
    dy = torch.randn(40, 80)
    layer = _layer(replace(P.recipe("int8_rowwise"), grad_weight="high"))
    layer(x).backward(dy)
    assert torch.equal(layer.weight.grad, dy.t() @ x)
    layer = _layer(P.recipe("int8_rowwise"))
    layer(x).backward(dy)
    exact = dy.bfloat16().double().t() @ x.bfloat16().double()  # products of bf16 values, summed exactly
    bound = exact.abs() * 2.0**-8 + 40 * 2.0**-23 * (
        dy.bfloat16().double().abs().t() @ x.bfloat16().double().abs()
    )
    assert ((layer.weight.grad.double() - exact).abs() <= bound).all()


def test_int8_rowwise_full_grad_weight_uses_per_channel_scales_along_tokens():
    """int8_rowwise_full: grad-weight is an int8 GEMM whose operands dy (T, N) and x (T, K) are scaled per
    channel, each scale from that channel's amax over the T tokens (the contraction dim). Reference: the
    quantisation spec of sysopt.kernels.formats written out here, products summed exactly in float64."""
    torch.manual_seed(3)
    x = torch.randn(40, 96) * torch.linspace(0.1, 10, 96)
    dy = torch.randn(40, 80) * torch.linspace(5, 0.2, 80)
    layer = _layer(P.recipe("int8_rowwise_full"))
    layer(x).backward(dy)

    def per_channel(t):  # columns of t (tokens, channels): scale = amax / 127, q = round(t * (1 / scale))
        scale = t.abs().amax(dim=0) / 127.0
        return torch.round(t * scale.reciprocal()), scale.double()

    q_dy, s_dy = per_channel(dy)
    q_x, s_x = per_channel(x)
    exact = (q_dy.double().t() @ q_x.double()) * s_dy[:, None] * s_x[None, :]
    torch.testing.assert_close(layer.weight.grad.double(), exact, rtol=2e-6, atol=0.0)
    switchback = _layer(P.recipe("int8_rowwise"))
    switchback(x).backward(dy)
    assert not torch.equal(switchback.weight.grad, layer.weight.grad)  # a different GEMM from SwitchBack


@pytest.mark.parametrize("fmt", ["int8", "e4m3"])
@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise"])
def test_quantizing_a_transposed_view_equals_quantizing_its_copy(fmt, granularity, monkeypatch):
    """Grad-weight quantises dy.t() and x.t(): the torch kernels work on the contiguous memory (column amax in
    chunks, cast without transposing writes) and must give the same bits and scales as a transposed copy,
    and as the Triton twin; the scaled GEMM must accept the resulting column-major operands."""
    from sysopt.kernels import gemm_ref, quantize_ref, quantize_triton

    monkeypatch.setattr(quantize_ref, "_CHUNK_ELEMENTS", 300)  # several chunks on a small tensor
    dtype = DTYPE_OF[fmt]
    g = torch.Generator().manual_seed(4)
    a = torch.randn(50, 36, generator=g) * torch.logspace(-2, 2, 36)
    b = torch.randn(50, 28, generator=g)
    qa, sa = quantize_ref.quantize(a.t(), dtype, granularity)
    qa_copy, sa_copy = quantize_ref.quantize(a.t().contiguous(), dtype, granularity)
    qa_tri, sa_tri = quantize_triton.quantize(a.t(), dtype, granularity)
    bits = (lambda q: q.view(torch.uint8)) if fmt != "int8" else (lambda q: q)
    assert qa.shape == (36, 50) and torch.equal(sa, sa_copy) and torch.equal(sa, sa_tri)
    assert torch.equal(bits(qa), bits(qa_copy)) and torch.equal(bits(qa), bits(qa_tri))
    qb, sb = quantize_ref.quantize(b.t(), dtype, granularity)
    got = gemm_ref.scaled_mm(qa, sa, qb, sb)
    want = gemm_ref.scaled_mm(qa.contiguous(), sa, qb.contiguous(), sb)
    assert torch.equal(got, want)


def test_high_precision_forward_equals_nn_linear():
    recipe = P.Recipe(
        "fwd_high", forward="high", grad_input="int8", grad_weight="int8", granularity="rowwise"
    )
    layer = _layer(recipe)
    x = torch.randn(7, 96)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_delayed_scaling_uses_amax_history(monkeypatch):
    """Scale at step t comes from max(amax[t-H:t]); a spike saturates its own step (finite output) and
    raises the scale for the next H steps; the history holds the latest H amaxes."""
    recipe = replace(P.recipe("fp8_tensorwise_delayed"), amax_history_len=3)
    layer = _layer(recipe, 32, 16)
    used = []
    real = kernels.quantize_with_amax

    def spy(x, dtype, amax, **kw):
        q, scale, x_amax = real(x, dtype, amax, **kw)
        if x.shape == (8, 32):  # the input operand
            used.append((amax.item(), q.float().abs().max().item()))
        return q, scale, x_amax

    monkeypatch.setattr(kernels, "quantize_with_amax", spy)
    base = torch.randn(8, 32)
    base = base / base.abs().max()
    amaxes = [1.0, 8.0, 2.0, 3.0, 0.5, 0.5]
    for a in amaxes:
        y = layer(base * a)
        assert torch.isfinite(y).all()
    # step 0 used current scaling; steps 1.. used the history max of the previous (up to) 3 amaxes
    assert [u[0] for u in used] == [max(amaxes[max(0, t - 3) : t]) for t in range(1, len(amaxes))]
    assert used[0][1] == 448.0  # the 8x spike saturated at qmax in its own step
    assert layer.amax_history[0].tolist() == [0.5, 0.5, 3.0]
    assert torch.allclose(layer.amax_history[1], layer.weight.detach().abs().max().expand(3))
    # checkpointed (persistent) for delayed scaling only
    assert "amax_history" in layer.state_dict()
    assert "amax_history" not in _layer(P.recipe("fp8_rowwise")).state_dict()


def test_delayed_scaling_state_survives_a_checkpoint_and_eval_freezes_it():
    """A layer restored from a state_dict quantises its next batch exactly as the layer that saved it
    (the history is used, not the first-use fallback), and eval mode reads the history without writing
    it, so an evaluation leaves training unchanged and does not depend on its batch order."""
    recipe = P.recipe("fp8_tensorwise_delayed")
    layer = _layer(recipe, 32, 16)
    torch.manual_seed(1)
    for a in (4.0, 1.0, 0.5):
        x = (torch.randn(8, 32) * a).requires_grad_()
        layer(x).sum().backward()
    restored = _layer(recipe, 32, 16, seed=7)
    restored.load_state_dict(layer.state_dict())
    nxt = torch.randn(8, 32) * 0.25  # quieter than the history: a fallback to current scaling would differ
    assert torch.equal(restored(nxt), layer(nxt))
    assert torch.equal(restored.amax_history, layer.amax_history)

    layer.eval()
    before = layer.amax_history.clone()
    a, b = torch.randn(8, 32) * 3.0, torch.randn(8, 32) * 0.1
    with torch.no_grad():
        ya = layer(a)
        layer(b)
        assert torch.equal(layer(a), ya)
    assert torch.equal(layer.amax_history, before)
    layer.train()
    layer(b)
    assert not torch.equal(layer.amax_history, before)  # training mode records again


def test_load_state_dict_with_assign_keeps_the_scaling_state_on_the_loaded_history():
    """load_state_dict(assign=True) replaces the amax_history buffer object: the layer's ScalingState must
    use (and record into) the loaded tensor, as after a plain load, not the tensor it replaced."""
    recipe = P.recipe("fp8_tensorwise_delayed")
    layer = _layer(recipe, 32, 16)
    torch.manual_seed(1)
    for a in (4.0, 1.0, 0.5):
        layer((torch.randn(8, 32) * a).requires_grad_()).sum().backward()
    restored = _layer(recipe, 32, 16, seed=7)
    restored.load_state_dict(copy.deepcopy(layer.state_dict()), assign=True)
    assert restored.scaling_state.amax_history is restored.amax_history
    nxt = torch.randn(8, 32) * 0.25  # quieter than the history: the first-use fallback would differ
    assert torch.equal(restored(nxt), layer(nxt))
    assert torch.equal(restored.state_dict()["amax_history"], layer.amax_history)  # recorded where saved


def test_state_dict_loads_across_a_recipe_change():
    """A resumed run may change its recipe: a current-scaling layer drops a saved history, a delayed one
    loading a checkpoint without a history starts empty (quantising as a new delayed layer does), and a
    history of another length keeps its most recent amaxes. All with strict loading."""
    delayed, current = P.recipe("fp8_tensorwise_delayed"), P.recipe("fp8_rowwise")
    src = _layer(delayed, 32, 16)
    torch.manual_seed(1)
    for a in (4.0, 1.0, 0.5):
        src((torch.randn(8, 32) * a).requires_grad_()).sum().backward()
    dst = _layer(current, 32, 16, seed=7)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.weight, src.weight)

    used = _layer(delayed, 32, 16, seed=7)
    used(torch.randn(8, 32) * 9.0)  # a history of its own, which the load must not keep
    used.load_state_dict(dst.state_dict())
    fresh = _layer(delayed, 32, 16, seed=7)
    fresh.load_state_dict(dst.state_dict())
    assert used.amax_history.abs().sum() == 0 and not any(used.scaling_state.seen.values())
    for a in (0.25, 2.0):  # first use: current scaling; then the history both recorded alike
        x = torch.randn(8, 32) * a
        assert torch.equal(used(x), fresh(x))

    longer = _layer(replace(delayed, amax_history_len=2 * delayed.amax_history_len), 32, 16, seed=7)
    longer.load_state_dict(src.state_dict())
    h = delayed.amax_history_len
    assert (
        torch.equal(longer.amax_history[:, :h], src.amax_history)
        and longer.amax_history[:, h:].abs().sum() == 0
    )
    shorter = _layer(replace(delayed, amax_history_len=2), 32, 16, seed=7)
    shorter.load_state_dict(src.state_dict())
    assert torch.equal(shorter.amax_history, src.amax_history[:, :2])


def test_nonfinite_forward_is_flagged_and_step_skipped(caplog):
    model = nn.Sequential(nn.Linear(8, 8), _layer(P.recipe("int8_rowwise"), 96, 80))
    x = torch.randn(4, 96)
    x[1, 2] = float("inf")
    model[1](x)
    assert P.nonfinite_layers(model) == [("1", "forward")]
    with caplog.at_level(logging.WARNING, logger="sysopt.precision.overflow"):
        assert P.check_finite(model) is False
    assert "1.forward" in caplog.text and "skip" in caplog.text
    assert P.check_finite(model) is True  # flags were reset
    model[1](torch.randn(4, 96))
    assert P.check_finite(model) is True


def test_nonfinite_gradient_is_flagged_and_can_raise():
    layer = _layer(P.recipe("fp8_rowwise"))
    x = torch.randn(4, 96, requires_grad=True)
    dy = torch.randn(4, 80)
    dy[0, 0] = float("nan")
    layer(x).backward(dy)
    with pytest.raises(P.NonFiniteError) as info:
        P.check_finite(layer, raise_error=True)
    assert ("", "grad_input") in info.value.where and ("", "grad_weight") in info.value.where


def test_delayed_history_is_not_poisoned_by_inf():
    layer = _layer(P.recipe("fp8_tensorwise_delayed"), 32, 16)
    layer(torch.randn(8, 32))
    bad = torch.randn(8, 32)
    bad[0, 0] = float("inf")
    layer(bad)
    assert not P.check_finite(layer)
    assert torch.isfinite(layer.amax_history).all()
    y = layer(torch.randn(8, 32))
    assert torch.isfinite(y).all() and P.check_finite(layer)


def test_delayed_scaling_with_an_all_zero_history_uses_current_scaling():
    """A role whose history holds no positive amax quantises with its own amax, not with scale EPS / qmax
    (which saturated every value and silently zeroed the GEMM): a zero-initialised weight after its first
    step, and an overflow (recorded as 0) with amax_history_len=1."""
    recipe = P.recipe("fp8_tensorwise_delayed")
    layer = _layer(recipe, 64, 32)
    with torch.no_grad():
        layer.weight.zero_()
    x = torch.randn(16, 64)
    layer(x).sum().backward()
    assert layer.amax_history[1].max() == 0  # the weight's history: only zeros
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 64) * 0.02)  # what an optimizer step makes of it
    w = layer.weight.detach()
    got = layer(x).detach() - layer.bias.detach()
    bound = _gemm_bound(x, w, recipe.forward, pow2=False)
    assert ((got.double() - (x @ w.t()).double()).abs() <= bound).all()
    assert P.check_finite(layer)

    layer = _layer(replace(recipe, amax_history_len=1), 64, 32)
    bad = x.clone()
    bad[0, 0] = float("inf")
    layer(bad)
    assert not P.check_finite(layer) and layer.amax_history[0].tolist() == [0.0]
    w = layer.weight.detach()
    got = layer(x).detach() - layer.bias.detach()
    bound = _gemm_bound(x, w, recipe.forward, pow2=False)
    assert ((got.double() - (x @ w.t()).double()).abs() <= bound).all()
    assert P.check_finite(layer)


def test_low_precision_tp_layers_name_the_fix_for_a_wrong_width():
    from sysopt.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    recipe = P.recipe("int8_rowwise")
    col = P.LowPrecisionColumnParallelLinear.from_parallel(ColumnParallelLinear(96, 64), recipe)
    row = P.LowPrecisionRowParallelLinear.from_parallel(RowParallelLinear(96, 64), recipe)
    with pytest.raises(ValueError, match="full hidden size"):
        col(torch.randn(4, 2, 95))
    with pytest.raises(ValueError, match="this rank's shard"):
        row(torch.randn(4, 2, 95))


@pytest.mark.parametrize("name", ["int8_rowwise", "fp8_rowwise"])
@pytest.mark.parametrize("kind", ["dense", "column", "row"])
def test_autocast_runs_in_the_autocast_dtype(name, kind):
    """Under autocast(bf16) a low-precision layer (dense or tensor-parallel) computes exactly what it computes
    on bf16 operands without autocast, fp32 accumulation included (the fp8 reference GEMM's fp32 matmul was
    itself autocast to bf16), and its fp32 parameters get those gradients."""
    from sysopt.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    recipe = P.recipe(name)

    def make():
        torch.manual_seed(0)
        dense = nn.Linear(96, 64)
        if kind == "dense":
            return P.LowPrecisionLinear.from_linear(dense, recipe)
        if kind == "column":
            return P.LowPrecisionColumnParallelLinear.from_parallel(
                ColumnParallelLinear.from_dense(dense), recipe
            )
        return P.LowPrecisionRowParallelLinear.from_parallel(RowParallelLinear.from_dense(dense), recipe)

    layer, ref = make(), make().bfloat16()
    x = torch.randn(6, 2, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y_ref = ref(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    y.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    assert torch.equal(layer.weight.grad, ref.weight.grad.float())


def test_linear_on_triton_backend_matches_torch_backend(monkeypatch):
    """The layer on the (interpreted) Triton kernels: transposed/strided operands, every recipe family."""
    for module in ("quantize_triton", "gemm_triton"):
        importlib.reload(importlib.import_module(f"sysopt.kernels.{module}"))
    x = torch.randn(24, 64)
    dy = torch.randn(24, 48)
    small_blocks = replace(
        P.recipe("fp8_blockwise"), activation_block=(8, 32), weight_block=(32, 32)
    )  # fewer
    for recipe in (P.recipe("int8_rowwise"), small_blocks, P.recipe("fp8_tensorwise_delayed")):  # programs
        # delayed scaling takes two steps: the first falls back to current scaling, the second scales from
        # the history (kernels.quantize_with_amax)
        steps = 2 if recipe.scaling == "delayed" else 1
        results = []
        for backend in ("torch", "triton"):
            monkeypatch.setenv("SYSOPT_KERNEL_BACKEND", backend)
            layer = _layer(recipe, 64, 48)
            outs = []
            for step in range(steps):
                xg = (x * (0.5 + step)).requires_grad_()
                y = layer(xg)
                y.backward(dy)
                outs += [y, xg.grad, layer.weight.grad.clone()]
            results.append(outs)
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- recipes -----------------------------------------------------------------------------------------------


def test_recipes_round_trip_json_and_validate():
    for r in P.RECIPES.values():
        assert P.Recipe.from_json(r.to_json()) == r
    assert P.recipe("int8_rowwise").grad_weight == ("bf16", "bf16")
    assert P.recipe("fp8_tensorwise_delayed").grad_input == ("e5m2", "e4m3")
    with pytest.raises(ValueError, match="tensorwise"):
        P.Recipe("x", granularity="rowwise", scaling="delayed")
    with pytest.raises(ValueError, match="int8 multiplies only with int8"):
        P.Recipe("x", forward=("int8", "e4m3"))
    with pytest.raises(ValueError, match="not one of"):
        P.Recipe("x", forward="fp16")
    with pytest.raises(ValueError, match="named recipes"):
        P.recipe("fp4")
    with pytest.raises(ValueError, match=r"Recipe forward=\('e4m3',\): give one format .* got 1"):
        P.Recipe("x", forward=("e4m3",))
    # the contraction dim's block sizes disagree: caught here, not at the first forward
    with pytest.raises(
        ValueError, match=r"activation_block=\(1, 64\) and weight_block=\(128, 128\).*\(1, 128\)"
    ):
        P.Recipe("x", granularity="blockwise", activation_block=(1, 64))
    P.Recipe("x", granularity="blockwise", weight_granularity="rowwise", activation_block=(1, 64))  # no clash
    # a contraction block the GPU's scaled GEMM cannot take: refused on every machine, not first on a GPU
    with pytest.raises(ValueError, match=r"activation_block=\(1, 48\) .* multiple of 32.*\(1, 128\)"):
        P.Recipe("x", granularity="blockwise", weight_granularity="rowwise", activation_block=(1, 48))
    with pytest.raises(ValueError, match=r"weight_block=\(64, 80\) .* multiple of 32"):
        P.Recipe("x", granularity="rowwise", weight_granularity="blockwise", weight_block=(64, 80))


# ---- convert -----------------------------------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
        nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


def _converted(model):
    return [fqn for fqn, m in model.named_modules() if isinstance(m, P.LowPrecisionLinear)]


def test_convert_default_skips_first_last_and_small():
    model = _mlp()
    params = [id(p) for p in model.parameters()]
    x = torch.randn(16, 32)
    before = model(x)
    P.convert(model, "int8_rowwise")
    assert _converted(model) == ["2", "4"]  # not 0 (first), 8 (last) or 6 (64 < MIN_FEATURES outputs)
    assert [id(p) for p in model.parameters()] == params  # same Parameters: optimizers stay valid
    after = model(x)
    assert ((after - before).norm() / before.norm()) < 0.02


def test_convert_filter_fn_overrides_default():
    model = _mlp()
    seen = []

    def only_first(module, fqn):
        seen.append(fqn)
        return fqn == "0"

    P.convert(model, P.recipe("fp8_rowwise"), filter_fn=only_first)
    assert seen == ["0", "2", "4", "6", "8"]
    assert _converted(model) == ["0"] and model[0].recipe.name == "fp8_rowwise"


def test_convert_swaps_a_shared_module_under_every_name():
    """A linear registered under two names (a reused layer) is listed once by named_modules(); every
    reference must become the same LowPrecisionLinear (one scaling state), by a fixed recipe or by a plan."""
    shared = nn.Linear(256, 256)
    model = nn.Sequential(nn.Linear(256, 256), shared, nn.ReLU(), shared, nn.Linear(256, 256))
    x = torch.randn(4, 256)
    before = model(x)
    P.convert(model, "int8_rowwise", filter_fn=lambda m, fqn: True)
    assert [type(m).__name__ for m in model] == ["LowPrecisionLinear"] * 2 + ["ReLU"] + [
        "LowPrecisionLinear"
    ] * 2
    assert model[1] is model[3] and model[1].weight is shared.weight
    assert ((model(x) - before).norm() / before.norm()) < 0.02

    model = nn.Sequential(nn.Linear(256, 256), shared, nn.ReLU(), shared)
    P.convert(model, {"3": "int8_rowwise"})  # a plan may name either name
    assert isinstance(model[1], P.LowPrecisionLinear) and model[1] is model[3]
    model = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(ValueError, match="one shared module two recipes"):
        P.convert(model, {"0": "int8_rowwise", "2": "fp8_rowwise"})


def test_convert_swaps_registered_types(monkeypatch):
    class Proj(nn.Module):  # stands in for a tensor-parallel linear
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(512, 512)

    swaps = importlib.import_module("sysopt.precision.convert")._SWAPS
    monkeypatch.setitem(swaps, Proj, swaps[nn.Linear])  # removed again after the test
    P.register_swap(Proj, lambda m, r: P.LowPrecisionLinear.from_linear(m.linear, r), lambda m: (512, 512))
    model = nn.Sequential(nn.Linear(8, 512), Proj(), nn.Linear(512, 8))
    P.convert(model, "int8_tensorwise", filter_fn=lambda m, fqn: isinstance(m, Proj))
    assert isinstance(model[1], P.LowPrecisionLinear) and model[1].recipe.name == "int8_tensorwise"


def _profile(isa=("avx2", "avx512f", "avx512_vnni"), gpus=(), rates=None):
    calibration = None
    if rates is not None:
        calibration = Calibration(
            device="cpu",
            matmul=tuple(MatmulPoint(d, 1024, 1024, 1024, 2 * 1024**3 / r, r) for d, r in rates.items()),
            matmul_flops_per_s=dict(rates), copy={}, p2p=None, allreduce=None, collective_world_size=1,
            collective_backend="gloo", optimizer_params_per_s={"host": 1e9, "device": 1e9}, created="now",
        )  # fmt: skip
    cpu = CPUInfo("test cpu", 2, 2, tuple(isa), 24 << 30)
    return HardwareProfile(cpu=cpu, gpus=tuple(gpus), calibration=calibration, created="now")


def _gpu(name, compute_capability=None):
    return GPUInfo(0, name, 80 << 30, 80 << 30, 5, 16, 0, 1980, 2619, compute_capability)


def test_auto_recipe_per_hardware_and_shape():
    vnni = _profile()
    assert P.auto_recipe_for(vnni, 4096, 4096, 4096) == "int8_rowwise"
    assert P.auto_recipe_for(vnni, 64, 64, 64) is None  # quantisation overhead beats the gain
    assert P.auto_recipe_for(_profile(isa=("avx2",)), 4096, 4096, 4096) is None
    hopper = _profile(gpus=[_gpu("NVIDIA H100 80GB HBM3")])
    assert P.auto_recipe_for(hopper, 8192, 8192, 8192) == "fp8_rowwise"
    assert P.auto_recipe_for(hopper, 128, 128, 128) is None
    assert (
        P.auto_recipe_for(_profile(gpus=[_gpu("NVIDIA A100-SXM4-80GB")]), 8192, 8192, 8192) == "int8_rowwise"
    )
    # calibrated throughput decides: int8 no faster than fp32 -> stay in high precision
    assert P.auto_recipe_for(_profile(rates={"fp32": 2e11, "bf16": 8e11, "int8": 1.8e12}), 4096, 4096, 4096)
    assert (
        P.auto_recipe_for(_profile(rates={"fp32": 2e11, "bf16": 2e11, "int8": 2e11}), 4096, 4096, 4096)
        is None
    )


def test_auto_and_the_planner_read_the_same_memory_rate_from_a_calibrated_cpu():
    """auto counts the bytes quantisation reads plus writes and divided them by the memcpy fit's rate, which
    counts a copied byte once (a copy reads and writes it): quantising cost twice what the planner charges."""
    import dataclasses

    from sysopt.hardware.profile import LinkFit
    from sysopt.planner.context import Machine
    from sysopt.precision.auto import _memory_bytes_per_s

    base = _profile(rates={"fp32": 2e11, "bf16": 8e11, "int8": 1.8e12})
    cal = dataclasses.replace(base.calibration, copy={"memcpy": LinkFit(1e-6, 7.5e9)})
    profile = dataclasses.replace(base, calibration=cal)
    assert _memory_bytes_per_s(profile) == Machine.from_profile(profile, 1).memory_touch_bytes_per_s


FP8_GPUS = ["NVIDIA H100 80GB HBM3", "NVIDIA GH200 480GB", "NVIDIA L4", "NVIDIA L40S", "NVIDIA GeForce RTX 4090",
            "NVIDIA RTX 6000 Ada Generation", "NVIDIA GeForce RTX 5090", "NVIDIA B200"]  # fmt: skip
NO_FP8_GPUS = ["Quadro RTX 4000", "Quadro RTX 5000", "NVIDIA RTX A6000", "NVIDIA A100-SXM4-80GB", "Tesla T4",
               "NVIDIA GeForce RTX 3090", "TITAN RTX"]  # fmt: skip


@pytest.mark.parametrize("name", FP8_GPUS + NO_FP8_GPUS)
def test_auto_picks_fp8_only_for_gpus_with_fp8(name):
    """fp8 from the compute capability when the profile has it (>= 8.9), else from the GPU's exact name:
    Turing's Quadro RTX 4000/5000 are not the GeForce RTX 40/50 series."""
    want = "fp8_rowwise" if name in FP8_GPUS else "int8_rowwise"
    assert P.auto_recipe_for(_profile(gpus=[_gpu(name)]), 8192, 8192, 8192) == want
    for cc, fmt in (((7, 5), "int8_rowwise"), ((8, 0), "int8_rowwise"), ((8, 9), "fp8_rowwise"),
                    ((9, 0), "fp8_rowwise"), ((12, 0), "fp8_rowwise")):  # fmt: skip
        assert P.auto_recipe_for(_profile(gpus=[_gpu(name, cc)]), 8192, 8192, 8192) == fmt, cc
    # every GPU must have fp8
    mixed = _profile(gpus=[_gpu("NVIDIA H100 80GB HBM3", (9, 0)), _gpu(name)])
    assert P.auto_recipe_for(mixed, 8192, 8192, 8192) == want


def test_convert_auto_uses_profile_and_tokens():
    model = nn.Sequential(nn.Linear(32, 2048), nn.Linear(2048, 2048), nn.Linear(2048, 16), nn.Linear(16, 2048),
                          nn.Linear(2048, 8))  # fmt: skip
    with pytest.raises(ValueError, match="tokens="):
        P.convert(model, "auto")
    fresh = copy.deepcopy(model)
    P.convert(model, "auto", profile=_profile(), tokens=4096)
    assert _converted(model) == ["1"]  # 2 and 3 are too small to gain, 0 and 4 are first/last
    assert model[1].recipe.name == "int8_rowwise"
    # the same choice as data, applied again where the hardware would choose nothing
    plan = P.auto_plan(fresh, profile=_profile(), tokens=4096)
    assert (
        plan == {"1": "int8_rowwise"}
        and P.auto_plan(fresh, profile=_profile(isa=("avx2",)), tokens=4096) == {}
    )
    P.convert(fresh, plan)
    assert _converted(fresh) == ["1"] and fresh[1].recipe.name == "int8_rowwise"
    with pytest.raises(ValueError, match=r"the plan names \['1', '9'\], which are not swappable"):
        P.convert(fresh, {"1": "int8_rowwise", "9": "int8_rowwise"})  # 1 is a LowPrecisionLinear by now


def test_scaling_state_quantized_transpose_is_exact():
    """Reusing a transposed quantisation (tensorwise, square blocks) equals quantising the transpose; an
    operand that says it is transposable must be, also when its scale has one element (one row, one block)."""
    cases = [  # (granularity, block, shape, transposable)
        ("tensorwise", None, (256, 384), True),
        ("tensorwise", None, (1, 100), True),
        ("blockwise", (128, 128), (256, 384), True),
        ("blockwise", (128, 128), (1, 100), True),
        ("rowwise", None, (1, 100), False),  # one row: a (1, 1) scale, but not a tensorwise one
        ("blockwise", (1, 128), (1, 128), False),  # one (1, 128) block
        ("blockwise", (1, 128), (4, 256), False),
    ]
    for granularity, block, shape, transposable in cases:
        w = torch.randn(shape)
        q, s = kernels.quantize(w, torch.float8_e4m3fn, granularity, block)
        quantized = scaling.Quantized(q, s, block)
        assert quantized.transposable() == transposable, (granularity, block, shape)
        qt = quantized.t()
        q2, s2 = kernels.quantize(w.t(), torch.float8_e4m3fn, granularity, block)
        exact = qt.block == block and qt.scale.shape == s2.shape and torch.equal(qt.scale, s2)
        exact = exact and torch.equal(qt.q.view(torch.uint8), q2.view(torch.uint8))
        assert exact == transposable, (granularity, block, shape)


def test_fp8_blockwise_single_row_with_one_block_runs_backward():
    """A (1, K <= 128) input is one (1, 128) block: its grad-weight operand is quantised again (reusing its
    transpose gave a (128, 1) block and the GEMM raised 'must share the K block size')."""
    recipe = P.recipe("fp8_blockwise")
    layer = _layer(recipe, 128, 256)
    x = torch.randn(1, 128, requires_grad=True)
    dy = torch.randn(1, 256)
    layer(x).backward(dy)
    bound = _gemm_bound(dy.t(), x.detach().t(), recipe.grad_weight, recipe.power_of_two_scales)
    assert ((layer.weight.grad.double() - (dy.t() @ x.detach()).double()).abs() <= bound).all()


def test_gemm_sqnr_measures_each_gemm_of_the_recipe():
    torch.manual_seed(0)
    x, w, dy = torch.randn(256, 128), torch.randn(96, 128) / 11, torch.randn(256, 96)
    high = P.gemm_sqnr(P.Recipe("fp32", "high", "high", "high"), x, w, dy)
    assert min(high.values()) > 100  # fp32 GEMMs against float64: only accumulation rounding
    switchback = P.gemm_sqnr(P.recipe("int8_rowwise"), x, w, dy)
    bf16_gw = P.gemm_sqnr(P.Recipe("gw", "high", "high", "bf16"), x, w, dy)
    assert switchback["grad_weight"] == bf16_gw["grad_weight"]  # its grad-weight GEMM is the bf16 one
    assert 20 < switchback["forward"] < switchback["grad_weight"]  # int8 loses more than bf16, but not all
    # a few tokens 100x louder: one scale per tensor spends int8's range on them, one per row does not
    x[::32] *= 100
    rowwise = P.gemm_sqnr(P.recipe("int8_rowwise"), x, w, dy)["forward"]
    tensorwise = P.gemm_sqnr(P.recipe("int8_tensorwise"), x, w, dy)["forward"]
    assert rowwise > tensorwise + 10
    with pytest.raises(ValueError, match=r"weight \(96, 128\), dy \(256, 95\)"):
        P.gemm_sqnr(P.recipe("int8_rowwise"), x, w, dy[:, :95])


@pytest.mark.parametrize("name", sorted(P.RECIPES))
def test_an_input_with_no_rows_runs_like_nn_linear_and_leaves_the_scaling_state(name):
    """nn.Linear takes an input with no rows (an expert that received no tokens); tensorwise and rowwise
    recipes used to fail on it (the amax of an empty tensor)."""
    torch.manual_seed(0)
    dense = nn.Linear(256, 128)
    layer = P.LowPrecisionLinear.from_linear(copy.deepcopy(dense), P.recipe(name))
    history = layer.scaling_state.amax_history.clone()
    x = torch.randn(0, 3, 256, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 3, 128) and x.grad.shape == x.shape
    assert torch.equal(layer.weight.grad, torch.zeros_like(dense.weight))
    assert torch.equal(layer.bias.grad, torch.zeros_like(dense.bias))
    assert torch.equal(layer.scaling_state.amax_history, history)


@pytest.mark.parametrize("granularity", ["tensorwise", "rowwise", "blockwise"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_quantize_returns_data_not_a_graph(dtype, granularity):
    """On a tensor that requires grad (a Parameter), q and scale carried autograd graphs (fp8 q had a grad_fn)."""
    from sysopt.kernels import quantize_ref

    w = nn.Parameter(torch.randn(4, 256))
    for fn in (kernels.quantize, quantize_ref.quantize):
        q, scale = fn(w, dtype, granularity, (1, 128) if granularity == "blockwise" else None)
        assert not q.requires_grad and not scale.requires_grad and q.grad_fn is None
    q, scale, amax = kernels.quantize_with_amax(w, dtype, torch.tensor(2.0))
    assert not (q.requires_grad or scale.requires_grad or amax.requires_grad)


def test_convert_swaps_a_model_that_is_one_linear_by_default():
    """The docstring's "the new module when the model itself is a linear": the default first/last rule kept
    the only layer in high precision, so convert() returned the nn.Linear unchanged."""
    got = P.convert(nn.Linear(256, 256), "int8_rowwise")
    assert isinstance(got, P.LowPrecisionLinear)
    model = P.convert(nn.Sequential(*(nn.Linear(256, 256) for _ in range(3))), "int8_rowwise")
    assert [type(m).__name__ for m in model] == ["Linear", "LowPrecisionLinear", "Linear"]  # still kept there
