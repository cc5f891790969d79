"""Data-parallel gradient reduction overlapped with backward: buckets are all-reduced as they fill.

Parameters are packed into buckets in reverse registration order (roughly the order backward produces
their gradients). A post-accumulate-grad hook marks each parameter's gradient ready; when a bucket is
full it is flattened and its all-reduce starts asynchronously while backward continues. Buckets are
launched strictly in bucket-index order on every rank (as torch DDP does), so ranks whose backward
fills buckets in different orders (a parameter unused on some ranks) still pair the same buckets.
`wait()` launches the rest in order, finishes the reductions and writes the reduced values into `.grad`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.autograd import Variable


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    ready: set[int] = field(default_factory=set)  # indices into params whose gradient arrived this round
    flat: torch.Tensor | None = None
    work: dist.Work | None = None
    hooks: list = field(default_factory=list)


class BucketedGradSync:
    """Sum (or average) gradients over `group` with reductions overlapping backward.

    Use: `sync = BucketedGradSync(model.parameters(), group)`; each step `loss.backward(); sync.wait()`.
    With `enabled=False` (gradient accumulation micro-steps) the hooks do nothing; enable it for the
    last backward before `wait()` only. A round is the backward passes between two `wait()` calls;
    a parameter may receive one gradient per round while enabled (a second one raises). A round whose
    backward raised is discarded when the next backward starts (or by `reset()`)."""

    def __init__(
        self,
        params,
        group: dist.ProcessGroup | None,
        *,
        bucket_bytes: int = 1 << 20,
        average: bool = False,
    ) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes={bucket_bytes} must be positive, e.g. 1<<20 (1 MiB)")
        self.group = group
        self.average = average
        self.enabled = True
        trainable = [p for p in params if p.requires_grad]
        self.buckets: list[_Bucket] = []
        current: list[torch.nn.Parameter] = []
        size = 0
        for p in reversed(trainable):
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                self.buckets.append(_Bucket(current))
                current, size = [], 0
        if current:
            self.buckets.append(_Bucket(current))
        for b, bucket in enumerate(self.buckets):
            for i, p in enumerate(bucket.params):
                bucket.hooks.append(p.register_post_accumulate_grad_hook(self._hook(b, i)))
        self.reductions_started_in_backward = 0  # how many buckets launched before wait()
        # called by wait() with each bucket's parameters once their reduced gradients are in .grad (e.g.
        # OffloadAdamW.grads_ready, which starts their host copies while later buckets still finish)
        self.on_reduced: list = []
        self._next_launch = 0  # buckets [0, _next_launch) are launched this round
        # backward passes (autograd graph task ids) that ran hooks and have not reached their end, each with
        # a weak reference to the end-of-backward callback it holds: dead means the pass raised part-way
        self._running: dict[int, weakref.ref] = {}

    def _hook(self, b: int, i: int):
        bucket = self.buckets[b]

        def on_grad_ready(param: torch.Tensor) -> None:
            if not self.enabled:
                return
            self._track_backward()
            if i in bucket.ready:
                raise RuntimeError(
                    f"BucketedGradSync: parameter {i} of bucket {b} (shape {tuple(param.shape)}) received a "
                    f"second gradient before wait(); with sync enabled each parameter may get one gradient "
                    f"per round. For gradient accumulation set sync.enabled=False for all but the last "
                    f"backward, or call sync.wait() between backward passes; a module applied twice under "
                    f"checkpoint(use_reentrant=True) also does this within one backward: use use_reentrant=False"
                )
            bucket.ready.add(i)
            self._launch_ready_in_order(from_hook=True)

        return on_grad_ready

    def _track_backward(self) -> None:
        """Notice the start of a new backward pass; if an earlier one raised part-way, discard its round.

        A pass that raised drops its graph task, and with it the end callback queued here, without
        running it. A nested (reentrant-checkpoint) pass still holds its callback: it is not stale."""
        task = torch._C._current_graph_task_id()
        if task in self._running:
            return
        if any(ref() is None for ref in self._running.values()):
            self.reset()

        def finished() -> None:
            self._running.pop(task, None)

        self._running[task] = weakref.ref(finished)
        Variable._execution_engine.queue_callback(finished)

    def _launch_ready_in_order(self, *, from_hook: bool) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if len(bucket.ready) < len(bucket.params):
                return
            self._launch(bucket)
            self._next_launch += 1
            if from_hook:
                self.reductions_started_in_backward += 1

    def _launch(self, bucket: _Bucket) -> None:
        grads = [p.grad for p in bucket.params]
        # an own buffer: flattening one tensor returns a view of that .grad, which the reduction would
        # then overwrite in place while backward (or the caller) may still read or accumulate into it
        bucket.flat = _flatten_dense_tensors(grads) if len(grads) > 1 else grads[0].detach().flatten().clone()
        bucket.work = dist.all_reduce(bucket.flat, group=self.group, async_op=True)

    def wait(self) -> None:
        """Launch, in bucket order, every bucket whose hooks did not all fire (e.g. a parameter unused
        this step), finish every reduction and copy the reduced gradients into `.grad`."""
        world = dist.get_world_size(self.group)
        for bucket in self.buckets[self._next_launch :]:
            for i, p in enumerate(bucket.params):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                bucket.ready.add(i)
        self._launch_ready_in_order(from_hook=False)
        try:
            for bucket in self.buckets:
                bucket.work.wait()
                if self.average:
                    bucket.flat.div_(world)
                grads = [p.grad for p in bucket.params]
                for g, reduced in zip(grads, _unflatten_dense_tensors(bucket.flat, grads)):
                    g.copy_(reduced)
                for callback in self.on_reduced:
                    callback(bucket.params)
        finally:
            self.reset()

    def reset(self) -> None:
        """Discard the current round: reductions launched but not yet applied are dropped (never copied
        into `.grad`), and every bucket waits for all of its gradients again. Called by `wait()`, and
        automatically when a backward starts after one that raised part-way. Every rank must discard
        the same round (launched collectives still pair in order across ranks)."""
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.flat, bucket.work = None, None
        self._next_launch = 0
        self._running = {t: ref for t, ref in self._running.items() if ref() is not None}

    def remove(self) -> None:
        for bucket in self.buckets:
            for handle in bucket.hooks:
                handle.remove()
            bucket.hooks.clear()
