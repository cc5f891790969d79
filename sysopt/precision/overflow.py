"""Overflow safety: find inf/NaN seen while scaling low-precision operands, so the trainer skips the step.

Every quantised operand's amax (or scale) is checked on the device; a non-finite one sets its layer's flag for
that GEMM (never a host sync inside forward/backward). Once per step, after backward and before
optimizer.step(), the trainer calls:

    if not sysopt.precision.check_finite(model):    # logs a warning naming the layers and GEMMs
        optimizer.zero_grad(set_to_none=True)       # skip the step: never train on these gradients
        continue

or check_finite(model, raise_error=True) to stop with NonFiniteError instead. Either call resets the flags.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .recipe import GEMMS

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Raised by check_finite(raise_error=True); `.where` lists (layer name, GEMM) pairs."""

    def __init__(self, where: list[tuple[str, str]]) -> None:
        self.where = where
        super().__init__(_message(where))


def _message(where: list[tuple[str, str]]) -> str:
    shown = ", ".join(f"{name or '<root>'}.{gemm}" for name, gemm in where[:8])
    more = f" and {len(where) - 8} more" if len(where) > 8 else ""
    return (
        f"inf/NaN in low-precision operands at {shown}{more}: this step's gradients are invalid; skip the "
        "optimizer step (and lower the learning rate or use delayed scaling with a longer amax history if it "
        "recurs)"
    )


def _flagged_layers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Layers carrying a `nonfinite` flag buffer (LowPrecisionLinear and any layer built on ScalingState)."""
    found = []
    for name, module in model.named_modules():
        flag = getattr(module, "nonfinite", None)
        if isinstance(flag, torch.Tensor) and flag.dtype == torch.bool:
            found.append((name, flag))
    return found


def nonfinite_layers(model: nn.Module, *, reset: bool = False) -> list[tuple[str, str]]:
    """(layer name, GEMM) pairs whose operands held inf/NaN since the last reset (one host sync)."""
    layers = _flagged_layers(model)
    if not layers:
        return []
    device = layers[0][1].device
    flags = torch.stack([f.to(device) for _, f in layers]).cpu().tolist()
    if reset:
        for _, f in layers:
            f.zero_()
    return [(name, GEMMS[g]) for (name, _), row in zip(layers, flags) for g, bad in enumerate(row) if bad]


def check_finite(model: nn.Module, *, raise_error: bool = False) -> bool:
    """True when no low-precision operand was non-finite this step; else warn (or raise) and return False.

    Resets the flags either way.
    """
    where = nonfinite_layers(model, reset=True)
    if not where:
        return True
    if raise_error:
        raise NonFiniteError(where)
    logger.warning(_message(where))
    return False
