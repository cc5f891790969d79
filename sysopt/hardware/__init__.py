"""What the machine can do: CPU/GPU facts (probe), calibration microbenchmarks, and the cached
HardwareProfile that cost models read."""

from sysopt.hardware.cache import default_cache_path, load_cached, load_or_calibrate
from sysopt.hardware.calibration import calibrate, intraop_threads
from sysopt.hardware.probe import probe
from sysopt.hardware.profile import (
    ISA_FLAGS,
    Calibration,
    CPUInfo,
    GPUInfo,
    HardwareProfile,
    LinkFit,
    MatmulPoint,
)
from sysopt.hardware.timing import TimingSamples, fit_alpha_beta

__all__ = [
    "ISA_FLAGS",
    "CPUInfo",
    "Calibration",
    "GPUInfo",
    "HardwareProfile",
    "LinkFit",
    "MatmulPoint",
    "TimingSamples",
    "calibrate",
    "intraop_threads",
    "default_cache_path",
    "fit_alpha_beta",
    "load_cached",
    "load_or_calibrate",
    "probe",
]
