"""Cost model for chunked GEMM/collective overlap: the pipeline time of k chunks and the k that
minimises it, with GEMM and collective costs read from a HardwareProfile (pure Python, no torch).

A producer GEMM feeding an all-reduce runs in k equal chunks and finishes at
    first chunk compute + sum_{i=2..k} max(compute_i, comm_{i-1}) + last comm
  = max(k*c + m, c + k*m)
for per-chunk compute c and communication m (latency included in m). A reduce-scatter sends only
the rows other ranks own, so those go first in k chunks and this rank's own rows (local compute L)
are multiplied last, under the final transfer: max(k*c + max(L, m), c + k*m). An all-gather
feeding a GEMM starts with the local shard's GEMM (L) while chunk 1 arrives, so it ends at
    max(max(L, m) + k*c, k*m + c)
which is the same expression: one formula, with L = 0 for the all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sysopt.hardware.profile import HardwareProfile

KINDS = ("reduce_scatter", "all_gather", "all_reduce")
# host time to issue one chunk (GEMM call, slicing, collective launch, completion bookkeeping);
# measured at ~50-150 us with gloo on a 2-core CPU; it keeps `auto` from splitting without limit
CHUNK_OVERHEAD_S = 1e-4
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "fp8": 1}


@dataclass(frozen=True)
class GemmCollective:
    """One GEMM paired with one collective on a tp group (all sizes per rank).

    reduce_scatter: [tp*rows, k] @ [k, n], then reduce-scatter to [rows, n].
    all_gather:     all-gather [rows, k] to [tp*rows, k], each block @ [k, n] as it arrives.
    all_reduce:     [rows, k] @ [k, n], then all-reduce.
    gemms_per_block: GEMMs of that size run on each block (2 when dgrad and wgrad both consume it).
    """

    kind: str
    rows: int
    n: int
    k: int
    tp: int
    dtype: str = "fp32"
    gemms_per_block: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"GemmCollective.kind={self.kind!r} must be one of {KINDS}")
        if min(self.rows, self.n, self.k, self.tp, self.gemms_per_block) < 1:
            raise ValueError(f"GemmCollective sizes must be positive: {self}")

    @property
    def itemsize(self) -> int:
        return ITEMSIZE.get(self.dtype, 4)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ChunkChoice:
    chunks: int
    predicted_s: float  # modelled time of the chunked pipeline
    serial_s: float  # modelled time of collective and GEMM one after the other (no overlap)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# (per-chunk compute s, per-chunk communication s, local compute s) for a chunk count: the local
# compute is the GEMM on this rank's own block, first for an all-gather, last for a reduce-scatter
ChunkCosts = Callable[[int], tuple[float, float, float]]


def pipeline_time_s(
    kind: str, chunks: int, compute_s: float, comm_s: float, local_compute_s: float = 0.0
) -> float:
    """Time of `chunks` equal chunks, each costing `compute_s` of GEMM and `comm_s` of collective,
    plus `local_compute_s` of GEMM on this rank's own block (all-gather, reduce-scatter)."""
    if kind not in KINDS:
        raise ValueError(f"pipeline_time_s: kind={kind!r} must be one of {KINDS}")
    return max(max(local_compute_s, comm_s) + chunks * compute_s, compute_s + chunks * comm_s)


def choose_chunks(kind: str, costs: ChunkCosts, max_chunks: int) -> ChunkChoice:
    """The chunk count in 1..max_chunks with the least pipeline time (the smaller count on ties)."""
    if max_chunks < 1:
        raise ValueError(f"max_chunks={max_chunks} must be >= 1")
    compute_1, comm_1, local_1 = costs(1)
    serial_s = local_1 + compute_1 + comm_1
    best: ChunkChoice | None = None
    for chunks in range(1, max_chunks + 1):
        t = pipeline_time_s(kind, chunks, *costs(chunks))
        if best is None or t < best.predicted_s:
            best = ChunkChoice(chunks, t, serial_s)
    assert best is not None
    return best


