"""Static facts about the machine: CPU model, cores, ISA flags, host memory (from /proc), and GPUs
through NVML (nvidia-ml-py). No GPU and no NVML is the normal case, not an error."""

from __future__ import annotations

import datetime
import math
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _nvml_call(nvml, name: str, *args):
    """nvml.<name>(*args), or None when this nvidia-ml-py lacks it or the device does not support it."""
    fn = getattr(nvml, name, None)
    return None if fn is None else _nvml_value(fn, *args)


def _text(value) -> str | None:
    return None if value is None else value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class _Unit:
    """A device CUDA can open: a whole card (NVML index `index`), or one MIG slice of it (`mig`), whose
    memory (and name) NVML reports through `own` while links and clocks are the card's (`card`)."""

    index: int
    card: Any
    own: Any
    uuid: str | None
    card_uuid: str | None
    mig: bool


def _units(nvml) -> list[_Unit]:
    """Every card NVML sees; a card with MIG enabled as its MIG devices (the card alone, flagged, when
    NVML lists none of them)."""
    units = []
    for index in range(nvml.nvmlDeviceGetCount()):
        card = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = _text(_nvml_call(nvml, "nvmlDeviceGetUUID", card))
        mode = _nvml_call(nvml, "nvmlDeviceGetMigMode", card)  # [current, pending]
        if mode is None or mode[0] != getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1):
            units.append(_Unit(index, card, card, uuid, uuid, False))
            continue
        slices = []
        for i in range(_nvml_call(nvml, "nvmlDeviceGetMaxMigDeviceCount", card) or 0):
            handle = _nvml_call(nvml, "nvmlDeviceGetMigDeviceHandleByIndex", card, i)
            if handle is not None:  # an unpopulated slot raises NVML_ERROR_NOT_FOUND
                slices.append(
                    _Unit(
                        index, card, handle, _text(_nvml_call(nvml, "nvmlDeviceGetUUID", handle)), uuid, True
                    )
                )
        units += slices or [_Unit(index, card, card, uuid, uuid, True)]
    return units


def visible_units(units: list[_Unit], cuda_visible_devices: str | None) -> list[_Unit]:
    """The units a CUDA process sees, in its device order (cuda:0, cuda:1, ...), under
    CUDA_VISIBLE_DEVICES: unset, every card (of a MIG card, its first slice, the one CUDA opens); else the
    listed entries in order, each an NVML index or a (prefix of a) GPU-/MIG- UUID, a card with MIG named
    as its first slice; like CUDA, the list ends at the first entry matching nothing ("" or -1: none).
    Indices are taken in NVML's (PCI bus) order, CUDA's own with CUDA_DEVICE_ORDER=PCI_BUS_ID."""
    if cuda_visible_devices is None:
        out, cards = [], set()
        for unit in units:
            if unit.index not in cards:
                cards.add(unit.index)
                out.append(unit)
        return out
    out = []
    for token in (t.strip() for t in cuda_visible_devices.split(",")):
        if token.isdigit():
            match = next((u for u in units if u.index == int(token)), None)
        elif token.startswith(("GPU-", "MIG-")):
            match = next((u for u in units if u.uuid and u.uuid.startswith(token)), None)
            match = match or next((u for u in units if u.card_uuid and u.card_uuid.startswith(token)), None)
        else:
            match = None
        if match is None or match in out:
            break
        out.append(match)
    return out


def gpus_from_torch(why: str) -> tuple[GPUInfo, ...]:
    """The GPUs torch.cuda sees, where NVML could not describe them (`why`): name, total memory and compute
    capability, with a warning; no link or clock figures, and the total memory stands in for the free memory
    (reading it would open a CUDA context on every GPU). () where CUDA sees no GPU: a CPU machine."""
    import torch

    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install reads as no GPU, as torch itself would
        count = 0
    if count == 0:
        return ()
    warnings.warn(
        f"NVML could not describe the GPUs ({why}); taking {count} from torch.cuda without link, clock or "
        "free-memory figures (install nvidia-ml-py, or check the driver's permissions, for those)",
        stacklevel=3,
    )
    gpus = []
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        total = int(props.total_memory)
        gpus.append(
            GPUInfo(i, props.name, total, total, None, None, 0, None, None, (props.major, props.minor))
        )
    return tuple(gpus)


def probe_gpus() -> tuple[GPUInfo, ...]:
    """One GPUInfo per GPU this process can use (CUDA_VISIBLE_DEVICES respected, see visible_units),
    indexed as CUDA numbers them here; a MIG slice reports its own memory and is flagged. Where nvidia-ml-py
    is missing or NVML fails (no driver, or one card it may not read), the GPUs torch.cuda sees, with fewer
    figures (gpus_from_torch): () only where neither sees a GPU."""
    try:
        import pynvml as nvml

        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no driver / no library: a CPU machine, or NVML alone missing
        return gpus_from_torch(f"{type(exc).__name__}: {exc}")
    try:
        gpus = []
        for ordinal, unit in enumerate(visible_units(_units(nvml), os.environ.get("CUDA_VISIBLE_DEVICES"))):
            h = unit.card
            name = _nvml_call(nvml, "nvmlDeviceGetName", unit.own) if unit.mig else None
            name = name or nvml.nvmlDeviceGetName(h)
            mem = (_nvml_call(nvml, "nvmlDeviceGetMemoryInfo", unit.own) if unit.mig else None) or (
                nvml.nvmlDeviceGetMemoryInfo(h)
            )
            gpus.append(
                GPUInfo(
                    index=ordinal,
                    name=_text(name) or "unknown",
                    memory_total_bytes=int(mem.total),
                    memory_free_bytes=int(mem.free),
                    # max = what the link trains to under load (idle links drop to gen 1)
                    pcie_gen=_nvml_value(nvml.nvmlDeviceGetMaxPcieLinkGeneration, h),
                    pcie_width=_nvml_value(nvml.nvmlDeviceGetMaxPcieLinkWidth, h),
                    nvlink_links=_nvlink_links(nvml, h),
                    sm_clock_mhz=_nvml_value(nvml.nvmlDeviceGetMaxClockInfo, h, nvml.NVML_CLOCK_SM),
                    memory_clock_mhz=_nvml_value(nvml.nvmlDeviceGetMaxClockInfo, h, nvml.NVML_CLOCK_MEM),
                    compute_capability=_compute_capability(nvml, h),
                    uuid=unit.uuid,
                    mig=unit.mig,
                )
            )
        return tuple(gpus)
    except Exception as exc:  # noqa: BLE001 - a broken driver must not break a CPU-side probe
        # one card NVML may not read (outside the job's cgroup, lost) used to drop every GPU, silently
        return gpus_from_torch(f"{type(exc).__name__}: {exc}")
    finally:
        _nvml_value(nvml.nvmlShutdown)


def probe() -> HardwareProfile:
    """The machine's static facts, without calibration (fast: no benchmarks run)."""
    return HardwareProfile(cpu=probe_cpu(), gpus=probe_gpus(), calibration=None, created=now_iso())
