"""Low-precision kernels: fused amax/scale/cast to fp8 and int8, and scaled GEMMs with dequantising epilogues.

Each operation has a torch reference (`*_ref`) and a Triton twin (`*_triton`) with the same signature; the
functions here dispatch per device (Triton on GPUs, torch on CPU; see dispatch.py).
"""

from __future__ import annotations

import torch

from .dispatch import backend_for, kernel_module, triton_available
from .formats import DEFAULT_BLOCK, GRANULARITIES, QMAX, dequantize, expand_scale


@torch.no_grad()  # quantised values and scales are data, not a graph (x may be a Parameter)
def quantize(
    x: torch.Tensor,
    dtype: torch.dtype,
    granularity: str,
    block: tuple[int, int] | None = None,
    *,
    power_of_two: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise x to `dtype` (float8_e4m3fn, float8_e5m2, int8) with scales from its own amax.

    granularity: 'tensorwise' (scale shape ()), 'rowwise' (one per row over the last dim: (*lead, 1)) or
    'blockwise' (2-D x, block=(rows, cols), default (1, 128); scale shape (ceil(M/rows), ceil(K/cols))).
    Returns (q, scale) with x ~= q.float() * scale (blockwise: scale expanded over blocks, see expand_scale).
    power_of_two rounds scales up to powers of two (exact rescaling).
    """
    return kernel_module("quantize", x.device, dtype).quantize(
        x, dtype, granularity, block, power_of_two=power_of_two
    )


@torch.no_grad()  # quantised values and scales are data, not a graph (x may be a Parameter)
def quantize_with_amax(
    x: torch.Tensor, dtype: torch.dtype, amax: torch.Tensor, *, power_of_two: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensorwise quantisation with the scale from a given amax (delayed scaling); values beyond it saturate.
    An amax that is not positive and finite (an all-zero history) is replaced by x's own (current scaling).

    Returns (q, scale, amax of x); x's amax is non-finite when x holds inf or NaN.
    """
    return kernel_module("quantize", x.device, dtype).quantize_with_amax(
        x, dtype, amax, power_of_two=power_of_two
    )


def contiguous_bf16(x: torch.Tensor) -> torch.Tensor:
    """x in bf16, row-major (x may be a transposed 2-D view, e.g. dy.t() in a grad-weight GEMM). On CPU with
    the C++ kernels a transposed fp32 view is cast and transposed in one pass."""
    if (
        x.dim() == 2
        and x.dtype == torch.float32
        and not x.is_contiguous()
        and x.t().is_contiguous()
        and backend_for(x.device) == "cpp"
    ):
        from . import cpu

        return cpu.transpose_bf16(x.t())
    return x.to(torch.bfloat16).contiguous()


def scaled_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    a_block: tuple[int, int] | None = None,
    b_block: tuple[int, int] | None = None,
    out_dtype: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """(a * a_scale) @ (b * b_scale).T + bias for quantised a (M, K), b (N, K); int32/fp32 accumulation."""
    return kernel_module("gemm", a.device, a.dtype).scaled_mm(
        a, a_scale, b, b_scale, a_block=a_block, b_block=b_block, out_dtype=out_dtype, bias=bias
    )


__all__ = [
    "DEFAULT_BLOCK",
    "GRANULARITIES",
    "QMAX",
    "backend_for",
    "contiguous_bf16",
    "dequantize",
    "expand_scale",
    "quantize",
    "quantize_with_amax",
    "scaled_mm",
    "triton_available",
]
