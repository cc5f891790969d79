"""Fit the planner's per-layer overhead once, to one measured training run: the per-op overhead that makes
the predicted step of that config equal its measured step. Cached per host beside the hardware profile."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

from sysopt.hardware.cache import cache_dir
from sysopt.planner.context import Machine, PlannerCalibration, Workload
from sysopt.planner.model import CostModel
from sysopt.planner.space import PlanConfig


def default_calibration_path() -> Path:
    return cache_dir() / f"planner-{socket.gethostname()}.json"


def predicted_step_s(
    workload: Workload, machine: Machine, calibration: PlannerCalibration, config: PlanConfig
) -> float:
    return CostModel(workload, machine, calibration).predict(config).step_s


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
    source = (
        f"{field}={value:.6g} fitted to {config.label()} measured at {measured_step_s * 1e3:.2f} ms "
        f"(uncalibrated prediction {zero_s * 1e3:.2f} ms), profile of {machine.profile.created}"
    )
    return dataclasses.replace(base, **{field: value}, source=source, profile_created=machine.profile.created)


def _relative_errors(
    workload: Workload,
    machine: Machine,
    calibration: PlannerCalibration,
    runs: list[tuple[PlanConfig, float]],
) -> list[float]:
    return [predicted_step_s(workload, machine, calibration, c) / m - 1 for c, m in runs]


def fit_calibration(
    workload: Workload,
    machine: Machine,
    runs: list[tuple[PlanConfig, float]],
    *,
    gemm_scales: tuple[float, ...] | None = None,
    op_overheads_s: tuple[float, ...] | None = None,
    action_overheads_s: tuple[float, ...] | None = None,
) -> PlannerCalibration:
    """Fit gemm_scale, op_overhead_s, action_overhead_s and step_overhead_s together to several measured runs
    [(config, measured step seconds)], minimising the sum of squared relative errors.

    The runs should differ in what they stress (ops per step, GEMM work, pipeline): with one run the three
    terms cannot be told apart, and fit_op_overhead's one-term fit is used instead. For each (gemm_scale,
    op_overhead_s) on a log grid the best step_overhead_s >= 0 has a closed form (the step overhead adds
    the same seconds to every prediction); the grid is then refined around the best point."""
    if not runs:
        raise ValueError("fit_calibration needs at least one measured run")
    if any(m <= 0 for _, m in runs):
        raise ValueError(f"measured step times must be > 0, got {[m for _, m in runs]}")
    if len(runs) == 1:
        return fit_op_overhead(workload, machine, runs[0][0], runs[0][1])
    gemm_scales = gemm_scales or tuple(2.0 ** (k / 2) for k in range(-12, 3))  # 1/64 .. 2
    op_overheads_s = op_overheads_s or (0.0, *(1e-6 * 2.0**k for k in range(0, 11)))  # 0, 1us .. 1ms
    action_overheads_s = action_overheads_s or (
        0.0,
        *(5e-5 * 2.0**k for k in range(0, 7)),
    )  # 0, 50us .. 3.2ms
    measured = [m for _, m in runs]

    def best_step_overhead(
        gemm_scale: float, op_overhead_s: float, action_overhead_s: float = 0.0
    ) -> tuple[float, PlannerCalibration]:
        trial = PlannerCalibration(
            op_overhead_s=op_overhead_s, gemm_scale=gemm_scale, action_overhead_s=action_overhead_s
        )
        base = [predicted_step_s(workload, machine, trial, c) for c, _ in runs]
        # minimise sum(((b + s) / m - 1)^2) over s >= 0
        s = sum((m - b) / (m * m) for b, m in zip(base, measured)) / sum(1 / (m * m) for m in measured)
        s = max(0.0, s)
        loss = sum(((b + s) / m - 1) ** 2 for b, m in zip(base, measured))
        return loss, dataclasses.replace(trial, step_overhead_s=s)

    grid = ((g, o, a) for g in gemm_scales for o in op_overheads_s for a in action_overheads_s)
    best = min((best_step_overhead(*point) for point in grid), key=lambda t: t[0])
    for _ in range(2):  # refine: a finer grid around the best point

        def around(x: float) -> tuple[float, ...]:
            return tuple(x * 2.0 ** (k / 4) for k in range(-2, 3)) if x > 0 else (0.0,)

        c0 = best[1]
        fine = ((g, o, a) for g in around(c0.gemm_scale) for o in around(c0.op_overhead_s)
                for a in around(c0.action_overhead_s))  # fmt: skip
        best = min([best, *(best_step_overhead(*point) for point in fine)], key=lambda t: t[0])
    calibration = best[1]
    errors = _relative_errors(workload, machine, calibration, runs)
    labels = ", ".join(f"{c.label()} {m * 1e3:.1f} ms ({e:+.1%})" for (c, m), e in zip(runs, errors))
    source = (
        f"gemm_scale={calibration.gemm_scale:.4g} op_overhead_s={calibration.op_overhead_s:.4g} "
        f"action_overhead_s={calibration.action_overhead_s:.4g} "
        f"step_overhead_s={calibration.step_overhead_s:.4g} fitted to {len(runs)} runs: {labels}; "
        f"profile of {machine.profile.created}"
    )
    return dataclasses.replace(calibration, source=source, profile_created=machine.profile.created)
