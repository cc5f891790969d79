"""Conversion to and from torch.distributed.pipelining's schedule IR (``dict[rank, list[_Action]]``).

torch is imported lazily so the rest of sysopt.schedules stays pure Python.
"""

from __future__ import annotations

from types import SimpleNamespace

from sysopt.schedules.ir import Action, Kind, Schedule

# our builder name -> torch.distributed.pipelining.schedules class name
TORCH_SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zb_h1": "ScheduleInterleavedZeroBubble",
    "zbv": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}
_SKIPPED = {"UNSHARD", "RESHARD", "REDUCE_GRAD"}


def _torch_schedules():
    from torch.distributed.pipelining import schedules

    return schedules


def to_torch(schedule: Schedule, include_comms: bool = False) -> dict[int, list]:
    """Compute actions of ``schedule`` (and its SEND/RECV when ``include_comms``) as torch ``_Action``s."""
    ts = _torch_schedules()
    return {
        rank: [
            ts._Action(a.stage, ts._ComputationType.from_str(a.kind.value), a.microbatch)
            for a in acts
            if include_comms or a.kind.is_compute
        ]
        for rank, acts in sorted(schedule.actions.items())
    }


def from_torch(
    pipeline_order: dict[int, list],
    *,
    microbatches: int,
    stage_to_rank: dict[int, int] | tuple[int, ...] | None = None,
    name: str = "torch",
) -> Schedule:
    """A Schedule from torch's ``pipeline_order``: drops idle slots (None), UNSHARD/RESHARD/REDUCE_GRAD,
    and expands OVERLAP_F_B into its sub-actions. The placement is read off the order unless given."""
    actions: dict[int, list[Action]] = {}
    seen_on: dict[int, int] = {}
    for rank in sorted(pipeline_order):
        actions[rank] = []
        for item in pipeline_order[rank]:
            if item is None:
                continue
            for sub in item.sub_actions or (item,):
                kind = sub.computation_type.value
                if kind in _SKIPPED:
                    continue
                actions[rank].append(Action(sub.stage_index, Kind(kind), sub.microbatch_index))
                seen_on.setdefault(sub.stage_index, rank)
    if stage_to_rank is None:
        if not seen_on:
            raise ValueError(
                "pipeline_order has no forward or backward actions on any rank: pass torch's "
                "pipeline_order of a schedule with microbatches >= 1"
            )
        missing = [s for s in range(max(seen_on) + 1) if s not in seen_on]
        if missing:
            raise ValueError(
                f"stages {missing} have no actions in pipeline_order, so their ranks are unknown: pass "
                "stage_to_rank= (stage index -> rank) for every stage"
            )
        placement = tuple(seen_on[s] for s in range(max(seen_on) + 1))
    elif isinstance(stage_to_rank, dict):
        placement = tuple(stage_to_rank[s] for s in range(len(stage_to_rank)))
    else:
        placement = tuple(stage_to_rank)
    return Schedule(name, len(pipeline_order), len(placement), microbatches, placement, actions)


def torch_pipeline_order(name: str, pp: int, vpp: int, microbatches: int, **kwargs) -> dict[int, list]:
    """torch's own compute order for our schedule ``name``, built without a process group.

    The torch schedule classes only read a few attributes of their stages when computing
    ``pipeline_order``, so light stand-ins are enough.
    """
    if name not in TORCH_SCHEDULES:
        raise ValueError(f"torch has no counterpart for {name!r}; choose one of {sorted(TORCH_SCHEDULES)}")
    cls = getattr(_torch_schedules(), TORCH_SCHEDULES[name])
    num_stages = pp * vpp

    def stand_in(stage_index: int) -> SimpleNamespace:
        return SimpleNamespace(
            stage_index=stage_index,
            num_stages=num_stages,
            group_size=pp,
            group_rank=0,
            submod=None,
            is_first=stage_index == 0,
            is_last=stage_index == num_stages - 1,
        )

    if vpp == 1 and name in ("gpipe", "1f1b"):
        return dict(cls(stand_in(0), microbatches, **kwargs).pipeline_order)
    return dict(cls([stand_in(i) for i in range(vpp)], microbatches, **kwargs).pipeline_order)


def torch_validate(schedule: Schedule) -> None:
    """Run torch's own validator (``_validate_schedule``) on our compute order; raises AssertionError."""
    _torch_schedules()._validate_schedule(
        to_torch(schedule), schedule.pp, schedule.num_stages, schedule.microbatches
    )
