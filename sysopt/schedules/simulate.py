"""Event-driven cost and memory simulation of a Schedule (pure Python).

An action starts when its rank is free (in-rank order) and its data has arrived: the producing
action on the neighbouring stage has ended, plus ``p2p`` when that stage lives on another rank.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from sysopt.schedules.ir import Action, B, F, I, Schedule, W, is_cross_rank, validate

Number = float | int


@dataclass(frozen=True)
class Costs:
    """Times for one microbatch through one stage (model chunk); each a scalar or one value per stage.

    ``backward`` is the whole backward; ``weight`` is the weight-gradient part of it, so a split
    backward costs ``backward - weight`` (I) plus ``weight`` (W). ``p2p[s]`` is the time to move the
    tensor between stage s and s+1 (either direction) when they sit on different ranks.
    """

    forward: Number | Sequence[Number]
    backward: Number | Sequence[Number]
    weight: Number | Sequence[Number] = 0.0
    p2p: Number | Sequence[Number] = 0.0

    def per_stage(self, num_stages: int) -> dict[str, tuple[float, ...]]:
        out = {}
        for name in ("forward", "backward", "weight", "p2p"):
            value = getattr(self, name)
            if isinstance(value, int | float):
                values = (float(value),) * num_stages
            else:
                values = tuple(float(v) for v in value)
                if len(values) != num_stages:
                    raise ValueError(
                        f"Costs.{name} has {len(values)} values but the schedule has {num_stages} stages; "
                        f"give one value per stage or a scalar"
                    )
            if any(v < 0 for v in values):
                raise ValueError(f"Costs.{name}={values} must be >= 0")
            out[name] = values
        bad = [s for s in range(num_stages) if out["weight"][s] > out["backward"][s]]
        if bad:
            raise ValueError(
                f"Costs.weight exceeds Costs.backward on stages {bad}: weight is the weight-gradient part "
                "of the whole backward, so it must be <= backward"
            )
        return out

    def to_dict(self) -> dict:
        return {k: (list(v) if not isinstance(v, int | float) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Span:
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Simulation:
    """Result of ``simulate``: times in the units of ``Costs``.

    ``bubble_fraction`` = (step_time - ideal_time) / ideal_time with ideal_time the busiest rank's
    compute (Megatron's bubble over ideal compute). ``peak_activations[r]``: most (stage, microbatch)
    activations rank r holds at once, counted from F until the backward that frees them (B or W).
    """

    schedule_name: str
    step_time: float
    ideal_time: float
    bubble_fraction: float
    busy_time: tuple[float, ...]
    peak_activations: tuple[int, ...]
    timeline: dict[int, tuple[Span, ...]]

    def to_dict(self) -> dict:
        return {
            "schedule_name": self.schedule_name,
            "step_time": self.step_time,
            "ideal_time": self.ideal_time,
            "bubble_fraction": self.bubble_fraction,
            "busy_time": list(self.busy_time),
            "peak_activations": list(self.peak_activations),
            "timeline": {
                str(r): [[str(s.action), s.start, s.end] for s in spans] for r, spans in self.timeline.items()
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @staticmethod
    def from_dict(d: dict) -> Simulation:
        return Simulation(
            d["schedule_name"],
            d["step_time"],
            d["ideal_time"],
            d["bubble_fraction"],
            tuple(d["busy_time"]),
            tuple(d["peak_activations"]),
            {
                int(r): tuple(Span(Action.parse(a), s, e) for a, s, e in spans)
                for r, spans in d["timeline"].items()
            },
        )


def simulate(schedule: Schedule, costs: Costs, check: bool = True) -> Simulation:
    """Run ``schedule`` against ``costs``; SEND/RECV actions are ignored (p2p is charged on edges).

    ``check=False`` skips validation for callers that simulate one validated schedule many times."""
    sched = schedule.compute_only()
    if check:
        validate(sched)
    starts, ends = _times(sched, costs)
    spans: dict[int, list[Span]] = {r: [] for r in sorted(sched.actions)}
    for (rank, action), start, end in zip(sched.execution_order, starts, ends):
        spans[rank].append(Span(action, start, end))
    step = max(ends, default=0.0)
    busy = tuple(sum(s.end - s.start for s in spans[r]) for r in spans)
    ideal = max(busy)
    return Simulation(
        schedule_name=sched.name,
        step_time=step,
        ideal_time=ideal,
        bubble_fraction=(step - ideal) / ideal if ideal > 0 else 0.0,
        busy_time=busy,
        peak_activations=tuple(peak_activations(sched, r) for r in spans),
        timeline={r: tuple(v) for r, v in spans.items()},
    )


def startup_lower_bound(schedule: Schedule, costs: Costs) -> float:
    """A step time no schedule with this one's stage placement can beat, whatever its order or memory.

    Rank r cannot start before the first forward input of its earliest stage arrives (the forwards of every
    stage before it, plus a p2p hop at each rank boundary on the way), and then has all of its own work to do
    one action at a time: max over ranks of (earliest start + microbatches x (forward + backward) of its
    stages). On unequal stages this is what separates a better order from an impossible target."""
    sched = schedule.compute_only()
    c = costs.per_stage(sched.num_stages)
    earliest = [0.0] * sched.num_stages
    for s in range(1, sched.num_stages):
        hop = c["p2p"][s - 1] if is_cross_rank(sched, s - 1, s) else 0.0
        earliest[s] = earliest[s - 1] + c["forward"][s - 1] + hop
    bound = 0.0
    for rank in sched.actions:
        stages = sched.stages_of(rank)
        work = sched.microbatches * sum(c["forward"][s] + c["backward"][s] for s in stages)
        bound = max(bound, min(earliest[s] for s in stages) + work)
    return bound


def step_time(schedule: Schedule, costs: Costs) -> float:
    """Only the step time of an already validated compute schedule (fast path for searches)."""
    return max(_times(schedule.compute_only(), costs)[1], default=0.0)


def _times(sched: Schedule, costs: Costs) -> tuple[list[float], list[float]]:
    """Start and end of every entry of ``sched.execution_order``."""
    c = costs.per_stage(sched.num_stages)
    times = {F: c["forward"], B: c["backward"], W: c["weight"]}
    times[I] = tuple(b - w for b, w in zip(c["backward"], c["weight"]))
    order = sched.execution_order
    starts, ends = [0.0] * len(order), [0.0] * len(order)
    free = dict.fromkeys(sched.actions, 0.0)
    for i, ((rank, action), dep) in enumerate(zip(order, sched.producer_positions)):
        start = free[rank]
        if dep is not None:
            src_rank, src = order[dep]
            latency = c["p2p"][min(src.stage, action.stage)] if src_rank != rank else 0.0
            start = max(start, ends[dep] + latency)
        starts[i] = start
        ends[i] = free[rank] = start + times[action.kind][action.stage]
    return starts, ends


def peak_activations(schedule: Schedule, rank: int) -> int:
    """Most activations held at once on ``rank``: +1 at each F, -1 when B or W frees them."""
    live = peak = 0
    for a in schedule.actions[rank]:
        if a.kind is F:
            live += 1
            peak = max(peak, live)
        elif a.kind in (B, W):
            live -= 1
    return peak
