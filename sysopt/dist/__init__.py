"""Process groups over torch.distributed: topology, launcher, megatron-core bridge."""

from sysopt.dist.grad_sync import BucketedGradSync
from sysopt.dist.launch import LaunchError, LaunchTimeout, env_world, free_port, launch
from sysopt.dist.topology import Coords, ParallelGroups, Topology, build_groups

__all__ = [
    "BucketedGradSync",
    "Coords",
    "LaunchError",
    "LaunchTimeout",
    "ParallelGroups",
    "Topology",
    "build_groups",
    "env_world",
    "free_port",
    "launch",
]
