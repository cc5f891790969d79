"""Torch reference quantisation (amax -> scale -> cast): the CPU path and the twin the Triton kernels are tested against.

Vectorised eager ops, few passes over memory: min/max reductions for amax (faster on CPU than abs().amax() or
an inf-norm), one multiply, one rounding (int8) and one cast, run over cache-sized row chunks; rowwise scaling
does amax, scale and cast chunk by chunk, so x is read from memory once. NaN in x propagates into amax and the
scale.
"""

from __future__ import annotations

import torch

from .formats import EPS, blocks_of, check_dtype, check_granularity, expand_scale

_CHUNK_ELEMENTS = 1 << 18  # 1 MiB of fp32: the chunk and its temporary stay in L2


def round_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale (exact, bitwise); non-finite scales pass through."""
    bits = scale.contiguous().view(torch.int32)
    up = ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    return torch.where(torch.isfinite(scale), up, scale)


def scale_from_amax(amax: torch.Tensor, qmax: float, power_of_two: bool) -> torch.Tensor:
    """Dequantisation scale from amax: max(amax, EPS) / qmax, optionally rounded up to a power of two.
    On CUDA qmax divides as a tensor: CUDA's division by a CPU scalar multiplies by its reciprocal instead,
    one rounding off the correctly rounded quotient for about half of all amax values with qmax 448 (the CPU
    divides, and the Triton kernels use div_rn)."""
    a = amax.float().clamp(min=EPS)
    scale = a / (torch.full_like(a, qmax) if a.is_cuda else qmax)
    return round_up_pow2(scale) if power_of_two else scale


def usable_amax(amax: torch.Tensor, own_amax: torch.Tensor) -> torch.Tensor:
    """`amax` where it is positive and finite, else `own_amax` (x's own: current scaling). A delayed-scaling
    history that holds no real amax (all zero: a zero tensor's first use, an overflow recorded as 0) would
    otherwise give scale EPS / qmax, and every value of x would saturate. Decided on the device: no sync."""
    usable = (amax > 0) & torch.isfinite(amax)
    return torch.where(usable, amax.float(), own_amax.float())


def _cast_rows(x: torch.Tensor, inv: torch.Tensor, out: torch.Tensor, qmax: float, clamp: bool) -> None:
    v = (x if x.dtype == torch.float32 else x.float()) * inv
    if clamp:
        v.clamp_(-qmax, qmax)
    if out.dtype == torch.int8:
        v.round_()
    out.copy_(v)  # the same rounding as .to(dtype)


def cast_scaled(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, clamp: bool) -> torch.Tensor:
    """round_to_format(x * (1 / scale)); `clamp` saturates values beyond qmax (needed when scale is not x's own).

    The result has x's layout: a transposed 2-D view (x.t() contiguous, e.g. dy.t() in a grad-weight GEMM)
    is cast as its contiguous transpose and returned transposed, so no strided (cache-missing) writes happen.
    Row chunks of ~_CHUNK_ELEMENTS keep the fp32 temporary small and cache-resident: on CPU a fresh
    tensor-sized temporary costs more in page faults than the arithmetic does."""
    if x.dim() == 2 and not x.is_contiguous() and x.t().is_contiguous():
        return cast_scaled(x.t(), scale.t() if scale.dim() == 2 else scale, dtype, clamp).t()
    qmax = check_dtype(dtype)
    inv = scale.reciprocal()
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    same_rank = x.dim() >= 2 and inv.dim() == x.dim()
    rows_inv = same_rank and inv.shape[:-1] == x.shape[:-1] and inv.shape[-1] == 1  # (*lead, 1)
    cols_inv = same_rank and inv.numel() == inv.shape[-1] == x.shape[-1]  # (1, ..., 1, K)
    if x.dim() < 2 or x.numel() <= _CHUNK_ELEMENTS or not (inv.dim() == 0 or rows_inv or cols_inv):
        _cast_rows(x, inv, out, qmax, clamp)
        return out
    x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    inv2 = inv.reshape(-1, 1) if rows_inv else inv.reshape(1, -1) if cols_inv else inv
    step = max(1, _CHUNK_ELEMENTS // x2.shape[1])
    for i in range(0, x2.shape[0], step):
        _cast_rows(
            x2[i : i + step], inv2[i : i + step] if rows_inv else inv2, out2[i : i + step], qmax, clamp
        )
    return out


def amax_of(x: torch.Tensor, granularity: str, block: tuple[int, int] | None) -> torch.Tensor:
    """max |x| per scaling group: () tensorwise, (*lead, 1) rowwise, (row blocks, col blocks) blockwise."""
    if granularity == "tensorwise":
        lo, hi = torch.aminmax(x)
        return torch.maximum(hi, -lo)
    if granularity == "rowwise":
        return torch.maximum(x.amax(dim=-1, keepdim=True), -x.amin(dim=-1, keepdim=True))
    if x.dim() != 2:
        raise ValueError(
            f"blockwise quantisation needs a 2-D tensor, got shape {tuple(x.shape)}; reshape first"
        )
    rows, cols = x.shape
    nbr, nbc = blocks_of(rows, cols, block)
    padded = torch.nn.functional.pad(x.float().abs(), (0, nbc * block[1] - cols, 0, nbr * block[0] - rows))
    return padded.view(nbr, block[0], nbc, block[1]).amax(dim=(1, 3))


def _quantize_rows(x: torch.Tensor, dtype: torch.dtype, qmax: float, power_of_two: bool) -> tuple:
    """Rowwise quantisation of a contiguous x, chunk by chunk (amax, scale, cast while the chunk is in cache)."""
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape, dtype=dtype, device=x.device)
    scale = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, x2.shape[1]))
    for i in range(0, x2.shape[0], step):
        chunk = x2[i : i + step]
        s = scale_from_amax(amax_of(chunk, "rowwise", None), qmax, power_of_two)
        scale[i : i + step] = s
        _cast_rows(chunk, s.reciprocal(), out[i : i + step], qmax, clamp=False)
    return out.view(x.shape), scale.view(*x.shape[:-1], 1)


def _column_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| per column of a contiguous 2-D x, (1, K): running min/max over cache-sized row chunks, so x
    is read from memory once (two whole-tensor reductions would read it twice)."""
    step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[1]))
    hi, lo = x[:step].amax(dim=0, keepdim=True), x[:step].amin(dim=0, keepdim=True)
    for i in range(step, x.shape[0], step):
        torch.maximum(hi, x[i : i + step].amax(dim=0, keepdim=True), out=hi)
        torch.minimum(lo, x[i : i + step].amin(dim=0, keepdim=True), out=lo)
    return torch.maximum(hi, -lo)


@torch.no_grad()
def quantize(
    x: torch.Tensor,
    dtype: torch.dtype,
    granularity: str,
    block: tuple[int, int] | None = None,
    *,
    power_of_two: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise x with scales from its own amax (current scaling). Returns (q, scale), x ~= q.float() * scale.

    q has x's layout when x is a transposed 2-D view (see cast_scaled), else it is contiguous."""
    qmax = check_dtype(dtype)
    block = check_granularity(granularity, block)
    if granularity == "rowwise" and x.dim() >= 2 and x.is_contiguous() and x.numel() > _CHUNK_ELEMENTS:
        return _quantize_rows(x, dtype, qmax, power_of_two)
    if granularity == "rowwise" and x.dim() == 2 and x.t().is_contiguous() and x.numel() > _CHUNK_ELEMENTS:
        # a transposed view (dy.t(), x.t() in grad-weight): its rows are the columns of x.t()
        scale = scale_from_amax(_column_amax(x.t()), qmax, power_of_two).t()
        return cast_scaled(x, scale, dtype, clamp=False), scale
    scale = scale_from_amax(amax_of(x, granularity, block), qmax, power_of_two)
    full = expand_scale(scale, tuple(x.shape), block)
    return cast_scaled(x, full, dtype, clamp=False), scale


@torch.no_grad()
def quantize_with_amax(
    x: torch.Tensor, dtype: torch.dtype, amax: torch.Tensor, *, power_of_two: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensorwise quantisation with the scale taken from a given amax (delayed scaling).

    Values beyond the scale's range saturate at +-qmax. An amax that is not positive and finite (an all-zero
    history) is not used: x's own amax is (current scaling, see usable_amax). Returns (q, scale, amax of x)
    so the caller can record x's own amax in its history.
    """
    qmax = check_dtype(dtype)
    x_amax = amax_of(x, "tensorwise", None)
    scale = scale_from_amax(usable_amax(amax.reshape(()), x_amax), qmax, power_of_two)
    return cast_scaled(x, scale, dtype, clamp=True), scale, x_amax
