"""Low-precision tensor-parallel linears: sysopt.tensor_parallel's column/row layers whose local GEMMs follow
a Recipe, registered with convert() so a tensor-parallel model converts like a dense one.

Each layer runs Megatron's unfused structure: the collective in the activations' own precision, then the
local low-precision GEMM (forward, grad-input and grad-weight in the recipe's formats):
  column: all-gather the sequence (sequence parallel) or copy the input (backward all-reduce), then GEMM;
  row:    GEMM, then reduce-scatter to the sequence shard (sequence parallel) or all-reduce, then the bias.
The chunked compute-collective overlap of the high-precision layers is not applied here (a layer's
`overlap` policy is kept but unused): quantising per chunk would change tensorwise and delayed scaling.
Quantisation sees the local shard: a row-parallel weight's per-row scales cover its in/tp columns.
"""

from __future__ import annotations

import torch

from sysopt.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from .convert import register_swap
from .linear import ScalingBuffers, autocast_dtype, low_precision_linear
from .recipe import Recipe


def _share_parameters(new, layer, recipe: Recipe):
    """`new` (a bare instance of a subclass) takes `layer`'s configuration and parameters (shared, so an
    optimizer holding them stays valid), then its own scaling buffers."""
    new.__dict__.update({k: type(v)(v) if isinstance(v, dict) else v for k, v in layer.__dict__.items()})
    new.recipe = recipe
    new._init_state(layer.weight.device)
    return new


class LowPrecisionColumnParallelLinear(ScalingBuffers, ColumnParallelLinear):
    """ColumnParallelLinear with its local GEMMs in a Recipe's formats (see the module docstring)."""

    @classmethod
    def from_parallel(cls, layer: ColumnParallelLinear, recipe: Recipe) -> LowPrecisionColumnParallelLinear:
        return _share_parameters(cls.__new__(cls), layer, recipe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"LowPrecisionColumnParallelLinear: input last dim {x.shape[-1]} != in_features={self.in_features}; "
                f"pass [sequence, batch, {self.in_features}] (the full hidden size: only the weight is sharded)"
            )
        dtype = autocast_dtype(x)
        x = (
            x if dtype is None else x.to(dtype)
        )  # under autocast: gather 16-bit activations, as the GEMM takes
        if self.sequence_parallel:
            full = gather_from_sequence_parallel_region(x, self.group, reduce_grad=True)
        else:
            full = copy_to_tensor_parallel_region(x, self.group)
        return low_precision_linear(full, self.weight, self.bias, self.scaling_state)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}"


class LowPrecisionRowParallelLinear(ScalingBuffers, RowParallelLinear):
    """RowParallelLinear with its local GEMMs in a Recipe's formats (see the module docstring)."""

    @classmethod
    def from_parallel(cls, layer: RowParallelLinear, recipe: Recipe) -> LowPrecisionRowParallelLinear:
        return _share_parameters(cls.__new__(cls), layer, recipe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] * self.tp_size != self.in_features:
            raise ValueError(
                f"LowPrecisionRowParallelLinear: input last dim {x.shape[-1]} should be in_features/tp = "
                f"{self.in_features}/{self.tp_size}; pass this rank's shard of the features (the output of a "
                "column-parallel layer)"
            )
        partial = low_precision_linear(x, self.weight, None, self.scaling_state)
        if self.sequence_parallel:
            if x.shape[0] % self.tp_size:
                raise ValueError(
                    f"LowPrecisionRowParallelLinear: sequence length {x.shape[0]} is not divisible by "
                    f"tp={self.tp_size}; pad the sequence to a multiple of {self.tp_size}"
                )
            out = reduce_scatter_to_sequence_parallel_region(partial, self.group)
            bias = None if self.bias is None else copy_to_tensor_parallel_region(self.bias, self.group)
        else:
            out = reduce_from_tensor_parallel_region(partial, self.group)
            bias = self.bias
        dtype = autocast_dtype(x)
        if (
            bias is not None and dtype is not None
        ):  # the partial sums came out in the autocast dtype: so does y
            bias = bias.to(dtype)
        return out if bias is None else out + bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}"


def _local_features(layer) -> tuple[int, int]:
    """(in, out) of the GEMM this rank runs: what decides whether low precision pays."""
    return layer.weight.shape[1], layer.weight.shape[0]


register_swap(ColumnParallelLinear, LowPrecisionColumnParallelLinear.from_parallel, _local_features)
register_swap(RowParallelLinear, LowPrecisionRowParallelLinear.from_parallel, _local_features)

__all__ = ["LowPrecisionColumnParallelLinear", "LowPrecisionRowParallelLinear"]
