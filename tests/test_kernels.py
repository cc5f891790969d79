"""sysopt.kernels: torch references vs Triton twins (interpreter), quantisation error bounds, scaled GEMMs."""

import importlib
import os
import subprocess
import sys

# Triton kernels must be decorated with the interpreter on: set it before (re)importing the kernel modules,
# whatever other test modules imported before this one.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from sysopt import kernels  # noqa: E402
from sysopt.kernels import gemm_ref, quantize_ref  # noqa: E402
from sysopt.kernels.formats import MANTISSA_BITS, QMAX, dequantize, expand_scale, ulp_of  # noqa: E402


def _triton_module(name: str):
    module = importlib.import_module(f"sysopt.kernels.{name}")
    return importlib.reload(module)  # re-decorate the kernels under TRITON_INTERPRET=1


quantize_triton = _triton_module("quantize_triton")
gemm_triton = _triton_module("gemm_triton")

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
DTYPES = (*FP8, torch.int8)
# (granularity, block, shape): shapes not divisible by the tile or block sizes
LAYOUTS = [
    ("tensorwise", None, (19, 200)),
    ("rowwise", None, (19, 200)),
    ("blockwise", (1, 128), (5, 200)),
    ("blockwise", (16, 32), (20, 70)),
    ("blockwise", (6, 40), (13, 90)),  # block sizes that are not powers of two
]


def _data(shape, seed=0, dtype=torch.float32):
    """Values over ~6 decades (exercises fp8 subnormals and rounding at every exponent)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[-1])
    return x.to(dtype)


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8) if q.dtype in FP8 else q


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("granularity,block,shape", LAYOUTS)
def test_triton_quantize_matches_torch_bitwise(dtype, granularity, block, shape):
    x = _data(shape)
    q_ref, s_ref = quantize_ref.quantize(x, dtype, granularity, block)
    q_tri, s_tri = quantize_triton.quantize(x, dtype, granularity, block)
    assert s_tri.shape == s_ref.shape
    assert torch.equal(s_tri, s_ref)
    assert torch.equal(_bits(q_tri), _bits(q_ref))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_quantize_pow2_bf16_and_3d_match_torch(dtype):
    x = _data((2, 7, 96), seed=1, dtype=torch.bfloat16)
    for granularity in ("tensorwise", "rowwise"):
        q_ref, s_ref = quantize_ref.quantize(x, dtype, granularity, power_of_two=True)
        q_tri, s_tri = quantize_triton.quantize(x, dtype, granularity, power_of_two=True)
        assert torch.equal(s_tri, s_ref) and torch.equal(_bits(q_tri), _bits(q_ref))
    x2 = x.reshape(14, 96).t()  # non-contiguous input
    q_ref, s_ref = quantize_ref.quantize(x2, dtype, "blockwise", (32, 8), power_of_two=True)
    q_tri, s_tri = quantize_triton.quantize(x2, dtype, "blockwise", (32, 8), power_of_two=True)
    assert torch.equal(s_tri, s_ref) and torch.equal(_bits(q_tri), _bits(q_ref))


class _Launches:
    """Stands in for a Triton kernel: records the grid of each launch and runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def test_triton_quantize_launch_grids_fit_cuda_limits(monkeypatch):
    """A long 1-D input (viewed as one row of 10M elements) needs 78125 column tiles: CUDA takes at most
    65535 programs on grid axes 1 and 2, 2^31 - 1 on axis 0. Every launch must fit; results stay exact."""
    launches = _Launches()
    for kernel in ("_amax_tiles_kernel", "_cast_tensorwise_kernel", "_quantize_rows_kernel",
                   "_quantize_blocks_kernel"):  # fmt: skip
        monkeypatch.setattr(quantize_triton, kernel, launches)
    x = torch.zeros(10_000_000)
    quantize_triton.quantize(x, torch.int8, "tensorwise")
    quantize_triton.quantize_with_amax(x, torch.int8, torch.tensor(1.0))
    quantize_triton.quantize(x.view(1, -1), torch.int8, "blockwise", (1, 128))
    assert len(launches.grids) == 5
    for grid in launches.grids:
        assert len(grid) <= 3 and grid[0] <= 2**31 - 1 and all(n <= 65535 for n in grid[1:]), grid
    monkeypatch.undo()
    x = _data((1, 3000)).reshape(-1)  # 1-D, several column tiles: the flattened grid covers them all
    for granularity, block, shaped in (("tensorwise", None, x), ("blockwise", (1, 128), x.view(1, -1)),
                                       ("blockwise", (3, 40), _data((7, 300)))):  # fmt: skip
        q_tri, s_tri = quantize_triton.quantize(shaped, torch.float8_e4m3fn, granularity, block)
        q_ref, s_ref = quantize_ref.quantize(shaped, torch.float8_e4m3fn, granularity, block)
        assert torch.equal(s_tri, s_ref) and torch.equal(_bits(q_tri), _bits(q_ref))
    q_tri, s_tri, a_tri = quantize_triton.quantize_with_amax(x, torch.int8, x.abs().max() / 2)
    q_ref, s_ref, a_ref = quantize_ref.quantize_with_amax(x, torch.int8, x.abs().max() / 2)
    assert torch.equal(q_tri, q_ref) and torch.equal(s_tri, s_ref) and torch.equal(a_tri, a_ref)


