"""The calibrated profile cached as JSON per host: ~/.cache/sysopt/profile-<hostname>.json
(SYSOPT_CACHE_DIR overrides the folder). Quick calibrations go to profile-<hostname>-quick.json so
they never stand in for a full one."""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

from sysopt.hardware import calibration
from sysopt.hardware.profile import HardwareProfile


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
    if cache_path is not None:
        return _read_calibrated(Path(cache_path))
    candidates = [default_cache_path(False)] + ([default_cache_path(True)] if quick else [])
    for path in candidates:
        if (profile := _read_calibrated(path)) is not None:
            return profile
    return None


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
    if not refresh and (cached := load_cached(cache_path, quick=quick)) is not None:
        return cached
    profile = calibration.calibrate(quick=quick, **calibrate_kwargs)
    profile.save(Path(cache_path) if cache_path is not None else default_cache_path(quick))
    return profile
