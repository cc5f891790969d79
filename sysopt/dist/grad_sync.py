"""Data-parallel gradient reduction overlapped with backward: buckets are all-reduced as they fill.

Parameters are packed into buckets in reverse registration order (roughly the order backward produces
their gradients). A post-accumulate-grad hook counts each bucket's ready gradients; when the last one
arrives, the bucket is flattened and its all-reduce starts asynchronously while backward continues.
`wait()` finishes the outstanding reductions and writes the reduced values back into `.grad`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    ready: int = 0
    flat: torch.Tensor | None = None
    work: dist.Work | None = None
    hooks: list = field(default_factory=list)


class BucketedGradSync:
    """Sum (or average) gradients over `group` with reductions overlapping backward.

    Use: `sync = BucketedGradSync(model.parameters(), group)`; each step `loss.backward(); sync.wait()`.
    With `enabled=False` (gradient accumulation micro-steps) the hooks do nothing."""

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
        for bucket in self.buckets:
            for p in bucket.params:
                bucket.hooks.append(p.register_post_accumulate_grad_hook(self._hook(bucket)))
        self.reductions_started_in_backward = 0  # how many buckets launched before wait()

    def _hook(self, bucket: _Bucket):
        def on_grad_ready(_param: torch.Tensor) -> None:
            if not self.enabled:
                return
            bucket.ready += 1
            if bucket.ready == len(bucket.params):
                self._launch(bucket)
                self.reductions_started_in_backward += 1

        return on_grad_ready

    def _launch(self, bucket: _Bucket) -> None:
        grads = [p.grad for p in bucket.params]
        bucket.flat = _flatten_dense_tensors(grads)
        bucket.work = dist.all_reduce(bucket.flat, group=self.group, async_op=True)

    def wait(self) -> None:
        """Finish every bucket's reduction (launching any whose hooks did not all fire, e.g. a
        parameter unused this step) and copy the reduced gradients into `.grad`."""
        world = dist.get_world_size(self.group)
        for bucket in self.buckets:
            if bucket.work is None:
                for p in bucket.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                self._launch(bucket)
            bucket.work.wait()
            if self.average:
                bucket.flat.div_(world)
            grads = [p.grad for p in bucket.params]
            for g, reduced in zip(grads, _unflatten_dense_tensors(bucket.flat, grads)):
                g.copy_(reduced)
            bucket.ready, bucket.flat, bucket.work = 0, None, None

    def remove(self) -> None:
        for bucket in self.buckets:
            for handle in bucket.hooks:
                handle.remove()
            bucket.hooks.clear()
