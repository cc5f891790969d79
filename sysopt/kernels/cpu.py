"""The `cpp` kernel backend: fused C++ int8 kernels for CPU tensors, the torch reference for everything else.

The torch reference makes a pass over memory per elementwise step (amax, multiply, round, cast; convert,
scale, bias in the epilogue), which on CPU costs a large share of an int8 linear's step. Here int8
quantisation is one pass per row (amax, scale and cast while the row is in cache; optionally the row's bf16
copy as well, which the grad-weight GEMM of SwitchBack recipes keeps) and the epilogue is one pass over the
int32 accumulator, in place; a transposing bf16 cast serves the grad-weight GEMM's left operand. Results equal quantize_ref / gemm_ref bit for bit (the same
operations in the same order; tests/test_kernels_cpu.py). fp8, blockwise scales and non-fp32 inputs go to the
reference. Built on first use (sysopt.kernels.jit); SYSOPT_CPU_KERNELS=torch turns it off.
"""

from __future__ import annotations

from typing import Any

import torch

from . import gemm_ref, quantize_ref
from .cpu_source import CPP_SOURCE
from .formats import check_dtype, check_granularity
from .jit import JitOps, KernelStatus
from .scales import ROW, TENSOR, check_operands, scale_layout

DISABLE_ENV = "SYSOPT_CPU_KERNELS"

_ops = JitOps("sysopt_quant_cpu", CPP_SOURCE, DISABLE_ENV, "sysopt.kernels: C++ int8 CPU kernels")
_EMPTY = torch.empty(0)


def load() -> Any | None:
    """The compiled ops (torch.ops.<name>), built on first use; None where they cannot be built."""
    return _ops.load()


def status() -> KernelStatus:
    return _ops.status()


def _fast(x: torch.Tensor, dtype: torch.dtype) -> bool:
    return dtype == torch.int8 and x.device.type == "cpu" and x.dtype == torch.float32 and load() is not None


