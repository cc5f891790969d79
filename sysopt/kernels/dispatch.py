"""Pick the kernel backend per device: Triton on GPUs, the torch reference on CPU.

SYSOPT_KERNEL_BACKEND=torch|triton overrides the choice (with TRITON_INTERPRET=1 set before the first Triton
import, `triton` runs the kernels on CPU in Triton's interpreter: slow, for tests). Triton modules are
imported only when first used, so `import sysopt.kernels` works where Triton is missing or unusable.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("torch", "triton")
_MODULES = {
    ("torch", "quantize"): "sysopt.kernels.quantize_ref",
    ("triton", "quantize"): "sysopt.kernels.quantize_triton",
    ("torch", "gemm"): "sysopt.kernels.gemm_ref",
    ("triton", "gemm"): "sysopt.kernels.gemm_triton",
}


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (it still needs a GPU or TRITON_INTERPRET=1 to run)."""
    try:
        importlib.import_module("triton")
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def backend_for(device: torch.device | str) -> str:
    """'triton' on CUDA/ROCm devices when Triton imports, else 'torch'; SYSOPT_KERNEL_BACKEND overrides."""
    forced = os.environ.get("SYSOPT_KERNEL_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"SYSOPT_KERNEL_BACKEND={forced!r} must be one of {BACKENDS} (or unset)")
        return forced
    return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"


def kernel_module(kind: str, device: torch.device | str) -> ModuleType:
    """The module implementing `kind` ('quantize' or 'gemm') for `device`."""
    return importlib.import_module(_MODULES[(backend_for(device), kind)])
