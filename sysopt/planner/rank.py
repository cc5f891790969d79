"""Rank configurations by predicted step time, reject those that do not fit in memory (or cannot be
modelled on this profile), and explain the top choice against the best differently-laid-out runner-up."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sysopt.planner.model import CostModel, Prediction
from sysopt.planner.space import PlanConfig

GIB = 1024**3
MIB = 1024**2
LAYOUT_KNOBS = ("tp", "pp", "vpp", "dp", "schedule", "microbatches", "micro_batch_size")
OTHER_KNOBS = ("tp_overlap", "tp_chunks", "offload", "precision")


@dataclass(frozen=True)
class Rejected:
    config: PlanConfig
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "reason": self.reason}


@dataclass(frozen=True)
class Ranking:
    """Fitting configs fastest first (ties: less memory, then fewer non-default knobs); rejected ones."""

    ranked: tuple[Prediction, ...]
    rejected: tuple[Rejected, ...]
    devices: int
    memory_bytes: int

    @property
    def top(self) -> Prediction:
        if not self.ranked:
            raise ValueError(
                f"no configuration fits: all {len(self.rejected)} were rejected (first: "
                f"{self.rejected[0].reason if self.rejected else 'none enumerated'}); use a smaller global "
                "batch, offload, or more devices"
            )
        return self.ranked[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "memory_bytes_per_device": self.memory_bytes,
            "ranking": [p.to_dict() for p in self.ranked],
            "rejected": [r.to_dict() for r in self.rejected],
        }


def complexity(config: PlanConfig) -> int:
    """How many knobs differ from the plainest way to run (a tie-break: simpler wins)."""
    return (
        (config.offload != "device")
        + (config.precision is not None)
        + (config.tp_overlap != "none")
        + (config.vpp > 1)
        + (config.microbatches > 1)
    )


def memory_reason(p: Prediction, memory_bytes: int) -> str:
    m = p.memory
    return (
        f"needs {m.total_bytes / GIB:.3f} GiB per device (params {m.params_bytes / GIB:.3f} + grads "
        f"{m.grads_bytes / GIB:.3f} + optimizer state {m.optimizer_bytes / GIB:.3f} + activations "
        f"{m.activations_bytes / GIB:.3f}) but a device has {memory_bytes / GIB:.3f} GiB; offload the "
        f"optimizer (offload=host/interleaved), raise tp or pp, or lower micro_batch_size"
    )


def rank(model: CostModel, configs: Iterable[PlanConfig]) -> Ranking:
    """Predict every config; keep those that fit the machine's device (and host) memory."""
    machine = model.machine
    fits: list[Prediction] = []
    rejected: list[Rejected] = []
    for config in configs:
        try:
            p = model.predict(config)
        except ValueError as exc:  # e.g. the profile lacks a fit this config needs
            rejected.append(Rejected(config, f"cannot be modelled: {exc}"))
            continue
        if p.peak_memory_bytes > machine.memory_bytes:
            rejected.append(Rejected(config, memory_reason(p, machine.memory_bytes)))
        elif machine.on_gpu and p.host_memory_bytes > machine.host_memory_bytes:
            rejected.append(
                Rejected(
                    config,
                    f"offloads {p.host_memory_bytes / GIB:.2f} GiB of optimizer state but the host has "
                    f"{machine.host_memory_bytes / GIB:.2f} GiB; keep more state on the devices",
                )
            )
        else:
            fits.append(p)
    fits.sort(key=lambda p: (p.step_s, p.peak_memory_bytes, complexity(p.config), p.config.label()))
    return Ranking(tuple(fits), tuple(rejected), machine.devices, machine.memory_bytes)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4g} ms"


def _breakdown_line(p: Prediction) -> str:
    parts = [
        f"compute {_ms(p.compute_s)}",
        f"TP comm {_ms(p.tp_comm_s)}",
        f"pipeline bubble {_ms(p.bubble_s)}",
        f"DP comm {_ms(p.dp_comm_s)}",
        f"optimizer {_ms(p.optimizer_s)}",
    ]
    if p.overhead_s:
        parts.append(f"step overhead {_ms(p.overhead_s)}")
    return " + ".join(parts)


def runner_up(ranking: Ranking) -> Prediction | None:
    """The fastest config whose layout (tp, pp, vpp, dp, schedule, microbatches) differs from the top's."""
    top = ranking.top
    key = tuple(getattr(top.config, k) for k in LAYOUT_KNOBS)
    return next(
        (p for p in ranking.ranked[1:] if tuple(getattr(p.config, k) for k in LAYOUT_KNOBS) != key), None
    )


def explain(ranking: Ranking, min_features: int | None = None, workload_overrides: Sequence[str] = ()) -> str:
    """Why the top config: its step-time breakdown and memory, and where the runner-up loses time.
    `min_features` goes into the printed sysopt-train command (see PlanConfig.to_overrides), and so do
    `workload_overrides`: the model/data settings the plan was made for (e.g. model.layers=3), so that the
    command trains that model on that data."""
    top = ranking.top
    lines = [
        f"Top choice: {top.config.label()}",
        f"  predicted step {_ms(top.step_s)} = {_breakdown_line(top)}",
        f"  peak memory {top.peak_memory_bytes / MIB:.1f} MiB per device of "
        f"{ranking.memory_bytes / GIB:.1f} GiB; layers per pipeline chunk "
        f"{[b - a for a, b in zip(top.boundaries, top.boundaries[1:])]}",
        "  sysopt-train "
        + " ".join(
            [
                *workload_overrides,
                *top.config.to_overrides(min_features, top.boundaries, top.offload_budget_bytes),
            ]
        ),
    ]
    ties = [
        p for p in ranking.ranked[1:] if p.step_s == top.step_s and all(
            getattr(p.config, k) == getattr(top.config, k) for k in LAYOUT_KNOBS
        )
    ]  # fmt: skip
    if ties:
        knobs = sorted(
            {k for p in ties for k in OTHER_KNOBS if getattr(p.config, k) != getattr(top.config, k)}
        )
        lines.append(
            f"  {len(ties)} other config(s) predict the same time, differing only in {', '.join(knobs)}; "
            "the top one uses less memory or fewer non-default knobs"
        )
    memory_rejects = sum(r.reason.startswith("needs ") for r in ranking.rejected)
    if ranking.rejected:
        lines.append(
            f"  rejected {len(ranking.rejected)} config(s) ({memory_rejects} over device memory); "
            f"e.g. {ranking.rejected[0].config.label()}: {ranking.rejected[0].reason}"
        )
    other = runner_up(ranking)
    if other is None:
        lines.append("No runner-up with a different layout fits.")
        return "\n".join(lines)
    changed = [
        f"{k} {getattr(top.config, k)}->{getattr(other.config, k)}"
        for k in LAYOUT_KNOBS + OTHER_KNOBS
        if getattr(top.config, k) != getattr(other.config, k)
    ]
    gap = other.step_s - top.step_s
    deltas = sorted(
        ((name, other.breakdown()[name] - value) for name, value in top.breakdown().items()),
        key=lambda item: -abs(item[1]),
    )
    why = ", ".join(f"{name[:-2].replace('_', ' ')} {delta * 1e3:+.3g} ms" for name, delta in deltas if delta)
    lines += [
        f"Runner-up: {other.config.label()} at {_ms(other.step_s)} "
        f"(+{gap * 1e3:.3g} ms, +{gap / top.step_s:.1%})",
        f"  it changes {', '.join(changed)}; against the top choice it spends {why or 'the same'}",
    ]
    return "\n".join(lines)