def test_triton_gemm_launch_grid_fits_cuda_limits(monkeypatch):
    """An output 2.2M columns wide (a vocabulary-sized projection's transpose) is 68750 column tiles of 32:
    beyond the 65535 programs CUDA allows on grid axis 1, so the GEMM's tiles share axis 0."""
    launches = _Launches()
    monkeypatch.setattr(gemm_triton, "_scaled_mm_kernel", launches)
    a = torch.zeros(1, 32, dtype=torch.int8)
    b = torch.zeros(1, 32, dtype=torch.int8).expand(2_200_000, 32)  # strides (0, 1): no 70 MB allocated
    gemm_triton.scaled_mm(a, torch.ones(()), b, torch.ones(()))
    (grid,) = launches.grids
    assert len(grid) == 1 and grid[0] == 2_200_000 // 32 and grid[0] <= 2**31 - 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_quantize_in_row_chunks_matches_triton(dtype, monkeypatch):
    """The torch reference casts large tensors in row chunks; force tiny chunks and compare with Triton."""
    monkeypatch.setattr(quantize_ref, "_CHUNK_ELEMENTS", 100)
    for x in (_data((3, 10, 48), seed=8), _data((30, 48), seed=9, dtype=torch.bfloat16)):
        for granularity in ("tensorwise", "rowwise"):
            q_ref, s_ref = quantize_ref.quantize(x, dtype, granularity)
            q_tri, s_tri = quantize_triton.quantize(x, dtype, granularity)
            assert torch.equal(s_tri, s_ref) and torch.equal(_bits(q_tri), _bits(q_ref))
    x = _data((30, 48), seed=10)
    q_ref, scale, amax = quantize_ref.quantize_with_amax(x, dtype, x.abs().max() / 2)
    q_tri, _, _ = quantize_triton.quantize_with_amax(x, dtype, x.abs().max() / 2)
    assert torch.equal(_bits(q_tri), _bits(q_ref))


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_fp8_rounding_every_value_and_tie(dtype):
    """Every finite fp8 value, the midpoints between neighbours (ties to even) and values just off them, cast
    with scale 1 (amax = qmax): both backends must equal torch's own fp32 -> fp8 cast."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    grid = torch.unique(codes[torch.isfinite(codes)])
    mids = (grid[1:] + grid[:-1]) / 2
    near = torch.cat([torch.nextafter(mids, grid[1:]), torch.nextafter(mids, grid[:-1])])
    x = torch.cat([grid, mids, near, torch.tensor([7.935, -7.935, 7.97])]).reshape(1, -1)
    assert x.abs().max() == QMAX[dtype]  # so the tensorwise scale is exactly 1
    expected = x.to(dtype)
    for impl in (quantize_ref, quantize_triton):
        q, scale = impl.quantize(x, dtype, "tensorwise")
        assert scale.item() == 1.0
        assert torch.equal(_bits(q), _bits(expected)), impl.__name__
    if dtype == torch.float8_e4m3fn:
        assert quantize_triton.quantize(x, dtype, "tensorwise")[0][0, -3].float() == 8.0  # the carry case


def test_int8_rounds_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.49, -126.5]])
    for impl in (quantize_ref, quantize_triton):
        q, scale = impl.quantize(x, torch.int8, "tensorwise")
        assert scale.item() == 1.0
        assert q.tolist() == torch.round(x).to(torch.int8).tolist()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("granularity,block,shape", LAYOUTS)
@pytest.mark.parametrize("power_of_two", [False, True])
def test_quantize_round_trip_error_bound(dtype, granularity, block, shape, power_of_two):
    """|x - q * scale| <= scale * ulp(q) / 2 (+ the fp32 rounding of x / scale); the largest element of each
    group lands on qmax (current scaling uses the full range) unless power-of-two scales shrink it by < 2x."""
    x = _data(shape, seed=2)
    q, scale = kernels.quantize(x, dtype, granularity, block, power_of_two=power_of_two)
    full_scale = expand_scale(scale, shape, block)
    err = (x - dequantize(q, scale, block)).abs()
    bound = full_scale * ulp_of(q, dtype) / 2 + x.abs() * 2.0**-22
    assert (err <= bound).all(), (err - bound).max()
    qmax = QMAX[dtype]
    peak = q.float().abs()
    if granularity == "rowwise":
        peak = peak.amax(dim=-1)
    elif granularity == "tensorwise":
        peak = peak.max()
    else:
        peak = quantize_ref.amax_of(q.float(), "blockwise", block)
    if power_of_two:
        assert (torch.log2(scale) == torch.round(torch.log2(scale))).all()
        assert ((peak > qmax / 2 - 1) & (peak <= qmax)).all()
    else:
        assert (peak == qmax).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_nonfinite_input_gives_nonfinite_scale(impl):
    module = quantize_ref if impl == "torch" else quantize_triton
    x = _data((4, 40))
    x[1, 3] = float("inf")
    x[2, 5] = float("nan")
    _, scale = module.quantize(x, torch.float8_e4m3fn, "rowwise")
    assert torch.isfinite(scale[[0, 3]]).all() and not torch.isfinite(scale[[1, 2]]).any()
    _, scale = module.quantize(x, torch.int8, "tensorwise")
    assert not torch.isfinite(scale)
    _, _, x_amax = module.quantize_with_amax(x, torch.float8_e4m3fn, torch.tensor(1.0))
    assert not torch.isfinite(x_amax)


def _equal_with_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "granularity,block", [("tensorwise", None), ("rowwise", None), ("blockwise", (16, 32))]
)
def test_triton_quantize_matches_torch_on_nan(dtype, granularity, block):
    """A NaN element quantises to NaN (fp8) or 0 (int8) as in the reference (tl.maximum / tl.minimum used
    to turn it into -qmax), and its scaling group's scale is NaN as torch's amax makes it; the same for
    delayed scaling with a finite amax, where only the NaN element is affected."""
    x = _data((20, 300))
    x[1, 3] = x[6, 250] = float("nan")
    x[12, 40] = float("inf")
    q_tri, s_tri = quantize_triton.quantize(x, dtype, granularity, block)
    q_ref, s_ref = quantize_ref.quantize(x, dtype, granularity, block)
    assert _equal_with_nan(s_tri, s_ref) and _equal_with_nan(q_tri, q_ref)
    q_tri, s_tri, amax_tri = quantize_triton.quantize_with_amax(x, dtype, torch.tensor(3.0))
    q_ref, s_ref, amax_ref = quantize_ref.quantize_with_amax(x, dtype, torch.tensor(3.0))
    assert (
        torch.equal(s_tri, s_ref) and _equal_with_nan(q_tri, q_ref) and amax_tri.isnan() and amax_ref.isnan()
    )
    nan_q = q_tri.float()[[1, 6], [3, 250]]
    assert (nan_q == 0).all() if dtype == torch.int8 else nan_q.isnan().all()
    assert q_tri.float()[12, 40] == QMAX[dtype]  # inf saturates


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_quantize_with_amax_saturates_and_reports_own_amax(impl):
    module = quantize_ref if impl == "torch" else quantize_triton
    x = _data((8, 50), seed=3)
    given = x.abs().max() / 4  # a history max smaller than this tensor: the top values saturate
    q, scale, x_amax = module.quantize_with_amax(x, torch.float8_e4m3fn, given)
    assert scale.item() == pytest.approx(given.item() / 448.0, rel=1e-7)
    assert x_amax.item() == x.abs().max().item()
    over = x.abs() > 448.0 * scale
    assert over.any() and (q.float()[over].abs() == 448.0).all()
    assert torch.isfinite(q.float()).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=str)
def test_quantize_with_amax_without_a_usable_amax_uses_the_tensors_own(impl, dtype):
    """A delayed-scaling history max of 0 (all-zero history) or inf/NaN must not become scale EPS / qmax,
    which saturates every value: x's own amax is used, exactly as current scaling would."""
    module = quantize_ref if impl == "torch" else quantize_triton
    x = _data((8, 50), seed=3)
    q_cur, s_cur = module.quantize(x, dtype, "tensorwise")
    for given in (0.0, float("inf"), float("nan")):
        q, scale, x_amax = module.quantize_with_amax(x, dtype, torch.tensor(given))
        assert torch.equal(scale, s_cur), given
        assert torch.equal(_bits(q), _bits(q_cur)), given
        assert x_amax.item() == x.abs().max().item()
    q, scale, _ = module.quantize_with_amax(x, dtype, torch.tensor(1.0))  # a usable amax is still used
    assert scale.item() == pytest.approx(1.0 / QMAX[dtype], rel=1e-7)


