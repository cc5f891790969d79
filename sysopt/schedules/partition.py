"""Stage partitioning: split per-layer costs into pp*vpp contiguous chunks minimising simulated step time.

Exhaustive when the number of splits is small; otherwise a min-max DP seed (and the even split) refined
by local moves of the boundaries while the simulated step time drops. A schedule that plans its order on
the stage costs (``zb_greedy``) is planned afresh for every candidate split, and searched exactly by
branch and bound: splits in order of their start-up lower bound, until that bound passes the best found.
Among splits within ``TIE_REL`` of the best, ``tie_break`` (a second schedule) picks the one it runs
fastest on, else the first found is kept. Pure Python.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sysopt.schedules.builders import build
from sysopt.schedules.ir import Schedule
from sysopt.schedules.simulate import Costs, startup_lower_bound, step_time

COST_PLANNED = frozenset({"zb_greedy"})  # builders whose order is planned on the stage costs
TIE_REL = 1e-9  # splits whose step times differ by less than this (relative) are ties
BOUND_LIMIT = 100_000  # the most splits branch and bound enumerates; beyond it, DP seed + refinement


@dataclass(frozen=True)
class Partition:
    """Chunk c holds layers ``boundaries[c] : boundaries[c+1]``; times in the units of the layer costs."""

    schedule: str
    pp: int
    vpp: int
    microbatches: int
    boundaries: tuple[int, ...]
    step_time: float
    even_boundaries: tuple[int, ...]
    even_step_time: float
    method: str  # "exhaustive", "bound" (branch and bound) or "dp+refine"
    tie_break: str | None = None  # the schedule that chose among equally fast splits

    @property
    def speedup_over_even(self) -> float:
        return self.even_step_time / self.step_time if self.step_time > 0 else 1.0

    @property
    def layers_per_chunk(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in itertools.pairwise(self.boundaries))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> Partition:
        d = json.loads(text)
        d["boundaries"], d["even_boundaries"] = tuple(d["boundaries"]), tuple(d["even_boundaries"])
        return Partition(**d)


def even_boundaries(num_layers: int, chunks: int) -> tuple[int, ...]:
    """Layer counts as equal as possible (earlier chunks take the remainder)."""
    base, extra = divmod(num_layers, chunks)
    sizes = [base + (1 if c < extra else 0) for c in range(chunks)]
    return tuple(itertools.accumulate(sizes, initial=0))


def chunk_costs(
    boundaries: Sequence[int], forward: Sequence[float], backward: Sequence[float], weight: Sequence[float]
) -> tuple[list[float], list[float], list[float]]:
    spans = list(itertools.pairwise(boundaries))
    return tuple([sum(values[a:b]) for a, b in spans] for values in (forward, backward, weight))  # type: ignore[return-value]


def min_max_boundaries(load: Sequence[float], chunks: int) -> tuple[int, ...]:
    """Contiguous split of ``load`` into ``chunks`` non-empty parts minimising the largest part (DP)."""
    n = len(load)
    prefix = list(itertools.accumulate(load, initial=0.0))
    best = [[math.inf] * (n + 1) for _ in range(chunks + 1)]
    cut = [[0] * (n + 1) for _ in range(chunks + 1)]
    best[0][0] = 0.0
    for c in range(1, chunks + 1):
        for j in range(c, n - (chunks - c) + 1):
            for i in range(c - 1, j):
                value = max(best[c - 1][i], prefix[j] - prefix[i])
                if value < best[c][j]:
                    best[c][j], cut[c][j] = value, i
    bounds, j = [n], n
    for c in range(chunks, 0, -1):
        j = cut[c][j]
        bounds.append(j)
    return tuple(reversed(bounds))


def partition(
    forward: Sequence[float],
    backward: Sequence[float],
    weight: Sequence[float] | None = None,
    *,
    pp: int,
    vpp: int = 1,
    schedule: str | Schedule = "1f1b",
    microbatches: int,
    p2p: float = 0.0,
    exhaustive_limit: int = 300,
    tie_break: str | None = None,
    **schedule_options,
) -> Partition:
    """Choose chunk boundaries for per-layer costs (e.g. vision-encoder layers then decoder layers).

    ``forward``/``backward``/``weight`` are per-layer times for one microbatch (``backward`` is the whole
    backward, ``weight`` its weight-gradient part). Stage s of ``schedule`` gets chunk s. ``schedule`` is a
    builder name (a cost-planned one is planned on each split's costs) or a built Schedule, whose order is
    then kept on every split. ``tie_break`` names a schedule (built with the same pp, vpp and
    microbatches) whose step time decides between splits that ``schedule`` runs equally fast, e.g. the
    baseline a comparison runs on the same split.
    """
    weight = [0.0] * len(forward) if weight is None else list(weight)
    if not len(forward) == len(backward) == len(weight):
        raise ValueError(
            f"per-layer costs differ in length: forward={len(forward)}, backward={len(backward)}, "
            f"weight={len(weight)}; give one value per layer in each"
        )
    chunks = pp * vpp
    if len(forward) < chunks:
        raise ValueError(
            f"{len(forward)} layers cannot fill pp*vpp={chunks} chunks of at least one layer; "
            f"lower pp or vpp, or split the model finer"
        )
    if isinstance(schedule, Schedule):
        if (schedule.pp, schedule.num_stages, schedule.microbatches) != (pp, chunks, microbatches):
            raise ValueError(
                f"schedule {schedule.name} has pp={schedule.pp}, {schedule.num_stages} stages and "
                f"{schedule.microbatches} microbatches but partition got pp={pp}, vpp={vpp} ({chunks} chunks), "
                f"microbatches={microbatches}; pass the values the schedule was built with"
            )
        plan, schedule, planned = schedule, schedule.name, False
    else:
        planned = schedule in COST_PLANNED
        if planned and "costs" in schedule_options:
            raise ValueError(
                f"partition plans {schedule} on each candidate split's own costs; drop costs= (got "
                f"{schedule_options['costs']!r}) and pass the per-layer costs"
            )
        plan = build(schedule, pp, vpp, microbatches, **schedule_options)
    baseline = build(tie_break, pp, vpp, microbatches) if tie_break is not None else None

    def costs_of(bounds: tuple[int, ...]) -> Costs:
        return Costs(*chunk_costs(bounds, forward, backward, weight), p2p)

    seen: dict[tuple[int, ...], float] = {}

    def time_of(bounds: tuple[int, ...]) -> float:
        if bounds not in seen:
            costs = costs_of(bounds)
            order = (
                build(schedule, pp, vpp, microbatches, costs=costs, **schedule_options) if planned else plan
            )
            seen[bounds] = step_time(order, costs)
        return seen[bounds]

    even = even_boundaries(len(forward), chunks)
    even_time = time_of(even)
    splits = math.comb(len(forward) - 1, chunks - 1)
    candidates = (
        (0, *inner, len(forward)) for inner in itertools.combinations(range(1, len(forward)), chunks - 1)
    )
    if splits <= exhaustive_limit:
        best = min(candidates, key=time_of)
        method = "exhaustive"
    elif planned and splits <= BOUND_LIMIT:
        best = _branch_and_bound(candidates, time_of, lambda b: startup_lower_bound(plan, costs_of(b)))
        method = "bound"
    else:
        seeds = {even, min_max_boundaries([f + b for f, b in zip(forward, backward)], chunks)}
        best = min((_refine(s, time_of) for s in seeds), key=time_of)
        method = "dp+refine"
    if baseline is not None:  # exhaustive and bound evaluate every tied split; dp+refine those it visited
        ties = [b for b, t in seen.items() if t <= time_of(best) * (1 + TIE_REL)]
        best = min(ties, key=lambda b: (step_time(baseline, costs_of(b)), b))
    return Partition(schedule, pp, vpp, microbatches, best, time_of(best), even, even_time, method, tie_break)


def _branch_and_bound(candidates, time_of, bound_of) -> tuple[int, ...]:
    """The fastest split, evaluating splits in order of a lower bound on their step time until the bound
    exceeds the best time found (so every split tied with the best is evaluated too)."""
    ranked = sorted((bound_of(b), b) for b in candidates)
    best, best_time = ranked[0][1], math.inf
    for bound, bounds in ranked:
        if bound > best_time * (1 + TIE_REL):
            break
        if time_of(bounds) < best_time:
            best, best_time = bounds, time_of(bounds)
    return best


def _step_time(plan: Schedule, bounds, forward, backward, weight, p2p: float) -> float:
    f, b, w = chunk_costs(bounds, forward, backward, weight)
    return step_time(plan, Costs(f, b, w, p2p))


def _refine(bounds: tuple[int, ...], time_of, max_steps: int = 50) -> tuple[int, ...]:
    """Hill-climb that may also walk across plateaus: move to the best unvisited neighbour while it is no
    slower (at most ``max_steps`` moves) and return the fastest split seen. Neighbours move one boundary
    anywhere between its neighbours, or any two boundaries by up to two layers each."""
    best, best_time = bounds, time_of(bounds)
    current, current_time, visited = best, best_time, {bounds}
    for _ in range(max_steps):
        fresh = [n for n in _neighbours(current) if n not in visited]
        if not fresh:
            break
        candidate = min(fresh, key=time_of)
        candidate_time = time_of(candidate)
        if candidate_time > current_time + 1e-12:
            break
        visited.add(candidate)
        current, current_time = candidate, candidate_time
        if current_time < best_time - 1e-12:
            best, best_time = current, current_time
    return best


def _neighbours(bounds: tuple[int, ...]):
    inner = range(1, len(bounds) - 1)
    for c in inner:
        for b in range(bounds[c - 1] + 1, bounds[c + 1]):
            if b != bounds[c]:
                yield bounds[:c] + (b,) + bounds[c + 1 :]
    for c1, c2 in itertools.combinations(inner, 2):
        for d1, d2 in itertools.product((-2, -1, 1, 2), repeat=2):
            moved = list(bounds)
            moved[c1] += d1
            moved[c2] += d2
            if all(a < b for a, b in itertools.pairwise(moved)):
                yield tuple(moved)
