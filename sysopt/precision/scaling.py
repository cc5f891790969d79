"""Scaling state of one low-precision layer: amax histories (delayed scaling) and non-finite flags.

Everything stays on the device: histories are updated in place and a non-finite amax only sets a flag, so a
step costs no host sync; overflow.check_finite() reads all flags once per step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sysopt import kernels
from sysopt.kernels.formats import FORMAT_DTYPES
from sysopt.kernels.quantize_ref import amax_of

from .recipe import GEMMS, Recipe

ROLES = ("input", "weight", "grad_output")


@dataclass(frozen=True)
class Quantized:
    """A quantised GEMM operand laid out as (rows, contraction dim), with its scale and block (or None)."""

    q: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int] | None
    bf16: torch.Tensor | None = None  # the operand itself in bf16, when quantize(..., keep_bf16=True)

    def t(self) -> Quantized:
        """The transposed operand; valid for tensorwise scales and for blockwise ones (blocks transpose too)."""
        if self.block is None:
            return Quantized(self.q.t(), self.scale, None)
        return Quantized(self.q.t(), self.scale.t(), (self.block[1], self.block[0]))

    def transposable(self) -> bool:
        """True when .t() is the quantisation of the transposed tensor with the same recipe settings:
        tensorwise scales (0-dim) and square blocks. A one-element scale is not enough: one row's rowwise
        scale, or a blockwise operand that is a single (1, 128) block, quantises its transpose otherwise."""
        if self.block is None:
            return self.scale.dim() == 0
        return self.block[0] == self.block[1]


class ScalingState:
    """Per-layer scaling state. Holds references to the layer's buffers:
    amax_history (3, H) rows ROLES (delayed scaling) and nonfinite (3,) bools per GEMM."""

    def __init__(self, recipe: Recipe, amax_history: torch.Tensor, nonfinite: torch.Tensor) -> None:
        self.recipe = recipe
        self.amax_history = amax_history
        self.nonfinite = nonfinite
        self.seen = dict.fromkeys(ROLES, False)  # whether a role's history holds an amax yet
        self.recording = True  # False in eval mode: the histories are read, never written

    def quantize(
        self, t: torch.Tensor, fmt: str, role: str, gemm: str, *, record: bool = True, keep_bf16: bool = False
    ) -> Quantized:
        """Quantise operand t (rows, contraction) for `gemm` in format `fmt`.

        Activations and gradients use the recipe's granularity/activation_block, the weight its
        weight granularity/weight_block. With delayed scaling the scale comes from the role's amax history
        and, when `record`, t's amax is pushed into it. The first use of a role falls back to current scaling,
        and so does a use whose history holds no positive finite amax (all zero: a zero-initialised weight, or
        an overflow recorded as 0); kernels.quantize_with_amax decides that on the device, without a sync.
        `keep_bf16` also returns t in bf16 (Quantized.bf16), written in the same pass where the C++ CPU
        kernels quantise (int8 rowwise, current scaling)."""
        if keep_bf16:
            fused = self._quantize_keep_bf16(t, fmt, role, gemm)
            if fused is not None:
                return fused
            return dataclasses.replace(
                self.quantize(t, fmt, role, gemm, record=record), bf16=t.to(torch.bfloat16)
            )
        recipe = self.recipe
        dtype = FORMAT_DTYPES[fmt]
        is_weight = role == "weight"
        granularity = recipe.weight_scaling_granularity if is_weight else recipe.granularity
        block = (
            (recipe.weight_block if is_weight else recipe.activation_block)
            if granularity == "blockwise"
            else None
        )
        pow2 = recipe.power_of_two_scales
        if recipe.scaling == "delayed":
            r = ROLES.index(role)
            if self.seen[role]:
                amax = self.amax_history[r].max()
                q, scale, x_amax = kernels.quantize_with_amax(t, dtype, amax, power_of_two=pow2)
            else:
                q, scale = kernels.quantize(t, dtype, "tensorwise", power_of_two=pow2)
                x_amax = amax_of(t, "tensorwise", None).float()
            self._flag(gemm, x_amax)
            if record and self.recording:
                self._record(r, x_amax)
                self.seen[role] = True
            return Quantized(q, scale, None)
        q, scale = kernels.quantize(t, dtype, granularity, block, power_of_two=pow2)
        self._flag(gemm, scale)
        return Quantized(q, scale, block)

    def _quantize_keep_bf16(self, t: torch.Tensor, fmt: str, role: str, gemm: str) -> Quantized | None:
        """The fused int8-rowwise + bf16 pass of the C++ CPU kernels, where it applies; else None."""
        recipe = self.recipe
        granularity = recipe.weight_scaling_granularity if role == "weight" else recipe.granularity
        if not (
            fmt == "int8"
            and granularity == "rowwise"
            and recipe.scaling != "delayed"
            and t.dtype == torch.float32
            and t.dim() >= 2
            and t.is_contiguous()
            and kernels.backend_for(t.device) == "cpp"
        ):
            return None
        from sysopt.kernels import cpu

        q, scale, bf16 = cpu.quantize_rows_int8(t, power_of_two=recipe.power_of_two_scales, with_bf16=True)
        self._flag(gemm, scale)
        return Quantized(q, scale, None, bf16)

    def history_loaded(self) -> None:
        """After amax_history was overwritten (a checkpoint load): a role with a nonzero amax in its
        history uses it from the next quantisation on, as the run that saved it would have."""
        for r, role in enumerate(ROLES):
            self.seen[role] = bool(self.amax_history[r].max() > 0)

    @torch.no_grad()
    def _record(self, r: int, amax: torch.Tensor) -> None:
        """Push amax into history row r (a non-finite amax is recorded as 0: it is flagged, not remembered)."""
        hist = self.amax_history[r]
        hist.copy_(torch.roll(hist, 1))
        hist[0] = torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax))

    @torch.no_grad()
    def _flag(self, gemm: str, values: torch.Tensor) -> None:
        g = GEMMS.index(gemm)
        self.nonfinite[g] |= ~torch.isfinite(values).all()
