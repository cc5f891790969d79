"""Inputs of the offload performance model: copy links, host/device update rates and free device
memory, taken from a HardwareProfile, a quick self-measurement, or documented defaults."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from sysopt.hardware.profile import HardwareProfile


@dataclass(frozen=True)
class CostInputs:
    """Alpha-beta copy links (time = latency_s + bytes / bytes_per_s) and AdamW update rates.

    `shared_processor` is True when host and device are the same processor (CPU-only): host and device
    updates then run one after the other on the same thread. `copies_overlap` says whether, there, the copy
    thread has a core of its own (fewer compute threads than cores), so copies run beside compute; if not,
    copies, host updates and device updates all compete for the same cores and the model adds them up."""

    d2h_latency_s: float
    d2h_bytes_per_s: float
    h2d_latency_s: float
    h2d_bytes_per_s: float
    host_params_per_s: float
    device_params_per_s: float
    shared_processor: bool
    free_device_bytes: int | None = None
    source: str = "default"
    copies_overlap: bool = False

    def __post_init__(self) -> None:
        for name in ("d2h_bytes_per_s", "h2d_bytes_per_s", "host_params_per_s", "device_params_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CostInputs.{name}={getattr(self, name)} must be > 0")

    def d2h_s(self, nbytes: int) -> float:
        return self.d2h_latency_s + nbytes / self.d2h_bytes_per_s

    def h2d_s(self, nbytes: int) -> float:
        return self.h2d_latency_s + nbytes / self.h2d_bytes_per_s

    def host_update_s(self, numel: int) -> float:
        return numel / self.host_params_per_s

    def device_update_s(self, numel: int) -> float:
        return numel / self.device_params_per_s

    def with_rates(self, **rates: float | None) -> CostInputs:
        """A copy with the given measured rates replaced (None leaves a rate as it is)."""
        return replace(self, **{k: v for k, v in rates.items() if v is not None}, source="measured")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostInputs:
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> CostInputs:
        return cls.from_dict(json.loads(text))


# Documented defaults, used only when neither a profile nor a measurement is available.
# GPU node: PCIe 4.0 x16 with pinned buffers moves ~20 GB/s each way (10 us per copy); a 32-core host
# runs fused AdamW at ~2e9 params/s (memory-bound: ~28 bytes touched per parameter at ~60 GB/s);
# an HBM GPU at ~2 TB/s runs it at ~7e10 params/s.
DEFAULT_GPU_COSTS = CostInputs(
    d2h_latency_s=10e-6,
    d2h_bytes_per_s=20e9,
    h2d_latency_s=10e-6,
    h2d_bytes_per_s=20e9,
    host_params_per_s=2e9,
    device_params_per_s=7e10,
    shared_processor=False,
    source="default",
)
# CPU-only: memcpy ~10 GB/s, fused AdamW ~5e8 params/s on a few cores.
DEFAULT_CPU_COSTS = CostInputs(
    d2h_latency_s=2e-6,
    d2h_bytes_per_s=10e9,
    h2d_latency_s=2e-6,
    h2d_bytes_per_s=10e9,
    host_params_per_s=5e8,
    device_params_per_s=5e8,
    shared_processor=True,
    source="default",
)


def free_device_bytes(device: torch.device) -> int:
    """Free memory where the optimizer's device state would live (host RAM on a CPU-only machine)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    try:  # MemAvailable counts reclaimable page cache, which free pages alone do not
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def cached_device_bytes(device: torch.device) -> int:
    """Device memory torch's caching allocator holds but no tensor uses (0 off CUDA: the CPU allocator hands
    freed memory back). Free to this process's allocations, though the driver counts it as used."""
    if device.type == "cuda" and torch.cuda.is_available():
        return max(int(torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)), 0)
    return 0


def copy_thread_has_core() -> bool:
    """CPU-only: whether the background copy thread can run beside torch's compute threads."""
    return torch.get_num_threads() < (os.cpu_count() or 1)