# ---- scaled GEMM --------------------------------------------------------------------------------------------

GEMM_LAYOUTS = [  # (a granularity, a block, b granularity, b block)
    ("tensorwise", None, "tensorwise", None),
    ("rowwise", None, "rowwise", None),
    ("rowwise", None, "tensorwise", None),
    ("blockwise", (1, 128), "blockwise", (128, 128)),
    ("blockwise", (1, 32), "rowwise", None),
    ("blockwise", (1, 96), "tensorwise", None),  # K step 32 inside a K block that is not a power of two
]
GEMM_DTYPES = [
    (torch.int8, torch.int8),
    (torch.float8_e4m3fn, torch.float8_e4m3fn),
    (torch.float8_e5m2, torch.float8_e4m3fn),
]


@pytest.mark.parametrize("a_dtype,b_dtype", GEMM_DTYPES, ids=str)
@pytest.mark.parametrize("ga,ba,gb,bb", GEMM_LAYOUTS)
def test_scaled_mm_matches_dequantised_matmul(a_dtype, b_dtype, ga, ba, gb, bb):
    """Both backends equal the float64 product of the dequantised operands to fp32 accumulation accuracy:
    |err| <= 2 K eps32 (|A| @ |B|.T) + |bias| eps32."""
    m, n, k = 40, 36, 200
    a, a_scale = quantize_ref.quantize(_data((m, k), seed=4), a_dtype, ga, ba)
    b, b_scale = quantize_ref.quantize(_data((n, k), seed=5), b_dtype, gb, bb)
    bias = torch.randn(n)
    deq_a, deq_b = dequantize(a, a_scale, ba).double(), dequantize(b, b_scale, bb).double()
    exact = deq_a @ deq_b.t() + bias.double()
    bound = 2 * k * 2.0**-24 * (deq_a.abs() @ deq_b.abs().t()) + bias.double().abs() * 2.0**-24
    for impl in (gemm_ref, gemm_triton):
        out = impl.scaled_mm(a, a_scale, b, b_scale, a_block=ba, b_block=bb, bias=bias)
        assert out.dtype == torch.float32 and out.shape == (m, n)
        assert ((out.double() - exact).abs() <= bound).all(), impl.__name__


