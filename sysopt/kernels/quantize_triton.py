"""Triton kernels: fused amax + scale + cast to fp8 / int8 (tensorwise, rowwise, blockwise).

Same math and signature as quantize_ref. Rounding to the target format is done in fp32 by the kernel itself
(round to nearest even: bit arithmetic for fp8 normals, an add/subtract of a power-of-two magic number for fp8
subnormals and int8), so the final cast only converts values that are already exact in the format. This keeps
results identical to torch's `.to(float8)` on every backend, including the Triton interpreter whose own
fp32->fp8 cast mis-rounds at exponent carries (7.935 -> 4.0). Loads are upcast to fp32 at once (the interpreter
computes bf16 wrongly) and there is no autotuning (one config per kernel). Element offsets (index * stride)
are computed in int64: in int32 they wrap for tensors (or strided views) spanning 2^31 elements or more.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import quantize_ref
from .dispatch import on_device
from .formats import EPS, MANTISSA_BITS, MIN_NORMAL_EXP, blocks_of, check_dtype, check_granularity

_TILE_M, _TILE_K = 16, 128


def _format_args(dtype: torch.dtype) -> dict:
    """constexpr arguments describing the target format."""
    if dtype == torch.int8:
        return dict(QMAX=127.0, IS_INT=True, MBITS=0, MIN_NORMAL=1.0, SUB_MAGIC=1.5 * 2.0**23)
    m, e = MANTISSA_BITS[dtype], MIN_NORMAL_EXP[dtype]
    return dict(
        QMAX=check_dtype(dtype), IS_INT=False, MBITS=m, MIN_NORMAL=2.0**e, SUB_MAGIC=1.5 * 2.0 ** (23 + e - m)
    )


@triton.jit
def _abs_for_amax(x):
    """|x| with NaN mapped to +inf, so a NaN anywhere makes amax (and the scale) non-finite."""
    return tl.where(x == x, tl.abs(x), float("inf"))


@triton.jit
def _nan_flag(x):
    """1.0 where x is NaN, else 0.0: reduced beside the amax, since tl.max / tl.maximum drop NaN."""
    return tl.where(x == x, 0.0, 1.0)


@triton.jit
def _amax_or_nan(amax, nan_flag):
    """amax, or NaN where its group held a NaN: torch's amax propagates NaN, so quantize_ref's scale is NaN."""
    return tl.where(nan_flag > 0.0, float("nan"), amax)


@triton.jit
def _tile_amax(x):
    """max |x| over a 2-D tile, NaN when the tile holds one."""
    amax = tl.max(tl.max(_abs_for_amax(x), axis=1), axis=0)
    return _amax_or_nan(amax, tl.max(tl.max(_nan_flag(x), axis=1), axis=0))


@triton.jit
def _scale_from_amax(amax, QMAX: tl.constexpr, EPS: tl.constexpr, POW2: tl.constexpr):
    amax = tl.where(amax == amax, tl.maximum(amax, EPS), amax)  # NaN stays NaN (tl.maximum drops it)
    scale = tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32))
    if POW2:
        bits = scale.to(tl.int32, bitcast=True)
        up = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
        scale = tl.where(scale < float("inf"), up, scale)
    return scale


@triton.jit
def _to_format(v, QMAX: tl.constexpr, IS_INT: tl.constexpr, MBITS: tl.constexpr,
               MIN_NORMAL: tl.constexpr, SUB_MAGIC: tl.constexpr):  # fmt: skip
    """Clamp to +-QMAX and round to nearest even on the format's grid; result is exact in the format.
    NaN gives NaN (fp8) or 0 (int8), as quantize_ref's cast does; tl.maximum / tl.minimum would drop it."""
    is_nan = v != v
    v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    if IS_INT:
        return tl.where(is_nan, 0.0, (v + SUB_MAGIC) - SUB_MAGIC)
    drop: tl.constexpr = 23 - MBITS
    bits = v.to(tl.int32, bitcast=True)
    rounded = (bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)) & (-(1 << drop))
    normal = rounded.to(tl.float32, bitcast=True)
    sub = tl.abs((v + SUB_MAGIC) - SUB_MAGIC)
    sub = tl.where(bits < 0, -sub, sub)  # the sign bit, so -0.0 stays -0.0
    return tl.where(is_nan, float("nan"), tl.where(tl.abs(v) < MIN_NORMAL, sub, normal))


