"""Pipeline schedules as data: actions, the per-rank Schedule, JSON, a text grid, and the validator.

Pure Python (no torch): a Schedule is ``{rank: [Action, ...]}`` plus the stage -> rank placement.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property


class Kind(StrEnum):
    """What an action does; the short letters follow torch.distributed.pipelining."""

    FORWARD = "F"
    BACKWARD_INPUT = "I"  # gradient w.r.t. the stage input only
    BACKWARD_WEIGHT = "W"  # gradient w.r.t. the stage weights (after I)
    BACKWARD = "B"  # full backward: I and W at once
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    @property
    def is_compute(self) -> bool:
        return self in COMPUTE_KINDS


F, I, W, B = Kind.FORWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT, Kind.BACKWARD
COMPUTE_KINDS = frozenset({F, I, W, B})
_ACTION_RE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|I|W|B)(\d+)$")


class ScheduleError(ValueError):
    """A schedule breaks an invariant; the message shows the whole grid with the failing cell marked."""


@dataclass(frozen=True, order=True)
class Action:
    """One step of one rank: ``kind`` applied to ``microbatch`` on ``stage`` (string form ``2F0``)."""

    stage: int
    kind: Kind
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    def __repr__(self) -> str:
        return f"Action({self})"

    @staticmethod
    def parse(text: str) -> Action:
        match = _ACTION_RE.match(text.strip())
        if match is None:
            raise ValueError(
                f"action {text!r} is not of the form <stage><kind><microbatch>, e.g. '2F0', '1W3', '0SEND_F1'"
            )
        stage, kind, microbatch = match.groups()
        return Action(int(stage), Kind(kind), int(microbatch))


@dataclass(frozen=True)
class Schedule:
    """Per-rank ordered actions plus the placement of stages on ranks.

    ``actions[rank]`` is the order rank ``rank`` runs its actions in; ``stage_to_rank[s]`` is the
    rank that holds stage ``s``. ``num_stages = pp * vpp`` model chunks in pipeline order.
    """

    name: str
    pp: int
    num_stages: int
    microbatches: int
    stage_to_rank: tuple[int, ...]
    actions: dict[int, tuple[Action, ...]] = field(compare=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_to_rank", tuple(self.stage_to_rank))
        object.__setattr__(self, "actions", {int(r): tuple(a) for r, a in sorted(self.actions.items())})

    @cached_property
    def index(self) -> dict[tuple[int, Kind, int], tuple[int, int]]:
        """(stage, kind, microbatch) -> (rank, step) of every action."""
        return {
            (a.stage, a.kind, a.microbatch): (r, i)
            for r, acts in self.actions.items()
            for i, a in enumerate(acts)
        }

    @cached_property
    def execution_order(self) -> tuple[tuple[int, Action], ...]:
        """(rank, action) pairs, dependencies first; raises ScheduleError on deadlock."""
        return execution_order(self)

    @cached_property
    def producer_positions(self) -> tuple[int | None, ...]:
        """For each entry of ``execution_order``, the position of the action that produces its input
        (None when it reads nothing from another stage)."""
        where = {action: i for i, (_, action) in enumerate(self.execution_order)}
        return tuple(
            None if (dep := producer(self, action)) is None else where[dep]
            for _, action in self.execution_order
        )

    @property
    def vpp(self) -> int:
        return self.num_stages // self.pp

    def stages_of(self, rank: int) -> tuple[int, ...]:
        return tuple(s for s, r in enumerate(self.stage_to_rank) if r == rank)

    @cached_property
    def has_comms(self) -> bool:
        return any(not a.kind.is_compute for acts in self.actions.values() for a in acts)

    def compute_only(self) -> Schedule:
        """The same schedule without SEND/RECV actions."""
        if not self.has_comms:
            return self
        kept = {r: tuple(a for a in acts if a.kind.is_compute) for r, acts in self.actions.items()}
        return self.replace_actions(kept)

    def replace_actions(self, actions: dict[int, tuple[Action, ...] | list[Action]]) -> Schedule:
        return Schedule(
            self.name,
            self.pp,
            self.num_stages,
            self.microbatches,
            self.stage_to_rank,
            {r: tuple(actions[r]) for r in sorted(actions)},
        )

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "pp": self.pp,
            "num_stages": self.num_stages,
            "microbatches": self.microbatches,
            "stage_to_rank": list(self.stage_to_rank),
            "actions": {str(r): [str(a) for a in acts] for r, acts in sorted(self.actions.items())},
        }

    @staticmethod
    def from_dict(data: dict) -> Schedule:
        return Schedule(
            name=data["name"],
            pp=int(data["pp"]),
            num_stages=int(data["num_stages"]),
            microbatches=int(data["microbatches"]),
            stage_to_rank=tuple(int(r) for r in data["stage_to_rank"]),
            actions={int(r): tuple(Action.parse(s) for s in acts) for r, acts in data["actions"].items()},
        )

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @staticmethod
    def from_json(text: str) -> Schedule:
        return Schedule.from_dict(json.loads(text))

    # ---- torch.distributed.pipelining interop (lazy: this module never imports torch) --------
    def to_torch(self, include_comms: bool = False) -> dict:
        """``dict[rank, list[torch.distributed.pipelining.schedules._Action]]`` (compute actions)."""
        from sysopt.schedules.torch_compat import to_torch

        return to_torch(self, include_comms)

    @staticmethod
    def from_torch(pipeline_order: dict, *, microbatches: int, stage_to_rank=None, name="torch") -> Schedule:
        from sysopt.schedules.torch_compat import from_torch

        return from_torch(pipeline_order, microbatches=microbatches, stage_to_rank=stage_to_rank, name=name)

    # ---- text ---------------------------------------------------------------------------------
    def grid(self, mark: tuple[int, int] | list[tuple[int, int]] | None = None) -> str:
        return format_grid(self, mark)

    def __str__(self) -> str:
        return self.grid()


def format_grid(schedule: Schedule, mark: tuple[int, int] | list[tuple[int, int]] | None = None) -> str:
    """Steps as rows, ranks as columns; ``mark=(rank, step)`` (or a list of them) brackets cells and
    flags their rows."""
    marks = [] if mark is None else [mark] if isinstance(mark, tuple) else list(mark)
    columns = [[str(a) for a in schedule.actions.get(r, ())] for r in range(schedule.pp)]
    for rank, step in marks:
        while len(columns[rank]) <= step:
            columns[rank].append("")
        columns[rank][step] = f"[{columns[rank][step]}]"
    steps = max((len(c) for c in columns), default=0)
    widths = [max([len(f"rank {r}")] + [len(c) for c in columns[r]]) for r in range(schedule.pp)]
    label = len(f"step {max(steps - 1, 0)}")
    lines = [" " * (label + 2) + " ".join(f"{'rank ' + str(r):<{widths[r]}}" for r in range(schedule.pp))]
    flagged = {step for _, step in marks}
    for step in range(steps):
        cells = [columns[r][step] if step < len(columns[r]) else "" for r in range(schedule.pp)]
        row = f"{'step ' + str(step):<{label}}: " + " ".join(f"{c:<{widths[r]}}" for r, c in enumerate(cells))
        lines.append(row.rstrip() + ("  <-- here" if step in flagged else ""))
    return "\n".join(lines)


def _fail(
    schedule: Schedule,
    message: str,
    rank: int | None = None,
    step: int | None = None,
    more: list[tuple[int, int]] = (),
) -> ScheduleError:
    marks = ([(rank, step)] if rank is not None and step is not None else []) + list(more)
    where = f"rank {rank}, step {step}: " if marks else ""
    return ScheduleError(f"{schedule.name}: {where}{message}\n\n{format_grid(schedule, marks)}")


# ---- dependencies (shared by the validator and the simulator) ---------------------------------


def producer(schedule: Schedule, action: Action) -> Action | None:
    """The compute action on the neighbouring stage whose output ``action`` consumes, if any."""
    s, m = action.stage, action.microbatch
    if action.kind is F:
        return Action(s - 1, F, m) if s > 0 else None
    if action.kind in (I, B):
        return None if s == schedule.num_stages - 1 else Action(s + 1, _backward_kind(schedule, s + 1, m), m)
    return None


def _backward_kind(schedule: Schedule, stage: int, microbatch: int) -> Kind:
    """Whether (stage, microbatch) runs a split backward (I) or a full one (B) in this schedule."""
    return I if (stage, I, microbatch) in schedule.index else B


def is_cross_rank(schedule: Schedule, stage_a: int, stage_b: int) -> bool:
    return schedule.stage_to_rank[stage_a] != schedule.stage_to_rank[stage_b]


def comm_pair(schedule: Schedule, action: Action) -> tuple[Action, Action] | None:
    """(SEND on the producer's rank, RECV on the consumer's rank) for the output of compute ``action``."""
    s, m = action.stage, action.microbatch
    if action.kind is F and s < schedule.num_stages - 1 and is_cross_rank(schedule, s, s + 1):
        return Action(s, Kind.SEND_F, m), Action(s + 1, Kind.RECV_F, m)
    if action.kind in (I, B) and s > 0 and is_cross_rank(schedule, s, s - 1):
        return Action(s, Kind.SEND_B, m), Action(s - 1, Kind.RECV_B, m)
    return None


# ---- validation ---------------------------------------------------------------------------------


def validate(schedule: Schedule) -> Schedule:
    """Raise ScheduleError (grid with the failing cell marked) unless ``schedule`` is runnable.

    Checks: placement, each (stage, microbatch) gets F then (B | I then W) exactly once, sends match
    receives (when the schedule carries them), and that every rank can run to the end (no deadlock).
    Returns the schedule so calls can be chained.
    """
    _check_shape(schedule)
    _check_actions(schedule)
    _check_lifecycles(schedule)
    if schedule.has_comms:
        _check_comms(schedule)
    _check_progress(schedule)
    return schedule


def _check_shape(schedule: Schedule) -> None:
    p, n, m = schedule.pp, schedule.num_stages, schedule.microbatches
    if p < 1 or n < 1 or m < 1:
        raise ScheduleError(f"{schedule.name}: pp={p}, num_stages={n}, microbatches={m} must all be >= 1")
    if len(schedule.stage_to_rank) != n:
        raise ScheduleError(
            f"{schedule.name}: stage_to_rank has {len(schedule.stage_to_rank)} entries but num_stages={n}; "
            "give one rank per stage"
        )
    bad = [s for s, r in enumerate(schedule.stage_to_rank) if not 0 <= r < p]
    if bad:
        raise ScheduleError(f"{schedule.name}: stages {bad} are placed on ranks outside 0..{p - 1} (pp={p})")
    if set(schedule.actions) != set(range(p)):
        raise ScheduleError(
            f"{schedule.name}: actions are given for ranks {sorted(schedule.actions)} but pp={p} needs "
            f"exactly ranks 0..{p - 1}"
        )


def _check_actions(schedule: Schedule) -> None:
    n, m = schedule.num_stages, schedule.microbatches
    seen: dict[Action, tuple[int, int]] = {}
    for rank, acts in schedule.actions.items():
        for step, a in enumerate(acts):
            if not isinstance(a, Action):
                raise _fail(schedule, f"{a!r} is not an Action", rank, step)
            if not 0 <= a.stage < n:
                raise _fail(schedule, f"{a} names stage {a.stage}, outside 0..{n - 1}", rank, step)
            if not 0 <= a.microbatch < m:
                raise _fail(schedule, f"{a} names microbatch {a.microbatch}, outside 0..{m - 1}", rank, step)
            home = schedule.stage_to_rank[a.stage]
            if home != rank:
                raise _fail(
                    schedule,
                    f"{a} runs on rank {rank} but stage {a.stage} is placed on rank {home} "
                    "(stage_to_rank); move the action or change the placement",
                    rank,
                    step,
                )
            if a in seen:
                r0, s0 = seen[a]
                raise _fail(schedule, f"{a} appears twice (first at rank {r0}, step {s0})", rank, step)
            seen[a] = (rank, step)


def _check_lifecycles(schedule: Schedule) -> None:
    """Per (stage, microbatch): F, then either B, or I then W; each exactly once, in rank order."""
    for rank, acts in schedule.actions.items():
        state: dict[tuple[int, int], str] = {}
        for step, a in enumerate(acts):
            if not a.kind.is_compute:
                continue
            key = (a.stage, a.microbatch)
            have = state.get(key, "")
            if a.kind is F:
                ok, need = have == "", ""
            elif a.kind in (I, B):
                ok, need = have == "F", f"{a.stage}F{a.microbatch} first"
            else:
                ok, need = have == "FI", f"{a.stage}I{a.microbatch} first"
            if not ok:
                why = f"after {have!r}" if have else "with nothing before it"
                if a.kind is W and have == "FB":
                    why = "after a full backward B, which already computed weight gradients"
                elif a.kind is B and have == "FI":
                    why = "after I; use W to finish a split backward"
                raise _fail(
                    schedule, f"{a} comes {why}; expected {need or 'one F per microbatch'}", rank, step
                )
            state[key] = have + a.kind.value
        for stage in schedule.stages_of(rank):
            for mb in range(schedule.microbatches):
                have = state.get((stage, mb), "")
                if have not in ("FB", "FIW"):
                    missing = {"": "F and a backward", "F": "a backward (B, or I then W)", "FI": "W"}[have]
                    raise _fail(
                        schedule,
                        f"stage {stage} microbatch {mb} is missing {missing} (ran {have or 'nothing'})",
                        rank,
                        len(acts),
                    )


def _check_comms(schedule: Schedule) -> None:
    """Each cross-rank edge has exactly one SEND after its producer and one RECV before its consumer."""
    index = schedule.index
    expected: set[Action] = set()
    for rank, acts in schedule.actions.items():
        for step, a in enumerate(acts):
            pair = comm_pair(schedule, a) if a.kind.is_compute else None
            if pair is None:
                continue
            send, recv = pair
            expected.update(pair)
            if (send.stage, send.kind, send.microbatch) not in index:
                raise _fail(schedule, f"{a} sends to another rank but {send} is missing", rank, step)
            s_rank, s_step = index[(send.stage, send.kind, send.microbatch)]
            if s_step < step:
                raise _fail(schedule, f"{send} comes before the {a} that produces its data", s_rank, s_step)
            consumer_kind = (
                F if recv.kind is Kind.RECV_F else _backward_kind(schedule, recv.stage, recv.microbatch)
            )
            consumer = (recv.stage, consumer_kind, recv.microbatch)
            if (recv.stage, recv.kind, recv.microbatch) not in index:
                c_rank, c_step = index[consumer]
                raise _fail(schedule, f"{send} has no matching {recv} before its consumer", c_rank, c_step)
            r_rank, r_step = index[(recv.stage, recv.kind, recv.microbatch)]
            c_rank, c_step = index[consumer]
            if r_step > c_step:
                raise _fail(
                    schedule,
                    f"{recv} comes after {Action(*consumer)} (step {c_step}) that needs its data",
                    r_rank,
                    r_step,
                )
    for rank, acts in schedule.actions.items():
        for step, a in enumerate(acts):
            if not a.kind.is_compute and a not in expected:
                raise _fail(
                    schedule,
                    f"{a} has no matching compute edge across ranks (nothing sends or consumes it)",
                    rank,
                    step,
                )


def _check_progress(schedule: Schedule) -> None:
    schedule.execution_order  # noqa: B018 (computing it is the check)


def execution_order(schedule: Schedule) -> tuple[tuple[int, Action], ...]:
    """(rank, action) pairs in an order where every action comes after its rank predecessor and its
    producer: run every rank in order, untimed; a compute waits for its producer (and, when the schedule
    carries comms, for the producer's SEND on the peer and its own RECV); SEND and RECV post without
    waiting. Raises ScheduleError on
    deadlock. Cached as ``Schedule.execution_order``."""
    pos = {r: 0 for r in schedule.actions}
    done: set[Action] = set()
    order: list[tuple[int, Action]] = []
    total = sum(len(a) for a in schedule.actions.values())
    lowered = schedule.has_comms
    while len(done) < total:
        progressed = False
        for rank in sorted(schedule.actions):
            acts = schedule.actions[rank]
            while pos[rank] < len(acts) and _ready(schedule, acts[pos[rank]], done, lowered):
                done.add(acts[pos[rank]])
                order.append((rank, acts[pos[rank]]))
                pos[rank] += 1
                progressed = True
        if not progressed:
            stuck = [r for r in sorted(pos) if pos[r] < len(schedule.actions[r])]
            waits = []
            for r in stuck:
                a = schedule.actions[r][pos[r]]
                dep = producer(schedule, a)
                need = f"the SEND and RECV of {dep}'s output" if dep in done else str(dep)
                waits.append(f"rank {r} at step {pos[r]} runs {a}, waiting for {need}")
            first = stuck[0]
            others = [(r, pos[r]) for r in stuck[1:]]
            message = "deadlock: no rank can make progress:\n  " + "\n  ".join(waits)
            raise _fail(schedule, message, first, pos[first], others)
    return tuple(order)


def _ready(schedule: Schedule, a: Action, done: set[Action], lowered: bool) -> bool:
    if not a.kind.is_compute or a.kind is W:
        return True
    dep = producer(schedule, a)
    if dep is None:
        return True
    if dep not in done:
        return False
    if lowered and is_cross_rank(schedule, a.stage, dep.stage):
        pair = comm_pair(schedule, dep)  # the data arrives once the peer posted its SEND and we our RECV
        return pair is not None and pair[0] in done and pair[1] in done
    return True
