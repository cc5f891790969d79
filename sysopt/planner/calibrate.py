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
