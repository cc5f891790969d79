"""Column- and row-parallel linears over [sequence, batch, hidden] tensors, with optional sequence
parallelism and a per-layer overlap policy (none / chunked / auto).

Sharding follows megatron-core: a column layer keeps rows rank*out/tp:(rank+1)*out/tp of the dense
weight ([out/tp, in]), a row layer keeps those columns of it ([out, in/tp]), and sequence shards are
contiguous slices of dim 0. Gradients come out complete on every rank (no extra reduction step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sysopt.tensor_parallel import comm, runtime
from sysopt.tensor_parallel.chunk_model import GemmCollective
from sysopt.tensor_parallel.overlap import (
    ChunkPlan,
    GatheredBlocks,
    OverlapPolicy,
    chunk_bounds,
    flat,
    gemm_all_reduce,
    gemm_reduce_scatter,
    mm_into,
    resolve_overlap,
    rows_of,
)

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_NO_COMM = ChunkPlan(overlap=False, chunks=1)


@dataclass(frozen=True)
class _Setup:
    """The non-tensor arguments of one layer call."""

    group: dist.ProcessGroup | None
    sequence_parallel: bool
    forward: ChunkPlan
    backward: ChunkPlan
    name: str


class _ColumnParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, setup: _Setup):
        x2 = x.reshape(-1, x.shape[-1])
        n = weight.shape[0]
        if setup.sequence_parallel:  # all-gather the sequence, then the GEMM
            tp = comm.group_size(setup.group)
            out = x2.new_empty(tp * x2.shape[0], n)
            out3, w_t = out.view(tp, x2.shape[0], n), weight.t()

            def gemm(first: int, row: int, blocks: torch.Tensor) -> None:
                target = rows_of(out3, first, row, blocks)
                mm_into(target, flat(blocks), w_t, f"{setup.name}.fwd", bias=bias)

            GatheredBlocks(x2, setup.group, setup.forward, f"{setup.name}.fwd.all_gather").consume(gemm)
            shape = (tp * x.shape[0], *x.shape[1:-1], n)
        else:
            out = runtime.mm(x2, weight.t(), name=f"{setup.name}.fwd", bias=bias)
            shape = (*x.shape[:-1], n)
        ctx.save_for_backward(x, weight)
        ctx.setup, ctx.has_bias = setup, bias is not None
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        setup: _Setup = ctx.setup
        x2 = x.reshape(-1, x.shape[-1])
        g2 = grad.reshape(-1, weight.shape[0]).contiguous()
        if setup.sequence_parallel:
            # re-gather the input for wgrad while dgrad runs; dgrad chunks feed the reduce-scatter
            gathered = GatheredBlocks(x2, setup.group, setup.forward, f"{setup.name}.bwd.all_gather")
            dx = gemm_reduce_scatter(g2, weight, setup.group, setup.backward, f"{setup.name}.dgrad")
            dw = _grad_accumulator(weight)
            g3 = g2.view(comm.group_size(setup.group), -1, g2.shape[1])

            def wgrad(first: int, row: int, blocks: torch.Tensor) -> None:
                g = flat(rows_of(g3, first, row, blocks))
                runtime.addmm_(dw, g.t(), flat(blocks), name=f"{setup.name}.wgrad")

            gathered.consume(wgrad)  # overlaps the reduce-scatter still in flight
            dw = dw.to(weight.dtype)
        else:
            dx = gemm_all_reduce(g2, weight, setup.group, setup.backward, f"{setup.name}.dgrad")
            dw = runtime.mm(g2.t(), x2, name=f"{setup.name}.wgrad")  # overlaps the all-reduce
        db = g2.sum(0) if ctx.has_bias else None
        return dx.wait().view(x.shape), dw, db, None


class _RowParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, bias, setup: _Setup):
        y2 = y.reshape(-1, y.shape[-1])
        n = weight.shape[0]
        if setup.sequence_parallel:  # the GEMM, then reduce-scatter the sequence; the bias joins our rows
            tp = comm.group_size(setup.group)
            name = f"{setup.name}.fwd"
            out = gemm_reduce_scatter(y2, weight.t(), setup.group, setup.forward, name, bias).wait()
            shape = (y.shape[0] // tp, *y.shape[1:-1], n)
        else:  # the bias goes on after the all-reduce (before it, it would be summed tp times)
            out = gemm_all_reduce(y2, weight.t(), setup.group, setup.forward, f"{setup.name}.fwd").wait()
            shape = (*y.shape[:-1], n)
            if bias is not None:
                out += bias
        ctx.save_for_backward(y, weight)
        ctx.setup, ctx.has_bias = setup, bias is not None
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad):
        y, weight = ctx.saved_tensors
        setup: _Setup = ctx.setup
        y2 = y.reshape(-1, y.shape[-1])
        g2 = grad.reshape(-1, weight.shape[0]).contiguous()
        db = None
        if setup.sequence_parallel:  # all-gather the output gradient; dgrad and wgrad per block
            tp = comm.group_size(setup.group)
            dy = y2.new_empty(y2.shape)
            dy3, y3 = dy.view(tp, -1, dy.shape[1]), y2.reshape(tp, -1, y2.shape[1])
            dw = _grad_accumulator(weight)
            bias_sums = _BiasGradSums(g2.shape[0], setup.backward) if ctx.has_bias else None

            def grads(first: int, row: int, blocks: torch.Tensor) -> None:
                g = flat(blocks)
                mm_into(rows_of(dy3, first, row, blocks), g, weight, f"{setup.name}.dgrad")
                runtime.addmm_(dw, g.t(), flat(rows_of(y3, first, row, blocks)), name=f"{setup.name}.wgrad")
                if bias_sums is not None:
                    bias_sums.add(first, row, blocks)

            GatheredBlocks(g2, setup.group, setup.backward, f"{setup.name}.bwd.all_gather").consume(grads)
            dw = dw.to(weight.dtype)
            db = None if bias_sums is None else bias_sums.total(g2.dtype)
        else:  # the output gradient is replicated: no communication
            dy = runtime.mm(g2, weight, name=f"{setup.name}.dgrad")
            dw = runtime.mm(g2.t(), y2, name=f"{setup.name}.wgrad")
            db = g2.sum(0) if ctx.has_bias else None
        return dy.view(y.shape), dw, db, None


def _plan_on_first_rank(
    plan: Callable[[], tuple[ChunkPlan, ChunkPlan]], group: dist.ProcessGroup | None
) -> tuple[ChunkPlan, ChunkPlan]:
    """`plan()` run on the group's first rank and broadcast: the ranks of a TP group must run the same
    chunking (mismatched all-to-all sizes abort gloo, and would hang or corrupt on NCCL), but `auto` reads
    each rank's own cached HardwareProfile, which may differ (or be missing) from host to host."""
    payload: list = [None]
    failure: Exception | None = None
    if dist.get_rank(group) == 0:
        try:
            payload[0] = plan()
        except Exception as exc:  # noqa: BLE001 - every rank raises, instead of the others waiting in the broadcast
            failure, payload[0] = exc, f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(
        payload, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group
    )
    if failure is not None:
        raise failure
    if isinstance(payload[0], str):
        raise ValueError(f"overlap='auto' planning failed on the TP group's first rank: {payload[0]}")
    return payload[0]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit gradients (summed over blocks, they round once at the end), else their own dtype."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _grad_accumulator(weight: torch.Tensor) -> torch.Tensor:
    """A zeroed weight gradient to sum per-block GEMMs into: fp32 for 16-bit weights, so a chunked
    backward rounds once at the end instead of once per block."""
    return torch.zeros(weight.shape, dtype=_accumulation_dtype(weight.dtype), device=weight.device)


