"""The calibrated profile cached as JSON per host: ~/.cache/sysopt/profile-<hostname>.json
(SYSOPT_CACHE_DIR overrides the folder). Quick calibrations go to profile-<hostname>-quick.json so
they never stand in for a full one. A cached calibration carries a fingerprint of the code that
measured it; `load_or_calibrate` measures again when that code (or torch) has changed since."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import socket
import warnings
from pathlib import Path

import torch

from sysopt.hardware import calibration
from sysopt.hardware.profile import HardwareProfile

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


def cache_dir() -> Path:
    return Path(os.environ.get("SYSOPT_CACHE_DIR") or Path.home() / ".cache" / "sysopt")


def default_cache_path(quick: bool = False) -> Path:
    return cache_dir() / f"profile-{socket.gethostname()}{'-quick' if quick else ''}.json"


def _read_calibrated(path: Path) -> HardwareProfile | None:
    if not path.is_file():
        return None
    try:
        profile = HardwareProfile.load(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"ignoring unreadable profile cache {path}: {exc}; it will be rewritten", stacklevel=3)
        return None
    return profile if profile.calibration is not None else None


def load_cached(cache_path: str | os.PathLike | None = None, quick: bool = True) -> HardwareProfile | None:
    """The cached calibrated profile, or None. With no path, a full calibration is preferred and
    a quick one is accepted when `quick`."""
    for path in _candidates(cache_path, quick):
        if (profile := _read_calibrated(path)) is not None:
            return profile
    return None


def _candidates(cache_path: str | os.PathLike | None, quick: bool) -> list[Path]:
    if cache_path is not None:
        return [Path(cache_path)]
    return [default_cache_path(False)] + ([default_cache_path(True)] if quick else [])


def load_or_calibrate(
    cache_path: str | os.PathLike | None = None,
    quick: bool = False,
    *,
    refresh: bool = False,
    **calibrate_kwargs,
) -> HardwareProfile:
    """The cached calibrated profile when there is one (and not `refresh`), else calibrate and cache it.

    Extra keyword arguments go to sysopt.hardware.calibrate (world_size, device, progress, samples).
    """
    stale = []
    for path in [] if refresh else _candidates(cache_path, quick):
        if (cached := _read_calibrated(path)) is None:
            continue
        assert cached.calibration is not None
        if cached.calibration.code == calibrating_code():
            return cached
        stale.append(f"{path} (fingerprint {cached.calibration.code or 'none'})")
    if stale:
        warnings.warn(
            f"cached profile {', '.join(stale)} was measured by other code than this "
            f"({calibrating_code()}: sysopt or torch changed since); calibrating again",
            stacklevel=2,
        )
    profile = calibration.calibrate(quick=quick, **calibrate_kwargs)
    assert profile.calibration is not None
    profile = dataclasses.replace(
        profile, calibration=dataclasses.replace(profile.calibration, code=calibrating_code())
    )
    if profile.calibration.collective_world_size < calibrate_kwargs.get("world_size", 2):
        warnings.warn(  # cached, it would stand in for a good calibration until the code changed
            "the collective calibration failed (its warning says why), so this profile is not cached: "
            "the next load_or_calibrate measures again",
            stacklevel=2,
        )
        return profile
    profile.save(Path(cache_path) if cache_path is not None else default_cache_path(quick))
    return profile
