"""Asynchronous host<->device copies with explicit waits. On CUDA: pinned host buffers, one side stream per
direction and events. On CPU (host and device are both the CPU): one background copy thread and futures,
so the same code path (start a copy, wait for it later) runs and is tested without a GPU."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch


@dataclass
class CopyStats:
    """Bytes moved and seconds spent per direction since the last `take()`."""

    d2h_bytes: int = 0
    d2h_s: float = 0.0
    h2d_bytes: int = 0
    h2d_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, direction: str, nbytes: int, seconds: float) -> None:
        with self.lock:
            setattr(self, f"{direction}_bytes", getattr(self, f"{direction}_bytes") + nbytes)
            setattr(self, f"{direction}_s", getattr(self, f"{direction}_s") + seconds)

    def take(self) -> tuple[float | None, float | None]:
        """Measured (d2h, h2d) bytes/s since the last call; None where nothing was timed."""
        with self.lock:
            d2h = self.d2h_bytes / self.d2h_s if self.d2h_s > 0 and self.d2h_bytes else None
            h2d = self.h2d_bytes / self.h2d_s if self.h2d_s > 0 and self.h2d_bytes else None
            self.d2h_bytes = self.h2d_bytes = 0
            self.d2h_s = self.h2d_s = 0.0
        return d2h, h2d


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class CpuTransfers:
    """Copies run in order on one background thread; a Future is the completion event."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sysopt-offload-copy")
        self.stats = CopyStats()

    def host_empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def _run(self, direction: str, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
        t = time.perf_counter()
        with torch.no_grad():
            for d, s in zip(dsts, srcs):
                d.copy_(s)
        self.stats.add(direction, _nbytes(srcs), time.perf_counter() - t)

    def d2h(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> Future:
        return self._pool.submit(self._run, "d2h", dsts, srcs)

    def h2d(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> Future:
        return self._pool.submit(self._run, "h2d", dsts, srcs)

    def wait_host(self, handle: Future) -> None:
        """Block the calling thread until the copy is done."""
        handle.result()

    def wait_device(self, handle: Future) -> None:
        """Order later device work after the copy; on CPU the device is this thread, so block."""
        handle.result()

    def poll(self) -> None:
        """Fold finished copies' timings into `stats` (CPU copies time themselves)."""

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class CudaTransfers:  # pragma: no cover - needs a GPU
    """Copies on two side streams (one per direction) into/out of pinned host memory, tracked by events."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.d2h_stream = torch.cuda.Stream(device)
        self.h2d_stream = torch.cuda.Stream(device)
        self.stats = CopyStats()
        self._untimed: list[tuple[str, int, torch.cuda.Event, torch.cuda.Event]] = []

    def host_empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def _copy(self, direction: str, stream: torch.cuda.Stream, dsts, srcs) -> torch.cuda.Event:
        # The copy must see everything the compute stream has queued so far (the gradient being produced,
        # or the last reads of a parameter about to be overwritten).
        stream.wait_stream(torch.cuda.current_stream(self.device))
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream), torch.no_grad():
            start.record(stream)
            for d, s in zip(dsts, srcs):
                d.copy_(s, non_blocking=True)
                for t in (d, s):  # keep device memory alive until the side stream is done with it
                    if t.is_cuda:
                        t.record_stream(stream)
            end.record(stream)
        self._untimed.append((direction, _nbytes(srcs), start, end))
        return end

    def d2h(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> torch.cuda.Event:
        return self._copy("d2h", self.d2h_stream, dsts, srcs)

    def h2d(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> torch.cuda.Event:
        return self._copy("h2d", self.h2d_stream, dsts, srcs)

    def wait_host(self, handle: torch.cuda.Event) -> None:
        handle.synchronize()
        self.poll()

    def wait_device(self, handle: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(handle)

    def poll(self) -> None:
        pending = []
        for direction, nbytes, start, end in self._untimed:
            if end.query():
                self.stats.add(direction, nbytes, start.elapsed_time(end) / 1e3)
            else:
                pending.append((direction, nbytes, start, end))
        self._untimed = pending

    def close(self) -> None:
        torch.cuda.synchronize(self.device)


def make_transfers(device: torch.device) -> CpuTransfers | CudaTransfers:
    """The one capability check: CUDA streams and pinned memory when the parameters live on a GPU."""
    if device.type == "cuda" and torch.cuda.is_available():
        return CudaTransfers(device)
    return CpuTransfers()