class _BiasGradSums:
    """The replicated row-layer bias gradient, summed from gathered gradient blocks so that every rank
    gets the same bits: each rank's rows are summed in the same pieces (the plan's chunks) whichever
    rank holds them, and the pieces are added in (rank, row) order. Summing blocks in arrival order
    would let the copies of the bias drift apart (each rank sees its own rows first)."""

    def __init__(self, rows: int, plan: ChunkPlan) -> None:
        self.bounds = chunk_bounds(rows, plan.chunks) if plan.overlap else [(0, rows)]
        self.pieces: dict[tuple[int, int], torch.Tensor] = {}

    def add(self, first: int, row: int, blocks: torch.Tensor) -> None:
        """blocks[i] holds rows row:row+blocks.shape[1] of rank first+i (see overlap.Consumer)."""
        dtype = _accumulation_dtype(blocks.dtype)
        for lo, hi in self.bounds:
            if row <= lo and hi <= row + blocks.shape[1]:
                for i in range(blocks.shape[0]):
                    self.pieces[(first + i, lo)] = blocks[i, lo - row : hi - row].sum(0, dtype=dtype)

    def total(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.stack([self.pieces[key] for key in sorted(self.pieces)]).sum(0).to(dtype)


class _ParallelLinear(nn.Module):
    """Shared set-up of the column and row layers."""

    partition_dim: int  # dim of the dense weight that is split across ranks

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
        overlap: str | OverlapPolicy = "none",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Initialised like nn.Linear(in_features, out_features) from the current RNG state, then
        sharded: with the same seed on every rank the layer equals that dense layer."""
        super().__init__()
        self._configure(in_features, out_features, group, sequence_parallel, overlap)
        self._take_shards(nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype))

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        *,
        group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
        overlap: str | OverlapPolicy = "none",
    ):
        """This rank's shard of an existing dense nn.Linear (copied, not shared)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._configure(linear.in_features, linear.out_features, group, sequence_parallel, overlap)
        layer._take_shards(linear)
        return layer

    def _configure(self, in_features, out_features, group, sequence_parallel, overlap) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.group, self.sequence_parallel = group, bool(sequence_parallel)
        self.overlap = resolve_overlap(overlap)
        self.tp_size, self.tp_rank = comm.group_size(group), comm.group_rank(group)
        split = out_features if self.partition_dim == 0 else in_features
        if split % self.tp_size:
            side = "out_features" if self.partition_dim == 0 else "in_features"
            raise ValueError(
                f"{type(self).__name__}: {side}={split} is not divisible by tp={self.tp_size}; "
                f"choose {side} as a multiple of {self.tp_size}"
            )
        self._plans: dict[tuple, tuple[ChunkPlan, ChunkPlan]] = {}
        self.last_plans: dict[str, ChunkPlan] = {}

    def _take_shards(self, linear: nn.Linear) -> None:
        w = linear.weight.detach()
        part = w.shape[self.partition_dim] // self.tp_size
        shard = w.narrow(self.partition_dim, self.tp_rank * part, part)
        # A frozen dense weight or bias stays frozen (requires_grad carried over, as for the block's norms).
        self.weight = nn.Parameter(shard.clone(), requires_grad=linear.weight.requires_grad)
        if linear.bias is None:
            self.bias = None
        else:
            b = linear.bias.detach()
            self.bias = nn.Parameter(
                (
                    b[self.tp_rank * part : (self.tp_rank + 1) * part] if self.partition_dim == 0 else b
                ).clone(),
                requires_grad=linear.bias.requires_grad,
            )

    def _ops(self, rows: int, dtype: str) -> tuple[GemmCollective | None, GemmCollective | None]:
        raise NotImplementedError

    def _setup(self, x: torch.Tensor, local_rows: int) -> _Setup:
        key = (tuple(x.shape), x.dtype)
        if key not in self._plans:
            fwd_op, bwd_op = self._ops(local_rows, _DTYPE_NAMES.get(x.dtype, "fp32"))

            def plan() -> tuple[ChunkPlan, ChunkPlan]:
                return (
                    _NO_COMM if fwd_op is None or self.tp_size == 1 else self.overlap.plan(fwd_op),
                    _NO_COMM if bwd_op is None or self.tp_size == 1 else self.overlap.plan(bwd_op),
                )

            auto = self.overlap.strategy == "auto" and self.tp_size > 1 and dist.is_initialized()
            self._plans[key] = _plan_on_first_rank(plan, self.group) if auto else plan()
        fwd, bwd = self._plans[key]
        self.last_plans = {"forward": fwd, "backward": bwd}
        return _Setup(self.group, self.sequence_parallel, fwd, bwd, type(self).__name__)

    def _call(
        self, function: type[torch.autograd.Function], x: torch.Tensor, local_rows: int
    ) -> torch.Tensor:
        """function.apply on (x, weight, bias). Under torch.autocast the three are cast to the autocast
        dtype first (differentiably, so fp32 parameters get fp32 grads) and the function runs with autocast
        off: its GEMMs write into preallocated buffers, which autocast would not cast."""
        weight, bias, device = self.weight, self.bias, x.device.type
        if x.numel() == 0:
            return self._empty(x)
        if not torch.is_autocast_enabled(device):
            return function.apply(x, weight, bias, self._setup(x, local_rows))
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return function.apply(x, weight, bias, self._setup(x, local_rows))

    def _empty(self, x: torch.Tensor) -> torch.Tensor:
        """The output for an input with no rows (e.g. an expert that received no tokens), as nn.Linear gives
        one: empty, of this layer's output shape, differentiable (zero weight gradients). Every rank of the
        group holds the same sequence shape, so all of them skip the collectives together."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, tp={self.tp_size}, "
            f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}, overlap={self.overlap}"
        )


class ColumnParallelLinear(_ParallelLinear):
    """y = x @ W.T + b with W split by output rows: [out/tp, in] per rank; the output stays split
    along its last dim. With sequence parallelism the input is this rank's sequence shard
    [S/tp, B, in] and is all-gathered (overlapped per the policy); otherwise the input is the full,
    replicated [S, B, in] and its gradient is all-reduced in backward."""

    partition_dim = 0

    def _ops(self, rows, dtype):
        n, k, tp = self.weight.shape[0], self.in_features, self.tp_size
        if self.sequence_parallel:
            return (
                GemmCollective("all_gather", rows, n, k, tp, dtype),
                GemmCollective("reduce_scatter", rows, k, n, tp, dtype),
            )
        return None, GemmCollective("all_reduce", rows, k, n, tp, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"ColumnParallelLinear: input last dim {x.shape[-1]} != in_features={self.in_features}; pass "
                f"[sequence, batch, {self.in_features}] (the full hidden size: only the weight is sharded)"
            )
        return self._call(_ColumnParallel, x, x.numel() // x.shape[-1])

    def _empty(self, x):
        gathered = x.repeat(self.tp_size, *[1] * (x.dim() - 1)) if self.sequence_parallel else x
        return F.linear(gathered, self.weight, self.bias)


class RowParallelLinear(_ParallelLinear):
    """y = x @ W.T + b with W split by input columns: [out, in/tp] per rank; the input is split
    along its last dim (a column layer's output). Partial products are reduce-scattered to this
    rank's sequence shard [S/tp, B, out] with sequence parallelism, else all-reduced to the full
    [S, B, out]; the collective is overlapped with the GEMM per the policy."""

    partition_dim = 1

    def _ops(self, rows, dtype):
        n, k, tp = self.out_features, self.weight.shape[1], self.tp_size
        if self.sequence_parallel:
            return (
                GemmCollective("reduce_scatter", rows, n, k, tp, dtype),
                GemmCollective("all_gather", rows, k, n, tp, dtype, gemms_per_block=2),
            )
        return GemmCollective("all_reduce", rows, n, k, tp, dtype), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] * self.tp_size != self.in_features:
            raise ValueError(
                f"RowParallelLinear: input last dim {x.shape[-1]} should be in_features/tp = "
                f"{self.in_features}/{self.tp_size} (the output of a ColumnParallelLinear)"
            )
        rows = x.numel() // x.shape[-1]
        if self.sequence_parallel:
            if x.shape[0] % self.tp_size:
                raise ValueError(
                    f"RowParallelLinear: sequence length {x.shape[0]} is not divisible by tp={self.tp_size}; "
                    f"sequence parallelism needs whole shards: pad the sequence to a multiple of {self.tp_size}"
                )
            rows //= self.tp_size
        return self._call(_RowParallel, x, rows)

    def _empty(self, x):
        y = F.linear(x, self.weight)
        y = y[: x.shape[0] // self.tp_size] if self.sequence_parallel else y
        return (
            y if self.bias is None else y + self.bias.to(y.dtype)
        )  # under autocast y is 16-bit, as nn.Linear's


def overlap_plans(model: nn.Module) -> dict[str, dict[str, str]]:
    """{name: {"forward": plan, "backward": plan}} for every column/row-parallel linear in `model` that has
    run, each plan "none" or "chunked:<k>" as its last call ran it (what `auto` chose, made visible)."""
    return {
        name: {phase: plan.name for phase, plan in module.last_plans.items()}
        for name, module in model.named_modules()
        if isinstance(module, _ParallelLinear) and module.last_plans
    }
