"""Let megatron-core 0.16.1 run on a CPU-only torch: shims applied only inside `megatron_cpu_shims()`.

megatron-core allocates buffers on the device that torch.cuda reports as current and, in its
schedules, makes a token counter with `torch.zeros` on the CUDA device. Inside the context manager
(and only when CUDA is absent) the first answers "cpu" and the second lands on the CPU; on exit every patched attribute is restored.
Not thread-safe against other threads creating CUDA tensors while the block is active.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand")
_lock = threading.RLock()
_depth = 0
_saved: dict[str, Any] = {}


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return False


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return wrapper


def _install() -> None:
    _saved["current_device"] = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    # megatron's p2p shape exchange synchronizes unconditionally; with "cpu" as the current device the real
    # call fails on a GPU host, and the CPU tensors here give it nothing to wait for anywhere
    _saved["synchronize"] = torch.cuda.synchronize
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    for name in _FACTORIES:
        _saved[name] = getattr(torch, name)
        setattr(torch, name, _on_cpu(_saved[name]))


def _uninstall() -> None:
    torch.cuda.current_device = _saved.pop("current_device")
    torch.cuda.synchronize = _saved.pop("synchronize")
    for name in _FACTORIES:
        setattr(torch, name, _saved.pop(name))


@contextlib.contextmanager
def megatron_cpu_shims(force: bool = False) -> Iterator[None]:
    """Run megatron-core calls inside this block on CPU tensors (re-entrant). A no-op when CUDA is
    available, so GPU runs use megatron-core unchanged, unless `force` (CPU/gloo runs on a GPU host)."""
    global _depth
    if torch.cuda.is_available() and not force:
        yield
        return
    with _lock:
        if _depth == 0:
            _install()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _uninstall()