@triton.jit
def _store_q(ptrs, q, mask, IS_INT: tl.constexpr):
    """Store q (exact in the format) in the format's dtype; fp8 NaN as the bits 0x7F (NaN in e4m3fn and e5m2),
    which the interpreter's own fp32 -> e4m3 cast does not give."""
    out = q.to(ptrs.dtype.element_ty)
    if not IS_INT:
        bits = tl.where(q == q, out.to(tl.uint8, bitcast=True), tl.full(q.shape, 0x7F, tl.uint8))
        out = bits.to(ptrs.dtype.element_ty, bitcast=True)
    tl.store(ptrs, out, mask=mask)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, sxm, sxk, sqm, sqk,
                          QMAX: tl.constexpr, EPS: tl.constexpr, POW2: tl.constexpr, IS_INT: tl.constexpr,
                          MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_MAGIC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """One program per BLOCK_M rows: a pass over K for the row amax, a second to scale and cast."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64 offsets (module doc)
    rmask = rows < M
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    nan = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask = rmask[:, None] & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * sxm + cols[None, :] * sxk, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(_abs_for_amax(x), axis=1))
        nan = tl.maximum(nan, tl.max(_nan_flag(x), axis=1))
    scale = _scale_from_amax(_amax_or_nan(amax, nan), QMAX, EPS, POW2)
    inv = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), scale)
    tl.store(s_ptr + rows, scale, mask=rmask)
    for k0 in range(0, K, BLOCK_K):
        cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask = rmask[:, None] & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * sxm + cols[None, :] * sxk, mask=mask, other=0.0).to(tl.float32)
        q = _to_format(x * inv[:, None], QMAX, IS_INT, MBITS, MIN_NORMAL, SUB_MAGIC)
        _store_q(q_ptr + rows[:, None] * sqm + cols[None, :] * sqk, q, mask, IS_INT)


@triton.jit
def _quantize_blocks_kernel(x_ptr, q_ptr, s_ptr, M, K, sxm, sxk, sqm, sqk, ssm,
                            BR: tl.constexpr, BC: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr,
                            QMAX: tl.constexpr, EPS: tl.constexpr, POW2: tl.constexpr, IS_INT: tl.constexpr,
                            MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_MAGIC: tl.constexpr):  # fmt: skip
    """One program per (BR, BC) block, held in a power-of-two (TILE_R, TILE_C) tile; a 1-D grid over the
    blocks, row-major (see _tile_grid)."""
    block_cols = tl.cdiv(K, BC)
    pid = tl.program_id(0).to(tl.int64)  # int64: so are the element offsets below (module doc)
    pr, pc = pid // block_cols, pid % block_cols
    ir, ic = tl.arange(0, TILE_R), tl.arange(0, TILE_C)
    rows, cols = pr * BR + ir, pc * BC + ic
    mask = ((ir < BR) & (rows < M))[:, None] & ((ic < BC) & (cols < K))[None, :]
    x = tl.load(x_ptr + rows[:, None] * sxm + cols[None, :] * sxk, mask=mask, other=0.0).to(tl.float32)
    scale = _scale_from_amax(_tile_amax(x), QMAX, EPS, POW2)
    inv = tl.math.div_rn(1.0, scale)
    tl.store(s_ptr + pr * ssm + pc, scale)
    q = _to_format(x * inv, QMAX, IS_INT, MBITS, MIN_NORMAL, SUB_MAGIC)
    _store_q(q_ptr + rows[:, None] * sqm + cols[None, :] * sqk, q, mask, IS_INT)


@triton.jit
def _amax_tiles_kernel(x_ptr, amax_ptr, gate_ptr, M, K, sxm, sxk, GATED: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Per-tile amax (tensorwise scaling reduces these partials). GATED: only where the amax at gate_ptr is
    not positive and finite (else every load is masked off, reads nothing, and the partials are 0)."""
    tiles_k = tl.cdiv(K, BLOCK_K)
    pid = tl.program_id(0).to(tl.int64)  # int64: so are the element offsets below (module doc)
    pm, pk = pid // tiles_k, pid % tiles_k  # a 1-D grid (see _tile_grid)
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    if GATED:
        gate = tl.load(gate_ptr)
        mask = tl.where((gate <= 0.0) | (gate != gate) | (gate == float("inf")), mask, False)
    x = tl.load(x_ptr + rows[:, None] * sxm + cols[None, :] * sxk, mask=mask, other=0.0).to(tl.float32)
    tl.store(amax_ptr + tl.program_id(0), _tile_amax(x))


@triton.jit
def _cast_tensorwise_kernel(x_ptr, q_ptr, s_ptr, amax_ptr, M, K, sxm, sxk, sqm, sqk,
                            WRITE_AMAX: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr,
                            MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_MAGIC: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Scale by a given tensorwise scale and cast; optionally also write the tile's amax (delayed scaling)."""
    tiles_k = tl.cdiv(K, BLOCK_K)
    pid = tl.program_id(0).to(tl.int64)  # int64: so are the element offsets below (module doc)
    pm, pk = pid // tiles_k, pid % tiles_k  # a 1-D grid (see _tile_grid)
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * sxm + cols[None, :] * sxk, mask=mask, other=0.0).to(tl.float32)
    inv = tl.math.div_rn(1.0, tl.load(s_ptr))
    q = _to_format(x * inv, QMAX, IS_INT, MBITS, MIN_NORMAL, SUB_MAGIC)
    _store_q(q_ptr + rows[:, None] * sqm + cols[None, :] * sqk, q, mask, IS_INT)
    if WRITE_AMAX:
        tl.store(amax_ptr + tl.program_id(0), _tile_amax(x))


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(1, -1) if x.dim() < 2 else x.reshape(-1, x.shape[-1])


