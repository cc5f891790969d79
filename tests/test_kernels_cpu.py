"""The C++ CPU int8 kernels (sysopt.kernels.cpu, the `cpp` backend) against the torch reference: the same bits
for quantisation, the dequantising epilogue and the transposing bf16 cast; fallbacks for what they do not
cover; and a low-precision linear giving the same output and gradients under either backend."""

import copy
import os
import shutil

import pytest
import torch
from torch import nn

from sysopt import kernels
from sysopt.kernels import cpu, gemm_ref, quantize_ref


@pytest.fixture(scope="module", autouse=True)
def ops():
    """Built once per machine (cached on disk); skipped only where no compiler or ninja exists."""
    module = cpu.load()
    if module is None:
        from torch.utils.cpp_extension import verify_ninja_availability

        try:
            verify_ninja_availability()
            ninja = True
        except RuntimeError:
            ninja = False
        if shutil.which(os.environ.get("CXX", "c++")) and ninja:
            pytest.fail(f"a compiler and ninja exist but the CPU kernels did not build: {cpu.status().error}")
        pytest.skip(f"no C++ toolchain here: {cpu.status().error}")
    return module


def _data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[-1])


# odd sizes (SIMD tails), 3-D, and one above the reference's row-chunk size (its chunked path)
SHAPES = [(7, 33), (3, 5, 48), (64, 17), (300, 1030)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("granularity", ["rowwise", "tensorwise"])
def test_int8_quantize_matches_reference_bitwise(shape, power_of_two, granularity):
    x = _data(shape)
    q, scale = cpu.quantize(x, torch.int8, granularity, power_of_two=power_of_two)
    q_ref, scale_ref = quantize_ref.quantize(x, torch.int8, granularity, power_of_two=power_of_two)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert (q != 0).any()


def test_transposed_view_and_saturating_cast_match_reference():
    x = _data((40, 70), seed=1)
    q, scale = cpu.quantize(x.t(), torch.int8, "tensorwise")
    q_ref, scale_ref = quantize_ref.quantize(x.t(), torch.int8, "tensorwise")
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref) and q.stride() == q_ref.stride()
    given = x.abs().max() / 4  # a delayed-scaling amax smaller than x's: values saturate at +-127
    got = cpu.quantize_with_amax(x, torch.int8, given)
    ref = quantize_ref.quantize_with_amax(x, torch.int8, given)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert (got[0].abs() == 127).sum() > 1


def test_quantize_with_amax_without_a_usable_amax_matches_reference():
    """An all-zero delayed-scaling history (amax 0) or a non-finite one: x's own amax, as in the reference."""
    x = _data((40, 70), seed=2)
    for given in (0.0, float("inf"), 3.0):
        q, scale, x_amax = cpu.quantize_with_amax(x, torch.int8, torch.tensor(given))
        q_ref, scale_ref, x_amax_ref = quantize_ref.quantize_with_amax(x, torch.int8, torch.tensor(given))
        assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref) and torch.equal(x_amax, x_amax_ref)
    assert scale.item() == pytest.approx(3.0 / 127, rel=1e-7)
    q, scale, _ = cpu.quantize_with_amax(x, torch.int8, torch.tensor(0.0))
    assert scale.item() == pytest.approx(x.abs().max().item() / 127, rel=1e-6) and q.abs().max() == 127


def test_rows_with_bf16_copy_and_transposing_cast():
    x = _data((33, 50), seed=2)
    q, scale, x16 = cpu.quantize_rows_int8(x, with_bf16=True)
    q_ref, scale_ref = quantize_ref.quantize(x, torch.int8, "rowwise")
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref) and torch.equal(x16, x.bfloat16())
    for shape in [(33, 50), (64, 128), (16, 5)]:
        y = _data(shape, seed=3)
        t = cpu.transpose_bf16(y)
        assert t.is_contiguous() and torch.equal(t, y.bfloat16().t().contiguous())
    assert torch.equal(kernels.contiguous_bf16(y.t()), y.t().bfloat16().contiguous())


def test_nonfinite_rows_give_nonfinite_scales_and_leave_the_others_alone():
    x = _data((6, 40), seed=4)
    x[1, 3], x[4, 7] = float("inf"), float("nan")
    q, scale = cpu.quantize(x, torch.int8, "rowwise")
    q_ref, scale_ref = quantize_ref.quantize(x, torch.int8, "rowwise")
    finite = [0, 2, 3, 5]
    assert not torch.isfinite(scale[[1, 4]]).any()
    assert torch.equal(scale[finite], scale_ref[finite]) and torch.equal(q[finite], q_ref[finite])
    t = cpu.transpose_bf16(x)
    assert torch.isnan(t[7, 4]) and torch.equal(t[:, finite], x[finite].bfloat16().t())


