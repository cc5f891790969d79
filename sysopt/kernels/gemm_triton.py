"""Triton scaled GEMM: out = (a * a_scale) @ (b * b_scale).T with fp32 accumulation (int32 for int8).

Same signature as gemm_ref.scaled_mm. Tensorwise and rowwise scales are applied in the dequantising epilogue
(with the bias and the cast to the output dtype); blockwise scales multiply each K block's partial sum, so the
kernel's K step divides the K block size (and is >= 32, the least K of an 8-bit tl.dot). A bf16 output is
rounded to nearest even in fp32 bits before the cast (the interpreter's own cast truncates). One config, no autotuning (the interpreter cannot time configs).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dispatch import on_device
from .gemm_ref import INT32_SAFE_K
from .scales import BLOCK, MIN_BLOCK_K, ROW, TENSOR, check_operands, k_block, scale_layout

_BLOCK_M, _BLOCK_N, _MAX_BLOCK_K = 32, 32, 64
_MIN_BLOCK_K = MIN_BLOCK_K  # tl.dot of 8-bit operands (int8, fp8) on NVIDIA GPUs needs K >= 32 per dot
_NO_UPCAST, _UPCAST_BF16, _UPCAST_FP32 = 0, 1, 2


@triton.jit
def _scaled_mm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K,
                      sam, sak, sbn, sbk, scm, scn, sas0, sas1, sbs0, sbs1,
                      A_MODE: tl.constexpr, B_MODE: tl.constexpr, A_BR: tl.constexpr, B_BR: tl.constexpr,
                      KB: tl.constexpr, IS_INT: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr,
                      OUT_BF16: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    # int64 indices, so element offsets (index * stride) do not wrap for operands spanning >= 2^31 elements
    pid, tiles_n = tl.program_id(0).to(tl.int64), tl.cdiv(N, BLOCK_N)  # a 1-D grid, row tiles major
    rm = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = rm < M, rn < N
    blocked: tl.constexpr = (A_MODE == 2) or (B_MODE == 2)
    int_acc: tl.constexpr = IS_INT and not blocked
    if int_acc:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        kmask = rk < K
        if IS_INT:
            a = tl.load(
                a_ptr + rm[:, None] * sam + rk[None, :] * sak, mask=mmask[:, None] & kmask[None, :], other=0
            )
            b = tl.load(
                b_ptr + rn[None, :] * sbn + rk[:, None] * sbk, mask=kmask[:, None] & nmask[None, :], other=0
            )
            part = tl.dot(a, b, out_dtype=tl.int32)
        else:
            a = tl.load(a_ptr + rm[:, None] * sam + rk[None, :] * sak, mask=mmask[:, None] & kmask[None, :],
                        other=0.0)  # fmt: skip
            b = tl.load(b_ptr + rn[None, :] * sbn + rk[:, None] * sbk, mask=kmask[:, None] & nmask[None, :],
                        other=0.0)  # fmt: skip
            if UPCAST == 1:
                a, b = a.to(tl.bfloat16), b.to(tl.bfloat16)
            if UPCAST == 2:
                a, b = a.to(tl.float32), b.to(tl.float32)
                part = tl.dot(a, b, input_precision="ieee", out_dtype=tl.float32)
            else:
                part = tl.dot(a, b, out_dtype=tl.float32)
        if blocked:
            part = part.to(tl.float32)
            kb = k0 // KB
            if A_MODE == 2:
                sa = tl.load(as_ptr + (rm // A_BR) * sas0 + kb * sas1, mask=mmask, other=0.0)
                part = part * sa[:, None]
            if B_MODE == 2:
                sb = tl.load(bs_ptr + (rn // B_BR) * sbs0 + kb * sbs1, mask=nmask, other=0.0)
                part = part * sb[None, :]
        acc += part
    out = acc.to(tl.float32)
    if A_MODE == 0:
        out = out * tl.load(as_ptr)
    if A_MODE == 1:
        out = out * tl.load(as_ptr + rm * sas0, mask=mmask, other=0.0)[:, None]
    if B_MODE == 0:
        out = out * tl.load(bs_ptr)
    if B_MODE == 1:
        out = out * tl.load(bs_ptr + rn * sbs0, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if OUT_BF16:  # round to nearest even here: the interpreter's fp32 -> bf16 cast truncates
        bits = out.to(tl.int32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        # NaN stays NaN: CUDA's canonical NaN 0x7FFFFFFF would wrap to 0x80000000 (-0.0) above
        out = tl.where(out != out, out, rounded)
    tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, out.to(c_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])  # fmt: skip


def _k_step(kb: int | None) -> int:
    """The kernel's K step: a power of two >= _MIN_BLOCK_K (8-bit tl.dot) that divides the blockwise K block
    size (each K step's partial sum is scaled by one block's scale)."""
    if kb is None:
        return _MAX_BLOCK_K
    step = _MAX_BLOCK_K
    while step >= _MIN_BLOCK_K and kb % step:
        step //= 2
    if step < _MIN_BLOCK_K:
        raise ValueError(
            f"the Triton scaled GEMM needs a blockwise K block size that is a multiple of {_MIN_BLOCK_K} "
            f"(8-bit tl.dot needs K >= {_MIN_BLOCK_K} per dot on NVIDIA GPUs), got {kb}; use e.g. block=(1, 128) "
            "or (128, 128)"
        )
    return step


def _upcast_mode(a: torch.Tensor, b: torch.Tensor) -> int:
    """Mixed fp8 operands (e4m3 x e5m2) are upcast in-kernel: bf16 on GPUs, fp32 in the interpreter."""
    if a.dtype == b.dtype:
        return _NO_UPCAST
    return _UPCAST_FP32 if os.environ.get("TRITON_INTERPRET") == "1" else _UPCAST_BF16


def _scale_strides(scale: torch.Tensor) -> tuple[int, int]:
    if scale.dim() == 2:
        return scale.stride(0), scale.stride(1)
    return (scale.stride(0) if scale.dim() == 1 else 0), 0


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
    """Triton twin of gemm_ref.scaled_mm."""
    with on_device(a):
        return _scaled_mm(a, a_scale, b, b_scale, a_block, b_block, out_dtype, bias)


def _scaled_mm(a, a_scale, b, b_scale, a_block, b_block, out_dtype, bias):
    check_operands(a, b)
    la = scale_layout("a", a, a_scale, a_block)
    lb = scale_layout("b", b, b_scale, b_block)
    kb = k_block(la, lb)
    m, k = a.shape
    if a.dtype == torch.int8 and kb is None and k > INT32_SAFE_K:
        # the kernel sums a whole K in int32, which K > INT32_SAFE_K products of int8 can overflow: run K in
        # slices that cannot (row and tensor scales do not vary along K) and add their dequantised results
        out = None
        for k0 in range(0, k, INT32_SAFE_K):
            part = _scaled_mm(
                a[:, k0 : k0 + INT32_SAFE_K],
                a_scale,
                b[:, k0 : k0 + INT32_SAFE_K],
                b_scale,
                None,
                None,
                torch.float32,
                None,
            )
            out = part if out is None else out.add_(part)
        if bias is not None:
            out.add_(bias.float())
        return out.to(out_dtype)
    n = b.shape[0]
    a_scale, b_scale = a_scale.float().contiguous(), b_scale.float().contiguous()
    if la.mode == ROW:
        a_scale = a_scale.reshape(m)
    if lb.mode == ROW:
        b_scale = b_scale.reshape(n)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    bias_arg = bias.contiguous() if bias is not None else out
    # one grid axis over all output tiles: CUDA allows 2^31 - 1 programs on axis 0 but 65535 on axis 1,
    # which N > 65535 * _BLOCK_N columns would exceed
    grid = (triton.cdiv(m, _BLOCK_M) * triton.cdiv(n, _BLOCK_N),)
    _scaled_mm_kernel[grid](
        a, b, out, a_scale, b_scale, bias_arg, m, n, k,
        *a.stride(), *b.stride(), *out.stride(), *_scale_strides(a_scale), *_scale_strides(b_scale),
        A_MODE=la.mode, B_MODE=lb.mode,
        A_BR=la.block[0] if la.mode == BLOCK else 1, B_BR=lb.block[0] if lb.mode == BLOCK else 1,
        KB=kb or 1, IS_INT=a.dtype == torch.int8, UPCAST=_upcast_mode(a, b), HAS_BIAS=bias is not None,
        OUT_BF16=out_dtype == torch.bfloat16,
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_k_step(kb),
    )  # fmt: skip
    return out


__all__ = ["scaled_mm", "TENSOR", "ROW", "BLOCK"]
