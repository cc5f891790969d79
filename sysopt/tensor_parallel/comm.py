"""Asynchronous collectives over any torch.distributed backend, each returned as a `Pending` whose
`wait()` yields the result tensor; completions are timed through work futures when recording.

Off NCCL both sequence-parallel collectives are all-to-alls among the other ranks (`exchange`):
gloo's reduce_scatter blocks the caller for most of its duration, and its all_gather_into_tensor
takes ~1.4x as long as the all-to-all of the same bytes (torch 2.13, measured on this 2-core host:
1 MB per rank, tp=2 2.0 vs 1.5 ms, tp=4 7.1 vs 5.0 ms). A reduce-scatter then adds the received
partial sums to its own block (leaving its own block out of the all-to-all: 2 MB at tp=2, 3.2 vs
2.5 ms); an all-gather places the received shards beside its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from sysopt.tensor_parallel import runtime

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Pending:
    """A collective in flight."""

    def __init__(
        self,
        work: dist.Work | None,
        result: torch.Tensor,
        finish: Callable[[], None] | None = None,
        done: Callable[[], None] | None = None,
    ) -> None:
        self._work, self._result, self._finish = work, result, finish
        self._done_at_wait = done if not _on_completion(work, done) else None
        self._waited = False

    def wait(self) -> torch.Tensor:
        if not self._waited:
            if self._work is not None:
                self._work.wait()
            if self._done_at_wait is not None:  # backend without futures: completion seen at wait
                self._done_at_wait()
            if self._finish is not None:
                self._finish()
            self._waited = True
        return self._result


def _on_completion(work: dist.Work | None, done: Callable[[], None] | None) -> bool:
    if work is None or done is None:
        return False
    try:
        future = work.get_future()
    except RuntimeError:  # "getFuture not implemented" on some backends / ops
        return False
    future.then(lambda _: done())
    return True


def group_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in `group`; 1 when torch.distributed is not initialised (a single-process run)."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _nccl(x: torch.Tensor, group: dist.ProcessGroup | None) -> bool:
    return x.is_cuda and "nccl" in str(dist.get_backend(group))


def to_every_other(x: torch.Tensor, tp: int) -> torch.Tensor:
    """`x` once per other rank, as `exchange` sends it (no copy at tp=2)."""
    return x if tp == 2 else x.repeat(tp - 1, *([1] * (x.dim() - 1)))


def all_gather(x: torch.Tensor, group: dist.ProcessGroup | None, name: str = "all_gather") -> Pending:
    """Concatenate every rank's `x` along dim 0 (rank order)."""
    x = x.contiguous()
    tp = group_size(group)
    if tp == 1:
        return Pending(None, x)
    out = torch.empty((tp * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    if _nccl(x, group):
        done = runtime.comm_started(name)
        return Pending(_all_gather(out, x, group=group, async_op=True), out, done=done)
    rank, out3 = group_rank(group), out.view(tp, *x.shape)
    if tp == 2:  # the other rank's shard lands in place
        pending = exchange(to_every_other(x, tp), group, name, out=out3[1 - rank])
        out3[rank].copy_(x)
        return Pending(None, out, finish=pending.wait)

    received = exchange(to_every_other(x, tp), group, name)
    out3[rank].copy_(x)

    def place() -> None:
        others = received.wait().view(tp - 1, *x.shape)
        out3[:rank].copy_(others[:rank])
        out3[rank + 1 :].copy_(others[rank:])

    return Pending(None, out, finish=place)


def reduce_scatter(
    x: torch.Tensor,
    group: dist.ProcessGroup | None,
    out: torch.Tensor | None = None,
    name: str = "reduce_scatter",
    bias: torch.Tensor | None = None,
) -> Pending:
    """Sum `x` over ranks and keep this rank's 1/tp slice of dim 0 (written into `out` if given), plus
    `bias` (broadcast over the last dim; off NCCL added to this rank's own block, before the partial sums,
    as the chunked GEMM+reduce-scatter adds it, so both give the same bits)."""
    tp = group_size(group)
    if x.shape[0] % tp:
        raise ValueError(
            f"reduce_scatter: dim 0 of size {x.shape[0]} is not divisible by tp={tp}; every rank keeps an "
            f"equal slice: pad dim 0 (the sequence) to a multiple of {tp}"
        )
    x = x.contiguous()
    shape = (x.shape[0] // tp, *x.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    if tp == 1:
        return Pending(None, out.copy_(x) if bias is None else torch.add(x, bias, out=out))
    if _nccl(x, group):
        done = runtime.comm_started(name)
        work = _reduce_scatter(out, x, group=group, async_op=True)
        return Pending(work, out, finish=None if bias is None else lambda: out.add_(bias), done=done)
    rank, x3 = group_rank(group), x.view(tp, *shape)
    received = exchange(remote_rows(x3, rank, 0, shape[0]), group, name)

    def finish() -> None:
        own = out.copy_(x3[rank]) if bias is None else torch.add(x3[rank], bias, out=out)
        add_partials(own, received)

    return Pending(None, out, finish=finish)


def add_partials(target: torch.Tensor, received: Pending) -> None:
    """Add into `target` the partial sums an `exchange` of a reduce-scatter brought (one block of
    target's shape per other rank), in rank order, so every strategy sums in the same order."""
    for partial in received.wait().view(-1, *target.shape):
        target.add_(partial)


def remote_rows(x3: torch.Tensor, rank: int, lo: int, hi: int) -> torch.Tensor:
    """Rows lo:hi of every block of `x3` ([tp, rows, ...]) except block `rank`, as one
    [(tp-1)*(hi-lo), ...] tensor in rank order (a view at tp=2, else a copy)."""
    if x3.shape[0] == 2:
        return x3[1 - rank, lo:hi]
    return torch.cat([x3[:rank, lo:hi], x3[rank + 1 :, lo:hi]]).reshape(-1, *x3.shape[2:])


def exchange(
    x: torch.Tensor, group: dist.ProcessGroup | None, name: str = "exchange", out: torch.Tensor | None = None
) -> Pending:
    """All-to-all between the other ranks only: `x` holds (tp-1) equal row blocks, one for each other
    rank in rank order; the result (written into `out` if given) holds the block each of them sent
    here, in the same order."""
    tp, rank = group_size(group), group_rank(group)
    x = x.contiguous()
    if tp == 1:
        return Pending(None, x)
    if x.shape[0] % (tp - 1):
        raise ValueError(
            f"exchange: dim 0 of size {x.shape[0]} is not divisible by tp-1={tp - 1}; pass one equal block "
            "per other rank, stacked along dim 0 (comm.to_every_other(x, tp) builds them from one block)"
        )
    block = x.shape[0] // (tp - 1)
    splits = [0 if r == rank else block for r in range(tp)]
    out = torch.empty_like(x) if out is None else out
    done = runtime.comm_started(name)
    return Pending(dist.all_to_all_single(out, x, splits, splits, group=group, async_op=True), out, done=done)


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None, name: str = "all_reduce") -> Pending:
    """Sum `x` over ranks in place (`x` must be contiguous)."""
    if not x.is_contiguous():
        raise ValueError(
            f"all_reduce: a tensor of shape {tuple(x.shape)} with strides {x.stride()} is not contiguous and "
            "is reduced in place; pass x.contiguous() (and read the result from the Pending)"
        )
    if group_size(group) == 1:
        return Pending(None, x)
    done = runtime.comm_started(name)
    return Pending(dist.all_reduce(x, group=group, async_op=True), x, done=done)
