"""convert(): swap a model's linear layers for low-precision ones, torchao-style.

Which module types can be swapped, and how, is a registry: nn.Linear is registered here; another layer type
(e.g. sysopt.tensor_parallel's column/row-parallel linears) registers its own swap with register_swap().
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .auto import auto_recipe_for
from .linear import LowPrecisionLinear
from .recipe import Recipe
from .recipe import recipe as named_recipe

MIN_FEATURES = 256  # default: GEMMs with fewer input or output features stay in high precision

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class SwapRule:
    """How to swap one module type: `swap(module, recipe) -> new module`; `features(module) -> (in, out)`."""

    swap: Callable[[nn.Module, Recipe], nn.Module]
    features: Callable[[nn.Module], tuple[int, int]]


_SWAPS: dict[type, SwapRule] = {}


def register_swap(
    module_type: type,
    swap: Callable[[nn.Module, Recipe], nn.Module],
    features: Callable[[nn.Module], tuple[int, int]] = lambda m: (m.in_features, m.out_features),
) -> None:
    """Make convert() swap modules of exactly `module_type` (subclasses are not matched: register them too)."""
    _SWAPS[module_type] = SwapRule(swap, features)


register_swap(nn.Linear, LowPrecisionLinear.from_linear)


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def default_filter(
    candidates: list[tuple[str, nn.Module]], *, keep_first_last: bool, min_features: int
) -> FilterFn:
    """The default choice: skip the first and last swappable layers (in registration order) and small GEMMs."""
    ends = {candidates[0][0], candidates[-1][0]} if keep_first_last and candidates else set()

    def keep_low(module: nn.Module, fqn: str) -> bool:
        in_features, out_features = _SWAPS[type(module)].features(module)
        return fqn not in ends and min(in_features, out_features) >= min_features

    return keep_low


def convert(
    model: nn.Module,
    recipe: Recipe | str,
    filter_fn: FilterFn | None = None,
    *,
    keep_first_last: bool = True,
    min_features: int | None = None,
    profile=None,
    tokens: int | None = None,
) -> nn.Module:
    """Swap the model's registered linear layers (nn.Linear) for LowPrecisionLinear, in place.

    recipe: a Recipe, a recipe name, or 'auto' (per layer from `profile` and `tokens` rows per step via
      auto_recipe_for; layers it leaves in high precision are not swapped).
    filter_fn(module, fqn) -> bool: convert exactly the layers it accepts (replaces the default choice:
      not the first/last layer when keep_first_last, not when in or out features < min_features, which
      defaults to MIN_FEATURES for a fixed recipe and to 1 for 'auto', whose cost model judges size itself).
    Returns the model (or the new module when the model itself is a linear).
    """
    auto = isinstance(recipe, str) and recipe == "auto"
    if min_features is None:
        min_features = 1 if auto else MIN_FEATURES
    candidates = [(fqn, m) for fqn, m in model.named_modules() if type(m) in _SWAPS]
    choose = filter_fn or default_filter(
        candidates, keep_first_last=keep_first_last, min_features=min_features
    )
    if auto:
        if profile is None or tokens is None:
            raise ValueError(
                "convert(recipe='auto') needs profile= (sysopt.hardware.load_or_calibrate()) and tokens= "
                f"(rows per GEMM per step, e.g. micro_batch * seq_len); got profile={profile!r}, tokens={tokens}"
            )
    elif isinstance(recipe, str):
        recipe = named_recipe(recipe)
    for fqn, module in candidates:
        if not choose(module, fqn):
            continue
        rule = _SWAPS[type(module)]
        layer_recipe = recipe
        if auto:
            in_features, out_features = rule.features(module)
            name = auto_recipe_for(profile, in_features, out_features, tokens)
            if name is None:
                continue
            layer_recipe = named_recipe(name)
        new = rule.swap(module, layer_recipe)
        if not fqn:
            return new
        _replace(model, fqn, new)
    return model
