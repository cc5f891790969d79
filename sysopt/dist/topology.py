"""Where each rank sits in a tp x pp x dp grid, and the process groups that follow from it.

Rank order matches megatron-core's default ("tp-cp-ep-dp-pp" with cp = ep = 1): tensor-parallel
ranks are adjacent (they share a node's fastest links), then data-parallel, then pipeline.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch.distributed as dist


@dataclass(frozen=True)
class Coords:
    tp: int
    pp: int
    dp: int


@dataclass(frozen=True)
class Topology:
    """Sizes of the parallel dimensions; `vpp` is model chunks per pipeline rank."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "vpp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name}={value!r} must be a positive integer")
        if self.vpp > 1 and self.pp == 1:
            raise ValueError(
                f"parallel.vpp={self.vpp} needs pipeline parallelism, but parallel.pp=1; "
                f"set parallel.pp>=2 or parallel.vpp=1"
            )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} outside world of size {self.world_size} ({self})")
        return Coords(tp=rank % self.tp, dp=(rank // self.tp) % self.dp, pp=rank // (self.tp * self.dp))

    def rank_of(self, *, tp: int = 0, pp: int = 0, dp: int = 0) -> int:
        return tp + self.tp * (dp + self.dp * pp)

    def tp_groups(self) -> list[list[int]]:
        return [
            [self.rank_of(tp=t, pp=p, dp=d) for t in range(self.tp)]
            for p in range(self.pp)
            for d in range(self.dp)
        ]

    def dp_groups(self) -> list[list[int]]:
        return [
            [self.rank_of(tp=t, pp=p, dp=d) for d in range(self.dp)]
            for p in range(self.pp)
            for t in range(self.tp)
        ]

    def pp_groups(self) -> list[list[int]]:
        return [
            [self.rank_of(tp=t, pp=p, dp=d) for p in range(self.pp)]
            for d in range(self.dp)
            for t in range(self.tp)
        ]

    def model_parallel_groups(self) -> list[list[int]]:
        """Ranks holding one full model replica (tp x pp), as megatron-core's model-parallel group."""
        return [
            sorted(self.rank_of(tp=t, pp=p, dp=d) for p in range(self.pp) for t in range(self.tp))
            for d in range(self.dp)
        ]

    def check_world(self, world_size: int) -> None:
        if self.world_size != world_size:
            model_parallel = self.tp * self.pp
            if world_size % model_parallel == 0:
                fix = f"change parallel.dp to {world_size // model_parallel} or launch {self.world_size} ranks"
            else:  # no dp fits: the world must be a multiple of tp*pp
                fix = (
                    f"no parallel.dp fits, since {world_size} is not a multiple of tp*pp = {model_parallel}; "
                    f"launch {self.world_size} ranks or change tp/pp so that tp*pp divides {world_size}"
                )
            raise ValueError(
                f"parallel.tp*pp*dp = {self.tp}*{self.pp}*{self.dp} = {self.world_size} does not equal "
                f"the world size {world_size}; {fix}"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Topology:
        return cls(**json.loads(text))


@dataclass
class ParallelGroups:
    """This rank's coordinates and its tp / pp / dp process groups (plus their rank lists)."""

    topology: Topology
    rank: int
    coords: Coords
    tp_group: dist.ProcessGroup | None
    pp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    tp_ranks: list[int]
    pp_ranks: list[int]
    dp_ranks: list[int]

    @property
    def is_first_stage(self) -> bool:
        return self.coords.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coords.pp == self.topology.pp - 1


def build_groups(topology: Topology, *, timeout_s: float = 120.0) -> ParallelGroups:
    """Create every tp, pp and dp group (collectively: all ranks must call this in step); their collectives
    fail after `timeout_s` (the trainer passes train.collective_timeout_s)."""
    if not dist.is_initialized():
        raise RuntimeError("build_groups needs torch.distributed initialised; use sysopt.dist.launch")
    topology.check_world(dist.get_world_size())
    rank = dist.get_rank()
    timeout = timedelta(seconds=timeout_s)
    mine: dict[str, tuple[dist.ProcessGroup | None, list[int]]] = {}
    for kind, groups in (
        ("tp", topology.tp_groups()),
        ("pp", topology.pp_groups()),
        ("dp", topology.dp_groups()),
    ):
        for ranks in groups:  # every rank creates every group, in the same order
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine[kind] = (group, ranks)
    return ParallelGroups(
        topology=topology,
        rank=rank,
        coords=topology.coords(rank),
        tp_group=mine["tp"][0],
        pp_group=mine["pp"][0],
        dp_group=mine["dp"][0],
        tp_ranks=mine["tp"][1],
        pp_ranks=mine["pp"][1],
        dp_ranks=mine["dp"][1],
    )
