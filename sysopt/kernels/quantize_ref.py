"""Torch reference quantisation (amax -> scale -> cast): the CPU path and the twin the Triton kernels are tested against.

Vectorised eager ops, few passes over memory: min/max reductions for amax (faster on CPU than abs().amax() or
an inf-norm), one multiply, one rounding (int8) and one cast. NaN in x propagates into amax and the scale.
"""

from __future__ import annotations

import torch

from .formats import EPS, blocks_of, check_dtype, check_granularity, expand_scale

_CHUNK_ELEMENTS = 1 << 20


def round_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale (exact, bitwise); non-finite scales pass through."""
    bits = scale.contiguous().view(torch.int32)
    up = ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    return torch.where(torch.isfinite(scale), up, scale)


def scale_from_amax(amax: torch.Tensor, qmax: float, power_of_two: bool) -> torch.Tensor:
    """Dequantisation scale from amax: max(amax, EPS) / qmax, optionally rounded up to a power of two."""
    scale = amax.float().clamp(min=EPS) / qmax
    return round_up_pow2(scale) if power_of_two else scale


def _cast_rows(x: torch.Tensor, inv: torch.Tensor, out: torch.Tensor, qmax: float, clamp: bool) -> None:
    v = (x if x.dtype == torch.float32 else x.float()) * inv
    if clamp:
        v.clamp_(-qmax, qmax)
    if out.dtype == torch.int8:
        v.round_()
    out.copy_(v)  # the same rounding as .to(dtype)


def cast_scaled(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, clamp: bool) -> torch.Tensor:
    """round_to_format(x * (1 / scale)); `clamp` saturates values beyond qmax (needed when scale is not x's own).

    Row chunks of ~_CHUNK_ELEMENTS keep the fp32 temporary small and cache-resident: on CPU a fresh
    tensor-sized temporary costs more in page faults than the arithmetic does."""
    qmax = check_dtype(dtype)
    inv = scale.reciprocal()
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    rows_inv = x.dim() >= 2 and inv.dim() == x.dim() and inv.shape[:-1] == x.shape[:-1] and inv.shape[-1] == 1
    if x.dim() < 2 or x.numel() <= _CHUNK_ELEMENTS or not (inv.dim() == 0 or rows_inv):
        _cast_rows(x, inv, out, qmax, clamp)
        return out
    x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    inv2 = inv.reshape(-1, 1) if rows_inv else inv
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


def quantize(
    x: torch.Tensor,
    dtype: torch.dtype,
    granularity: str,
    block: tuple[int, int] | None = None,
    *,
    power_of_two: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise x with scales from its own amax (current scaling). Returns (q, scale), x ~= q.float() * scale."""
    qmax = check_dtype(dtype)
    block = check_granularity(granularity, block)
    scale = scale_from_amax(amax_of(x, granularity, block), qmax, power_of_two)
    full = expand_scale(scale, tuple(x.shape), block)
    return cast_scaled(x, full, dtype, clamp=False), scale


def quantize_with_amax(
    x: torch.Tensor, dtype: torch.dtype, amax: torch.Tensor, *, power_of_two: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensorwise quantisation with the scale taken from a given amax (delayed scaling).

    Values beyond the scale's range saturate at +-qmax. Returns (q, scale, amax of x) so the caller can
    record x's own amax in its history.
    """
    qmax = check_dtype(dtype)
    scale = scale_from_amax(amax.reshape(()), qmax, power_of_two)
    x_amax = amax_of(x, "tensorwise", None)
    return cast_scaled(x, scale, dtype, clamp=True), scale, x_amax
