"""Optimizer-state offloading: subgroups of parameters whose AdamW state lives on host or device as a
placement plan says (Deep Optimizer States, ZeRO-Offload, fixed-fraction hybrid), behind one optimizer."""

from sysopt.offload.costs import (
    DEFAULT_CPU_COSTS,
    DEFAULT_GPU_COSTS,
    CostInputs,
    cost_inputs_from_profile,
    default_cost_inputs,
    measure_cost_inputs,
)
from sysopt.offload.optimizer import OffloadAdamW, OffloadStats
from sysopt.offload.placement import (
    DEVICE,
    HOST,
    STRATEGIES,
    IterationPrediction,
    PhaseTimes,
    PlacementPlan,
    check_plan,
    make_plan,
    plan_fraction,
    plan_interleaved,
    predict_iteration,
)
from sysopt.offload.subgroups import DEFAULT_SUBGROUP_BYTES, Subgroup, partition

__all__ = [
    "DEFAULT_CPU_COSTS",
    "DEFAULT_GPU_COSTS",
    "DEFAULT_SUBGROUP_BYTES",
    "DEVICE",
    "HOST",
    "STRATEGIES",
    "CostInputs",
    "IterationPrediction",
    "OffloadAdamW",
    "OffloadStats",
    "PhaseTimes",
    "PlacementPlan",
    "Subgroup",
    "check_plan",
    "cost_inputs_from_profile",
    "default_cost_inputs",
    "make_plan",
    "measure_cost_inputs",
    "partition",
    "plan_fraction",
    "plan_interleaved",
    "predict_iteration",
]