def test_nan_and_inf_cast_as_in_the_reference_in_the_vector_body_and_the_tail():
    """NaN -> 0 and, unclamped, +-inf -> 0 (clamped: +-127), in SIMD lanes (elements 0..15) and in the scalar
    tail (element 16) alike: the vector body used to give -128 (unclamped) or -127 (clamped) for NaN."""
    nan, inf = float("nan"), float("inf")
    x = torch.ones(4, 17)
    x[0, [0, 16]], x[1, [0, 16]], x[2, [5, 16]] = inf, nan, -inf
    q, scale = cpu.quantize(x, torch.int8, "rowwise")
    q_ref, scale_ref = quantize_ref.quantize(x, torch.int8, "rowwise")
    assert torch.equal(q, q_ref) and (q[:3] == 0).all() and (q[3] == 127).all()
    y = torch.tensor([nan, inf, -inf, 1.0, -1.0, 9.0, -9.0, 0.5] * 2 + [nan, inf, -inf])  # 16 lanes + tail
    for given in (4.0, 0.0):  # delayed scaling (clamped), and x's own amax (NaN: 0 everywhere)
        q, *_ = cpu.quantize_with_amax(y, torch.int8, torch.tensor(given))
        q_ref, *_ = quantize_ref.quantize_with_amax(y, torch.int8, torch.tensor(given))
        assert torch.equal(q, q_ref)
    assert q_ref.tolist()[:3] == [0, 0, 0]
    q, *_ = cpu.quantize_with_amax(y, torch.int8, torch.tensor(4.0))
    assert q[[0, 1, 2, 16, 17, 18]].tolist() == [0, 127, -127, 0, 127, -127]
    scale = torch.tensor(1 / 8)  # an unclamped cast of +-inf with a finite scale (the raw op)
    q = torch.empty(y.shape, dtype=torch.int8)
    cpu.load().cast_int8(y, q, 8.0, False)
    assert torch.equal(q, quantize_ref.cast_scaled(y, scale, torch.int8, clamp=False))
    assert q[[0, 1, 2, 16, 17, 18]].tolist() == [0] * 6