def quantize_rows_int8(
    x: torch.Tensor, *, power_of_two: bool = False, with_bf16: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rowwise int8 quantisation of a contiguous fp32 x (rows over the last dim): (q, scale (*lead, 1), and
    x in bf16 when `with_bf16`, written in the same pass), as quantize_ref.quantize(x, int8, "rowwise")."""
    ops = load()
    if ops is None:
        raise RuntimeError(f"the C++ CPU kernels are unavailable: {status().error}")
    x2 = x.reshape(-1, x.shape[-1])
    q = torch.empty(x2.shape, dtype=torch.int8)
    scale = torch.empty(x2.shape[0], 1, dtype=torch.float32)
    bf16 = torch.empty(x2.shape, dtype=torch.bfloat16) if with_bf16 else _EMPTY
    ops.quantize_rows_int8(x2, q, scale, bf16, power_of_two)
    return (
        q.view(x.shape),
        scale.view(*x.shape[:-1], 1),
        bf16.view(x.shape) if with_bf16 else None,
    )


def _cast_int8(x: torch.Tensor, scale: torch.Tensor, clamp: bool) -> torch.Tensor:
    """round(x / scale) for one (tensorwise) scale; a transposed 2-D view keeps its layout, as in the reference."""
    if x.dim() == 2 and not x.is_contiguous() and x.t().is_contiguous():
        return _cast_int8(x.t(), scale, clamp).t()
    if not x.is_contiguous():
        return quantize_ref.cast_scaled(x, scale, torch.int8, clamp)
    q = torch.empty(x.shape, dtype=torch.int8)
    load().cast_int8(x, q, float(scale.reciprocal()), clamp)
    return q


@torch.no_grad()  # as its twin: quantised values and scales are data, not a graph
def quantize(
    x: torch.Tensor,
    dtype: torch.dtype,
    granularity: str,
    block: tuple[int, int] | None = None,
    *,
    power_of_two: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_ref.quantize, with int8 rowwise (contiguous x) and tensorwise quantisation in C++."""
    check_dtype(dtype)
    block = check_granularity(granularity, block)
    if _fast(x, dtype):
        if granularity == "rowwise" and x.dim() >= 2 and x.is_contiguous():
            q, scale, _ = quantize_rows_int8(x, power_of_two=power_of_two)
            return q, scale
        if granularity == "tensorwise":
            amax = quantize_ref.amax_of(x, "tensorwise", None)
            scale = quantize_ref.scale_from_amax(amax, 127.0, power_of_two)
            return _cast_int8(x, scale, clamp=False), scale
    return quantize_ref.quantize(x, dtype, granularity, block, power_of_two=power_of_two)


@torch.no_grad()
def quantize_with_amax(
    x: torch.Tensor, dtype: torch.dtype, amax: torch.Tensor, *, power_of_two: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_ref.quantize_with_amax, with the int8 cast in C++."""
    if not _fast(x, dtype):
        return quantize_ref.quantize_with_amax(x, dtype, amax, power_of_two=power_of_two)
    x_amax = quantize_ref.amax_of(x, "tensorwise", None)
    usable = quantize_ref.usable_amax(amax.reshape(()), x_amax)
    scale = quantize_ref.scale_from_amax(usable, check_dtype(dtype), power_of_two)
    return _cast_int8(x, scale, clamp=True), scale, x_amax


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
    """gemm_ref.scaled_mm, with the int32 -> fp32 dequantising epilogue of int8 x int8 in C++ (tensorwise or
    rowwise scales; blockwise scales and fp8 go to the reference)."""
    check_operands(a, b)
    la = scale_layout("a", a, a_scale, a_block)
    lb = scale_layout("b", b, b_scale, b_block)
    plain = la.mode in (TENSOR, ROW) and lb.mode in (TENSOR, ROW)
    int32_acc = a.shape[1] <= gemm_ref.INT32_SAFE_K  # longer K accumulates in int64: the reference epilogue
    # the C++ epilogue adds one bias per column; the reference broadcasts any other shape
    per_column_bias = bias is None or tuple(bias.shape) == (b.shape[0],)
    fast = plain and int32_acc and per_column_bias
    if not (fast and a.dtype == torch.int8 and a.device.type == "cpu" and load() is not None):
        return gemm_ref.scaled_mm(
            a, a_scale, b, b_scale, a_block=a_block, b_block=b_block, out_dtype=out_dtype, bias=bias
        )
    acc = gemm_ref.accumulate_mm(a, b)
    # the reference's epilogue factors: one combined scale when either side is tensorwise, else row then column
    sa, sb = a_scale.float(), b_scale.float()
    if la.mode == TENSOR or lb.mode == TENSOR:
        combined = (sa.reshape(-1, 1) if la.mode == ROW else sa.reshape(())) * (
            sb.reshape(1, -1) if lb.mode == ROW else sb.reshape(())
        )
        if lb.mode == ROW:
            row, col = _EMPTY, combined.reshape(-1).contiguous()
        else:
            row, col = combined.reshape(-1).expand(a.shape[0]).contiguous(), _EMPTY
    else:
        row, col = sa.reshape(-1).contiguous(), sb.reshape(-1).contiguous()
    out = acc.view(torch.float32)
    bias32 = bias.float().contiguous() if bias is not None else _EMPTY
    load().dequant_int32(acc, out, row, col, bias32)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def transpose_bf16(x: torch.Tensor) -> torch.Tensor:
    """x.t() in bf16, contiguous, for a contiguous 2-D fp32 CPU x (one tiled pass); torch ops elsewhere."""
    ops = load()
    if (
        ops is None
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or x.dim() != 2
        or not x.is_contiguous()
    ):
        return x.to(torch.bfloat16).t().contiguous()
    out = torch.empty(x.shape[1], x.shape[0], dtype=torch.bfloat16)
    ops.transpose_bf16(x, out)
    return out
