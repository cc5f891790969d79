"""Fit the planner's per-layer overhead once, to one measured training run: the per-op overhead that makes
the predicted step of that config equal its measured step. Cached per host beside the hardware profile."""

from __future__ import annotations

import dataclasses
import itertools
import socket
from pathlib import Path

from sysopt.hardware.cache import cache_dir
from sysopt.planner.context import Machine, PlannerCalibration, Workload
from sysopt.planner.layer_times import LayerTimes
from sysopt.planner.model import CostModel
from sysopt.planner.space import PlanConfig


def default_calibration_path() -> Path:
    return cache_dir() / f"planner-{socket.gethostname()}.json"


def predicted_step_s(
    workload: Workload,
    machine: Machine,
    calibration: PlannerCalibration,
    config: PlanConfig,
    boundaries: tuple[int, ...] | None = None,
) -> float:
    return CostModel(workload, machine, calibration).predict(config, boundaries).step_s


Run = tuple  # (PlanConfig, measured step seconds) or (PlanConfig, measured, pipeline boundaries that ran)


def _runs(runs: list[Run]) -> list[tuple[PlanConfig, float, tuple[int, ...] | None]]:
    return [(r[0], r[1], tuple(r[2]) if len(r) > 2 and r[2] is not None else None) for r in runs]


def fit_op_overhead(
    workload: Workload,
    machine: Machine,
    config: PlanConfig,
    measured_step_s: float,
    *,
    tolerance_s: float = 1e-9,
) -> PlannerCalibration:
    """The PlannerCalibration whose op_overhead_s makes `config` predict `measured_step_s`.

    The predicted step grows monotonically with the overhead, so bisection finds it. When the model
    without any overhead already predicts more than was measured, the overhead stays 0 and gemm_scale
    (< 1) is fitted instead, so GEMMs run faster than the profile's rates say."""
    if measured_step_s <= 0:
        raise ValueError(f"measured_step_s={measured_step_s} must be > 0")
    base = PlannerCalibration()
    zero_s = predicted_step_s(workload, machine, base, config)
    if zero_s <= measured_step_s:
        field, lo, hi = "op_overhead_s", 0.0, measured_step_s
    else:
        field, lo, hi = "gemm_scale", 0.0, 1.0
    while hi - lo > tolerance_s * (1.0 if field == "op_overhead_s" else 1e-3):
        mid = (lo + hi) / 2
        trial = dataclasses.replace(base, **{field: mid})
        if predicted_step_s(workload, machine, trial, config) < measured_step_s:
            lo = mid
        else:
            hi = mid
    value = (lo + hi) / 2
    if field == "gemm_scale" and value < 1e-3:  # even free GEMMs predict more than was measured
        raise ValueError(
            f"cannot fit {config.label()} measured at {measured_step_s * 1e3:.2f} ms: the model predicts "
            f"{predicted_step_s(workload, machine, dataclasses.replace(base, gemm_scale=0.0), config) * 1e3:.2f} "
            "ms for it with GEMMs taking no time at all, so its other costs (optimizer, copies, collectives, "
            "elementwise) are too high for this machine; calibrate the profile here (sysopt-probe "
            "--calibrate) or fit with a configuration whose GEMMs dominate"
        )
    source = (
        f"{field}={value:.6g} fitted to {config.label()} measured at {measured_step_s * 1e3:.2f} ms "
        f"(uncalibrated prediction {zero_s * 1e3:.2f} ms), profile of {machine.profile.created}"
    )
    return dataclasses.replace(
        base,
        **{field: value},
        source=source,
        profile_created=machine.profile.created,
        workload_key=workload.key(),
    )


_PROBE_S = 1e-4  # a host-tensor overhead to read off how many host tensors each prediction counts


def _nonnegative_two_term_fit(
    base: list[float], per_h: list[float], measured: list[float]
) -> tuple[float, float]:
    """(s, h) >= 0 minimising sum(((base_i + s + h * per_h_i) / measured_i - 1)^2)."""
    r = [(m - b) / m for b, m in zip(base, measured)]  # residual to explain, relative
    a1 = [1 / m for m in measured]  # d(relative prediction)/ds
    a2 = [d / m for d, m in zip(per_h, measured)]  # d(relative prediction)/dh
    dot = lambda x, y: sum(p * q for p, q in zip(x, y))  # noqa: E731

    def loss(s: float, h: float) -> float:
        return sum((s * x + h * y - z) ** 2 for x, y, z in zip(a1, a2, r))

    candidates = [(0.0, 0.0), (max(0.0, dot(a1, r) / dot(a1, a1)), 0.0)]
    if dot(a2, a2) > 0:
        candidates.append((0.0, max(0.0, dot(a2, r) / dot(a2, a2))))
        det = dot(a1, a1) * dot(a2, a2) - dot(a1, a2) ** 2
        if det > 1e-12 * dot(a1, a1) * dot(a2, a2):
            s = (dot(a2, a2) * dot(a1, r) - dot(a1, a2) * dot(a2, r)) / det
            h = (dot(a1, a1) * dot(a2, r) - dot(a1, a2) * dot(a1, r)) / det
            if s >= 0 and h >= 0:
                candidates.append((s, h))
    return min(candidates, key=lambda c: loss(*c))


def _relative_errors(
    workload: Workload,
    machine: Machine,
    calibration: PlannerCalibration,
    runs: list[Run],
) -> list[float]:
    return [predicted_step_s(workload, machine, calibration, c, b) / m - 1 for c, m, b in _runs(runs)]