@pytest.mark.parametrize("impl", [gemm_ref, gemm_triton], ids=["torch", "triton"])
def test_scaled_mm_bf16_output_keeps_a_nan_with_every_payload(impl):
    """A NaN bias stays NaN in a bf16 output whatever its bits: CUDA's canonical NaN is 0x7FFFFFFF, which the
    round-to-nearest-even bit trick (add 0x7FFF + lsb, clear the low half) would wrap to -0.0."""
    a, a_scale = quantize_ref.quantize(_data((16, 32), seed=8), torch.int8, "rowwise")
    b, b_scale = quantize_ref.quantize(_data((16, 32), seed=9), torch.int8, "rowwise")
    for bits in (0x7FFFFFFF, 0x7FC00000, -1):  # CUDA's, the default quiet NaN, a negative all-ones NaN
        bias = torch.zeros(16)
        bias[3] = torch.tensor([bits], dtype=torch.int32).view(torch.float32)
        out = impl.scaled_mm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, bias=bias)
        assert out[:, 3].isnan().all() and not out[:, :3].isnan().any(), hex(bits & 0xFFFFFFFF)


@pytest.mark.parametrize("impl", [gemm_ref, gemm_triton], ids=["torch", "triton"])
def test_scaled_mm_bf16_output_and_transposed_operand(impl):
    m, n, k = 24, 40, 48
    a, a_scale = quantize_ref.quantize(_data((m, k), seed=6), torch.int8, "rowwise")
    w, w_scale = quantize_ref.quantize(_data((k, n), seed=7), torch.int8, "tensorwise")
    out = impl.scaled_mm(a, a_scale, w.t(), w_scale, out_dtype=torch.bfloat16)  # b given as a transposed view
    deq_a, deq_w = dequantize(a, a_scale).double(), dequantize(w, w_scale).double()
    exact = deq_a @ deq_w
    bound = exact.abs() * 2.0**-8 + 2 * k * 2.0**-24 * (
        deq_a.abs() @ deq_w.abs()
    )  # bf16 rounding + fp32 sums
    assert out.dtype == torch.bfloat16
    assert ((out.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_reference_scaled_mm_accumulates_in_fp32_under_autocast(dtype):
    """torch.autocast would run the fp8 reference's fp32 matmul in bf16: the result must not depend on it
    (int8 accumulates through torch._int_mm or float64, which autocast leaves alone)."""
    a, a_scale = quantize_ref.quantize(_data((24, 64), seed=8), dtype, "rowwise")
    b, b_scale = quantize_ref.quantize(_data((40, 64), seed=9), dtype, "tensorwise")
    plain = gemm_ref.scaled_mm(a, a_scale, b, b_scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = gemm_ref.scaled_mm(a, a_scale, b, b_scale)
    assert under.dtype == torch.float32 and torch.equal(under, plain)


def test_int8_gemm_accumulates_exactly_in_int32():
    """K large enough that fp32 accumulation of int8 products would round: the int32 path must not."""
    k = 4096
    a = torch.full((4, k), 127, dtype=torch.int8)
    b = torch.full((4, k), 127, dtype=torch.int8)
    b[0, 0] = 126  # 127*127*4096 - 127 is not representable in fp32 (> 2**24)
    one = torch.tensor(1.0)
    for impl in (gemm_ref, gemm_triton):
        out = impl.scaled_mm(a, one, b, one, out_dtype=torch.float32)
        assert out[0, 0].item() == float(torch.tensor(127 * 127 * k - 127, dtype=torch.float32))
        assert out[0, 1].item() == 127 * 127 * k


def test_int8_gemm_exact_for_k_of_one_and_beyond_the_int32_range(monkeypatch):
    """torch._int_mm on CPU sums wrongly at K == 1, and int32 sums wrap beyond K = 2^31 / 128^2: both exact."""
    g = torch.Generator().manual_seed(0)
    for k, (m, n) in [(1, (1, 19)), (1, (17, 32)), (2, (3, 19)), (7, (8, 8)), (8, (17, 32))]:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        got = gemm_ref.accumulate_mm(a, b)
        assert got.dtype == torch.int32 and torch.equal(got.long(), a.long() @ b.long().t()), k
    k = 140_000  # > INT32_SAFE_K: 128 * 128 * k = 2.29e9 > 2^31
    a = torch.full((2, k), -128, dtype=torch.int8)
    b = torch.full((3, k), -128, dtype=torch.int8)
    b[1], b[2, :5] = 127, 3
    exact = a.long() @ b.long().t()
    assert exact.abs().max() > 2**31 and torch.equal(gemm_ref.accumulate_mm(a, b), exact)
    one = torch.tensor(1.0)
    assert torch.equal(gemm_ref.scaled_mm(a, one, b, one), exact.float())
    # chunk boundaries (K not a multiple of the chunk) with a lowered threshold; the epilogue's bits unchanged
    a = torch.randint(-128, 128, (5, 30), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (6, 30), dtype=torch.int8, generator=g)
    sa, sb = torch.rand(5, 1, generator=g), torch.rand(6, 1, generator=g)
    whole = gemm_ref.scaled_mm(a, sa, b, sb, bias=torch.ones(6))
    monkeypatch.setattr(gemm_ref, "INT32_SAFE_K", 7)
    got = gemm_ref.accumulate_mm(a, b)
    assert got.dtype == torch.int64 and torch.equal(got, a.long() @ b.long().t())
    assert torch.equal(gemm_ref.scaled_mm(a, sa, b, sb, bias=torch.ones(6)), whole)


def test_int8_gemm_exact_for_one_row_operands_that_only_look_contiguous():
    """A (1, K) operand with strides (1, 1) (the transpose of a (K, 1) column: what an int8 linear with one
    output feature hands its grad-weight GEMM) counts as contiguous, and oneDNN's _int_mm summed garbage for
    it; both orders, several K, each checked against exact int64 sums."""
    g = torch.Generator().manual_seed(1)
    for k in (8, 64, 200):
        column = torch.randint(-128, 128, (k, 1), dtype=torch.int8, generator=g)
        one_row = column.t()
        assert one_row.stride() == (1, 1) and one_row.is_contiguous()
        other = torch.randint(-128, 128, (5, k), dtype=torch.int8, generator=g)
        for a, b in ((one_row, other), (other, one_row), (one_row, one_row)):
            assert torch.equal(gemm_ref.accumulate_mm(a, b).long(), a.long() @ b.long().t()), (k, a.shape)


def test_triton_gemm_k_step_is_at_least_32_for_8bit_operands():
    """tl.dot of 8-bit operands needs K >= 32 per dot on NVIDIA GPUs: the K step is a power of two >= 32
    dividing the blockwise K block size, and a K block that allows none is refused, naming the fix."""
    assert [gemm_triton._k_step(kb) for kb in (None, 128, 64, 96, 32)] == [64, 64, 64, 32, 32]
    for kb in (48, 16, 80):
        with pytest.raises(ValueError, match=rf"multiple of 32 .*got {kb}; use e.g. block=\(1, 128\)"):
            gemm_triton._k_step(kb)
    a, a_scale = quantize_ref.quantize(_data((8, 96)), torch.int8, "blockwise", (1, 48))
    with pytest.raises(ValueError, match="K >= 32 per dot"):
        gemm_triton.scaled_mm(a, a_scale, a, a_scale, a_block=(1, 48), b_block=(1, 48))


_OFFSETS_BEYOND_INT32 = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from sysopt.kernels import gemm_ref, gemm_triton, quantize_ref, quantize_triton
M, K, STRIDE = 66, 64, 2**25  # the last row starts at element 65 * 2^25 > 2^31
try:  # 4.4 GB of address space; only the rows' pages are ever touched
    store = torch.empty(M * STRIDE, dtype=torch.bfloat16)
except (RuntimeError, MemoryError) as e:
    print("SKIP", e)
    sys.exit(0)
g = torch.Generator().manual_seed(0)
x = store.as_strided((M, K), (STRIDE, 1))
x.copy_(torch.randn(M, K, generator=g) * 3)
for granularity, block in (("tensorwise", None), ("rowwise", None), ("blockwise", (2, 32))):
    q, s = quantize_triton.quantize(x, torch.float8_e4m3fn, granularity, block)
    q_ref, s_ref = quantize_ref.quantize(x.contiguous(), torch.float8_e4m3fn, granularity, block)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), granularity
q, s, amax = quantize_triton.quantize_with_amax(x, torch.int8, torch.tensor(2.0))
q_ref, s_ref, amax_ref = quantize_ref.quantize_with_amax(x.contiguous(), torch.int8, torch.tensor(2.0))
assert torch.equal(q, q_ref) and torch.equal(amax, amax_ref.float())
a = store.view(torch.int8).as_strided((M, K), (STRIDE, 1))  # int8 rows 2^25 bytes apart: same offsets
a.copy_(torch.randint(-100, 100, (M, K), dtype=torch.int8, generator=g))
b = torch.randint(-100, 100, (32, K), dtype=torch.int8, generator=g)
one = torch.tensor(1.0)
assert torch.equal(gemm_triton.scaled_mm(a, one, b, one), gemm_ref.scaled_mm(a.contiguous(), one, b, one))
assert torch.equal(gemm_triton.scaled_mm(b, one, a, one), gemm_ref.scaled_mm(b, one, a.contiguous(), one))
print("ok")
"""


def test_triton_kernels_address_operands_beyond_int32_offsets():
    """Element offsets (row * stride) of 2^31 or more must not wrap in int32: quantise and multiply a strided
    view whose last row starts past element 2^31. In a subprocess: a wrapped offset in the interpreter is
    a wild pointer (a crash, not an exception). The view's storage is reserved, not touched (~no memory)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _OFFSETS_BEYOND_INT32], env=env, capture_output=True, text=True, timeout=300
    )
    if result.stdout.startswith("SKIP"):
        pytest.skip(f"cannot reserve the address space here: {result.stdout}")
    assert result.returncode == 0 and result.stdout.strip() == "ok", (
        result.returncode,
        result.stderr[-2000:],
    )


def test_scale_shape_errors_name_the_fix():
    a, a_scale = quantize_ref.quantize(_data((8, 256)), torch.int8, "blockwise", (1, 128))
    b, b_scale = quantize_ref.quantize(_data((16, 256)), torch.int8, "rowwise")
    with pytest.raises(ValueError, match="a_block"):
        gemm_ref.scaled_mm(a, a_scale, b, b_scale)  # blockwise scale without its block
    with pytest.raises(ValueError, match=r"needs \(8, 4\)"):
        gemm_ref.scaled_mm(a, a_scale, b, b_scale, a_block=(1, 64))
    with pytest.raises(ValueError, match="int8 operands multiply only with int8"):
        gemm_ref.scaled_mm(a, a_scale, b.view(torch.float8_e4m3fn), b_scale, a_block=(1, 128))
    with pytest.raises(ValueError, match="not a low-precision format"):
        kernels.quantize(_data((2, 4)), torch.float16, "rowwise")
    with pytest.raises(ValueError, match="only applies to granularity='blockwise'"):
        kernels.quantize(_data((2, 4)), torch.int8, "rowwise", (1, 2))


def test_dispatch_picks_cpp_or_torch_on_cpu_and_honours_override(monkeypatch):
    from sysopt.kernels import cpu

    monkeypatch.delenv("SYSOPT_KERNEL_BACKEND", raising=False)
    assert kernels.backend_for("cpu") == ("cpp" if cpu.load() is not None else "torch")
    monkeypatch.setenv("SYSOPT_CPU_KERNELS", "torch")  # the C++ kernels switched off: the torch reference
    assert kernels.backend_for("cpu") == "torch"
    monkeypatch.delenv("SYSOPT_CPU_KERNELS")
    monkeypatch.setenv("SYSOPT_KERNEL_BACKEND", "triton")
    assert kernels.backend_for("cpu") == "triton"
    x = _data((3, 40))
    q, s = kernels.quantize(x, torch.int8, "rowwise")  # runs the interpreted Triton kernel
    q_ref, s_ref = quantize_ref.quantize(x, torch.int8, "rowwise")
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    monkeypatch.setenv("SYSOPT_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SYSOPT_KERNEL_BACKEND"):
        kernels.backend_for("cpu")


def test_triton_int8_gemm_slices_a_k_that_could_overflow_int32(monkeypatch):
    """The kernel sums K in int32; beyond INT32_SAFE_K products of int8 that could overflow, so the wrapper runs
    K in slices and adds their dequantised results. The limit is lowered here so that the interpreter runs a
    sliced product (with a remainder slice) in a moment; the result must match the reference's."""
    m, n, k = 8, 16, 200
    a, a_scale = quantize_ref.quantize(_data((m, k), seed=10), torch.int8, "rowwise")
    b, b_scale = quantize_ref.quantize(_data((n, k), seed=11), torch.int8, "tensorwise")
    bias = torch.randn(n)
    want = gemm_ref.scaled_mm(a, a_scale, b, b_scale, bias=bias)
    calls = []
    real_kernel = gemm_triton._scaled_mm_kernel
    monkeypatch.setattr(gemm_triton, "INT32_SAFE_K", 64)
    monkeypatch.setattr(
        gemm_triton,
        "_scaled_mm_kernel",
        type("Spy", (), {"__getitem__": lambda s, g: calls.append(g) or real_kernel[g]})(),
    )
    got = gemm_triton.scaled_mm(a, a_scale, b, b_scale, bias=bias)
    assert len(calls) == 4  # 64 + 64 + 64 + 8
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got16 = gemm_triton.scaled_mm(a, a_scale, b, b_scale, bias=bias, out_dtype=torch.bfloat16)
    assert got16.dtype == torch.bfloat16 and torch.equal(got16, got.to(torch.bfloat16))


def test_dispatch_sends_fp8_on_a_pre_ada_gpu_to_the_torch_reference(monkeypatch):
    """Triton compiles no fp8e4nv below compute capability 8.9: fp8 there runs the torch reference, int8 and
    fp8 on Ada/Hopper stay on Triton (the GPU is faked: only the choice is under test)."""
    from sysopt.kernels import dispatch

    monkeypatch.delenv("SYSOPT_KERNEL_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET")  # the file's interpreter switch would mark the device as emulated
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, fp8_backend in (((8, 0), "torch"), ((8, 9), "triton"), ((9, 0), "triton")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        for kind in ("quantize", "gemm"):
            fp8 = dispatch.kernel_module(kind, "cuda", torch.float8_e4m3fn).__name__
            int8 = dispatch.kernel_module(kind, "cuda", torch.int8).__name__
            assert fp8.endswith("_ref" if fp8_backend == "torch" else "_triton"), (capability, kind, fp8)
            assert int8.endswith("_triton"), (capability, kind, int8)
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm: capability (9, 0) means an MI200, no fp8 there
    assert dispatch.kernel_module("gemm", "cuda", torch.float8_e4m3fn).__name__.endswith("_ref")


def test_import_does_not_need_triton():
    """`import sysopt.kernels` (and a CPU quantise + GEMM) must not import Triton."""
    code = (
        "import sys, torch; import sysopt.kernels as k; "
        "q, s = k.quantize(torch.randn(4, 8), torch.int8, 'rowwise'); k.scaled_mm(q, s, q, s); "
        "assert 'triton' not in sys.modules, 'triton imported'"
    )
    env = {
        key: v for key, v in os.environ.items() if key not in ("TRITON_INTERPRET", "SYSOPT_KERNEL_BACKEND")
    }
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_mantissa_table_matches_torch_finfo():
    for dtype, m in MANTISSA_BITS.items():
        assert torch.finfo(dtype).eps == 2.0**-m
        assert torch.finfo(dtype).max == QMAX[dtype]
