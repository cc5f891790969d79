"""Time emulated pipeline steps on every rank of a process group: through sysopt's ScheduleExecutor,
megatron-core's interleaved schedule (CPU shims) and torch.distributed.pipelining's schedules.

``time_runs(specs)`` is the per-rank body of the schedules benchmark (call it under
``sysopt.dist.launch``); each run builds ``EmulatedStage`` chunks with the run's per-stage costs and
times ``repeats`` steps after ``warmup``, barrier to barrier.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sysopt.schedules.builders import build
from sysopt.schedules.emulate import EmulatedStage, StageCost
from sysopt.schedules.executor import ScheduleExecutor

IMPLEMENTATIONS = ("sysopt", "megatron", "torch")
_TORCH_CLASSES = {"interleaved_1f1b": "ScheduleInterleaved1F1B", "zbv": "ScheduleZBVZeroBubble"}


@dataclass(frozen=True)
class RunSpec:
    """One timed configuration: ``impl`` runs sysopt schedule ``schedule`` (or its peer's twin)."""

    label: str
    impl: str
    schedule: str
    vpp: int
    microbatches: int
    costs: tuple[StageCost, ...]  # one per stage
    shape: tuple[int, ...]  # the activation of one microbatch, [seq, batch, features]
    warmup: int = 1
    repeats: int = 3
    trace: bool = False  # also return the last step's (action, start, end) compute spans (sysopt only)
    options: tuple[tuple[str, object], ...] = ()  # builder options, e.g. (("costs", Costs(...)),)

    def __post_init__(self) -> None:
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"RunSpec.impl={self.impl!r}; choose one of {IMPLEMENTATIONS}")
        if self.impl == "megatron" and self.schedule != "interleaved_1f1b":
            raise ValueError(f"megatron-core peer runs only interleaved_1f1b, not {self.schedule!r}")
        if self.impl == "torch" and self.schedule not in _TORCH_CLASSES:
            raise ValueError(f"torch peer runs {sorted(_TORCH_CLASSES)}, not {self.schedule!r}")


def time_runs(specs: list[RunSpec]) -> list[dict]:
    """Per rank: for each spec, {"label", "times_s" (barrier-to-barrier step seconds), "spans",
    "setup_s" (building the run, imports included), "wall_s" (setup, warmup and repeats)}."""
    torch.manual_seed(0)
    out = []
    try:
        for spec in specs:
            start = time.perf_counter()
            step, spans = {"sysopt": _sysopt, "megatron": _megatron, "torch": _torch}[spec.impl](spec)
            setup_s = time.perf_counter() - start
            times = _time_steps(step, spec.warmup, spec.repeats)
            out.append({"label": spec.label, "times_s": times, "spans": list(spans) if spec.trace else None,
                        "setup_s": setup_s, "wall_s": time.perf_counter() - start})  # fmt: skip
    finally:
        _close_megatron()
    return out


