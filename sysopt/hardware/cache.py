"""The calibrated profile cached as JSON per host and per request: ~/.cache/sysopt/
profile-<hostname>-<device>-t<threads>-w<world_size>.json (SYSOPT_CACHE_DIR overrides the folder), so a
profile measured with all threads never stands in for a one-thread request, nor a 2-rank collective fit
for a 4-rank one, nor a CPU profile for a GPU. Quick calibrations go to ...-quick.json so they never stand
in for a full one. A cached calibration records what it was measured with (device, threads, collective
world size) and a fingerprint of the code that measured it; `load_or_calibrate` returns it only when all
of them match the request, and on hardware this process still sees as it was (the CPUs it may use, the
visible GPUs: CUDA_VISIBLE_DEVICES, MIG slices), and measures again otherwise; `load_cached` applies the same
checks."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import re
import socket
import warnings
from pathlib import Path

import torch

from sysopt.hardware import calibration
from sysopt.hardware.probe import probe
from sysopt.hardware.profile import LOAD_ERRORS, HardwareProfile

# the modules whose code is timed or does the timing: GEMMs, copies, collectives (through the TP
# layers' own comm path), the per-chunk cost of a chunked TP layer
CALIBRATING_MODULES = (
    "sysopt.hardware.calibration",
    "sysopt.hardware.collectives",
    "sysopt.hardware.timing",
    "sysopt.tensor_parallel.comm",
    "sysopt.tensor_parallel.layers",
    "sysopt.tensor_parallel.overlap",
    "sysopt.tensor_parallel.runtime",
)


@functools.cache
def calibrating_code() -> str:
    """A fingerprint of CALIBRATING_MODULES' source and torch's version."""
    digest = hashlib.sha256(torch.__version__.encode())
    for name in CALIBRATING_MODULES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        digest.update(name.encode() + b"\0" + Path(spec.origin).read_bytes())
    return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Request:
    """What a calibration is asked to measure with: the device (as calibrate resolves it), torch intra-op
    threads (calibrate's threads=None: the current setting) and the collectives' world size."""

    device: str
    threads: int
    world_size: int

    @classmethod
    def of(cls, threads: int | None = None, world_size: int = 2, device=None) -> Request:
        return cls(resolved_device(device), threads or torch.get_num_threads(), int(world_size))

    @property
    def tag(self) -> str:
        """The request in a cache file name, e.g. cpu-t1-w2, cuda0-t8-w2."""
        return f"{self.device.replace(':', '')}-t{self.threads}-w{self.world_size}"

    def mismatch(self, profile: HardwareProfile) -> str | None:
        """How `profile`'s calibration differs from this request (None when it matches)."""
        cal = profile.calibration
        assert cal is not None
        measured = Request(cal.device, cal.threads or 0, cal.collective_world_size)
        if measured == self:
            return None
        return f"measured with {measured.describe()}, asked for {self.describe()}"

    def describe(self) -> str:
        return f"device={self.device} threads={self.threads or '?'} world_size={self.world_size}"


def _hardware(profile: HardwareProfile) -> tuple:
    """What a profile's figures belong to: the CPU (model, and the cores and threads the process may use)
    and each visible GPU (CUDA index, name, UUID, total memory, MIG slice or not)."""
    cpu = profile.cpu
    gpus = tuple((g.index, g.name, g.uuid, g.memory_total_bytes, g.mig) for g in profile.gpus)
    return (cpu.model, cpu.cores, cpu.threads), gpus


def _describe_hardware(profile: HardwareProfile) -> str:
    gpus = ", ".join(f"cuda:{g.index} {g.name}{' (MIG)' if g.mig else ''}" for g in profile.gpus) or "no GPU"
    return f"{profile.cpu.threads} CPU threads, {gpus}"


def other_hardware(cached: HardwareProfile, here: HardwareProfile | None = None) -> str | None:
    """How the hardware `cached` was probed on differs from what this process sees now (`here`: probe()),
    or None. A calibration made with four GPUs visible, or under another CPU affinity, describes devices
    this process does not have: its device count and memory would plan for them."""
    here = probe() if here is None else here
    if _hardware(cached) == _hardware(here):
        return None
    return f"probed with {_describe_hardware(cached)}; this process sees {_describe_hardware(here)}"


def resolved_device(device=None) -> str:
    """The device calibrate measures on for `device` (None: its default), e.g. 'cpu', 'cuda:0'."""
    return str(calibration.resolve_device(device))


def cache_dir() -> Path:
    return Path(os.environ.get("SYSOPT_CACHE_DIR") or Path.home() / ".cache" / "sysopt")


def default_cache_path(
    quick: bool = False, *, threads: int | None = None, world_size: int = 2, device=None
) -> Path:
    """This host's cache file for a calibration of these arguments (calibrate's, with their defaults)."""
    tag = Request.of(threads, world_size, device).tag
    return cache_dir() / f"profile-{socket.gethostname()}-{tag}{'-quick' if quick else ''}.json"


def _cached_paths(quick: bool) -> list[Path]:
    """This host's cache files of any request: full calibrations first, then (when `quick`) quick ones."""
    name = re.compile(rf"profile-{re.escape(socket.gethostname())}-[a-z]+\d*-t\d+-w\d+(-quick)?\.json")
    found = sorted(p for p in cache_dir().glob("profile-*.json") if name.fullmatch(p.name))
    full = [p for p in found if not p.name.endswith("-quick.json")]
    return full + ([p for p in found if p.name.endswith("-quick.json")] if quick else [])


def _read_calibrated(path: Path) -> HardwareProfile | None:
    if not path.is_file():
        return None
    try:
        profile = HardwareProfile.load(path)
    except LOAD_ERRORS as exc:  # torn, or JSON of another shape
        warnings.warn(f"ignoring unreadable profile cache {path}: {exc}; it will be rewritten", stacklevel=3)
        return None
    return profile if profile.calibration is not None else None


def load_cached(
    cache_path: str | os.PathLike | None = None,
    quick: bool = True,
    *,
    threads: int | None = None,
    world_size: int | None = None,
    device=None,
) -> HardwareProfile | None:
    """A cached calibrated profile measured by this code, or None; never calibrates. With no path, any of
    this host's cache files (a full calibration preferred; a quick one accepted when `quick`), restricted
    to those measured with the given `threads`, `world_size` and `device` (None: any). Among several, the
    one measured with the current torch thread count and default device is preferred, then the newest."""
    paths = [Path(cache_path)] if cache_path is not None else _cached_paths(quick)
    wanted_device = None if device is None else resolved_device(device)
    usable, stale, moved = [], [], []
    here = probe()
    for path in paths:
        if (profile := _read_calibrated(path)) is None:
            continue
        cal = profile.calibration
        assert cal is not None
        if cal.code != calibrating_code():
            stale.append(str(path))
        elif (why := other_hardware(profile, here)) is not None:
            moved.append(f"{path} ({why})")
        elif (
            (threads is None or cal.threads == threads)
            and (world_size is None or cal.collective_world_size == world_size)
            and (wanted_device is None or cal.device == wanted_device)
        ):
            usable.append((path.name.endswith("-quick.json"), cal, profile))
    if not usable:
        if moved:
            warnings.warn(
                f"ignoring cached profile {', '.join(moved)}; recalibrate with sysopt-probe --calibrate",
                stacklevel=2,
            )
        if stale:
            warnings.warn(
                f"ignoring cached profile {', '.join(stale)}: measured by other code than this "
                f"({calibrating_code()}: sysopt or torch changed since); recalibrate with "
                "sysopt-probe --calibrate",
                stacklevel=2,
            )
        return None
    here_threads, here_device = torch.get_num_threads(), resolved_device()
    usable.sort(key=lambda item: item[1].created, reverse=True)  # newest first among equals
    _, _, best = min(
        usable, key=lambda item: (item[1].threads != here_threads, item[1].device != here_device, item[0])
    )
    return best


def _candidates(cache_path: str | os.PathLike | None, quick: bool, request: Request) -> list[Path]:
    if cache_path is not None:
        return [Path(cache_path)]
    paths = [
        default_cache_path(
            False, threads=request.threads, world_size=request.world_size, device=request.device
        )
    ]
    if quick:
        paths.append(
            default_cache_path(
                True, threads=request.threads, world_size=request.world_size, device=request.device
            )
        )
    return paths


def load_or_calibrate(
    cache_path: str | os.PathLike | None = None,
    quick: bool = False,
    *,
    refresh: bool = False,
    **calibrate_kwargs,
) -> HardwareProfile:
    """The cached calibrated profile for this request when there is one (and not `refresh`), else
    calibrate and cache it.

    Extra keyword arguments go to sysopt.hardware.calibrate (world_size, device, threads, progress,
    samples); world_size, device and threads select the cache file and must match what a cached profile
    was measured with (a profile at an explicit `cache_path` that does not is measured again and replaced).
    """
    request = Request.of(
        calibrate_kwargs.get("threads"), calibrate_kwargs.get("world_size", 2), calibrate_kwargs.get("device")
    )
    stale, other = [], []
    for path in [] if refresh else _candidates(cache_path, quick, request):
        if (cached := _read_calibrated(path)) is None:
            continue
        assert cached.calibration is not None
        if cached.calibration.code != calibrating_code():
            stale.append(f"{path} (fingerprint {cached.calibration.code or 'none'})")
        elif (why := request.mismatch(cached)) is not None:
            other.append(f"{path} ({why})")
        elif (why := other_hardware(cached)) is not None:
            other.append(f"{path} ({why})")
        elif not quick and cached.calibration.quick:  # a quick calibration never stands in for a full one
            other.append(f"{path} (a quick calibration, and a full one was asked for)")
        else:
            return cached
    if stale:
        warnings.warn(
            f"cached profile {', '.join(stale)} was measured by other code than this "
            f"({calibrating_code()}: sysopt or torch changed since); calibrating again",
            stacklevel=2,
        )
    if other:
        warnings.warn(f"cached profile {', '.join(other)}; calibrating again", stacklevel=2)
    profile = calibration.calibrate(quick=quick, **calibrate_kwargs)
    assert profile.calibration is not None
    cal = dataclasses.replace(profile.calibration, code=calibrating_code())
    if cal.threads is None:  # a calibrate that does not say: it ran with the threads it was given
        cal = dataclasses.replace(cal, threads=request.threads)
    profile = dataclasses.replace(profile, calibration=cal)
    if cal.collective_world_size < request.world_size:
        warnings.warn(  # cached, it would stand in for a good calibration until the code changed
            "the collective calibration failed (its warning says why), so this profile is not cached: "
            "the next load_or_calibrate measures again",
            stacklevel=2,
        )
        return profile
    target = Path(cache_path) if cache_path is not None else _candidates(None, quick, request)[-1]
    profile.save(target)
    return profile
