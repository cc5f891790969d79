"""Scaling state of one low-precision layer: amax histories (delayed scaling) and non-finite flags.

Everything stays on the device: histories are updated in place and a non-finite amax only sets a flag, so a
step costs no host sync; overflow.check_finite() reads all flags once per step.
"""

from __future__ import annotations

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

    def t(self) -> Quantized:
        """The transposed operand; valid for tensorwise scales and for blockwise ones (blocks transpose too)."""
        if self.block is None:
            return Quantized(self.q.t(), self.scale, None)
        return Quantized(self.q.t(), self.scale.t(), (self.block[1], self.block[0]))

    def transposable(self) -> bool:
        """True when .t() is the quantisation of the transposed tensor with the same recipe settings."""
        return self.scale.numel() == 1 or (self.block is not None and self.block[0] == self.block[1])


class ScalingState:
    """Per-layer scaling state. Holds references to the layer's buffers:
    amax_history (3, H) rows ROLES (delayed scaling) and nonfinite (3,) bools per GEMM."""

    def __init__(self, recipe: Recipe, amax_history: torch.Tensor, nonfinite: torch.Tensor) -> None:
        self.recipe = recipe
        self.amax_history = amax_history
        self.nonfinite = nonfinite
        self.seen = dict.fromkeys(ROLES, False)

    def quantize(self, t: torch.Tensor, fmt: str, role: str, gemm: str, *, record: bool = True) -> Quantized:
        """Quantise operand t (rows, contraction) for `gemm` in format `fmt`.

        Activations and gradients use the recipe's granularity/activation_block, the weight its
        weight granularity/weight_block. With delayed scaling the scale comes from the role's amax history
        and, when `record`, t's amax is pushed into it (the first use of a role falls back to current scaling).
        """
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
            if record:
                self._record(r, x_amax)
                self.seen[role] = True
            return Quantized(q, scale, None)
        q, scale = kernels.quantize(t, dtype, granularity, block, power_of_two=pow2)
        self._flag(gemm, scale)
        return Quantized(q, scale, block)

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