def _tile_grid(m: int, k: int) -> tuple[int]:
    """One grid axis over all (row tile, column tile) pairs: axis 0 takes 2^31 - 1 programs, axes 1 and 2 only
    65535 on CUDA, which a long 1-D input ((1, numel) here) would exceed in its column tiles."""
    return (triton.cdiv(m, _TILE_M) * triton.cdiv(k, _TILE_K),)


def _tensorwise_cast(x2, dtype, scale, write_amax):
    q = torch.empty(x2.shape, dtype=dtype, device=x2.device)
    grid = _tile_grid(*x2.shape)
    partial = torch.empty(grid[0], dtype=torch.float32, device=x2.device)
    fmt = _format_args(dtype)
    _cast_tensorwise_kernel[grid](x2, q, scale, partial, x2.shape[0], x2.shape[1], *x2.stride(), *q.stride(),
                                  WRITE_AMAX=write_amax, BLOCK_M=_TILE_M, BLOCK_K=_TILE_K, **fmt)  # fmt: skip
    return q, partial


def _tensorwise_amax(x2: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """max |x2|; with `gate` (an fp32 amax) only where the gate is not positive and finite, else 0."""
    grid = _tile_grid(*x2.shape)
    partial = torch.empty(grid[0], dtype=torch.float32, device=x2.device)
    gated = gate is not None
    _amax_tiles_kernel[grid](x2, partial, gate if gated else partial, x2.shape[0], x2.shape[1], *x2.stride(),
                             GATED=gated, BLOCK_M=_TILE_M, BLOCK_K=_TILE_K)  # fmt: skip
    return partial.max()


def quantize(
    x: torch.Tensor,
    dtype: torch.dtype,
    granularity: str,
    block: tuple[int, int] | None = None,
    *,
    power_of_two: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of quantize_ref.quantize: (q, scale) with x ~= q.float() * scale."""
    with on_device(x):
        return _quantize(x, dtype, granularity, block, power_of_two)


def _quantize(x, dtype, granularity, block, power_of_two):
    qmax = check_dtype(dtype)
    block = check_granularity(granularity, block)
    if granularity == "tensorwise":
        x2 = _as_2d(x)
        scale = quantize_ref.scale_from_amax(_tensorwise_amax(x2), qmax, power_of_two)
        q, _ = _tensorwise_cast(x2, dtype, scale, write_amax=False)
        return q.reshape(x.shape), scale
    fmt = _format_args(dtype)
    if granularity == "rowwise":
        x2 = _as_2d(x)
        m, k = x2.shape
        q = torch.empty((m, k), dtype=dtype, device=x.device)
        scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
        _quantize_rows_kernel[(triton.cdiv(m, _TILE_M),)](x2, q, scale, m, k, *x2.stride(), *q.stride(),
                                                          EPS=EPS, POW2=power_of_two, BLOCK_M=_TILE_M,
                                                          BLOCK_K=_TILE_K, **fmt)  # fmt: skip
        return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)
    if x.dim() != 2:
        raise ValueError(
            f"blockwise quantisation needs a 2-D tensor, got shape {tuple(x.shape)}; reshape first"
        )
    m, k = x.shape
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    scale = torch.empty(blocks_of(m, k, block), dtype=torch.float32, device=x.device)
    tiles = (1 << math.ceil(math.log2(block[0])), 1 << math.ceil(math.log2(block[1])))
    _quantize_blocks_kernel[(scale.numel(),)](x, q, scale, m, k, *x.stride(), *q.stride(), scale.stride(0),
                                              BR=block[0], BC=block[1], TILE_R=tiles[0], TILE_C=tiles[1],
                                              EPS=EPS, POW2=power_of_two, **fmt)  # fmt: skip
    return q, scale


def quantize_with_amax(
    x: torch.Tensor, dtype: torch.dtype, amax: torch.Tensor, *, power_of_two: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of quantize_ref.quantize_with_amax: one fused pass casts with the given scale and
    reduces x's own amax. Where the given amax is not positive and finite, a pass before it takes x's own
    amax for the scale (current scaling); otherwise that pass reads nothing (no host sync decides it)."""
    x2 = _as_2d(x)
    amax = amax.reshape(()).float().to(x.device, non_blocking=True)  # a kernel reads it: on x's device
    with on_device(x):
        own = _tensorwise_amax(x2, gate=amax)
        scale = quantize_ref.scale_from_amax(
            quantize_ref.usable_amax(amax, own), check_dtype(dtype), power_of_two
        )
        q, partial = _tensorwise_cast(x2, dtype, scale, write_amax=True)
        return q.reshape(x.shape), scale, partial.max()
