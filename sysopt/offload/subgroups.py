"""Partition an optimizer's parameters into subgroups: the unit that is placed on host or device,
copied and updated together. Subgroups come in the order gradients become ready (reverse of forward)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

DEFAULT_SUBGROUP_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Subgroup:
    """Parameters of one param group that move and update together.

    `param_indices` are positions in `param_groups[group_index]["params"]`, in grad-ready order.
    `device_state_bytes` is what the subgroup's optimizer state occupies on the device when placed there
    (two moments, plus an fp32 master when the parameters are not fp32); `host_state_bytes` is what it
    occupies on the host when placed there (moments, master, gradient staging buffer). `param_bytes` is
    what a host update copies back to the device: the parameters in their dtype, or in bf16 when the host
    masters are bf16; `grad_bytes` what backward copies to the host."""

    index: int
    group_index: int
    param_indices: tuple[int, ...]
    numel: int
    param_bytes: int
    grad_bytes: int
    device_state_bytes: int
    host_state_bytes: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["param_indices"] = list(self.param_indices)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Subgroup:
        return cls(**{**d, "param_indices": tuple(d["param_indices"])})


def device_state_bytes_per_param(param_dtype: torch.dtype) -> int:
    """fp32 exp_avg + exp_avg_sq, plus an fp32 master copy when the parameter itself is not fp32."""
    return 8 + (0 if param_dtype == torch.float32 else 4)


def host_state_bytes_per_param(
    param_dtype: torch.dtype,
    state_dtype: torch.dtype = torch.float32,
    master_dtype: torch.dtype = torch.float32,
) -> int:
    """Moments in `state_dtype`, a master in `master_dtype` and a gradient buffer in the parameter's dtype."""
    itemsize = torch.empty((), dtype=param_dtype).element_size()
    moment = torch.empty((), dtype=state_dtype).element_size()
    master = torch.empty((), dtype=master_dtype).element_size()
    return 2 * moment + master + itemsize


def _copy_back_itemsize(param_dtype: torch.dtype, master_dtype: torch.dtype) -> int:
    """Bytes per element a host update sends back: a bf16 master (or a parameter narrower than its
    master, rounded on the host) crosses in the narrower of the two dtypes."""
    return min(torch.empty((), dtype=d).element_size() for d in (param_dtype, master_dtype))


def partition(
    param_groups: Sequence[Sequence[torch.Tensor]],
    subgroup_bytes: int = DEFAULT_SUBGROUP_BYTES,
    state_dtype: torch.dtype = torch.float32,
    master_dtype: torch.dtype = torch.float32,
    include: Callable[[torch.Tensor], bool] | None = None,
) -> tuple[Subgroup, ...]:
    """Cut parameters into subgroups of about `subgroup_bytes` of device optimizer state.

    Parameters are walked in reverse (last group's last parameter first): with parameters registered in
    forward order that is the order backward produces their gradients. A subgroup never spans two param
    groups (one update call uses one lr/weight decay); a parameter larger than `subgroup_bytes` gets a
    subgroup of its own.
    `include(p)` False leaves a parameter out (no state, no subgroup; its index is skipped)."""
    if subgroup_bytes <= 0:
        raise ValueError(f"subgroup_bytes={subgroup_bytes} must be positive; try {DEFAULT_SUBGROUP_BYTES}")
    subgroups: list[Subgroup] = []
    for group_index in reversed(range(len(param_groups))):
        params = param_groups[group_index]
        current: list[int] = []
        current_bytes = 0
        for param_index in reversed(range(len(params))):
            p = params[param_index]
            if include is not None and not include(p):
                continue
            if not p.is_floating_point():
                raise ValueError(
                    f"param_groups[{group_index}] parameter {param_index} has dtype {p.dtype}; "
                    "AdamW needs floating-point parameters"
                )
            nbytes = p.numel() * device_state_bytes_per_param(p.dtype)
            if current and current_bytes + nbytes > subgroup_bytes:
                subgroups.append(
                    _make(len(subgroups), group_index, current, params, state_dtype, master_dtype)
                )
                current, current_bytes = [], 0
            current.append(param_index)
            current_bytes += nbytes
        if current:
            subgroups.append(_make(len(subgroups), group_index, current, params, state_dtype, master_dtype))
    return tuple(subgroups)


def _make(
    index: int,
    group_index: int,
    indices: list[int],
    params: Sequence[torch.Tensor],
    state_dtype: torch.dtype,
    master_dtype: torch.dtype,
) -> Subgroup:
    ps = [params[i] for i in indices]
    return Subgroup(
        index=index,
        group_index=group_index,
        param_indices=tuple(indices),
        numel=sum(p.numel() for p in ps),
        param_bytes=sum(p.numel() * _copy_back_itemsize(p.dtype, master_dtype) for p in ps),
        grad_bytes=sum(p.numel() * p.element_size() for p in ps),
        device_state_bytes=sum(p.numel() * device_state_bytes_per_param(p.dtype) for p in ps),
        host_state_bytes=sum(
            p.numel() * host_state_bytes_per_param(p.dtype, state_dtype, master_dtype) for p in ps
        ),
    )


def subgroups_to_json(subgroups: Sequence[Subgroup]) -> str:
    return json.dumps([s.to_dict() for s in subgroups])


def subgroups_from_json(text: str) -> tuple[Subgroup, ...]:
    return tuple(Subgroup.from_dict(d) for d in json.loads(text))
