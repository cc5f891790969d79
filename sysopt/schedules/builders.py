"""Schedule builders, picked from a registry by name: ``build("interleaved_1f1b", pp=4, vpp=2, microbatches=8)``.

Each builder only decides the per-rank compute order (data); communication is added by ``lower``.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from sysopt.schedules.ir import Action, B, F, I, Kind, Schedule, W, validate

Builder = Callable[..., Schedule]
BUILDERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def add(fn: Builder) -> Builder:
        BUILDERS[name] = fn
        return fn

    return add


def build(name: str, pp: int, vpp: int = 1, microbatches: int = 1, **options) -> Schedule:
    """Build and validate the named schedule. ``options`` go to the builder (e.g. microbatch_group_size)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(BUILDERS)}")
    for label, value in (("pp", pp), ("vpp", vpp), ("microbatches", microbatches)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label}={value!r} must be an integer >= 1 for schedule {name!r}")
    return validate(BUILDERS[name](pp, vpp, microbatches, **options))


# ---- placement ----------------------------------------------------------------------------------


def loop_placement(pp: int, vpp: int) -> tuple[int, ...]:
    """Stage s on rank s % pp (Megatron interleaving)."""
    return tuple(s % pp for s in range(pp * vpp))


def v_placement(pp: int) -> tuple[int, ...]:
    """Chunk 0 stages 0..p-1 on ranks 0..p-1, chunk 1 stages p..2p-1 on ranks p-1..0."""
    return tuple(range(pp)) + tuple(reversed(range(pp)))


def _schedule(name, pp, vpp, m, placement, per_rank: Callable[[int], list[Action]]) -> Schedule:
    return Schedule(name, pp, pp * vpp, m, placement, {r: tuple(per_rank(r)) for r in range(pp)})


def _need_vpp(name: str, vpp: int, allowed: int, hint: str) -> None:
    if vpp != allowed:
        raise ValueError(f"vpp={vpp} is not supported by {name}: it needs vpp={allowed}; {hint}")


# ---- single-chunk schedules ---------------------------------------------------------------------


@register("gpipe")
def gpipe(pp: int, vpp: int, m: int) -> Schedule:
    """All forwards, then all backwards."""
    _need_vpp("gpipe", vpp, 1, "use interleaved_1f1b for several chunks per rank")

    def order(r: int) -> list[Action]:
        return [Action(r, F, i) for i in range(m)] + [Action(r, B, i) for i in range(m)]

    return _schedule("gpipe", pp, 1, m, loop_placement(pp, 1), order)


@register("1f1b")
def one_f_one_b(pp: int, vpp: int, m: int) -> Schedule:
    """Warm up with p-1-rank forwards, then alternate one forward and one backward."""
    _need_vpp("1f1b", vpp, 1, "use interleaved_1f1b for several chunks per rank")

    def order(r: int) -> list[Action]:
        warmup = min(pp - 1 - r, m)
        acts = [Action(r, F, i) for i in range(warmup)]
        for k in range(m - warmup):
            acts += [Action(r, F, warmup + k), Action(r, B, k)]
        return acts + [Action(r, B, k) for k in range(m - warmup, m)]

    return _schedule("1f1b", pp, 1, m, loop_placement(pp, 1), order)


# ---- interleaved (looped placement) schedules ---------------------------------------------------


def check_group_size(name: str, pp: int, m: int, group: int) -> None:
    """Megatron-core 0.16.1's rule for interleaved microbatch groups (microbatch_group_size_per_vp_stage)."""
    if m < pp:
        raise ValueError(
            f"microbatches={m} must be >= pp={pp} for {name} (Megatron's interleaved rule); "
            f"use microbatches>={pp} or schedule=1f1b"
        )
    if not pp <= group <= m:
        raise ValueError(
            f"microbatch_group_size={group} must lie in [pp={pp}, microbatches={m}] for {name}; "
            f"use microbatch_group_size={pp}"
        )
    rest = m % group
    if 0 < rest < pp:
        fits = [g for g in range(pp, m + 1) if m % g == 0 or m % g >= pp]
        raise ValueError(
            f"microbatches={m} leaves a last group of {rest} < pp={pp} microbatches with "
            f"microbatch_group_size={group} in {name}; use microbatches={m + group - rest} "
            f"(a multiple of {group}) or microbatch_group_size in {fits}"
        )


