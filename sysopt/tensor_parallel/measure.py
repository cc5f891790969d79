"""Measure a tensor-parallel sublayer's step time and overlap per strategy on the ranks of a launch
(used by the tp_overlap benchmark suite): emulated or real compute, with megatron-core as a peer."""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sysopt.hardware.profile import HardwareProfile
from sysopt.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from sysopt.tensor_parallel.overlap import OverlapPolicy
from sysopt.tensor_parallel.runtime import EmulatedCompute, TorchCompute, recording, use_compute
from sysopt.tensor_parallel.timeline import Span, Timeline, summarize


@dataclass(frozen=True)
class Shape:
    """Column: hidden -> column_out; row: row_in -> hidden (row_in <= column_out)."""

    seq: int
    batch: int
    hidden: int
    column_out: int
    row_in: int


class ShapeRecorder(TorchCompute):
    """Real GEMMs that also note every (m, n, k) they ran."""

    def __init__(self) -> None:
        self.shapes: set[tuple[int, int, int]] = set()

    def mm(self, a, b, out=None):
        self.shapes.add((a.shape[0], b.shape[1], a.shape[1]))
        return super().mm(a, b, out)

    def addmm_(self, acc, a, b):
        self.shapes.add((a.shape[0], b.shape[1], a.shape[1]))
        return super().addmm_(acc, a, b)

    def mm_bias(self, bias, a, b, out=None):
        self.shapes.add((a.shape[0], b.shape[1], a.shape[1]))
        return super().mm_bias(bias, a, b, out)


class MeasuredGemms:
    """GEMM seconds per (m, n, k) for emulated compute. `measure(shapes)` (collective) times the
    shapes on rank 0 alone while the others wait, and gives every rank that table, so emulated
    ranks sleep identical times. The shapes are timed round-robin (`rounds` times each, median), so
    a change in the machine's speed while measuring (shared hosts drift by 20%) hits the chunked
    and the unchunked GEMMs alike instead of skewing one strategy's sleeps against another's."""

    rounds = 9

    def __init__(self) -> None:
        self.seconds: dict[tuple[int, int, int], float] = {}

    def __call__(self, m: int, n: int, k: int) -> float:
        return self.seconds[(m, n, k)]

    def measure(self, shapes: set[tuple[int, int, int]]) -> None:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, sorted(shapes - set(self.seconds)))
        missing = sorted(set().union(*map(set, everyone)))
        table = [{}]
        if dist.get_rank() == 0:
            operands = {(m, n, k): (torch.randn(m, k), torch.randn(k, n)) for m, n, k in missing}
            times: dict[tuple[int, int, int], list[float]] = {shape: [] for shape in operands}
            for a, b in operands.values():
                torch.mm(a, b)  # warm-up
            for _ in range(self.rounds):
                for shape, (a, b) in operands.items():
                    start = time.perf_counter()
                    torch.mm(a, b)
                    times[shape].append(time.perf_counter() - start)
            table[0] = {shape: statistics.median(t) for shape, t in times.items()}
        dist.broadcast_object_list(table, src=0)
        self.seconds.update(table[0])


class Sublayer(nn.Module):
    """column -> GELU -> row; the row layer reads the first row_in/tp columns (for the attention
    projection shape that stands in for attention's output)."""

    def __init__(self, column: nn.Module, row: nn.Module, row_in_local: int, megatron: bool = False) -> None:
        super().__init__()
        self.column, self.row, self.row_in_local, self.megatron = column, row, row_in_local, megatron

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.column(x)
        h = F.gelu((h[0] if self.megatron else h)[..., : self.row_in_local])
        y = self.row(h)
        return y[0] if self.megatron else y


