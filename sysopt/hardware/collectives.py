"""Point-to-point and all-reduce calibration: time a few message sizes on a spawned process group
(sysopt.dist.launch) and fit latency + bandwidth to each."""

from __future__ import annotations

import time
import warnings

import torch
import torch.distributed as dist

from sysopt.hardware.profile import LinkFit
from sysopt.hardware.timing import TimingSamples, fit_alpha_beta, median

QUICK_SIZES_BYTES = (4 << 10, 256 << 10, 4 << 20)
FULL_SIZES_BYTES = (1 << 10, 16 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _p2p_round_trip_s(buf: torch.Tensor, rank: int) -> float:
    """One ping-pong between ranks 0 and 1; other ranks idle. Returns the one-way time."""
    start = time.perf_counter()
    if rank == 0:
        dist.send(buf, 1)
        dist.recv(buf, 1)
    elif rank == 1:
        dist.recv(buf, 0)
        dist.send(buf, 0)
    _sync(buf.device)
    return (time.perf_counter() - start) / 2


def _allreduce_s(buf: torch.Tensor) -> float:
    dist.barrier()
    start = time.perf_counter()
    dist.all_reduce(buf)
    _sync(buf.device)
    return time.perf_counter() - start


TP_KINDS = ("all_gather", "reduce_scatter")
TP_BURSTS = (1, 4)  # ops issued back to back, as a chunked tensor-parallel layer issues them


def _tp_burst_s(kind: str, full: torch.Tensor, ops: int) -> float:
    """Issue `ops` asynchronous collectives of 1/ops of `full` each (through sysopt.tensor_parallel.comm,
    the code path the TP layers use), then wait for all; returns seconds for the burst."""
    from sysopt.tensor_parallel import comm

    world = dist.get_world_size()
    if kind == "all_gather":  # full = the gathered output; each rank contributes 1/world of it
        pieces = full[: full.shape[0] // world].chunk(ops)
        issue = lambda piece: comm.all_gather(piece, None)  # noqa: E731
    else:  # full = the reduce-scatter input
        pieces = full.view(world, -1).chunk(ops, dim=1)
        issue = lambda piece: comm.reduce_scatter(piece.contiguous().view(-1), None)  # noqa: E731
    dist.barrier()
    start = time.perf_counter()
    pending = [issue(piece) for piece in pieces]
    for p in pending:
        p.wait()
    _sync(full.device)
    return time.perf_counter() - start


def _chunk_overhead_s(repeats: int, warmup: int, device: torch.device, many: int = 8) -> float:
    """Host cost of one more chunk in a chunked tensor-parallel layer: a sequence-parallel column linear
    on a tiny input (GEMMs and bytes negligible) run with 1 and `many` chunks; the difference in the CPU time
    of the calling thread, per extra chunk: slicing, launching, bookkeeping, what a chunk costs the compute
    stream. Not wall time: a tiny layer's wall time also counts each chunk's collective latency, which the
    chunk model already charges on the communication side (the burst fits), and the wait for the peer rank,
    which on a shared 2-core host swung the estimate 5x between calibrations (160-740 us per chunk at tp=2,
    0.4-1.6 ms at tp=4, where the thread's CPU time gave 50-120 us). Blocked in a gloo wait the thread uses no
    CPU; on CUDA the layer call only launches work, and the device sync sits outside the timed span."""
    from sysopt.tensor_parallel import ColumnParallelLinear

    world = dist.get_world_size()
    x = torch.randn(8 * many, 1, 16, device=device)
    layers = {
        chunks: ColumnParallelLinear(
            16, 16 * world, bias=False, sequence_parallel=True, overlap=f"chunked:{chunks}"
        ).to(device)
        for chunks in (1, many)
    }
    times: dict[int, list[float]] = {chunks: [] for chunks in layers}
    for i in range(warmup + repeats):
        for chunks, layer in layers.items():  # alternated, so a drift in the machine's speed hits both
            dist.barrier()
            start = time.thread_time()
            layer(x)
            spent = time.thread_time() - start
            _sync(device)
            if i >= warmup:
                times[chunks].append(spent)
    return max(0.0, (median(times[many]) - median(times[1])) / (many - 1))


def collective_worker(sizes_bytes: tuple[int, ...], repeats: int, warmup: int) -> dict | None:
    """Runs on every rank under sysopt.dist.launch; rank 0 returns {kind: {n_bytes: [seconds]}}, and for
    the tensor-parallel collectives {"tp_<kind>": {(n_bytes, ops): [seconds per burst]}} and
    "tp_chunk_overhead_s"."""
    rank, world = dist.get_rank(), dist.get_world_size()
    on_gpu = dist.get_backend() == "nccl"  # launch bound this rank to its GPU
    device = torch.device("cpu")
    if on_gpu:
        device = torch.device("cuda", torch.cuda.current_device())  # cuda-ok: NCCL backend only
    out: dict = {"p2p": {}, "allreduce": {}}
    for n_bytes in sizes_bytes:
        buf = torch.zeros(max(n_bytes // 4, 1), dtype=torch.float32, device=device)
        dist.barrier()
        out["p2p"][n_bytes] = [_p2p_round_trip_s(buf, rank) for _ in range(warmup + repeats)][warmup:]
        dist.barrier()
        out["allreduce"][n_bytes] = [_allreduce_s(buf) for _ in range(warmup + repeats)][warmup:]
        elements = max(n_bytes // 4, 1)
        full = torch.zeros(elements - elements % (world * max(TP_BURSTS)) or world * max(TP_BURSTS),
                           dtype=torch.float32, device=device)  # fmt: skip
        for kind in TP_KINDS:
            for ops in TP_BURSTS:
                runs = [_tp_burst_s(kind, full, ops) for _ in range(warmup + repeats)][warmup:]
                out.setdefault(f"tp_{kind}", {})[(4 * full.numel(), ops)] = runs
    out["tp_chunk_overhead_s"] = _chunk_overhead_s(3 * repeats, warmup, device)
    dist.barrier()
    return out if rank == 0 else None


def fit_bursts(by_burst: dict[tuple[int, int], list[float]]) -> LinkFit:
    """Per-op latency and bandwidth of a collective issued in bursts: a burst of k ops over n bytes in all
    takes k * latency + n / bandwidth, so each (n/k bytes, t/k seconds) is one point of an alpha-beta fit."""
    points = sorted((n / ops, median(times) / ops) for (n, ops), times in by_burst.items())
    return fit_alpha_beta([p[0] for p in points], [p[1] for p in points])


def collective_backend(device: torch.device, world_size: int) -> str:
    """The backend a calibration of `device` measures its collectives with: NCCL for a CUDA device when
    there is a GPU per rank, else gloo on host tensors (a CPU profile on a GPU node is measured over gloo,
    as the CPU ranks that will use it communicate)."""
    if device.type == "cuda" and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def calibrate_collectives(
    world_size: int,
    *,
    quick: bool,
    repeats: int,
    warmup: int = 1,
    samples: list | None = None,
    device: torch.device | None = None,
) -> tuple[LinkFit | None, LinkFit | None, str, dict[str, LinkFit], float | None]:
    """(p2p fit, all-reduce fit, backend, {tensor-parallel collective: per-op fit}, host seconds per extra
    chunk of a chunked TP layer) for the profile of `device` (default CPU; see collective_backend). Fits
    are None (the dict empty) when world_size < 2 or the launch fails (a warning says why): calibration of
    everything else still stands."""
    if world_size < 2:
        return None, None, "", {}, None
    backend = collective_backend(device or torch.device("cpu"), world_size)
    sizes = QUICK_SIZES_BYTES if quick else FULL_SIZES_BYTES
    from sysopt.dist.launch import env_world

    if (
        env_world() is not None
    ):  # launch() would run the worker here, as one rank, and only rank 0 has results
        warnings.warn(
            "collective calibration skipped: this process is one rank of a torchrun/srun job; calibrate "
            "outside it (sysopt-probe --calibrate spawns its own ranks) and the ranks read the cached profile",
            stacklevel=2,
        )
        return None, None, backend, {}, None
    try:
        from sysopt.dist import launch

        results = launch(
            collective_worker, world_size, args=(sizes, repeats, warmup), backend=backend, timeout_s=120.0
        )
    except Exception as exc:  # noqa: BLE001 - ImportError, LaunchError, LaunchTimeout
        warnings.warn(f"collective calibration skipped: {type(exc).__name__}: {exc}", stacklevel=2)
        return None, None, backend, {}, None
    fits = {}
    for kind in ("p2p", "allreduce"):
        by_size = results[0][kind]
        sizes_sorted = sorted(by_size)
        if samples is not None:
            for n in sizes_sorted:
                config = {"n_bytes": n, "world_size": world_size, "backend": backend}
                samples.append(TimingSamples(f"{kind}/{n}B", config, tuple(by_size[n])))
        fits[kind] = fit_alpha_beta(sizes_sorted, [median(by_size[n]) for n in sizes_sorted])
    tp_fits = {}
    for kind in TP_KINDS:
        by_burst = results[0][f"tp_{kind}"]
        if samples is not None:
            for (n, ops), times in sorted(by_burst.items()):
                config = {"n_bytes": n, "ops": ops, "world_size": world_size, "backend": backend}
                samples.append(TimingSamples(f"tp_{kind}/{n}B/{ops}ops", config, tuple(times)))
        tp_fits[kind] = fit_bursts(by_burst)
    overhead = results[0]["tp_chunk_overhead_s"]
    return fits["p2p"], fits["allreduce"], backend, tp_fits, overhead
