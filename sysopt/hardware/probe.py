"""Static facts about the machine: CPU model, cores, ISA flags, host memory (from /proc), and GPUs
through NVML (nvidia-ml-py). No GPU and no NVML is the normal case, not an error."""

from __future__ import annotations

import datetime
import math
import os
import platform
from pathlib import Path

from sysopt.hardware.profile import ISA_FLAGS, CPUInfo, GPUInfo, HardwareProfile


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def parse_cpuinfo(text: str, allowed: set[int] | None = None) -> tuple[str, int, set[str]]:
    """(model name, physical cores, flags) from /proc/cpuinfo text; cores 0 when not stated. With
    `allowed` (logical CPU numbers, e.g. the affinity mask) only the cores of those CPUs count."""
    model, flags, cores = "", set(), set()
    processor = physical_id = core_id = None
    for line in text.splitlines() + [""]:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and not model:
            model = value
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "processor" and value.isdigit():
            processor = int(value)
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            core_id = value
        elif not key:  # blank line ends one logical CPU's block
            if core_id is not None and (allowed is None or processor is None or processor in allowed):
                cores.add((physical_id, core_id))
            processor = physical_id = core_id = None
    return model, len(cores), flags


def usable_cpus() -> set[int] | None:
    """The logical CPUs this process may run on (its affinity mask: taskset, numactl, a container's
    cpuset), or None where the OS does not say (no os.sched_getaffinity: macOS, Windows)."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is None:
        return None
    try:
        return set(getaffinity(0))
    except OSError:
        return None


def cgroup_cpu_limit() -> int | None:
    """CPUs a cgroup v2 CPU quota allows this process (cpu.max "quota period", rounded up), or None when
    there is no quota (or no cgroup v2)."""
    fields = _read("/sys/fs/cgroup/cpu.max").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def host_memory_bytes() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def probe_cpu() -> CPUInfo:
    """The CPU as this process may use it: logical CPUs of its affinity mask (all of os.cpu_count() where
    the OS has no affinity call), capped by a cgroup CPU quota, and the physical cores under them."""
    allowed = usable_cpus()
    model, cores, flags = parse_cpuinfo(_read("/proc/cpuinfo"), allowed)
    threads = len(allowed) if allowed else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    if limit is not None:
        threads = min(threads, limit)
    return CPUInfo(
        model=model or platform.processor() or platform.machine() or "unknown",
        cores=min(cores or threads, threads),
        threads=threads,
        isa=tuple(f for f in ISA_FLAGS if f in flags),
        host_memory_bytes=host_memory_bytes(),
    )


def _nvml_value(fn, *args):
    """One NVML query; None when the driver or device does not support it."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - pynvml raises many NVMLError subclasses
        return None


def _nvlink_links(nvml, handle) -> int:
    links = 0
    for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
        state = _nvml_value(nvml.nvmlDeviceGetNvLinkState, handle, link)
        if state is None:
            break
        links += int(state == getattr(nvml, "NVML_FEATURE_ENABLED", 1))
    return links


def _compute_capability(nvml, handle) -> tuple[int, int] | None:
    query = getattr(nvml, "nvmlDeviceGetCudaComputeCapability", None)  # absent from old nvidia-ml-py
    cc = _nvml_value(query, handle) if query is not None else None
    return (int(cc[0]), int(cc[1])) if cc is not None else None


def probe_gpus() -> tuple[GPUInfo, ...]:
    """One GPUInfo per NVML device; () when nvidia-ml-py is missing or NVML cannot start."""
    try:
        import pynvml as nvml

        nvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver / no library: a CPU machine
        return ()
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(h)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(
                GPUInfo(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_total_bytes=int(mem.total),
                    memory_free_bytes=int(mem.free),
                    # max = what the link trains to under load (idle links drop to gen 1)
                    pcie_gen=_nvml_value(nvml.nvmlDeviceGetMaxPcieLinkGeneration, h),
                    pcie_width=_nvml_value(nvml.nvmlDeviceGetMaxPcieLinkWidth, h),
                    nvlink_links=_nvlink_links(nvml, h),
                    sm_clock_mhz=_nvml_value(nvml.nvmlDeviceGetMaxClockInfo, h, nvml.NVML_CLOCK_SM),
                    memory_clock_mhz=_nvml_value(nvml.nvmlDeviceGetMaxClockInfo, h, nvml.NVML_CLOCK_MEM),
                    compute_capability=_compute_capability(nvml, h),
                )
            )
        return tuple(gpus)
    except Exception:  # noqa: BLE001 - a broken driver must not break a CPU-side probe
        return ()
    finally:
        _nvml_value(nvml.nvmlShutdown)


def probe() -> HardwareProfile:
    """The machine's static facts, without calibration (fast: no benchmarks run)."""
    return HardwareProfile(cpu=probe_cpu(), gpus=probe_gpus(), calibration=None, created=now_iso())
