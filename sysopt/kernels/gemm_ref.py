"""Torch reference scaled GEMM: out = (a * a_scale) @ (b * b_scale).T with a dequantising epilogue.

int8 operands multiply in int32 (torch._int_mm: the fast CPU path, VNNI/AMX), fp8 operands in fp32 (every
product of two fp8 values is exact in fp32, so this is fp32 accumulation as on tensor cores). Blockwise scales
are applied per K block to the partial sums; tensorwise and rowwise scales once, in the epilogue.
"""

from __future__ import annotations

import torch

from .scales import BLOCK, ROW, TENSOR, ScaleLayout, check_operands, k_block, scale_layout

_EPILOGUE_CHUNK_ELEMENTS = 1 << 18  # 1 MiB of fp32 output per chunk: stays in L2 between the steps


# int8 x int8 products are at most 2^14 in magnitude (-128 * -128), so int32 sums of this many cannot overflow;
# a longer K (the token count of a grad-weight GEMM) is split into chunks of it, summed in int64
# the largest K whose int8 products cannot overflow int32, rounded down to a multiple of 128 so that chunks
# of it keep the K % 8 == 0 that torch._int_mm needs on CUDA (odd chunks would all take float64)
INT32_SAFE_K = (2**31 - 1) // (128 * 128) // 128 * 128  # 130944
# torch._int_mm on CPU returns wrong sums for K == 1 (torch 2.13; K = 2..69 checked correct): below this K,
# float64 products (exact for int8) are used instead
INT_MM_MIN_K = 8


def _one_row_row_major(x: torch.Tensor) -> torch.Tensor:
    """x (2-D) itself, or where it has one row, the same data with row-major strides (K, 1). torch counts a
    (1, K) tensor with strides (1, 1) (the transpose of a (K, 1) column) as contiguous, and oneDNN's _int_mm
    reads such an operand wrongly (torch 2.13: sums of uninitialised memory for every K tried)."""
    if x.shape[0] != 1 or x.stride(1) == 1 and x.stride(0) == x.shape[1]:
        return x
    return x.contiguous().view(-1).view(x.shape)


def _int32_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T in int32 for int8 a, b with K <= INT32_SAFE_K (exact: no sum can overflow)."""
    m, k = a.shape
    if k < INT_MM_MIN_K or (a.is_cuda and (m <= 16 or k % 8 or b.shape[0] % 8)):
        # torch._int_mm's small-K bug on CPU and its CUDA shape limits: float64 sums of int8 products are exact
        return (a.double() @ b.double().t()).to(torch.int32)
    if a.is_cuda:
        a, b = a.contiguous(), b.contiguous()  # CUDA wants row-major a and column-major b.T
    # CPU (oneDNN) takes the four row/column-major layouts, but not a single row that only looks contiguous
    return torch._int_mm(_one_row_row_major(a), _one_row_row_major(b).t())


def accumulate_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T in the accumulation type: int32 for int8 (int64 when K > INT32_SAFE_K, where int32 sums could
    overflow: the int32 sums of K chunks added in int64, exact), fp32 for fp8."""
    if a.dtype != torch.int8:
        with torch.autocast(a.device.type, enabled=False):  # an fp32 accumulation, also under autocast
            return a.float() @ b.float().t()
    k, step = a.shape[1], INT32_SAFE_K
    if k <= step:
        return _int32_mm(a, b)
    out = _int32_mm(a[:, :step], b[:, :step]).long()
    for k0 in range(step, k, step):
        out.add_(_int32_mm(a[:, k0 : k0 + step], b[:, k0 : k0 + step]))
    return out


def _epilogue_scale(scale: torch.Tensor, layout: ScaleLayout, as_columns: bool) -> torch.Tensor | None:
    """A tensorwise/rowwise scale shaped to broadcast over the output ((M, 1) rows or (1, N) columns)."""
    if layout.mode == TENSOR:
        return scale.reshape(())
    if layout.mode == ROW:
        return scale.reshape(1, -1) if as_columns else scale.reshape(-1, 1)
    return None


def _block_column(scale: torch.Tensor, layout: ScaleLayout, j: int, rows: int) -> torch.Tensor:
    """Scales of K block j for each of `rows` operand rows."""
    return scale[:, j].float().repeat_interleave(layout.block[0])[:rows]


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
    """(a * a_scale) @ (b * b_scale).T + bias for a (M, K) and b (N, K) as returned by quantize().

    Scales: one element (tensorwise), (rows, 1) (rowwise), or blockwise with `a_block` / `b_block` given
    (both blockwise operands share the K block size).
    """
    check_operands(a, b)
    la = scale_layout("a", a, a_scale, a_block)
    lb = scale_layout("b", b, b_scale, b_block)
    kb = k_block(la, lb)
    m, k = a.shape
    n = b.shape[0]
    if kb is None:
        out = accumulate_mm(a, b)
    else:
        out = torch.zeros(m, n, dtype=torch.float32, device=a.device)
        for j, k0 in enumerate(range(0, k, kb)):
            part = accumulate_mm(a[:, k0 : k0 + kb], b[:, k0 : k0 + kb]).float()
            if la.mode == BLOCK:
                part.mul_(_block_column(a_scale, la, j, m)[:, None])
            if lb.mode == BLOCK:
                part.mul_(_block_column(b_scale, lb, j, n)[None, :])
            out.add_(part)
    sa = _epilogue_scale(a_scale.float(), la, as_columns=False)
    sb = _epilogue_scale(b_scale.float(), lb, as_columns=True)
    if sa is not None and sb is not None and (la.mode == TENSOR or lb.mode == TENSOR):
        scales = [sa * sb]
    else:
        scales = [s for s in (sa, sb) if s is not None]
    out = _epilogue(out, scales, bias.float() if bias is not None else None)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def _epilogue(acc: torch.Tensor, scales: list[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 out = acc * scales... + bias, over row chunks so each chunk is converted, scaled and biased while
    it sits in cache (one trip through memory instead of one per step).

    An int32 accumulator is converted in its own memory (same size, element i to element i): this saves
    allocating and page-faulting a second output-sized buffer. An int64 one (K > INT32_SAFE_K) is converted to
    fp32 first: the same single rounding float(acc) as the int32 path."""
    if acc.dtype == torch.int64:
        acc = acc.float()
    out = acc.view(torch.float32) if acc.dtype == torch.int32 else acc
    rows = out.shape[0]
    step = max(1, _EPILOGUE_CHUNK_ELEMENTS // max(1, out.shape[1]))
    for i in range(0, rows, step):
        whole = step >= rows  # one chunk: no slicing (fewer dispatched ops on small GEMMs)
        chunk = out if whole else out[i : i + step]
        if acc.dtype == torch.int32:
            chunk.copy_(acc if whole else acc[i : i + step])
        for s in scales:
            chunk.mul_(s[i : i + step] if not whole and s.dim() == 2 and s.shape[0] == rows else s)
        if bias is not None:
            chunk.add_(bias)
    return out