def collective_time_s(profile: HardwareProfile, kind: str, nbytes: float, tp: int) -> float:
    """Time of one collective over `tp` ranks on `nbytes` per rank (reduce-scatter input, all-gather
    output, all-reduce buffer). From the profile's per-op fit of that collective as the TP layers issue
    it when the calibration has one (ring-scaled from its world size to tp), else ring-scaled from the
    all-reduce alpha-beta fit."""
    if tp < 2:
        return 0.0
    cal = profile.calibration
    world = max(2, cal.collective_world_size if cal is not None else 2)
    fit = cal.tp_collectives.get(kind) if cal is not None else None
    if fit is not None:  # ring: (tp-1) steps, each moving 1/tp of the tensor
        steps, measured_steps = tp - 1, world - 1
        return (
            fit.latency_s * steps / measured_steps
            + nbytes * (steps / tp) / (measured_steps / world) / fit.bytes_per_s
        )
    latency_s = profile.allreduce_time_s(0)
    probe_bytes = 1 << 20
    per_byte_s = (profile.allreduce_time_s(probe_bytes) - latency_s) / probe_bytes
    step_latency_s = latency_s / (2 * (world - 1))  # an all-reduce ring is 2(p-1) steps
    link_s_per_byte = per_byte_s * world / (2 * (world - 1))  # ...moving 2(p-1)/p of the buffer
    steps = 2 * (tp - 1) if kind == "all_reduce" else tp - 1
    return steps * step_latency_s + steps * nbytes / tp * link_s_per_byte


def chunk_overhead_s(profile: HardwareProfile) -> float:
    """Host seconds one more chunk costs: the profile's calibrated figure, else CHUNK_OVERHEAD_S."""
    calibrated = profile.calibration.tp_chunk_overhead_s if profile.calibration is not None else None
    return CHUNK_OVERHEAD_S if calibrated is None else calibrated


def profile_costs(
    profile: HardwareProfile, op: GemmCollective, chunk_overhead_s: float = CHUNK_OVERHEAD_S
) -> ChunkCosts:
    """Per-chunk costs of `op` split into k chunks, from the profile's GEMM and collective fits,
    plus `chunk_overhead_s` of host work per chunk."""

    def gemm_s(rows: int) -> float:
        return op.gemms_per_block * profile.matmul_time_s(rows, op.n, op.k, op.dtype) + chunk_overhead_s

    def costs(chunks: int) -> tuple[float, float, float]:
        rows = math.ceil(op.rows / chunks)  # the largest chunk sets the pace
        if op.kind == "reduce_scatter":  # the other ranks' rows of each chunk, then our own block
            nbytes = op.tp * rows * op.n * op.itemsize  # on the wire as a reduce-scatter of tp blocks
            compute_s = gemm_s((op.tp - 1) * rows)
            return compute_s, collective_time_s(profile, op.kind, nbytes, op.tp), gemm_s(op.rows)
        if op.kind == "all_gather":
            nbytes = op.tp * rows * op.k * op.itemsize
            compute_s = (op.tp - 1) * (gemm_s(rows) - chunk_overhead_s) + chunk_overhead_s
            return compute_s, collective_time_s(profile, op.kind, nbytes, op.tp), gemm_s(op.rows)
        nbytes = rows * op.n * op.itemsize
        return gemm_s(rows), collective_time_s(profile, op.kind, nbytes, op.tp), 0.0

    return costs


def choose_chunks_for(
    profile: HardwareProfile,
    op: GemmCollective,
    max_chunks: int = 16,
    chunk_overhead_s: float = CHUNK_OVERHEAD_S,
) -> ChunkChoice:
    """`choose_chunks` with costs from `profile`, never more chunks than rows."""
    return choose_chunks(op.kind, profile_costs(profile, op, chunk_overhead_s), min(max_chunks, op.rows))
