"""Autograd-aware moves between tensor-parallel regions (sequence dim 0, as in megatron-core):
scatter / gather / reduce-scatter along the sequence, and copy / reduce across the tp group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from sysopt.tensor_parallel import comm


def _shard(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    tp = comm.group_size(group)
    if x.shape[0] % tp:
        raise ValueError(
            f"sequence length {x.shape[0]} is not divisible by tp={tp}; sequence parallelism needs "
            f"whole shards: pad the sequence to a multiple of {tp} or disable sequence_parallel"
        )
    rows = x.shape[0] // tp
    return x[comm.group_rank(group) * rows : (comm.group_rank(group) + 1) * rows].contiguous()


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _shard(x, group)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.group).wait(), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, reduce_grad):
        ctx.group, ctx.reduce_grad = group, reduce_grad
        return comm.all_gather(x, group).wait()

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return comm.reduce_scatter(grad, ctx.group).wait(), None, None
        return _shard(grad, ctx.group), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.reduce_scatter(x, group).wait()

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.group).wait(), None


class _CopyToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce(grad.contiguous().clone(), ctx.group).wait(), None


class _ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return comm.all_reduce(x.contiguous().clone(), group).wait()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def scatter_to_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """This rank's sequence shard of a replicated x; backward all-gathers the gradient."""
    return _ScatterToSequence.apply(x, group)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, *, reduce_grad: bool = False
) -> torch.Tensor:
    """The full sequence from every rank's shard. Backward keeps this rank's slice of the gradient
    (the output feeds replicated compute) or, with `reduce_grad`, reduce-scatters it (the output
    feeds tensor-parallel compute whose gradients are partial sums)."""
    return _GatherFromSequence.apply(x, group, reduce_grad)


def reduce_scatter_to_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Sum partial results over ranks, keeping this rank's sequence shard; backward all-gathers."""
    return _ReduceScatterToSequence.apply(x, group)


def copy_to_tensor_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Identity forward, all-reduced gradient backward. Wrap a parameter used on sequence shards
    (a layernorm weight under sequence parallelism) so every rank gets the full gradient."""
    return _CopyToTensorParallel.apply(x, group)


def reduce_from_tensor_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """All-reduce forward, identity backward."""
    return _ReduceFromTensorParallel.apply(x, group)
