"""Stage partitioning: split per-layer costs into pp*vpp contiguous chunks minimising simulated step time.

Exhaustive when the number of splits is small; otherwise a min-max DP seed (and the even split) refined
by local moves of the boundaries while the simulated step time drops. Pure Python.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sysopt.schedules.builders import build
from sysopt.schedules.ir import Schedule
from sysopt.schedules.simulate import Costs, step_time


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
    method: str  # "exhaustive" or "dp+refine"

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
    schedule: str = "1f1b",
    microbatches: int,
    p2p: float = 0.0,
    exhaustive_limit: int = 300,
    **schedule_options,
) -> Partition:
    """Choose chunk boundaries for per-layer costs (e.g. vision-encoder layers then decoder layers).

    ``forward``/``backward``/``weight`` are per-layer times for one microbatch (``backward`` is the whole
    backward, ``weight`` its weight-gradient part). Stage s of ``schedule`` gets chunk s.
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
    plan = build(schedule, pp, vpp, microbatches, **schedule_options)

    seen: dict[tuple[int, ...], float] = {}

    def time_of(bounds: tuple[int, ...]) -> float:
        if bounds not in seen:
            seen[bounds] = _step_time(plan, bounds, forward, backward, weight, p2p)
        return seen[bounds]

    even = even_boundaries(len(forward), chunks)
    even_time = time_of(even)
    if math.comb(len(forward) - 1, chunks - 1) <= exhaustive_limit:
        candidates = (
            (0, *inner, len(forward)) for inner in itertools.combinations(range(1, len(forward)), chunks - 1)
        )
        best = min(candidates, key=time_of)
        method = "exhaustive"
    else:
        seeds = {even, min_max_boundaries([f + b for f, b in zip(forward, backward)], chunks)}
        best = min((_refine(s, time_of) for s in seeds), key=time_of)
        method = "dp+refine"
    return Partition(schedule, pp, vpp, microbatches, best, time_of(best), even, even_time, method)


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