def default_cost_inputs(device: torch.device) -> CostInputs:
    if device.type == "cpu":
        return replace(
            DEFAULT_CPU_COSTS,
            free_device_bytes=free_device_bytes(device),
            copies_overlap=copy_thread_has_core(),
        )
    return replace(DEFAULT_GPU_COSTS, free_device_bytes=free_device_bytes(device))


def cost_inputs_from_profile(profile: HardwareProfile, device: torch.device | str) -> CostInputs:
    """Read copy fits, update rates and free memory from a calibrated HardwareProfile.

    Works without the hardware present, so a profile JSON from a GPU node can be used for projection."""
    device = torch.device(device)
    cal = profile.calibration
    if cal is None:
        raise ValueError(
            "HardwareProfile has no calibration; run sysopt.hardware.calibrate(profile) or pass profile=None "
            "to let OffloadAdamW measure itself"
        )
    host_rate = cal.optimizer_params_per_s.get("host")
    if host_rate is None:
        have = cal.optimizer_params_per_s
        raise ValueError(f"profile calibration lacks optimizer_params_per_s['host'] (have {have})")
    device_rate = cal.optimizer_params_per_s.get("device", host_rate)
    if device.type == "cpu":
        link = cal.copy.get("memcpy") or cal.copy.get("h2d_pinned")
        d2h = h2d = link
        free = profile.cpu.host_memory_bytes
    else:
        d2h = cal.copy.get("d2h_pinned") or cal.copy.get("d2h_pageable")
        h2d = cal.copy.get("h2d_pinned") or cal.copy.get("h2d_pageable")
        index = device.index or 0
        gpu = next((g for g in profile.gpus if g.index == index), None)
        free = gpu.memory_free_bytes if gpu is not None else None
    if d2h is None or h2d is None:
        have = sorted(cal.copy)
        raise ValueError(f"profile calibration has no copy fit usable for device {device} (have {have})")
    return CostInputs(
        d2h_latency_s=d2h.latency_s,
        d2h_bytes_per_s=d2h.bytes_per_s,
        h2d_latency_s=h2d.latency_s,
        h2d_bytes_per_s=h2d.bytes_per_s,
        host_params_per_s=host_rate,
        device_params_per_s=device_rate,
        shared_processor=device.type == "cpu",
        free_device_bytes=free,
        source="profile",
    )


def measure_cost_inputs(device: torch.device | str, numel: int = 1 << 20, repeats: int = 3) -> CostInputs:
    """A quick (tens of ms) self-measurement: one copy each way and one fused AdamW per side."""
    from sysopt.offload.update import fused_adamw_

    device = torch.device(device)
    is_cuda = device.type == "cuda" and torch.cuda.is_available()
    host = torch.randn(numel, pin_memory=is_cuda)
    dev = torch.empty(numel, device=device)

    def best_s(fn) -> float:
        times = []
        for _ in range(repeats):
            if is_cuda:
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            fn()
            if is_cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
        return max(min(times), 1e-9)

    nbytes = numel * 4
    h2d_s = best_s(lambda: dev.copy_(host, non_blocking=True))
    d2h_s = best_s(lambda: host.copy_(dev, non_blocking=True))

    def update_rate(where: torch.device) -> float:
        p, g, m, v = (torch.randn(numel, device=where) for _ in range(4))
        v.abs_()
        step = torch.zeros((), device=where)
        return numel / best_s(
            lambda: fused_adamw_(
                [p], [g], [m], [v], [step], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8
            )
        )

    host_rate = update_rate(torch.device("cpu"))
    device_rate = update_rate(device) if is_cuda else host_rate
    return CostInputs(
        d2h_latency_s=0.0,
        d2h_bytes_per_s=nbytes / d2h_s,
        h2d_latency_s=0.0,
        h2d_bytes_per_s=nbytes / h2d_s,
        host_params_per_s=host_rate,
        device_params_per_s=device_rate,
        shared_processor=not is_cuda,
        free_device_bytes=free_device_bytes(device),
        source="measured",
        copies_overlap=not is_cuda and copy_thread_has_core(),
    )