def _megatron_sublayer(shape: Shape, column: nn.Linear, row: nn.Linear) -> Sublayer:
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear as MegatronColumn
    from megatron.core.tensor_parallel import RowParallelLinear as MegatronRow

    tp = dist.get_world_size()
    cfg = ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=True,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
    )
    m_col = MegatronColumn(
        shape.hidden, shape.column_out, config=cfg, init_method=lambda w: w.copy_(column.weight), bias=True,
        gather_output=False,
    )  # fmt: skip
    m_row = MegatronRow(
        shape.row_in, shape.hidden, config=cfg, init_method=lambda w: w.copy_(row.weight), bias=True,
        input_is_parallel=True, skip_bias_add=False,
    )  # fmt: skip
    return Sublayer(m_col, m_row, shape.row_in // tp, megatron=True)


def _timed_step(step, record: bool) -> tuple[float, list[Span]]:
    """The slowest rank's seconds for one step, and this rank's spans (when recording)."""
    timeline = Timeline()
    dist.barrier()
    start = time.perf_counter()
    with recording(timeline) if record else contextlib.nullcontext():
        step()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item(), timeline.spans


def _sublayer(strategy: str, shape: Shape, column: nn.Linear, row: nn.Linear, profile: HardwareProfile):
    if strategy == "megatron":
        return _megatron_sublayer(shape, column, row)
    policy = OverlapPolicy("auto", profile=profile) if strategy == "auto" else strategy
    kw = dict(sequence_parallel=True, overlap=policy)
    tp = dist.get_world_size()
    return Sublayer(
        ColumnParallelLinear.from_dense(column, **kw),
        RowParallelLinear.from_dense(row, **kw),
        shape.row_in // tp,
    )


def measure_cases(
    shapes: dict[str, Shape], sweep: dict[str, tuple[int, ...]], repeats: int, profile_json: str
) -> dict:
    """Every case of one tp size: {"<shape>/<mode>/<strategy>": {"seconds", "recorded_seconds", "summaries",
    "spans", "plans"}}: "seconds" from steps run without recording, the spans (and "recorded_seconds") from
    a recorded step right after each. Every repeat runs each strategy once, so load drifts hit them all
    alike, in an order shuffled afresh each round (seeded by the round, so every rank agrees): no strategy
    keeps the same neighbour (in a fixed order `auto` always ran after chunked:16 and measured ~10% slower
    than chunked:1 with the same plan; rotating the start of the round, as 7d356be did, keeps the
    neighbours and did not fix that)."""
    from megatron.core import parallel_state

    from sysopt.dist.megatron_shims import megatron_cpu_shims

    tp, rank = dist.get_world_size(), dist.get_rank()
    profile = HardwareProfile.from_json(profile_json)
    gemms = MeasuredGemms()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=False)
    out: dict[str, dict] = {}
    try:
        for shape_name, shape in shapes.items():
            torch.manual_seed(0)
            column, row = nn.Linear(shape.hidden, shape.column_out), nn.Linear(shape.row_in, shape.hidden)
            local = shape.seq // tp
            x = torch.randn(shape.seq, shape.batch, shape.hidden)[rank * local : (rank + 1) * local]
            grad = torch.randn(local, shape.batch, shape.hidden)
            for mode in ("emulated", "real"):
                strategies = ["none", *(f"chunked:{k}" for k in sweep[mode]), "auto"]
                strategies += ["megatron"] if mode == "real" else []
                steps, models = {}, {}
                for strategy in strategies:
                    shims = (
                        megatron_cpu_shims(force=True) if strategy == "megatron" else contextlib.nullcontext()
                    )
                    with shims:
                        model = models[strategy] = _sublayer(strategy, shape, column, row, profile)
                    x_in = x.clone().requires_grad_()

                    def step(model=model, x_in=x_in, grad=grad, megatron=strategy == "megatron"):
                        with megatron_cpu_shims(force=True) if megatron else contextlib.nullcontext():
                            model(x_in).backward(grad)

                    steps[strategy] = step
                if mode == "emulated":
                    recorder = ShapeRecorder()
                    with use_compute(recorder):
                        for step in steps.values():
                            step()  # a real step to learn every GEMM shape
                    gemms.measure(recorder.shapes)
                seconds = {k: [] for k in steps}
                recorded = {k: [] for k in steps}  # the recorded steps' seconds: recording's cost shows
                spans = {k: [] for k in steps}
                with use_compute(EmulatedCompute(gemms) if mode == "emulated" else TorchCompute()):
                    for step in steps.values():
                        step()  # warm-up
                    for r in range(repeats):  # a new order each round, the same on every rank (seeded)
                        order = list(steps.items())
                        random.Random(r).shuffle(order)
                        for strategy, step in order:
                            # timed without recording (a span's timestamps, lock and gloo completion
                            # callback, which takes the GIL, cost per chunk: chunked steps paid more of it
                            # than `none`, and megatron paid none), then once more recorded for the spans
                            seconds[strategy].append(_timed_step(step, record=False)[0])
                            t, s = _timed_step(step, record=strategy != "megatron")
                            recorded[strategy].append(t)
                            spans[strategy].append(s)
                for strategy in strategies:
                    plans = {}
                    if strategy != "megatron":
                        for name, layer in (
                            ("column", models[strategy].column),
                            ("row", models[strategy].row),
                        ):
                            plans.update({f"{name}.{k}": p.chunks for k, p in layer.last_plans.items()})
                    middle = sorted(range(repeats), key=lambda i: recorded[strategy][i])[repeats // 2]
                    out[f"{shape_name}/{mode}/{strategy}"] = {
                        "seconds": seconds[strategy],
                        "recorded_seconds": recorded[strategy],
                        "summaries": [summarize(s).to_dict() for s in spans[strategy]],
                        "spans": [s.to_dict() for s in spans[strategy][middle]],
                        "plans": plans,
                    }
    finally:
        parallel_state.destroy_model_parallel()
    return out
