"""Where tensor-parallel GEMMs run and who watches them: the active compute backend (real torch
matmuls, or sleeps of a measured time for emulated-compute benchmarks) and the active Timeline."""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Callable, Iterator

import torch

from sysopt.tensor_parallel.timeline import COMM, COMPUTE, Timeline


class TorchCompute:
    """Real GEMMs."""

    def mm(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)

    def addmm_(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if acc.dtype != a.dtype:  # a wider accumulator (fp32 for bf16 operands): the product rounds once
            return acc.add_(torch.mm(a, b))
        return acc.addmm_(a, b)

    def mm_bias(
        self, bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return torch.addmm(bias, a, b, out=out) if out is not None else torch.addmm(bias, a, b)


class EmulatedCompute:
    """Each GEMM sleeps `seconds_fn(m, n, k)` and returns uninitialised memory: collectives still
    move real tensors, but compute leaves the cores free (on 2 cores real GEMMs starve gloo)."""

    def __init__(self, seconds_fn: Callable[[int, int, int], float]) -> None:
        self.seconds_fn = seconds_fn

    def mm(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        time.sleep(self.seconds_fn(a.shape[0], b.shape[1], a.shape[1]))
        return out if out is not None else torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)

    def addmm_(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds_fn(a.shape[0], b.shape[1], a.shape[1]))
        return acc

    def mm_bias(
        self, bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:  # the bias rides in the GEMM's epilogue: the same sleep as mm
        return self.mm(a, b, out)


_compute: TorchCompute | EmulatedCompute = TorchCompute()
_timeline: Timeline | None = None


@contextlib.contextmanager
def use_compute(compute: TorchCompute | EmulatedCompute) -> Iterator[None]:
    global _compute
    previous, _compute = _compute, compute
    try:
        yield
    finally:
        _compute = previous


@contextlib.contextmanager
def recording(timeline: Timeline) -> Iterator[Timeline]:
    """Record every tensor-parallel GEMM and collective issued inside the block into `timeline`."""
    global _timeline
    previous, _timeline = _timeline, timeline
    try:
        yield timeline
    finally:
        _timeline = previous


def active_timeline() -> Timeline | None:
    return _timeline


def mm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor | None = None,
    name: str = "gemm",
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """a @ b (+ bias, broadcast over rows, added in the GEMM's epilogue: torch.addmm) into `out` when
    given, on the active compute backend."""
    start = time.perf_counter() if _timeline is not None else 0.0
    if _timeline is not None and a.is_cuda:
        _warn_cuda_timeline()
    result = _compute.mm(a, b, out) if bias is None else _compute.mm_bias(bias, a, b, out)
    if _timeline is not None:
        _timeline.add(COMPUTE, name, start, time.perf_counter())
    return result


@functools.cache
def _warn_cuda_timeline() -> None:
    warnings.warn(
        "tensor_parallel timeline on CUDA tensors: spans are host-side times, so a GEMM span is its kernel "
        "launch and an NCCL collective completes (its future) when enqueued; the hidden fraction is only "
        "meaningful on CPU/gloo. Time CUDA runs with torch.profiler or CUDA events instead.",
        stacklevel=3,
    )


def addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, name: str = "wgrad") -> torch.Tensor:
    """acc += a @ b on the active compute backend."""
    if _timeline is None:
        return _compute.addmm_(acc, a, b)
    start = time.perf_counter()
    result = _compute.addmm_(acc, a, b)
    _timeline.add(COMPUTE, name, start, time.perf_counter())
    return result


def comm_started(name: str) -> Callable[[], None] | None:
    """Mark a collective launch; returns the function to call at its completion (None when not
    recording)."""
    timeline = _timeline
    if timeline is None:
        return None
    start = time.perf_counter()
    return lambda: timeline.add(COMM, name, start, time.perf_counter())
