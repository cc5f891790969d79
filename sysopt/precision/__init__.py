"""Low-precision training: recipes (fp8 / int8, per-GEMM formats, scaling), the low-precision linear, convert().

model = sysopt.precision.convert(model, sysopt.precision.recipe("int8_rowwise"))
...; loss.backward()
if sysopt.precision.check_finite(model):   # inf/NaN in a scaled operand -> warn and skip the step
    optimizer.step()
optimizer.zero_grad()
"""

from __future__ import annotations

from .auto import auto_recipe_for
from .convert import MIN_FEATURES, SwapRule, auto_plan, convert, register_swap
from .diagnostics import gemm_sqnr
from .linear import LowPrecisionLinear, LowPrecisionLinearFunction, low_precision_linear
from .overflow import NonFiniteError, check_finite, nonfinite_layers
from .recipe import FORMATS, GEMMS, RECIPES, Recipe, recipe
from .scaling import Quantized, ScalingState
from .tensor_parallel import LowPrecisionColumnParallelLinear, LowPrecisionRowParallelLinear

__all__ = [
    "FORMATS",
    "GEMMS",
    "MIN_FEATURES",
    "RECIPES",
    "LowPrecisionColumnParallelLinear",
    "LowPrecisionLinear",
    "LowPrecisionRowParallelLinear",
    "LowPrecisionLinearFunction",
    "NonFiniteError",
    "Quantized",
    "Recipe",
    "ScalingState",
    "SwapRule",
    "auto_plan",
    "auto_recipe_for",
    "check_finite",
    "convert",
    "gemm_sqnr",
    "low_precision_linear",
    "nonfinite_layers",
    "recipe",
    "register_swap",
]
