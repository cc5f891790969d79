"""Classify the scale of one GEMM operand (tensorwise / rowwise / blockwise) and check its shape."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import blocks_of

TENSOR, ROW, BLOCK = 0, 1, 2
# a blockwise scale's contraction-dim block size must be a multiple of this: the Triton scaled GEMM scales each
# K step's partial sum by one block's scale, and 8-bit tl.dot on NVIDIA GPUs needs K >= 32 per dot
MIN_BLOCK_K = 32


@dataclass(frozen=True)
class ScaleLayout:
    """How an operand of shape (rows, K) is scaled: mode TENSOR, ROW (one per row) or BLOCK (block=(br, bk))."""

    mode: int
    block: tuple[int, int] | None = None


def scale_layout(
    name: str, operand: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None
) -> ScaleLayout:
    """Infer the operand's scale layout from the scale's shape; `block` must be given for blockwise scales."""
    rows, k = operand.shape
    if block is not None:
        block = (int(block[0]), int(block[1]))
        want = blocks_of(rows, k, block)
        if tuple(scale.shape) != want:
            raise ValueError(
                f"{name}_scale has shape {tuple(scale.shape)} but {name} of shape {(rows, k)} with "
                f"{name}_block={block} needs {want}; pass the scale returned by quantize(..., block={block})"
            )
        return ScaleLayout(BLOCK, block)
    if scale.numel() == 1:
        return ScaleLayout(TENSOR)
    if tuple(scale.shape) == (rows, 1):
        return ScaleLayout(ROW)
    raise ValueError(
        f"{name}_scale has shape {tuple(scale.shape)}; for {name} of shape {(rows, k)} use a one-element "
        f"(tensorwise) or ({rows}, 1) (rowwise) scale, or pass {name}_block for a blockwise scale"
    )


def k_block(a: ScaleLayout, b: ScaleLayout) -> int | None:
    """The K block size shared by blockwise operands (None when neither is blockwise)."""
    sizes = {lay.block[1] for lay in (a, b) if lay.mode == BLOCK}
    if len(sizes) > 1:
        raise ValueError(
            f"blockwise operands must share the K block size, got a_block/b_block K sizes {sizes}"
        )
    return sizes.pop() if sizes else None


def check_operands(a: torch.Tensor, b: torch.Tensor) -> None:
    """a (M, K) and b (N, K), both of one low-precision family (int8 with int8, fp8 with fp8)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"scaled_mm computes a @ b.T with a (M, K) and b (N, K); got a {tuple(a.shape)}, b {tuple(b.shape)}"
        )
    if (a.dtype == torch.int8) != (b.dtype == torch.int8):
        raise ValueError(f"int8 operands multiply only with int8, got a {a.dtype} and b {b.dtype}")