def _time_steps(step: Callable[[], None], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return times


def _loss(y: torch.Tensor, _target=None) -> torch.Tensor:
    return y.mean()


# ---- sysopt ---------------------------------------------------------------------------------------


def _sysopt(spec: RunSpec):
    schedule = build(spec.schedule, dist.get_world_size(), spec.vpp, spec.microbatches, **dict(spec.options))
    modules = {s: EmulatedStage(spec.costs[s], spec.shape[-1]) for s in schedule.stages_of(dist.get_rank())}
    # gloo: every receive posted at the step's start, as the trainer does (sysopt.train.parallel)
    executor = ScheduleExecutor(schedule, modules, _loss, boundary_shape=spec.shape, receive_ahead=None)
    spans: list[tuple[str, float, float]] = []
    arrived = [0.0]  # when the last awaited message arrived: a span starts after its inputs are in
    receive = executor._received

    def received(*args):
        tensor = receive(*args)
        arrived[0] = time.perf_counter()
        return tensor

    executor._received = received
    for kind, handler in list(executor.handlers.items()):
        if kind.is_compute:

            def timed(action, handler=handler):
                start = time.perf_counter()
                handler(action)
                spans.append((str(action), max(start, arrived[0]), time.perf_counter()))

            executor.handlers[kind] = timed
    inputs = [torch.randn(spec.shape)] * spec.microbatches
    targets = [None] * spec.microbatches

    def step() -> None:
        spans.clear()
        executor.step(inputs, targets)

    return step, spans


# ---- megatron-core 0.16.1 interleaved -------------------------------------------------------------


class _MegatronChunk(torch.nn.Module):
    """An emulated stage as megatron-core expects a model chunk (config, model_type, set_input_tensor)."""

    def __init__(self, body: EmulatedStage, stage: int, config, model_type) -> None:
        super().__init__()
        self.body, self.stage, self.config, self.model_type = body, stage, config, model_type
        self.input_tensor = None

    def set_input_tensor(self, tensors) -> None:
        self.input_tensor = tensors[0]

    def forward(self, data):
        return self.body(data if self.stage == 0 else self.input_tensor)


def _megatron(spec: RunSpec):
    from megatron.core import parallel_state as ps
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel.schedules import forward_backward_pipelining_with_interleaving
    from megatron.core.transformer import TransformerConfig

    from sysopt.dist.megatron_shims import megatron_cpu_shims

    pp = dist.get_world_size()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=spec.vpp
        )
    seq, batch, hidden = spec.shape
    config = TransformerConfig(
        num_layers=pp * spec.vpp,
        hidden_size=hidden,
        num_attention_heads=1,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=spec.vpp,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        batch_p2p_comm=False,
        batch_p2p_sync=False,
        overlap_p2p_comm=True,  # megatron's faster setting over gloo
    )
    stages = build("interleaved_1f1b", pp, spec.vpp, spec.microbatches).stages_of(dist.get_rank())
    chunks = [
        _MegatronChunk(EmulatedStage(spec.costs[s], hidden), s, config, ModelType.encoder_or_decoder)
        for s in stages
    ]
    data = torch.randn(spec.shape)

    def forward_step(data_iterator, model):
        output = model(next(data_iterator))
        return output, lambda out: (_loss(out), {})

    def step() -> None:
        with megatron_cpu_shims(force=True):  # CPU stages, GPUs present or not
            forward_backward_pipelining_with_interleaving(
                forward_step_func=forward_step,
                data_iterator=[itertools.repeat(data) for _ in chunks],
                model=chunks,
                num_microbatches=spec.microbatches,
                seq_length=seq,
                micro_batch_size=batch,
            )

    return step, []


def _close_megatron() -> None:
    ps = sys.modules.get("megatron.core.parallel_state")  # never import megatron-core just to close it
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


# ---- torch.distributed.pipelining -----------------------------------------------------------------


def _torch(spec: RunSpec):
    from torch.distributed import pipelining

    pp, rank = dist.get_world_size(), dist.get_rank()
    placement = build(spec.schedule, pp, spec.vpp, spec.microbatches)
    stage_ids = placement.stages_of(rank)
    n = placement.num_stages
    stages = [
        pipelining.PipelineStage(EmulatedStage(spec.costs[s], spec.shape[-1]), s, n, torch.device("cpu"))
        for s in stage_ids
    ]
    schedule = getattr(pipelining, _TORCH_CLASSES[spec.schedule])(stages, spec.microbatches, loss_fn=_loss)
    seq, *rest = spec.shape
    full_batch = torch.randn(seq * spec.microbatches, *rest)  # split along dim 0 into microbatches
    target = torch.zeros(spec.microbatches)

    def step() -> None:
        args = (full_batch,) if 0 in stage_ids else ()
        kwargs = {"target": target, "losses": []} if n - 1 in stage_ids else {}
        schedule.step(*args, **kwargs)

    return step, []