@pytest.mark.parametrize("ga", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("gb", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("with_bias", [False, True, "scalar", "full"])
def test_int8_epilogue_matches_reference_bitwise(ga, gb, with_bias):
    """Every bias the reference broadcasts: one per column, and (falling back to the reference, whose
    epilogue broadcasts it) a scalar or a full (M, N) one, which the C++ epilogue refused."""
    a, b = _data((37, 96), seed=5), _data((45, 96), seed=6)
    shape = {False: None, True: (45,), "scalar": (), "full": (37, 45)}[with_bias]
    bias = None if shape is None else torch.randn(shape)
    qa, sa = quantize_ref.quantize(a, torch.int8, ga)
    qb, sb = quantize_ref.quantize(b, torch.int8, gb)
    got = cpu.scaled_mm(qa, sa, qb, sb, bias=bias)
    ref = gemm_ref.scaled_mm(qa, sa, qb, sb, bias=bias)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    got16 = cpu.scaled_mm(qa, sa, qb, sb, bias=bias, out_dtype=torch.bfloat16)
    assert torch.equal(got16, gemm_ref.scaled_mm(qa, sa, qb, sb, bias=bias, out_dtype=torch.bfloat16))
    rel = (got - a @ b.t() - (0 if bias is None else bias)).norm() / (a @ b.t()).norm()
    assert rel < 0.05  # and it is the product: a wrong scale would be off by orders of magnitude


def test_int8_gemm_exact_for_k_of_one_and_beyond_the_int32_range():
    """K == 1 (torch._int_mm's wrong sums) and K past the int32 range (int64 chunk sums, reference epilogue)."""
    for k in (1, 140_000):  # constant rows quantise to 127 everywhere: 127 * 127 * 140000 > 2^31
        x, w = torch.ones(2, k), torch.ones(3, k)
        qa, sa = cpu.quantize(x, torch.int8, "rowwise")
        qb, sb = cpu.quantize(w, torch.int8, "tensorwise")
        got = cpu.scaled_mm(qa, sa, qb, sb)
        exact = (qa.double() @ qb.double().t()).float() * (sa * sb)
        assert torch.equal(got, gemm_ref.scaled_mm(qa, sa, qb, sb)) and torch.equal(got, exact), k


def test_what_the_cpp_kernels_do_not_cover_runs_the_reference():
    x = _data((20, 64), seed=7)
    for dtype, granularity, block in [
        (torch.float8_e4m3fn, "rowwise", None),
        (torch.int8, "blockwise", (1, 32)),
    ]:
        q, s = cpu.quantize(x, dtype, granularity, block)
        q_ref, s_ref = quantize_ref.quantize(x, dtype, granularity, block)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    qa, sa = quantize_ref.quantize(x, torch.int8, "blockwise", (1, 32))
    got = cpu.scaled_mm(qa, sa, qa, sa, a_block=(1, 32), b_block=(1, 32))
    assert torch.equal(got, gemm_ref.scaled_mm(qa, sa, qa, sa, a_block=(1, 32), b_block=(1, 32)))
    x64 = x.double()  # not fp32: the reference, which quantises any float dtype
    assert torch.equal(
        cpu.quantize(x64, torch.int8, "rowwise")[0], quantize_ref.quantize(x64, torch.int8, "rowwise")[0]
    )


@pytest.mark.parametrize("name", ["int8_rowwise", "int8_rowwise_full", "int8_tensorwise"])
def test_low_precision_linear_same_bits_under_cpp_and_torch(name, monkeypatch):
    import sysopt.precision as P

    torch.manual_seed(0)
    base = nn.Linear(96, 80)
    x, dy = torch.randn(3, 40, 96), torch.randn(3, 40, 80)
    results = {}
    for backend in ("torch", "cpp"):
        monkeypatch.setenv("SYSOPT_KERNEL_BACKEND", backend)
        layer = P.LowPrecisionLinear.from_linear(copy.deepcopy(base), P.recipe(name))
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        results[backend] = (y.detach(), xi.grad, layer.weight.grad, layer.bias.grad)
    for got, ref in zip(results["cpp"], results["torch"]):
        assert torch.equal(got, ref)
    assert not torch.equal(results["cpp"][0], base(x).detach())  # int8 really ran


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_an_int8_linear_with_one_output_feature_gets_its_weight_gradient(backend, monkeypatch):
    """The grad-weight GEMM of a linear with out_features=1 reuses the quantised dy transposed: a (1, T)
    operand with strides (1, 1), which oneDNN's _int_mm misread (errors of ~1e6 on gradients of ~10)."""
    import sysopt.precision as P

    monkeypatch.setenv("SYSOPT_KERNEL_BACKEND", backend)
    torch.manual_seed(0)
    base = nn.Linear(64, 1)
    x, dy = torch.randn(50, 64), torch.randn(50, 1)
    layer = P.LowPrecisionLinear.from_linear(copy.deepcopy(base), P.recipe("int8_tensorwise"))
    xi = x.clone().requires_grad_()
    layer(xi).backward(dy)
    base(x).backward(dy)
    error = (layer.weight.grad - base.weight.grad).abs().max().item()
    assert error <= 0.05 * base.weight.grad.abs().max().item(), error  # int8 rounding, not garbage


def test_the_cpp_quantizers_return_data_for_a_tensor_that_requires_grad():
    x = _data((6, 40), seed=3).requires_grad_()
    for out in (*cpu.quantize(x, torch.int8, "tensorwise"), *cpu.quantize(x, torch.int8, "rowwise")):
        assert not out.requires_grad
    assert not any(t.requires_grad for t in cpu.quantize_with_amax(x, torch.int8, torch.tensor(2.0)))


def test_the_build_key_tells_cpus_apart_where_proc_cpuinfo_names_no_x86_flags(tmp_path):
    """-march=native builds are keyed by the CPU's features; on aarch64 /proc/cpuinfo calls them
    "Features", which the key (reading only an x86 "flags" line) ignored: a Graviton3 build could serve a
    Graviton2 sharing TORCH_EXTENSIONS_DIR and die of SIGILL."""
    from sysopt.kernels.jit import _cpu_flags

    def key(text):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return _cpu_flags(str(path))

    neoverse_v1 = "processor\t: 0\nFeatures\t: fp asimd sve sve2 bf16\nCPU part\t: 0xd40\n"
    neoverse_n1 = "processor\t: 0\nFeatures\t: fp asimd\nCPU part\t: 0xd0c\n"
    assert key(neoverse_v1) != key(neoverse_n1)
    assert key(neoverse_v1) == key(neoverse_v1 + neoverse_v1.replace(": 0", ": 1", 1))  # per-core repeats
    assert key("flags\t: fpu sse avx2\n") != key("flags\t: fpu sse avx2 avx512f\n")


def test_scaling_state_keeps_bf16_in_the_quantising_pass(monkeypatch):
    """int8_rowwise's forward asks for x in bf16 beside its int8 quantisation: under `cpp` both come from
    one fused pass; under `torch` from quantize + a cast; the two agree bit for bit."""
    import sysopt.precision as P
    from sysopt.precision.scaling import ScalingState

    x = _data((24, 64), seed=8)
    got = {}
    for backend in ("cpp", "torch"):
        monkeypatch.setenv("SYSOPT_KERNEL_BACKEND", backend)
        state = ScalingState(P.recipe("int8_rowwise"), torch.zeros(3, 16), torch.zeros(3, dtype=torch.bool))
        assert (state._quantize_keep_bf16(x, "int8", "input", "forward") is not None) == (backend == "cpp")
        got[backend] = state.quantize(x, "int8", "input", "forward", keep_bf16=True)
    for q in got.values():
        assert torch.equal(q.bf16, x.bfloat16())
    assert torch.equal(got["cpp"].q, got["torch"].q) and torch.equal(got["cpp"].scale, got["torch"].scale)
