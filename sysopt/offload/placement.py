"""Placement plans (which subgroups update on host or device, in which transfer order), the performance
model that predicts an iteration's time for a plan, one planner per strategy, and the budget checks."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sysopt.offload.costs import CostInputs
from sysopt.offload.subgroups import Subgroup

HOST = "host"
DEVICE = "device"
STRATEGIES = ("device", "host", "fraction", "interleaved")


@dataclass(frozen=True)
class PlacementPlan:
    """Per subgroup HOST or DEVICE; `transfer_order` lists the host subgroups in the order their gradients
    are copied and their updates run (the order gradients become ready)."""

    strategy: str
    placements: tuple[str, ...]
    transfer_order: tuple[int, ...]
    device_state_bytes: int
    predicted_iteration_s: float | None = None

    def __post_init__(self) -> None:
        bad = [p for p in self.placements if p not in (HOST, DEVICE)]
        if bad:
            raise ValueError(f"placements {bad} must each be {HOST!r} or {DEVICE!r}")
        hosts = sorted(i for i, p in enumerate(self.placements) if p == HOST)
        if sorted(self.transfer_order) != hosts:
            raise ValueError(
                f"transfer_order {list(self.transfer_order)} must list each host subgroup {hosts} once"
            )

    @property
    def host_subgroups(self) -> tuple[int, ...]:
        return self.transfer_order

    @property
    def device_subgroups(self) -> tuple[int, ...]:
        return tuple(i for i, p in enumerate(self.placements) if p == DEVICE)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["placements"] = list(self.placements)
        d["transfer_order"] = list(self.transfer_order)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlacementPlan:
        fields = {**d, "placements": tuple(d["placements"]), "transfer_order": tuple(d["transfer_order"])}
        return cls(**fields)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> PlacementPlan:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class PhaseTimes:
    """Measured (or assumed) forward and backward time of one iteration, without optimizer work."""

    forward_s: float = 0.0
    backward_s: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhaseTimes:
        return cls(**d)


@dataclass(frozen=True)
class IterationPrediction:
    """Predicted times for one iteration under a plan; `iteration_s` is the sum along the critical path."""

    forward_s: float
    backward_s: float
    grad_copy_tail_s: float  # gradient copies still running after backward ends
    device_update_s: float
    host_update_s: float
    param_copy_s: float
    step_s: float  # from the end of backward to the last parameter back on the device
    iteration_s: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _placement_bytes(subgroups: Sequence[Subgroup], placements: Sequence[str]) -> int:
    return sum(s.device_state_bytes for s, p in zip(subgroups, placements) if p == DEVICE)


def predict_iteration(
    subgroups: Sequence[Subgroup],
    placements: Sequence[str],
    costs: CostInputs,
    phases: PhaseTimes,
    ready_order: Sequence[int] | None = None,
) -> IterationPrediction:
    """Time one iteration: forward, backward, then the optimizer step.

    Backward produces gradients subgroup by subgroup in `ready_order`, in proportion to their size. A host
    subgroup's gradient copy starts when it is ready (one copy link, FIFO), so copies hide under backward.
    The step starts when backward ends: device updates run back to back on the device while host
    subgroups pipeline through host update (one CPU) and parameter copy back (the other link direction).
    On a shared processor (CPU-only) without a spare core nothing overlaps and all the work adds up; with
    one (`costs.copies_overlap`), copies run on one copy thread (gradients out during backward, then
    parameters back, first in first out) beside the step, whose device updates precede the host updates."""
    order = list(ready_order) if ready_order is not None else list(range(len(subgroups)))
    total = max(sum(s.numel for s in subgroups), 1)
    host = [i for i in order if placements[i] == HOST]
    dev = [i for i in order if placements[i] == DEVICE]
    d2h = {i: costs.d2h_s(subgroups[i].grad_bytes) for i in host}
    h2d = {i: costs.h2d_s(subgroups[i].param_bytes) for i in host}
    host_upd = {i: costs.host_update_s(subgroups[i].numel) for i in host}
    device_update_s = sum(costs.device_update_s(subgroups[i].numel) for i in dev)
    host_update_s = sum(host_upd.values())
    param_copy_s = sum(h2d.values())
    fwd, bwd = phases.forward_s, phases.backward_s
    if costs.shared_processor and not costs.copies_overlap:
        step_s = sum(d2h.values()) + host_update_s + param_copy_s + device_update_s
        return IterationPrediction(
            fwd,
            bwd,
            sum(d2h.values()),
            device_update_s,
            host_update_s,
            param_copy_s,
            step_s,
            fwd + bwd + step_s,
        )
    ready_s, done = {}, 0
    for i in order:
        done += subgroups[i].numel
        ready_s[i] = bwd * done / total
    copied_s, link_free_s = {}, 0.0
    for i in host:
        link_free_s = max(link_free_s, ready_s[i]) + d2h[i]
        copied_s[i] = link_free_s
    tail = max(0.0, link_free_s - bwd) if host else 0.0
    if costs.shared_processor:  # one thread updates (device first), one copy thread serves both directions
        update_end_s = bwd + device_update_s
        for i in host:
            update_end_s = max(update_end_s, copied_s[i]) + host_upd[i]
            link_free_s = max(link_free_s, update_end_s) + h2d[i]
        step_end_s = max(update_end_s, link_free_s)
        return IterationPrediction(
            fwd, bwd, tail, device_update_s, host_update_s, param_copy_s, step_end_s - bwd, fwd + step_end_s
        )
    update_end_s = copy_end_s = bwd
    for i in host:
        update_end_s = max(update_end_s, copied_s[i]) + host_upd[i]
        copy_end_s = max(copy_end_s, update_end_s) + h2d[i]
    step_end_s = max(bwd + device_update_s, copy_end_s)
    return IterationPrediction(
        fwd, bwd, tail, device_update_s, host_update_s, param_copy_s, step_end_s - bwd, fwd + step_end_s
    )


def _plan(
    strategy: str,
    subgroups: Sequence[Subgroup],
    placements: Sequence[str],
    ready_order: Sequence[int],
    costs: CostInputs | None,
    phases: PhaseTimes,
) -> PlacementPlan:
    predicted = None
    if costs is not None:
        predicted = predict_iteration(subgroups, placements, costs, phases, ready_order).iteration_s
    return PlacementPlan(
        strategy=strategy,
        placements=tuple(placements),
        transfer_order=tuple(i for i in ready_order if placements[i] == HOST),
        device_state_bytes=_placement_bytes(subgroups, placements),
        predicted_iteration_s=predicted,
    )


def _tail(n: int, order: Sequence[int], k: int) -> list[str]:
    """The k subgroups whose gradients become ready last go on the device (their copies could not hide)."""
    placements = [HOST] * n
    for i in order[n - k :] if k else ():
        placements[i] = DEVICE
    return placements


def _spread(n: int, order: Sequence[int], k: int) -> list[str]:
    """k device subgroups spaced evenly along the ready order, ending with the last one."""
    placements = [HOST] * n
    for j in range(k):
        placements[order[(j + 1) * n // k - 1]] = DEVICE
    return placements


def plan_interleaved(
    subgroups: Sequence[Subgroup],
    device_budget_bytes: int,
    costs: CostInputs,
    phases: PhaseTimes,
    ready_order: Sequence[int] | None = None,
) -> PlacementPlan:
    """The plan with the least predicted iteration time among those within the budget.

    Candidates: for each count k of device subgroups, the k ready last ('tail') and k spread evenly. Ties
    go to the plan using less device memory."""
    n = len(subgroups)
    order = list(ready_order) if ready_order is not None else list(range(n))
    best: tuple[float, int, list[str]] | None = None
    for k in range(n + 1):
        for placements in (_tail(n, order, k), _spread(n, order, k)):
            nbytes = _placement_bytes(subgroups, placements)
            if nbytes > device_budget_bytes:
                continue
            t = predict_iteration(subgroups, placements, costs, phases, order).iteration_s
            if best is None or (t, nbytes) < best[:2]:
                best = (t, nbytes, placements)
    assert best is not None  # all-host always fits a budget >= 0
    return _plan("interleaved", subgroups, best[2], order, costs, phases)


def plan_fraction(
    subgroups: Sequence[Subgroup],
    device_fraction: float,
    costs: CostInputs | None = None,
    phases: PhaseTimes = PhaseTimes(),
    ready_order: Sequence[int] | None = None,
) -> PlacementPlan:
    """Fixed split (megatron-core HybridDeviceOptimizer, DeepSpeed Twin-Flow): the subgroups ready last,
    up to `device_fraction` of all optimizer state bytes, stay on the device; the rest go to the host."""
    if not 0.0 <= device_fraction <= 1.0:
        raise ValueError(f"fraction={device_fraction} must be in [0, 1] (share of state kept on the device)")
    n = len(subgroups)
    order = list(ready_order) if ready_order is not None else list(range(n))
    limit = device_fraction * sum(s.device_state_bytes for s in subgroups)
    placements, used = [HOST] * n, 0
    for i in reversed(order):
        if used + subgroups[i].device_state_bytes > limit:
            break
        placements[i] = DEVICE
        used += subgroups[i].device_state_bytes
    return _plan("fraction", subgroups, placements, order, costs, phases)


def make_plan(
    strategy: str,
    subgroups: Sequence[Subgroup],
    *,
    device_budget_bytes: int,
    costs: CostInputs | None = None,
    phases: PhaseTimes = PhaseTimes(),
    device_fraction: float = 0.5,
    ready_order: Sequence[int] | None = None,
) -> PlacementPlan:
    """Plan for a strategy: 'device' (no offload), 'host' (ZeRO-Offload), 'fraction', 'interleaved'."""
    n = len(subgroups)
    order = list(ready_order) if ready_order is not None else list(range(n))
    if strategy == "device":
        plan = _plan("device", subgroups, [DEVICE] * n, order, costs, phases)
    elif strategy == "host":
        plan = _plan("host", subgroups, [HOST] * n, order, costs, phases)
    elif strategy == "fraction":
        plan = plan_fraction(subgroups, device_fraction, costs, phases, order)
    elif strategy == "interleaved":
        if costs is None:
            raise ValueError("strategy='interleaved' needs CostInputs (profile or measurement)")
        plan = plan_interleaved(subgroups, device_budget_bytes, costs, phases, order)
    else:
        raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
    check_plan(plan, subgroups, device_budget_bytes)
    return plan


def check_plan(
    plan: PlacementPlan,
    subgroups: Sequence[Subgroup],
    device_budget_bytes: int,
    free_device_bytes: int | None = None,
    free_host_bytes: int | None = None,
    host_bytes_of: Callable[[Subgroup], int] | None = None,
) -> None:
    """Raise ValueError, with the numbers, if a plan does not fit the subgroups, the budget or the memory.
    `host_bytes_of(subgroup)`: the host memory a subgroup's buffers take as allocated (pinned buffers are
    rounded up), where that is more than its host_state_bytes."""
    if device_budget_bytes < 0:
        raise ValueError(f"device_budget_bytes={device_budget_bytes} must be >= 0")
    if len(plan.placements) != len(subgroups):
        raise ValueError(
            f"plan has {len(plan.placements)} placements but the optimizer has {len(subgroups)} subgroups; "
            "make the plan for these parameters and subgroup_bytes"
        )
    need = _placement_bytes(subgroups, plan.placements)
    total = sum(s.device_state_bytes for s in subgroups)
    if need > device_budget_bytes:
        fix = (
            f"lower fraction to <= {device_budget_bytes / max(total, 1):.3f}, "
            if plan.strategy == "fraction"
            else ""
        )
        raise ValueError(
            f"strategy={plan.strategy!r} places {need} bytes of optimizer state on the device "
            f"({len(plan.device_subgroups)} of {len(subgroups)} subgroups, {total} bytes in all) but "
            f"device_budget_bytes={device_budget_bytes}; raise the budget, {fix}or use strategy='interleaved' "
            "or 'host'"
        )
    if free_device_bytes is not None and need > free_device_bytes:
        raise ValueError(
            f"strategy={plan.strategy!r} places {need} bytes of optimizer state on the device but only "
            f"{free_device_bytes} bytes are free there; offload more (strategy='interleaved' or 'host')"
        )
    size = host_bytes_of or (lambda s: s.host_state_bytes)
    host_need = sum(size(s) for s, p in zip(subgroups, plan.placements) if p == HOST)
    if free_host_bytes is not None and host_need > free_host_bytes:
        allocated = " (as pinned buffers, each rounded up to a power of two)" if host_bytes_of else ""
        raise ValueError(
            f"strategy={plan.strategy!r} places {host_need} bytes of optimizer state on the host{allocated} but "
            f"only {free_host_bytes} bytes of host memory are free; keep more on the device or add host memory"
        )
