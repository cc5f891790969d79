"""convert(): swap a model's linear layers for low-precision ones, torchao-style.

Which module types can be swapped, and how, is a registry: nn.Linear is registered here; another layer type
(e.g. sysopt.tensor_parallel's column/row-parallel linears) registers its own swap with register_swap().
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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


def _replace_all(model: nn.Module, new_of: dict[int, nn.Module]) -> None:
    """Replace every reference to a swapped module (by id) with its one replacement: a module registered
    under several names (reused layers, tied projections) is listed once by named_modules() but must be
    swapped under all of them, and by the same new module (one set of scaling state)."""
    for parent in list(model.modules()):
        if id(parent) in new_of:
            continue  # swapped away itself: its children are no longer part of the model
        for name, child in list(parent._modules.items()):  # named_children() would skip repeats
            if child is not None and id(child) in new_of:
                setattr(parent, name, new_of[id(child)])


def default_filter(
    candidates: list[tuple[str, nn.Module]], *, keep_first_last: bool, min_features: int
) -> FilterFn:
    """The default choice: skip the first and last swappable layers (in registration order) and small GEMMs."""
    ends = {candidates[0][0], candidates[-1][0]} if keep_first_last and candidates else set()
    ends.discard("")  # a model that is itself one linear has no first or last layer to keep

    def keep_low(module: nn.Module, fqn: str) -> bool:
        in_features, out_features = _SWAPS[type(module)].features(module)
        return fqn not in ends and min(in_features, out_features) >= min_features

    return keep_low


def _choose(
    model: nn.Module, filter_fn: FilterFn | None, keep_first_last: bool, min_features: int
) -> list[tuple[str, nn.Module]]:
    """The swappable layers convert() takes: those filter_fn accepts, else the default choice."""
    candidates = [(fqn, m) for fqn, m in model.named_modules() if type(m) in _SWAPS]
    choose = filter_fn or default_filter(
        candidates, keep_first_last=keep_first_last, min_features=min_features
    )
    return [(fqn, m) for fqn, m in candidates if choose(m, fqn)]


def auto_plan(
    model: nn.Module,
    *,
    profile,
    tokens: int,
    filter_fn: FilterFn | None = None,
    keep_first_last: bool = True,
    min_features: int = 1,
) -> dict[str, str]:
    """What convert(model, 'auto', ...) would do, as data: {layer fqn: recipe name} for the layers that
    auto_recipe_for gives a recipe (the others stay in high precision). Pass it to convert() to apply it
    again, e.g. on another machine or when resuming, where the hardware might choose otherwise."""
    if profile is None or tokens is None:
        raise ValueError(
            "convert(recipe='auto') needs profile= (sysopt.hardware.load_or_calibrate()) and tokens= "
            f"(rows per GEMM per step, e.g. micro_batch * seq_len); got profile={profile!r}, tokens={tokens}"
        )
    plan = {}
    for fqn, module in _choose(model, filter_fn, keep_first_last, min_features):
        in_features, out_features = _SWAPS[type(module)].features(module)
        name = auto_recipe_for(profile, in_features, out_features, tokens)
        if name is not None:
            plan[fqn] = name
    return plan


def convert(
    model: nn.Module,
    recipe: Recipe | str | Mapping[str, str | Recipe],
    filter_fn: FilterFn | None = None,
    *,
    keep_first_last: bool = True,
    min_features: int | None = None,
    profile=None,
    tokens: int | None = None,
) -> nn.Module:
    """Swap the model's registered linear layers (nn.Linear) for LowPrecisionLinear, in place.

    recipe: a Recipe, a recipe name, 'auto' (per layer from `profile` and `tokens` rows per step via
      auto_recipe_for; layers it leaves in high precision are not swapped), or a plan {fqn: recipe or name}
      such as auto_plan() returns, which converts exactly the layers it names (filter_fn is not used).
    filter_fn(module, fqn) -> bool: convert exactly the layers it accepts (replaces the default choice:
      not the first/last layer when keep_first_last, not when in or out features < min_features, which
      defaults to MIN_FEATURES for a fixed recipe and to 1 for 'auto', whose cost model judges size itself).
    A module registered under several names (a reused layer) is swapped under all of them by one new module.
    Returns the model (or the new module when the model itself is a linear).
    """
    auto = isinstance(recipe, str) and recipe == "auto"
    if min_features is None:
        min_features = 1 if auto else MIN_FEATURES
    if auto:
        recipe = auto_plan(
            model, profile=profile, tokens=tokens, filter_fn=filter_fn, keep_first_last=keep_first_last,
            min_features=min_features,
        )  # fmt: skip
    if isinstance(recipe, Mapping):
        layers = dict(model.named_modules(remove_duplicate=False))  # every name of a shared module
        unknown = sorted(fqn for fqn in recipe if type(layers.get(fqn)) not in _SWAPS)
        if unknown:
            swappable = [f for f, m in model.named_modules() if type(m) in _SWAPS]
            raise ValueError(
                f"convert(): the plan names {unknown}, which are not swappable linears of this model (those "
                f"are {swappable}); was the plan made for another model?"
            )
        per_layer = {fqn: named_recipe(r) if isinstance(r, str) else r for fqn, r in recipe.items()}
        chosen = [(fqn, layers[fqn]) for fqn in layers if fqn in per_layer]
    else:
        fixed = named_recipe(recipe) if isinstance(recipe, str) else recipe
        chosen = _choose(model, filter_fn, keep_first_last, min_features)
        per_layer = {fqn: fixed for fqn, _ in chosen}
    new_of: dict[int, nn.Module] = {}
    first_name: dict[int, str] = {}
    for fqn, module in chosen:
        if id(module) in new_of:
            if per_layer[fqn] != per_layer[first_name[id(module)]]:
                raise ValueError(
                    f"convert(): the plan gives one shared module two recipes: {first_name[id(module)]!r} -> "
                    f"{per_layer[first_name[id(module)]].name}, {fqn!r} -> {per_layer[fqn].name}; a module "
                    "registered under several names is swapped under all of them, so give them the same recipe"
                )
            continue
        new_of[id(module)], first_name[id(module)] = _SWAPS[type(module)].swap(module, per_layer[fqn]), fqn
        if not fqn:
            return new_of[id(module)]
    _replace_all(model, new_of)
    return model
