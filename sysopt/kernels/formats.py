"""Facts about the low-precision formats and scale layouts shared by the torch and Triton kernels.

The quantisation math is defined once here and followed bit for bit by both backends:
  amax  = max |x| over the scaling group            (NaN/inf in x make it non-finite)
  scale = max(amax, EPS) / qmax                     (fp32, correctly rounded; optionally rounded UP to 2^k)
  q     = round_to_format(x * (1 / scale))          (round to nearest even, clamped to +-qmax)
so x ~= q * scale, with |x - q * scale| <= scale * ulp(q) / 2 for x in range.
"""

from __future__ import annotations

import torch

EPS = 1e-12
GRANULARITIES = ("tensorwise", "rowwise", "blockwise")
DEFAULT_BLOCK = (1, 128)

# largest finite magnitude, explicit mantissa bits, exponent of the smallest normal
QMAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0, torch.int8: 127.0}
MANTISSA_BITS = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}
MIN_NORMAL_EXP = {torch.float8_e4m3fn: -6, torch.float8_e5m2: -14}

FORMAT_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "int8": torch.int8}


def check_dtype(dtype: torch.dtype) -> float:
    """Return qmax of `dtype`, or raise naming the supported ones."""
    if dtype not in QMAX:
        raise ValueError(
            f"dtype={dtype} is not a low-precision format; use one of "
            "torch.float8_e4m3fn, torch.float8_e5m2, torch.int8"
        )
    return QMAX[dtype]


def check_granularity(granularity: str, block: tuple[int, int] | None) -> tuple[int, int] | None:
    """Validate granularity/block and return the block to use (None unless blockwise)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}")
    if granularity != "blockwise":
        if block is not None:
            raise ValueError(f"block={block} only applies to granularity='blockwise', got {granularity!r}")
        return None
    block = DEFAULT_BLOCK if block is None else tuple(int(b) for b in block)
    if len(block) != 2 or min(block) < 1:
        raise ValueError(
            f"block={block} must be two positive sizes (rows, cols), e.g. (1, 128) or (128, 128)"
        )
    return block


def ulp_of(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of the format's grid at each value of q (as fp32), the unit of rounding error."""
    if dtype == torch.int8:
        return torch.ones_like(q, dtype=torch.float32)
    m = MANTISSA_BITS[dtype]
    mag = q.float().abs()
    exp = torch.floor(torch.log2(mag.clamp(min=2.0 ** MIN_NORMAL_EXP[dtype])))
    return torch.exp2(exp - m)


def blocks_of(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """Number of blocks along each dim (the blockwise scale's shape)."""
    return -(-rows // block[0]), -(-cols // block[1])


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] | None) -> torch.Tensor:
    """Blockwise scale -> per-element scale of `shape`; other scales are returned as they are (broadcastable)."""
    if block is None:
        return scale
    full = scale.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return full[: shape[0], : shape[1]]


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """q.float() * scale (scale expanded over blocks when `block` is given)."""
    return q.float() * expand_scale(scale, tuple(q.shape), block)
