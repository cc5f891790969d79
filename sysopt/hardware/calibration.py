"""Calibration microbenchmarks: matmul throughput per dtype, host<->device copy bandwidth,
collectives and optimizer update rate, gathered into a Calibration on the HardwareProfile."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterable

import torch

from sysopt.hardware.collectives import calibrate_collectives
from sysopt.hardware.probe import now_iso, probe
from sysopt.hardware.profile import Calibration, HardwareProfile, LinkFit, MatmulPoint
from sysopt.hardware.timing import TimingSamples, fit_alpha_beta, median, time_samples

QUICK_SHAPES = (256, 512, 1024)
FULL_SHAPES = (512, 1024, 2048)
QUICK_COPY_BYTES = (64 << 10, 1 << 20, 16 << 20)
FULL_COPY_BYTES = (64 << 10, 1 << 20, 16 << 20, 64 << 20)
QUICK_OPTIMIZER_PARAMS = 4_000_000
FULL_OPTIMIZER_PARAMS = 10_000_000

Progress = Callable[[Iterable, str], Iterable]


def default_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())  # cuda-ok: behind the capability check
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def resolve_device(device=None) -> torch.device:
    """The device a calibration measures on: `device`, or the default one; a bare 'cuda' becomes the
    current CUDA device ('cuda:0'), so a profile records the same name a request for it resolves to."""
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())  # cuda-ok: behind the capability check
    return dev


def _syncer(device: torch.device) -> Callable[[], None] | None:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def _matmul_fn(dtype: str, size: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """A closure computing one size^3 matmul in `dtype` (fp16 is deliberately absent: ~1 GFLOP/s on CPU)."""
    g = torch.Generator().manual_seed(size)
    a = torch.randn(size, size, generator=g)
    b = torch.randn(size, size, generator=g)
    if dtype == "fp32":
        a, b = a.to(device), b.to(device)
        return lambda: a @ b
    if dtype == "bf16":
        a, b = a.to(device, torch.bfloat16), b.to(device, torch.bfloat16)
        return lambda: a @ b
    if dtype == "int8":
        a8 = a.mul(30).clamp(-127, 127).to(torch.int8).to(device)
        b8 = b.mul(30).clamp(-127, 127).to(torch.int8).to(device)
        return lambda: torch._int_mm(a8, b8)
    if dtype == "fp8":
        a8 = a.to(device, torch.float8_e4m3fn)
        b8 = b.t().contiguous().to(device, torch.float8_e4m3fn).t()  # column-major, as cuBLASLt wants
        # tensorwise scales on CUDA (the widest-supported recipe); rowwise on CPU, where the
        # tensorwise path is a ~0.01 GFLOP/s reference loop (torch 2.13)
        rowwise = device.type == "cpu"
        scale_a = torch.ones((size, 1) if rowwise else (), device=device)
        scale_b = torch.ones((1, size) if rowwise else (), device=device)
        return lambda: torch._scaled_mm(a8, b8, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
    raise ValueError(f"dtype={dtype!r} is not calibrated; use one of fp32, bf16, int8, fp8")


def calibrate_matmul(
    device: torch.device, *, quick: bool, repeats: int, samples: list | None = None
) -> tuple[tuple[MatmulPoint, ...], dict[str, float]]:
    """Points per (dtype, square size) and the best FLOP/s per dtype; a dtype that fails is absent."""
    points = []
    for dtype in ("fp32", "bf16", "int8", "fp8"):
        for size in QUICK_SHAPES if quick else FULL_SHAPES:
            try:
                fn = _matmul_fn(dtype, size, device)
                secs = time_samples(fn, repeats=repeats, warmup=2, sync=_syncer(device))
            except (RuntimeError, NotImplementedError, TypeError) as exc:
                warnings.warn(
                    f"matmul {dtype} {size}^3 on {device} failed, skipping {dtype}: {exc}", stacklevel=2
                )
                points = [p for p in points if p.dtype != dtype]
                break
            flops = 2 * size**3
            t = median(secs)
            points.append(MatmulPoint(dtype, size, size, size, t, flops / t))
            if samples is not None:
                config = {
                    "dtype": dtype,
                    "m": size,
                    "n": size,
                    "k": size,
                    "flops": flops,
                    "device": str(device),
                }
                samples.append(TimingSamples(f"matmul/{dtype}/{size}x{size}x{size}", config, tuple(secs)))
    best: dict[str, float] = {}
    for p in points:
        best[p.dtype] = max(best.get(p.dtype, 0.0), p.flops_per_s)
    return tuple(points), best


def _copy_kinds(device: torch.device) -> dict[str, Callable[[int], Callable[[], object]]]:
    """Copy kind -> factory(n_bytes) -> closure doing one copy of n_bytes."""
    if device.type != "cuda":

        def memcpy(n: int):
            src, dst = torch.ones(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
            return lambda: dst.copy_(src)

        return {"memcpy": memcpy}

    def h2d(pinned: bool):
        def make(n: int):
            host = torch.ones(n, dtype=torch.uint8, pin_memory=pinned)
            dev = torch.empty(n, dtype=torch.uint8, device=device)
            return lambda: dev.copy_(host, non_blocking=pinned)

        return make

    def d2h(pinned: bool):
        def make(n: int):
            dev = torch.ones(n, dtype=torch.uint8, device=device)
            host = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
            return lambda: host.copy_(dev, non_blocking=pinned)

        return make

    return {
        "h2d_pinned": h2d(True),
        "h2d_pageable": h2d(False),
        "d2h_pinned": d2h(True),
        "d2h_pageable": d2h(False),
    }


def calibrate_copy(
    device: torch.device, *, quick: bool, repeats: int, samples: list | None = None
) -> dict[str, LinkFit]:
    fits = {}
    sizes = QUICK_COPY_BYTES if quick else FULL_COPY_BYTES
    for kind, make in _copy_kinds(device).items():
        times = []
        for n in sizes:
            secs = time_samples(make(n), repeats=repeats, warmup=1, sync=_syncer(device))
            times.append(median(secs))
            if samples is not None:
                samples.append(TimingSamples(f"copy/{kind}/{n}B", {"kind": kind, "n_bytes": n}, tuple(secs)))
        fits[kind] = fit_alpha_beta(sizes, times)
    return fits


def _adamw(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device: foreach is the next best
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)


def optimizer_params_per_s(
    device: torch.device, *, n_params: int, repeats: int, samples: list | None = None, where: str = "host"
) -> float:
    """Parameters updated per second by AdamW (fused where available) over `n_params` in 1M chunks."""
    chunk = 1_000_000
    sizes = [chunk] * (n_params // chunk) + ([n_params % chunk] if n_params % chunk else [])
    params = [torch.zeros(s, device=device, requires_grad=True) for s in sizes]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt = _adamw(params)
    secs = time_samples(opt.step, repeats=repeats, warmup=1, sync=_syncer(device))
    if samples is not None:
        config = {"n_params": n_params, "optimizer": type(opt).__name__, "device": str(device)}
        config["fused"] = bool(opt.defaults.get("fused"))
        samples.append(TimingSamples(f"optimizer/{where}", config, tuple(secs)))
    return n_params / median(secs)


def calibrate(
    profile: HardwareProfile | None = None,
    *,
    quick: bool = False,
    world_size: int = 2,
    device: str | torch.device | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    samples: list[TimingSamples] | None = None,
) -> HardwareProfile:
    """Measure what cost models need and return `profile` (probed when None) with its calibration.

    quick=True uses smaller shapes and fewer sizes (seconds, not minutes); `repeats` timed runs per
    figure (default 3 quick, 5 full) give each median. `threads` sets torch's intra-op threads while
    measuring (default: as configured; 1 is steadier on a shared machine, where a descheduled
    OpenMP thread stalls every parallel region). `progress` wraps the
    list of steps (e.g. rich.progress.track); `samples`, when given, collects the raw wall times
    behind every figure. Collectives spawn processes: call this under `if __name__ == "__main__":`.
    """
    with intraop_threads(threads):
        return _calibrate(profile, quick, world_size, device, repeats, progress, samples)


@contextlib.contextmanager
def intraop_threads(threads: int | None):
    """torch's intra-op thread count set to `threads` (None: unchanged) inside the block, restored after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _calibrate(profile, quick, world_size, device, repeats, progress, samples) -> HardwareProfile:
    profile = profile or probe()
    dev = resolve_device(device)
    repeats = repeats or (3 if quick else 5)
    n_params = QUICK_OPTIMIZER_PARAMS if quick else FULL_OPTIMIZER_PARAMS

    def optimizer_rates() -> dict[str, float]:
        host = optimizer_params_per_s(
            torch.device("cpu"), n_params=n_params, repeats=repeats, samples=samples
        )
        if dev.type == "cpu":  # no device: "device" is the host figure, measured the same way
            return {"host": host, "device": host}
        on_dev = optimizer_params_per_s(
            dev, n_params=n_params, repeats=repeats, samples=samples, where="device"
        )
        return {"host": host, "device": on_dev}

    steps: list[tuple[str, Callable[[], object]]] = [
        ("matmul", lambda: calibrate_matmul(dev, quick=quick, repeats=repeats, samples=samples)),
        ("copy", lambda: calibrate_copy(dev, quick=quick, repeats=repeats, samples=samples)),
        (
            "collectives",
            lambda: calibrate_collectives(
                world_size, quick=quick, repeats=repeats, samples=samples, device=dev
            ),
        ),
        ("optimizer", optimizer_rates),
    ]
    found = {name: run() for name, run in (progress(steps, "calibrating") if progress else steps)}
    points, best = found["matmul"]
    p2p, allreduce, backend, tp_collectives, chunk_overhead = found["collectives"]
    calibration = Calibration(
        device=str(dev),
        matmul=points,
        matmul_flops_per_s=best,
        copy=found["copy"],
        p2p=p2p,
        allreduce=allreduce,
        collective_world_size=world_size if p2p is not None else 1,
        collective_backend=backend,
        optimizer_params_per_s=found["optimizer"],
        created=now_iso(),
        tp_collectives=tp_collectives,
        tp_chunk_overhead_s=chunk_overhead,
        threads=torch.get_num_threads(),  # inside intraop_threads: what every figure was measured with
        quick=quick,
    )
    return dataclasses.replace(profile, calibration=calibration)
