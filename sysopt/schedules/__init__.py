"""Pipeline schedules as data: build by name, validate, lower to comms, simulate, render, partition.

Modules that need torch are imported by name: executor (ScheduleExecutor), wgrad (deferred weight
gradients), megatron_adapter (megatron-core's forward_backward_func), emulate and runners (benchmarks).
"""

from sysopt.schedules.builders import BUILDERS, build, loop_placement, register, v_placement
from sysopt.schedules.greedy import zb_greedy  # registers "zb_greedy"
from sysopt.schedules.ir import Action, Kind, Schedule, ScheduleError, validate
from sysopt.schedules.lower import add_comms
from sysopt.schedules.partition import Partition, partition
from sysopt.schedules.render import render
from sysopt.schedules.simulate import Costs, Simulation, Span, simulate, startup_lower_bound

__all__ = [
    "BUILDERS",
    "Action",
    "Costs",
    "Kind",
    "Partition",
    "Schedule",
    "ScheduleError",
    "Simulation",
    "Span",
    "add_comms",
    "build",
    "loop_placement",
    "partition",
    "register",
    "render",
    "simulate",
    "startup_lower_bound",
    "v_placement",
    "validate",
    "zb_greedy",
]
