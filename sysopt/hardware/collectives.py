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


def collective_worker(sizes_bytes: tuple[int, ...], repeats: int, warmup: int) -> dict | None:
    """Runs on every rank under sysopt.dist.launch; rank 0 returns {kind: {n_bytes: [seconds]}}."""
    rank = dist.get_rank()
    on_gpu = dist.get_backend() == "nccl"  # launch bound this rank to its GPU
    device = torch.device("cpu")
    if on_gpu:
        device = torch.device("cuda", torch.cuda.current_device())  # cuda-ok: NCCL backend only
    out: dict[str, dict[int, list[float]]] = {"p2p": {}, "allreduce": {}}
    for n_bytes in sizes_bytes:
        buf = torch.zeros(max(n_bytes // 4, 1), dtype=torch.float32, device=device)
        dist.barrier()
        out["p2p"][n_bytes] = [_p2p_round_trip_s(buf, rank) for _ in range(warmup + repeats)][warmup:]
        dist.barrier()
        out["allreduce"][n_bytes] = [_allreduce_s(buf) for _ in range(warmup + repeats)][warmup:]
    dist.barrier()
    return out if rank == 0 else None


def calibrate_collectives(
    world_size: int, *, quick: bool, repeats: int, warmup: int = 1, samples: list | None = None
) -> tuple[LinkFit | None, LinkFit | None, str]:
    """(p2p fit, all-reduce fit, backend). Fits are None when world_size < 2 or the launch fails
    (a warning says why): calibration of everything else still stands."""
    if world_size < 2:
        return None, None, ""
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"
    sizes = QUICK_SIZES_BYTES if quick else FULL_SIZES_BYTES
    try:
        from sysopt.dist import launch

        results = launch(
            collective_worker, world_size, args=(sizes, repeats, warmup), backend=backend, timeout_s=120.0
        )
    except Exception as exc:  # noqa: BLE001 - ImportError, LaunchError, LaunchTimeout
        warnings.warn(f"collective calibration skipped: {type(exc).__name__}: {exc}", stacklevel=2)
        return None, None, backend
    fits = {}
    for kind in ("p2p", "allreduce"):
        by_size = results[0][kind]
        sizes_sorted = sorted(by_size)
        if samples is not None:
            for n in sizes_sorted:
                config = {"n_bytes": n, "world_size": world_size, "backend": backend}
                samples.append(TimingSamples(f"{kind}/{n}B", config, tuple(by_size[n])))
        fits[kind] = fit_alpha_beta(sizes_sorted, [median(by_size[n]) for n in sizes_sorted])
    return fits["p2p"], fits["allreduce"], backend