def group_table(m: int, vpp: int, group: int) -> list[tuple[int, int]]:
    """Megatron's (microbatch, chunk) order: each group of microbatches runs through chunk 0, then 1, ..."""
    table = []
    for start in range(0, m, group):
        stop = min(start + group, m)
        table += [(mb, chunk) for chunk in range(vpp) for mb in range(start, stop)]
    return table


def _interleaved_order(pp, vpp, m, group, r, warmup_per_hop: int, split_backward: bool) -> list[Action]:
    table = group_table(m, vpp, group)
    forwards = [Action(chunk * pp + r, F, mb) for mb, chunk in table]
    bkind = I if split_backward else B
    backwards = [Action((vpp - 1 - chunk) * pp + r, bkind, mb) for mb, chunk in table]
    total = len(table)
    warmup = min(warmup_per_hop * (pp - 1 - r) + (vpp - 1) * group, total)
    acts = forwards[:warmup]
    pending_w: deque[Action] = deque()
    for k, back in enumerate(backwards):
        if warmup + k < total:
            acts.append(forwards[warmup + k])
        acts.append(back)
        if split_backward:
            pending_w.append(Action(back.stage, W, back.microbatch))
            if k >= r:  # ZB-H1: rank r delays its W by r backwards to fill the cool-down bubble
                acts.append(pending_w.popleft())
    return acts + list(pending_w)


@register("interleaved_1f1b")
def interleaved_1f1b(pp: int, vpp: int, m: int, microbatch_group_size: int | None = None) -> Schedule:
    """Megatron's interleaved 1F1B: vpp chunks per rank, stage s on rank s % pp, depth-first groups."""
    if vpp < 2:
        raise ValueError(f"vpp={vpp} must be >= 2 for interleaved_1f1b; use schedule=1f1b for vpp=1")
    group = pp if microbatch_group_size is None else microbatch_group_size
    check_group_size("interleaved_1f1b", pp, m, group)
    return _schedule(
        "interleaved_1f1b",
        pp,
        vpp,
        m,
        loop_placement(pp, vpp),
        lambda r: _interleaved_order(pp, vpp, m, group, r, warmup_per_hop=2, split_backward=False),
    )


@register("zb_h1")
def zb_h1(pp: int, vpp: int, m: int, microbatch_group_size: int | None = None) -> Schedule:
    """ZB-H1 (Qi et al. 2024): 1F1B with split backward, rank r deferring its W by r steps.

    With vpp > 1 it is the interleaved zero-bubble order (ZB1P on looped placement)."""
    group = pp if microbatch_group_size is None else microbatch_group_size
    if vpp > 1:
        check_group_size("zb_h1", pp, m, group)
    else:
        group = m
    return _schedule(
        "zb_h1",
        pp,
        vpp,
        m,
        loop_placement(pp, vpp),
        lambda r: _interleaved_order(pp, vpp, m, group, r, warmup_per_hop=1, split_backward=True),
    )


# ---- V-shape schedules (two chunks per rank, stage p-1 and p on the last rank) -----------------


class _Emitter:
    """Appends actions, handing out each (stage, kind)'s next microbatch index."""

    def __init__(self) -> None:
        self.actions: list[Action] = []
        self.count: Counter[tuple[int, str]] = Counter()
        self.weights: deque[Action] = deque()

    def emit(self, *steps: tuple[int, Kind]) -> None:
        """Append (stage, kind) steps in order; an I also queues its W for ``emit_pending_weight``."""
        for stage, kind in steps:
            key = (stage, "back" if kind in (I, B) else kind.value)
            mb = self.count[key]
            self.count[key] += 1
            self.actions.append(Action(stage, kind, mb))
            if kind is I:
                self.weights.append(Action(stage, W, mb))

    def emit_pending_weight(self) -> None:
        if self.weights:
            self.actions.append(self.weights.popleft())

    def emitted(self, stage: int, kind: Kind) -> int:
        return self.count[(stage, "back" if kind in (I, B) else kind.value)]


