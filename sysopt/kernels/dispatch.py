"""Pick the kernel backend per device: Triton on GPUs; on CPU the fused C++ int8 kernels (`cpp`, see cpu.py)
where they build, else the torch reference.

SYSOPT_KERNEL_BACKEND=torch|triton|cpp overrides the choice (with TRITON_INTERPRET=1 set before the first Triton
import, `triton` runs the kernels on CPU in Triton's interpreter: slow, for tests). Triton modules are
imported only when first used, so `import sysopt.kernels` works where Triton is missing or unusable.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "cpp")
_MODULES = {
    ("torch", "quantize"): "sysopt.kernels.quantize_ref",
    ("triton", "quantize"): "sysopt.kernels.quantize_triton",
    ("torch", "gemm"): "sysopt.kernels.gemm_ref",
    ("triton", "gemm"): "sysopt.kernels.gemm_triton",
    ("cpp", "quantize"): "sysopt.kernels.cpu",
    ("cpp", "gemm"): "sysopt.kernels.cpu",
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
    """'triton' on CUDA/ROCm devices when Triton imports; 'cpp' on CPU when the C++ kernels build; else 'torch'.
    SYSOPT_KERNEL_BACKEND overrides."""
    forced = os.environ.get("SYSOPT_KERNEL_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"SYSOPT_KERNEL_BACKEND={forced!r} must be one of {BACKENDS} (or unset)")
        return forced
    kind = torch.device(device).type
    if kind == "cuda":
        return "triton" if triton_available() else "torch"
    if kind == "cpu":
        from . import cpu

        return "cpp" if cpu.load() is not None else "torch"
    return "torch"


def on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """x's GPU as the current device while its kernels launch: Triton launches on the current device's
    stream, so a tensor on cuda:1 with cuda:0 current would run on the wrong GPU. No-op off CUDA."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _triton_lacks_fp8(device: torch.device | str) -> bool:
    """True on a CUDA GPU older than compute capability 8.9 (Ada): Triton compiles no fp8e4nv there (it raises
    'type fp8e4nv not supported in this architecture'); the torch reference then casts and multiplies. Also
    on ROCm, whose "capability" is not CUDA's (an MI200 reports 9.0) and whose fp8 kernels are untested here."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device) < (8, 9)


def kernel_module(kind: str, device: torch.device | str, dtype: torch.dtype | None = None) -> ModuleType:
    """The module implementing `kind` ('quantize' or 'gemm') for `device`; with `dtype` (the low-precision
    format), fp8 on a pre-Ada GPU goes to the torch reference instead of Triton."""
    backend = backend_for(device)
    if backend == "triton" and dtype in FP8_DTYPES and _triton_lacks_fp8(device):
        backend = "torch"
    return importlib.import_module(_MODULES[(backend, kind)])
