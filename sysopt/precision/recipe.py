"""Recipes: which number format each GEMM of a linear layer runs in, and how its operands are scaled.

A linear layer runs three GEMMs, each with two operands (the format of each is explicit, TransformerEngine-style):
  forward      y  = x  @ W.T   operands (input, weight)
  grad_input   dx = dy @ W     operands (grad_output, weight)
  grad_weight  dW = dy.T @ x   operands (grad_output, input)
Formats: 'e4m3', 'e5m2' (fp8), 'int8' (int32 accumulation), 'bf16' (a bf16 GEMM), 'high' (the input's dtype).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

from sysopt.kernels.scales import MIN_BLOCK_K as BLOCK_K_MULTIPLE

LOW_FORMATS = ("e4m3", "e5m2", "int8")
HIGH_FORMATS = ("bf16", "high")
FORMATS = LOW_FORMATS + HIGH_FORMATS
SCALINGS = ("current", "delayed")
GEMMS = ("forward", "grad_input", "grad_weight")
_GRANULARITIES = ("tensorwise", "rowwise", "blockwise")


def _pair(gemm: str, value: str | tuple[str, str] | list[str]) -> tuple[str, str]:
    if isinstance(value, str):
        return (value, value)
    pair = tuple(value)
    if len(pair) != 2:
        raise ValueError(
            f"Recipe {gemm}={value!r}: give one format for both operands (e.g. 'e4m3') or two, one per operand "
            f"(e.g. ('e5m2', 'e4m3')); got {len(pair)}"
        )
    return pair


@dataclass(frozen=True)
class Recipe:
    """Numerics of a low-precision linear layer (which layers get converted is convert()'s business).

    forward / grad_input / grad_weight: operand formats of each GEMM (a single string means both operands).
    granularity: scaling of activations and gradients; weight_granularity: of the weight (None: the same).
    activation_block / weight_block: (rows, cols) blocks for 'blockwise' (DeepSeek-V3: 1x128 and 128x128),
      applied to each GEMM operand laid out as (rows, contraction dim).
    scaling: 'current' (scale from this tensor's amax) or 'delayed' (tensorwise only: scale from the max
      of the last amax_history_len amaxes, so one spike saturates this step and raises later scales).
    power_of_two_scales: round scales up to powers of two (rescaling is then exact).
    """

    name: str = "custom"
    forward: tuple[str, str] = ("e4m3", "e4m3")
    grad_input: tuple[str, str] = ("e5m2", "e4m3")
    grad_weight: tuple[str, str] = ("e5m2", "e4m3")
    granularity: str = "tensorwise"
    weight_granularity: str | None = None
    activation_block: tuple[int, int] = (1, 128)
    weight_block: tuple[int, int] = (128, 128)
    scaling: str = "current"
    amax_history_len: int = 16
    power_of_two_scales: bool = False

    def __post_init__(self) -> None:
        for gemm in GEMMS:
            object.__setattr__(self, gemm, _pair(gemm, getattr(self, gemm)))
        object.__setattr__(self, "activation_block", tuple(int(b) for b in self.activation_block))
        object.__setattr__(self, "weight_block", tuple(int(b) for b in self.weight_block))
        self._validate()

    def _validate(self) -> None:
        for gemm in GEMMS:
            a, b = getattr(self, gemm)
            for fmt in (a, b):
                if fmt not in FORMATS:
                    raise ValueError(f"recipe {self.name!r}: {gemm} format {fmt!r} is not one of {FORMATS}")
            if (a in HIGH_FORMATS or b in HIGH_FORMATS) and a != b:
                raise ValueError(
                    f"recipe {self.name!r}: {gemm}={(a, b)} mixes a high-precision and another format; "
                    f"a high-precision GEMM uses one format for both operands, e.g. {(a, a)}"
                )
            if ("int8" in (a, b)) and a != b:
                raise ValueError(f"recipe {self.name!r}: {gemm}={(a, b)}: int8 multiplies only with int8")
        for attr in ("granularity", "weight_granularity"):
            value = getattr(self, attr)
            if value is not None and value not in _GRANULARITIES:
                raise ValueError(f"recipe {self.name!r}: {attr}={value!r} is not one of {_GRANULARITIES}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"recipe {self.name!r}: scaling={self.scaling!r} is not one of {SCALINGS}")
        if self.scaling == "delayed" and {self.granularity, self.weight_granularity or "tensorwise"} != {
            "tensorwise"
        }:
            raise ValueError(
                f"recipe {self.name!r}: delayed scaling keeps one amax per tensor, so it needs tensorwise "
                f"granularity (got {self.granularity!r}/{self.weight_granularity!r}); use scaling='current'"
            )
        if self.amax_history_len < 1:
            raise ValueError(f"recipe {self.name!r}: amax_history_len={self.amax_history_len} must be >= 1")
        for attr in ("activation_block", "weight_block"):
            block = getattr(self, attr)
            if len(block) != 2 or min(block) < 1:
                raise ValueError(
                    f"recipe {self.name!r}: {attr}={block} must be two positive sizes (rows, cols)"
                )
        # both operands of a GEMM are blocked along its contraction dim (the blocks' cols): the sizes must agree
        ab, wb = self.activation_block, self.weight_block
        blocked = [("activation_block", ab)] if self.granularity == "blockwise" else []
        blocked += [("weight_block", wb)] if self.weight_scaling_granularity == "blockwise" else []
        for attr, block in blocked:  # the CPU reference takes any size; the GPU kernel would refuse it later
            if block[1] % BLOCK_K_MULTIPLE:
                raise ValueError(
                    f"recipe {self.name!r}: {attr}={block} blocks the contraction dim in {block[1]}, which must "
                    f"be a multiple of {BLOCK_K_MULTIPLE} (the Triton scaled GEMM's K step: 8-bit tl.dot on "
                    f"NVIDIA GPUs needs K >= {BLOCK_K_MULTIPLE}); use e.g. {(block[0], 128)}"
                )
        if (
            self.granularity == "blockwise"
            and self.weight_scaling_granularity == "blockwise"
            and ab[1] != wb[1]
        ):
            raise ValueError(
                f"recipe {self.name!r}: activation_block={ab} and weight_block={wb} block the contraction dim "
                f"in {ab[1]} and {wb[1]}; the GEMMs need one size: e.g. activation_block={(ab[0], wb[1])}"
            )

    @property
    def weight_scaling_granularity(self) -> str:
        return self.weight_granularity or self.granularity

    def is_low_precision(self, gemm: str) -> bool:
        return getattr(self, gemm)[0] in LOW_FORMATS

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Recipe fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls.from_dict(json.loads(text))


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        # TransformerEngine's default: e4m3 forward, e5m2 gradients, per-tensor delayed scaling
        Recipe("fp8_tensorwise_delayed", ("e4m3", "e4m3"), ("e5m2", "e4m3"), ("e5m2", "e4m3"),
               granularity="tensorwise", scaling="delayed", amax_history_len=16),
        # torchao rowwise: e4m3 everywhere, a scale per row of every operand, power-of-two scales
        Recipe("fp8_rowwise", "e4m3", "e4m3", "e4m3", granularity="rowwise", power_of_two_scales=True),
        # DeepSeek-V3: e4m3 everywhere, 1x128 activation/gradient blocks, 128x128 weight blocks
        Recipe("fp8_blockwise", "e4m3", "e4m3", "e4m3", granularity="blockwise"),
        # SwitchBack: int8 forward and grad-input (rowwise activations, tensorwise weight so the weight is
        # quantised once per step), 16-bit grad-weight
        Recipe("int8_rowwise", "int8", "int8", "bf16", granularity="rowwise", weight_granularity="tensorwise"),
        # int8 in all three GEMMs: rowwise activations and gradients (in grad-weight the contraction runs over
        # tokens, so its scales are per channel, taken along the token dim), tensorwise weight. Not SwitchBack.
        Recipe("int8_rowwise_full", "int8", "int8", "int8", granularity="rowwise",
               weight_granularity="tensorwise"),
        Recipe("int8_tensorwise", "int8", "int8", "int8", granularity="tensorwise"),
    )
}  # fmt: skip


def recipe(name: str) -> Recipe:
    """The named recipe: one of RECIPES (fp8_tensorwise_delayed, fp8_rowwise, fp8_blockwise, int8_rowwise,
    int8_rowwise_full, int8_tensorwise)."""
    if name not in RECIPES:
        raise ValueError(
            f"unknown recipe {name!r}; named recipes: {sorted(RECIPES)} (or build a Recipe(...))"
        )
    return RECIPES[name]


__all__ = ["FORMATS", "GEMMS", "RECIPES", "Recipe", "recipe", "replace"]
