"""The planner: one cost model over schedules, TP overlap, offloading, precision and the hardware profile,
ranking ways to train a model on a machine by predicted step time and peak memory per device."""

from sysopt.planner.calibrate import default_calibration_path, fit_calibration, fit_op_overhead
from sysopt.planner.context import Machine, PlannerCalibration, Workload
from sysopt.planner.measure import MeasureRecord, job_for, measure_config
from sysopt.planner.model import CostModel, LayerCost, Memory, Prediction
from sysopt.planner.rank import Ranking, Rejected, explain, rank
from sysopt.planner.space import PlanConfig, SpaceOptions, enumerate_configs, violations
from sysopt.planner.workload import BatchShape, Layer, Linear, layers, param_count

__all__ = [
    "BatchShape",
    "CostModel",
    "Layer",
    "LayerCost",
    "Linear",
    "Machine",
    "MeasureRecord",
    "Memory",
    "PlanConfig",
    "PlannerCalibration",
    "Prediction",
    "Ranking",
    "Rejected",
    "SpaceOptions",
    "Workload",
    "default_calibration_path",
    "enumerate_configs",
    "explain",
    "fit_calibration",
    "fit_op_overhead",
    "job_for",
    "layers",
    "measure_config",
    "param_count",
    "rank",
    "violations",
]