def fit_calibration(
    workload: Workload,
    machine: Machine,
    runs: list[Run],
    *,
    gemm_scales: tuple[float, ...] | None = None,
    op_overheads_s: tuple[float, ...] | None = None,
    action_overheads_s: tuple[float, ...] | None = None,
    layer_times: LayerTimes | None = None,
) -> PlannerCalibration:
    """Fit gemm_scale, op_overhead_s, action_overhead_s and step_overhead_s together to several measured runs
    [(config, measured step seconds)], minimising the sum of squared relative errors. A run may carry a
    third item, the pipeline boundaries it ran with: it is then predicted on that split, not the planner's.

    With `layer_times` (blocks timed here), the compute of every case they cover is measured, so only
    action_overhead_s, message_overhead_s, hop_latency_s, host_tensor_overhead_s and step_overhead_s are fitted (gemm_scale 1, op_overhead_s 0: the modelled fallback
    for uncovered cases stays unscaled), and the fit stands on the runs alone, even a single one.

    The runs should differ in what they stress (ops per step, GEMM work, pipeline): with one run the three
    terms cannot be told apart, and fit_op_overhead's one-term fit is used instead. For each (gemm_scale,
    op_overhead_s) on a log grid the best step_overhead_s >= 0 has a closed form (the step overhead adds
    the same seconds to every prediction); the grid is then refined around the best point."""
    if not runs:
        raise ValueError("fit_calibration needs at least one measured run")
    runs = _runs(runs)
    if any(m <= 0 for _, m, _ in runs):
        raise ValueError(f"measured step times must be > 0, got {[m for _, m, _ in runs]}")
    if len(runs) == 1 and layer_times is None:
        return fit_op_overhead(workload, machine, runs[0][0], runs[0][1])
    if layer_times is not None:
        gemm_scales, op_overheads_s = (1.0,), (0.0,)
    gemm_scales = gemm_scales or tuple(2.0 ** (k / 2) for k in range(-12, 3))  # 1/64 .. 2
    op_overheads_s = op_overheads_s or (0.0, *(1e-6 * 2.0**k for k in range(0, 11)))  # 0, 1us .. 1ms
    action_overheads_s = action_overheads_s or (
        0.0,
        *(5e-5 * 2.0**k for k in range(0, 7)),
    )  # 0, 50us .. 3.2ms
    measured = [m for _, m, _ in runs]

    def best_step_overhead(
        gemm_scale: float,
        op_overhead_s: float,
        action_overhead_s: float = 0.0,
        message_overhead_s: float = 0.0,
        hop_latency_s: float = 0.0,
    ) -> tuple[float, PlannerCalibration]:
        """The best step_overhead_s >= 0 and host_tensor_overhead_s >= 0 for this grid point: both add
        linearly to each prediction (the step overhead once, the host term per host-resident tensor), so
        they solve a two-variable non-negative least-squares problem in closed form."""
        trial = PlannerCalibration(
            op_overhead_s=op_overhead_s,
            gemm_scale=gemm_scale,
            action_overhead_s=action_overhead_s,
            message_overhead_s=message_overhead_s,
            hop_latency_s=hop_latency_s,
            layer_times=layer_times,
        )
        base = [predicted_step_s(workload, machine, trial, c, b) for c, _, b in runs]
        probe = dataclasses.replace(trial, host_tensor_overhead_s=_PROBE_S)
        per_host = [
            (predicted_step_s(workload, machine, probe, c, bounds) - b) / _PROBE_S
            for (c, _, bounds), b in zip(runs, base)
        ]
        s, h = _nonnegative_two_term_fit(base, per_host, measured)
        loss = sum(((b + s + h * d) / m - 1) ** 2 for b, d, m in zip(base, per_host, measured))
        return loss, dataclasses.replace(trial, step_overhead_s=s, host_tensor_overhead_s=h)

    # the message terms are fitted with measured block times only (without, the grid would be too large)
    messages_s = (0.0, 1e-4, 3e-4, 1e-3, 3e-3) if layer_times is not None else (0.0,)
    grid = itertools.product(gemm_scales, op_overheads_s, action_overheads_s, messages_s, messages_s)
    best = min((best_step_overhead(*point) for point in grid), key=lambda t: t[0])
    for _ in range(2):  # refine: a finer grid around the best point

        def around(x: float) -> tuple[float, ...]:
            return tuple(x * 2.0 ** (k / 4) for k in range(-2, 3)) if x > 0 else (0.0,)

        c0 = best[1]
        gs, os_ = (
            ((1.0,), (0.0,)) if layer_times is not None else (around(c0.gemm_scale), around(c0.op_overhead_s))
        )
        fine = itertools.product(
            gs, os_, around(c0.action_overhead_s), around(c0.message_overhead_s), around(c0.hop_latency_s)
        )
        best = min([best, *(best_step_overhead(*point) for point in fine)], key=lambda t: t[0])
    calibration = best[1]
    errors = _relative_errors(workload, machine, calibration, runs)
    labels = ", ".join(f"{c.label()} {m * 1e3:.1f} ms ({e:+.1%})" for (c, m, _), e in zip(runs, errors))
    timed = f"blocks timed here ({layer_times.source}), " if layer_times is not None else ""
    source = (
        f"{timed}gemm_scale={calibration.gemm_scale:.4g} op_overhead_s={calibration.op_overhead_s:.4g} "
        f"action_overhead_s={calibration.action_overhead_s:.4g} "
        f"message_overhead_s={calibration.message_overhead_s:.4g} hop_latency_s={calibration.hop_latency_s:.4g} "
        f"host_tensor_overhead_s={calibration.host_tensor_overhead_s:.4g} "
        f"step_overhead_s={calibration.step_overhead_s:.4g} fitted to {len(runs)} runs: {labels}; "
        f"profile of {machine.profile.created}"
    )
    return dataclasses.replace(
        calibration, source=source, profile_created=machine.profile.created, workload_key=workload.key()
    )
