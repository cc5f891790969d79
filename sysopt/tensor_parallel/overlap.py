"""Overlap policies (`none`, `chunked`, `auto`) and the GEMM+collective kernels they drive.

`chunked` is T3 in software: a GEMM feeding a reduce-scatter / all-reduce runs in k row chunks
and each chunk's asynchronous collective starts as soon as its rows exist (for a reduce-scatter the
rows other ranks own go first and this rank's own rows last, so their GEMM hides the last transfer);
an all-gather feeding a GEMM starts on the local shard while the remote shards arrive in k
asynchronous exchanges (comm.exchange).
`none` runs the collective and the GEMM one after the other. `auto` picks k per GEMM from the
HardwareProfile (see chunk_model). Every rank must resolve the same plan (same profile, shapes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from sysopt.hardware.profile import HardwareProfile
from sysopt.tensor_parallel import comm, runtime
from sysopt.tensor_parallel.chunk_model import GemmCollective, choose_chunks_for, chunk_overhead_s

STRATEGIES = ("none", "chunked", "auto")


@dataclass(frozen=True)
class ChunkPlan:
    """How one GEMM+collective runs: overlapped or not, in how many chunks."""

    overlap: bool
    chunks: int
    predicted_s: float | None = None  # auto: modelled pipeline time
    serial_s: float | None = None  # auto: modelled time without overlap

    @property
    def name(self) -> str:
        """ "none" or "chunked:<k>": the overlap name that runs this plan."""
        return f"chunked:{self.chunks}" if self.overlap else "none"

    def to_dict(self) -> dict[str, Any]:
        return {
            "overlap": self.overlap,
            "chunks": self.chunks,
            "predicted_s": self.predicted_s,
            "serial_s": self.serial_s,
        }


@dataclass(frozen=True)
class OverlapPolicy:
    """strategy: "none" | "chunked" | "auto"; chunks: k for "chunked"; max_chunks: the largest k
    "auto" considers; chunk_overhead_s: host cost per chunk in auto's model (None: the profile's
    calibrated tp_chunk_overhead_s, or CHUNK_OVERHEAD_S when it has none); profile: the calibrated
    HardwareProfile "auto" reads (default: the cached one, measured on `device` when given: layers on the
    CPU of a GPU host must not plan from the GPU's rates). "auto" plans each GEMM+collective shape
    once and reuses the plan (a plan costs ~0.2 ms of Python, paid on every call otherwise)."""

    strategy: str = "none"
    chunks: int = 4
    max_chunks: int = 16
    chunk_overhead_s: float | None = None
    profile: HardwareProfile | None = field(default=None, compare=False, repr=False)
    device: str | None = None
    _auto_plans: dict[GemmCollective, ChunkPlan] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"overlap strategy={self.strategy!r} is not one of {STRATEGIES}")
        for name in ("chunks", "max_chunks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"OverlapPolicy.{name}={value!r} must be a positive integer")

    def plan(self, op: GemmCollective) -> ChunkPlan:
        if self.strategy == "none":
            return ChunkPlan(overlap=False, chunks=1)
        if self.strategy == "chunked":
            if self.chunks > op.rows:
                paired = (
                    f"an {op.kind} feeding a GEMM" if op.kind == "all_gather" else f"a GEMM feeding {op.kind}"
                )
                raise ValueError(
                    f"overlap chunks={self.chunks} cannot split the {op.rows} rows (sequence x batch on "
                    f"each rank) of {paired}: use chunks <= {op.rows}, a longer sequence, or overlap='auto'"
                )
            return ChunkPlan(overlap=True, chunks=self.chunks)
        if (cached := self._auto_plans.get(op)) is not None:
            return cached
        profile = self._profile()
        overhead = self.chunk_overhead_s if self.chunk_overhead_s is not None else chunk_overhead_s(profile)
        choice = choose_chunks_for(profile, op, self.max_chunks, overhead)
        plan = ChunkPlan(
            overlap=True, chunks=choice.chunks, predicted_s=choice.predicted_s, serial_s=choice.serial_s
        )
        self._auto_plans[op] = plan
        return plan

    def _profile(self) -> HardwareProfile:
        if self.profile is not None:
            return self.profile
        from sysopt.hardware.cache import load_cached

        profile = load_cached(device=self.device)
        if profile is None:
            where = "" if self.device is None else f" for device={self.device!r}"
            raise ValueError(
                f"overlap='auto' needs a calibrated HardwareProfile and none is cached{where}; pass "
                "OverlapPolicy('auto', profile=sysopt.hardware.load_or_calibrate()) or calibrate once "
                "with sysopt.hardware.load_or_calibrate(quick=True)"
            )
        object.__setattr__(self, "profile", profile)  # cache on the (frozen) policy
        return profile

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "chunks": self.chunks,
            "max_chunks": self.max_chunks,
            "chunk_overhead_s": self.chunk_overhead_s,
            "device": self.device,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OverlapPolicy:
        return cls(
            d["strategy"],
            int(d["chunks"]),
            int(d["max_chunks"]),
            None if d["chunk_overhead_s"] is None else float(d["chunk_overhead_s"]),
            device=d.get("device"),  # absent in dicts written before the field existed
        )


def resolve_overlap(overlap: str | OverlapPolicy) -> OverlapPolicy:
    """A policy from a policy or a name: "none", "chunked" (k=4), "chunked:<k>", "auto"."""
    if isinstance(overlap, OverlapPolicy):
        return overlap
    if isinstance(overlap, str):
        name, _, k = overlap.partition(":")
        if name == "chunked" and k:
            if not k.isdigit():
                raise ValueError(
                    f"overlap={overlap!r}: the chunk count after ':' must be an integer, e.g. 'chunked:8'"
                )
            return OverlapPolicy("chunked", chunks=int(k))
        if name in STRATEGIES and not k:
            return OverlapPolicy(name)
    raise ValueError(
        f"overlap={overlap!r} must be an OverlapPolicy or one of 'none', 'chunked', 'chunked:<k>', 'auto'"
    )


def chunk_bounds(rows: int, chunks: int) -> list[tuple[int, int]]:
    """`chunks` contiguous row ranges covering 0..rows, sizes differing by at most one."""
    if not 1 <= chunks <= rows:
        raise ValueError(f"cannot split {rows} rows into chunks={chunks}; use 1 <= chunks <= {rows}")
    base, extra = divmod(rows, chunks)
    bounds, start = [], 0
    for i in range(chunks):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class InFlight:
    """Collectives launched for one result; wait() completes them all, runs `finish` (if any) once,
    and returns the result."""

    def __init__(
        self, pending: list[comm.Pending], result: torch.Tensor, finish: Callable[[], None] | None = None
    ) -> None:
        self.pending, self.result, self._finish = pending, result, finish

    def wait(self) -> torch.Tensor:
        for p in self.pending:
            p.wait()
        if self._finish is not None:
            self._finish()
            self._finish = None
        return self.result


# consumer(first_rank, row, blocks): blocks[i] holds rows row:row+blocks.shape[1] of rank
# first_rank+i's shard (blocks is [ranks, rows, k], contiguous)
Consumer = Callable[[int, int, torch.Tensor], None]


class GatheredBlocks:
    """All-gather of each rank's [rows, k] shard, consumed in blocks.

    Overlapped: k asynchronous exchanges (comm.exchange: each other rank gets this rank's rows of the
    chunk, this rank gets theirs) start at construction, so the caller can do other work before
    `consume`, which hands over the local shard first and then, as each chunk arrives, the remote
    ranks' rows of it (in at most two contiguous runs: ranks before and after this one).
    Not overlapped: one blocking all-gather, then the whole gathered tensor as one block.
    """

    def __init__(
        self, local: torch.Tensor, group: dist.ProcessGroup | None, plan: ChunkPlan, name: str
    ) -> None:
        self.local, self.group, self.plan = local.contiguous(), group, plan
        self.tp, self.rank, self.rows = comm.group_size(group), comm.group_rank(group), local.shape[0]
        if plan.overlap:
            self.bounds = chunk_bounds(self.rows, plan.chunks)
            self.pending = [  # each chunk: every other rank's rows a:b, in rank order
                comm.exchange(comm.to_every_other(self.local[a:b], self.tp), group, f"{name}[{i}]")
                for i, (a, b) in enumerate(self.bounds)
            ]
        else:
            self.full = comm.all_gather(self.local, group, name).wait()

    def consume(self, consumer: Consumer) -> None:
        shape = self.local.shape[1:]
        if not self.plan.overlap:
            consumer(0, 0, self.full.view(self.tp, self.rows, *shape))
            return
        consumer(self.rank, 0, self.local.view(1, self.rows, *shape))
        for (a, b), pending in zip(self.bounds, self.pending):
            others = pending.wait().view(self.tp - 1, b - a, *shape)
            if self.rank > 0:
                consumer(0, a, others[: self.rank])
            if self.rank < self.tp - 1:
                consumer(self.rank + 1, a, others[self.rank :])


def rows_of(t3: torch.Tensor, first_rank: int, row: int, blocks: torch.Tensor) -> torch.Tensor:
    """The [ranks, rows, ...] view of per-rank tensor `t3` matching a consumer's `blocks`."""
    return t3[first_rank : first_rank + blocks.shape[0], row : row + blocks.shape[1]]


def flat(blocks: torch.Tensor) -> torch.Tensor:
    """[ranks, rows, k] -> [ranks*rows, k] (a copy only when not contiguous)."""
    return blocks.reshape(-1, blocks.shape[-1])


def mm_into(
    target: torch.Tensor, a: torch.Tensor, b: torch.Tensor, name: str, bias: torch.Tensor | None = None
) -> None:
    """target[...] = a @ b (+ bias) for a [ranks, rows, n] view `target` (a 2-D `a`); written in place
    when the view is contiguous, else through a temporary."""
    if target.is_contiguous():
        runtime.mm(a, b, out=target.view(-1, target.shape[-1]), name=name, bias=bias)
    else:
        target.copy_(runtime.mm(a, b, name=name, bias=bias).view(target.shape))


def gemm_reduce_scatter(
    a: torch.Tensor,
    b: torch.Tensor,
    group: dist.ProcessGroup | None,
    plan: ChunkPlan,
    name: str,
    bias: torch.Tensor | None = None,
) -> InFlight:
    """Reduce-scatter of a @ b over dim 0 (a: [tp*rows, k], rank-major rows) -> [rows, n], plus `bias`
    (added once, to this rank's own block, before the partial sums of the other ranks).

    Overlapped, the rows other ranks own come first: chunk i's GEMM makes rows lo:hi of every other
    rank's block and its exchange (an all-to-all among the other ranks) starts at once. This rank's
    own block is multiplied last (the bias in its epilogue), while the final chunks are in flight, and
    the partial sums received are added to it when the result is waited for (after whatever the caller
    overlaps with them).
    """
    tp = comm.group_size(group)
    if not plan.overlap:
        full = runtime.mm(a, b, name=f"{name}.gemm")
        return InFlight([], comm.reduce_scatter(full, group, name=name, bias=bias).wait())
    rank, rows = comm.group_rank(group), a.shape[0] // tp
    a3 = a.reshape(tp, rows, a.shape[1])
    chunks = []
    for i, (lo, hi) in enumerate(chunk_bounds(rows, plan.chunks)):
        block = runtime.mm(comm.remote_rows(a3, rank, lo, hi), b, name=f"{name}.gemm[{i}]")
        chunks.append((lo, hi, comm.exchange(block, group, name=f"{name}[{i}]")))
    out = runtime.mm(a3[rank], b, name=f"{name}.gemm[local]", bias=bias)

    def add_received() -> None:
        for lo, hi, pending in chunks:
            comm.add_partials(out[lo:hi], pending)

    return InFlight([pending for _, _, pending in chunks], out, add_received)


def gemm_all_reduce(
    a: torch.Tensor, b: torch.Tensor, group: dist.ProcessGroup | None, plan: ChunkPlan, name: str
) -> InFlight:
    """All-reduce of a @ b (a: [rows, k]) -> [rows, n]."""
    if not plan.overlap:
        full = runtime.mm(a, b, name=f"{name}.gemm")
        return InFlight([], comm.all_reduce(full, group, name=name).wait())
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    pending = []
    for i, (lo, hi) in enumerate(chunk_bounds(a.shape[0], plan.chunks)):
        runtime.mm(a[lo:hi], b, out=out[lo:hi], name=f"{name}.gemm[{i}]")
        pending.append(comm.all_reduce(out[lo:hi], group, name=f"{name}[{i}]"))
    return InFlight(pending, out)
