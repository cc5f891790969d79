"""Timing primitives for calibration: wall-clock samples after warmup, medians, and the
alpha-beta (latency + bandwidth) least-squares fit."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sysopt.hardware.profile import LinkFit

MIN_LATENCY_S = 1e-9  # floor for a fitted latency that noise pushed to <= 0


def time_samples(
    fn: Callable[[], object], *, repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None
) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` after `warmup` untimed calls; `sync` (e.g.
    torch.cuda.synchronize) runs before each clock read so queued device work is counted."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        samples.append(time.perf_counter() - start)
    return samples


def median(samples: Sequence[float]) -> float:
    return float(statistics.median(samples))


def fit_alpha_beta(n_bytes: Sequence[float], seconds: Sequence[float]) -> LinkFit:
    """Fit time = latency_s + n / bytes_per_s by least squares on relative error.

    Each point is weighted by 1/t^2 so small messages (which pin down the latency) count as much
    as large ones (which pin down the bandwidth). Results are clamped positive: a latency that
    noise pushes to <= 0 becomes MIN_LATENCY_S; a slope <= 0 falls back to the best observed n/t.
    """
    if len(n_bytes) != len(seconds) or len(n_bytes) < 2:
        raise ValueError(
            f"fit_alpha_beta needs >= 2 (size, time) pairs of equal length; got {len(n_bytes)} sizes "
            f"and {len(seconds)} times"
        )
    if any(t <= 0 for t in seconds):
        raise ValueError(f"fit_alpha_beta: times must be positive, got {list(seconds)}")
    w = [1.0 / (t * t) for t in seconds]
    sw = sum(w)
    sx = sum(wi * x for wi, x in zip(w, n_bytes))
    sy = sum(wi * y for wi, y in zip(w, seconds))
    sxx = sum(wi * x * x for wi, x in zip(w, n_bytes))
    sxy = sum(wi * x * y for wi, x, y in zip(w, n_bytes, seconds))
    det = sw * sxx - sx * sx
    if det <= 0:  # all sizes equal: no slope to fit
        raise ValueError(f"fit_alpha_beta needs at least two distinct sizes, got {list(n_bytes)}")
    slope = (sw * sxy - sx * sy) / det
    intercept = (sy - slope * sx) / sw
    if slope <= 0:
        return LinkFit(max(min(seconds), MIN_LATENCY_S), max(x / t for x, t in zip(n_bytes, seconds)))
    return LinkFit(max(intercept, MIN_LATENCY_S), 1.0 / slope)


@dataclass(frozen=True)
class TimingSamples:
    """Raw wall times behind one calibrated figure, for reports that show spread (min/max)."""

    name: str  # e.g. "matmul/bf16/1024x1024x1024", "copy/memcpy/1048576B", "optimizer/host"
    config: dict
    seconds: tuple[float, ...]
