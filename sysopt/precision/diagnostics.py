"""How much a recipe perturbs each GEMM of a linear layer, measured on real operands.

gemm_sqnr(recipe, x, weight, dy) runs the layer's three GEMMs (forward y = x W^T, grad-input dx = dy W,
grad-weight dW = dy^T x) through the low-precision linear and returns each output's SQNR against the same GEMM
in float64. Use it on operands captured from a model (forward/backward hooks) to compare recipes per GEMM
before paying for a training run: a recipe whose grad-weight SQNR sits 20 dB below another's is the one to
suspect when its loss drifts.
"""

from __future__ import annotations

import math

import torch

from .linear import LowPrecisionLinearFunction
from .recipe import GEMMS, Recipe
from .scaling import ScalingState


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(sum ref^2 / sum (ref - approx)^2) in float64; inf when they are equal."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def gemm_sqnr(
    recipe: Recipe, x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, *, steps: int = 2
) -> dict[str, float]:
    """{'forward', 'grad_input', 'grad_weight'}: SQNR [dB] of y, dx and dW under `recipe` for one linear
    layer with input x (..., in), weight (out, in) and output gradient dy (..., out).

    The layer runs `steps` times on the same operands and the last run is measured, so delayed scaling
    reads an amax history as it would in training rather than its first-use fallback."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or dy.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"gemm_sqnr needs x (..., in), weight (out, in) and dy (..., out) with matching sizes; got x "
            f"{tuple(x.shape)}, weight {tuple(weight.shape)}, dy {tuple(dy.shape)}"
        )
    if x.shape[:-1] != dy.shape[:-1]:
        raise ValueError(f"x {tuple(x.shape)} and dy {tuple(dy.shape)} must have the same leading dims")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    x2 = x.detach().reshape(-1, x.shape[-1])
    dy2 = dy.detach().reshape(-1, dy.shape[-1])
    w = weight.detach()
    reference = {
        "forward": x2.double() @ w.double().t(),
        "grad_input": dy2.double() @ w.double(),
        "grad_weight": dy2.double().t() @ x2.double(),
    }
    history = torch.zeros(3, recipe.amax_history_len, dtype=torch.float32, device=x.device)
    state = ScalingState(recipe, history, torch.zeros(3, dtype=torch.bool, device=x.device))
    for _ in range(steps):
        xi = x2.clone().requires_grad_(True)
        wi = w.clone().requires_grad_(True)
        y = LowPrecisionLinearFunction.apply(xi, wi, None, state)
        y.backward(dy2.to(y.dtype))
    got = {"forward": y.detach(), "grad_input": xi.grad, "grad_weight": wi.grad}
    return {gemm: sqnr_db(reference[gemm], got[gemm]) for gemm in GEMMS}


__all__ = ["gemm_sqnr", "sqnr_db"]
