"""A cost-aware zero-bubble schedule: list scheduling of split-backward actions under a memory cap.

The fixed builders (1F1B, interleaved, ZB-H1, ZB-V) assume equal stage costs. When stages differ, as in
a VLM whose first stage carries the vision encoder, a rank can often do useful work where the fixed
order makes it wait. ``zb_greedy`` builds the order by simulating it (the zero-bubble paper's heuristic
scheduler, in spirit): whenever a rank can start something, it starts the action that can begin
earliest, preferring on ties an input gradient (I, on the critical path), then a forward (deepest stage
first, capped by ``max_activations`` live activations per rank), then a weight gradient (W, which fills
what would otherwise be a bubble). Each stage runs its forwards, input gradients and weight gradients in
microbatch order. The cost model is the simulator's (``Costs``), so ``simulate`` on the result reproduces
the times the builder planned with.

    build("zb_greedy", pp=4, vpp=2, microbatches=8, costs=Costs(forward, backward, weight, p2p))

Without ``costs`` it plans for equal stages with F = I = W. ``max_activations`` defaults to the peak of
interleaved 1F1B on the same pp, vpp and microbatches (Megatron's memory), so comparisons with it are
at equal activation memory; ``placement="v"`` plans on the V placement (vpp=2) instead of the loop.
"""

from __future__ import annotations

from sysopt.schedules.builders import build, loop_placement, register, v_placement
from sysopt.schedules.ir import Action, F, I, Schedule, W
from sysopt.schedules.simulate import Costs, peak_activations

_PRIORITY = {I: 0, F: 1, W: 2}


def default_max_activations(pp: int, vpp: int, m: int) -> int:
    """The busiest rank's activation peak under 1F1B (vpp=1) or Megatron's interleaved 1F1B (with
    Megatron's microbatch grouping when m is not a multiple of pp): zb_greedy's default cap."""
    attempts = (
        [("1f1b", {})]
        if vpp == 1
        else [("interleaved_1f1b", {}), ("interleaved_1f1b", {"microbatch_group_size": m})]
    )
    for name, options in attempts:
        try:
            reference = build(name, pp, vpp, m, **options)
        except ValueError:
            continue
        return max(peak_activations(reference, r) for r in range(pp))
    return pp * vpp


@register("zb_greedy")
def zb_greedy(
    pp: int,
    vpp: int,
    m: int,
    costs: Costs | None = None,
    max_activations: int | None = None,
    placement: str = "loop",
) -> Schedule:
    """The zero-bubble order list-scheduled on `costs` (see the module docstring)."""
    if placement not in ("loop", "v"):
        raise ValueError(f"placement={placement!r} must be 'loop' (Megatron's) or 'v' (needs vpp=2)")
    if placement == "v" and vpp != 2:
        raise ValueError(f"placement='v' needs vpp=2 (two chunks per rank in a V), got vpp={vpp}")
    stages = pp * vpp
    to_rank = loop_placement(pp, vpp) if placement == "loop" else v_placement(pp)
    c = (costs or Costs(1.0, 2.0, 1.0)).per_stage(stages)
    duration = {F: c["forward"], W: c["weight"], I: tuple(b - w for b, w in zip(c["backward"], c["weight"]))}
    if max_activations is None:
        max_activations = default_max_activations(pp, vpp, m)
    if max_activations < vpp:  # a microbatch needs a slot on each of a rank's vpp chunks
        raise ValueError(
            f"max_activations={max_activations} cannot fill the pipeline: a rank must hold at least one "
            f"activation per chunk ({vpp}); raise max_activations"
        )

    done: dict[Action, float] = {}  # end time of every scheduled action
    next_mb = {(s, k): 0 for s in range(stages) for k in (F, I, W)}
    free = [0.0] * pp
    live = [0] * pp
    rank_stages = {r: [s for s in range(stages) if to_rank[s] == r] for r in range(pp)}
    # forwards done on each rank per microbatch: a microbatch part-way through a rank's chunks still needs
    # a slot for each of its remaining chunks there, and a new forward may not take those slots (else the
    # cap can fill with shallow chunks whose deeper chunks never get to run: a deadlock)
    forwards_here = [[0] * m for _ in range(pp)]

    def admits(i: int, rank: int) -> bool:
        chunks = len(rank_stages[rank])
        after = forwards_here[rank][i] + 1
        reserved = sum(chunks - n for j, n in enumerate(forwards_here[rank]) if j != i and 0 < n < chunks)
        return live[rank] + 1 + reserved + (chunks - after) <= max_activations

    orders: dict[int, list[Action]] = {r: [] for r in range(pp)}

    def ready_at(action: Action, rank: int) -> float | None:
        s, i = action.stage, action.microbatch
        if action.kind is F:
            if not admits(i, rank):
                return None
            if s == 0:
                return 0.0
            upstream = Action(s - 1, F, i)
            if upstream not in done:
                return None
            return done[upstream] + (c["p2p"][s - 1] if to_rank[s - 1] != rank else 0.0)
        if action.kind is I:
            own = done.get(Action(s, F, i))
            if own is None:
                return None
            if s == stages - 1:
                return own
            upstream = Action(s + 1, I, i)
            if upstream not in done:
                return None
            hop = c["p2p"][s] if to_rank[s + 1] != rank else 0.0
            return max(own, done[upstream] + hop)
        return done.get(Action(s, I, i))  # W after this stage's I

    total = 3 * stages * m
    while len(done) < total:
        best = None  # (start, priority, -stage, rank, action)
        for s in range(stages):
            rank = to_rank[s]
            for kind in (F, I, W):
                i = next_mb[(s, kind)]
                if i >= m:
                    continue
                action = Action(s, kind, i)
                ready = ready_at(action, rank)
                if ready is None:
                    continue
                key = (max(free[rank], ready), _PRIORITY[kind], -s, rank, action)
                if best is None or key < best:
                    best = key
        if best is None:
            raise ValueError(
                f"zb_greedy found no runnable action with max_activations={max_activations} (a bug: the slot "
                "reservation should prevent this); raise max_activations"
            )
        start, _, _, rank, action = best
        end = start + duration[action.kind][action.stage]
        done[action] = free[rank] = end
        next_mb[(action.stage, action.kind)] += 1
        live[rank] += 1 if action.kind is F else -1 if action.kind is W else 0
        if action.kind is F:
            forwards_here[rank][action.microbatch] += 1
        orders[rank].append(action)
    return Schedule("zb_greedy", pp, stages, m, to_rank, {r: tuple(a) for r, a in orders.items()})