@register("zbv")
def zbv(pp: int, vpp: int, m: int) -> Schedule:
    """ZB-V (Qi et al. 2024, section 6): V placement, split backward, W fills the bubbles."""
    _need_vpp("zbv", vpp, 2, "zbv places exactly two chunks per rank in a V")
    n = max(2 * pp - 1, m)  # plan for a full pipeline, then drop microbatches >= m

    def order(r: int) -> list[Action]:
        s0, s1 = r, 2 * pp - 1 - r
        e = _Emitter()
        for _ in range(2 * (pp - r) - 1):
            e.emit((s0, F))
        for _ in range(r):
            e.emit((s1, F), (s0, F))
        for _ in range(pp - r):
            e.emit((s1, F), (s1, I))
            e.emit_pending_weight()
        while e.emitted(s1, F) < e.emitted(s0, F) or e.emitted(s0, F) < n:
            if e.emitted(s0, F) < n:
                e.emit((s0, F))
            e.emit((s0, I))
            e.emit_pending_weight()
            e.emit((s1, F), (s1, I))
            e.emit_pending_weight()
        for _ in range(r):
            e.emit((s0, I), (s1, I))
        for _ in range(pp - r):
            e.emit((s0, I))
            e.actions.append(_take_weight(e.weights, s0))
        e.actions += [w for w in e.weights if w.stage == s1] + [w for w in e.weights if w.stage == s0]
        return [a for a in e.actions if a.microbatch < m]

    return _schedule("zbv", pp, 2, m, v_placement(pp), order)


def _take_weight(weights: deque[Action], stage: int) -> Action:
    """Pop the oldest pending W of ``stage``."""
    for w in weights:
        if w.stage == stage:
            weights.remove(w)
            return w
    raise AssertionError(f"no pending W for stage {stage}")


@register("dualpipev")
def dualpipev(pp: int, vpp: int, m: int) -> Schedule:
    """DualPipeV (DeepSeek-V3's DualPipe folded onto a V): overlapped F/B pairs, ZB in the tail."""
    _need_vpp("dualpipev", vpp, 2, "dualpipev places exactly two chunks per rank in a V")
    if m < 2 * pp:
        raise ValueError(
            f"microbatches={m} must be >= 2*pp={2 * pp} (the number of stages) for dualpipev; "
            f"use microbatches>={2 * pp} or schedule=zbv"
        )

    def order(r: int) -> list[Action]:
        s0, s1 = r, 2 * pp - 1 - r
        e = _Emitter()
        for _ in range(2 * (pp - r - 1)):
            e.emit((s0, F))
        for _ in range(r + 1):
            e.emit((s0, F), (s1, F))
        for _ in range(pp - r - 1):
            e.emit((s1, I))
            e.emit_pending_weight()
            e.emit((s1, F))
        for _ in range(m - 2 * pp + r + 1):  # steady state: F0+B1 and F1+B0 pairs
            e.emit((s0, F), (s1, B), (s1, F), (s0, B))
        for _ in range(pp - r - 1):
            e.emit((s1, B), (s1, F), (s0, B))
        zero_bubble = False
        tail = r + 1
        for i in range(tail):  # the second half of the tail splits backwards
            zero_bubble |= i == tail // 2 and r % 2 == 1
            e.emit((s1, I if zero_bubble else B))
            zero_bubble |= i == tail // 2 and r % 2 == 0
            e.emit((s0, I if zero_bubble else B))
        for _ in range(pp - r - 1):
            e.emit_pending_weight()
            e.emit((s0, I if zero_bubble else B))
        while e.weights:
            e.emit_pending_weight()
        return e.actions

    return _schedule("dualpipev", pp, 2, m, v_placement(pp), order)
