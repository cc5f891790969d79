"""Build the C++ host AdamW kernel once (torch.utils.cpp_extension.load_inline, cached on disk per source, flags,
torch version and CPU) and hand it out; None, with the reason kept, where it cannot be built (then the torch
reference in sysopt.offload.update runs instead). SYSOPT_OFFLOAD_KERNEL=torch turns the kernel off."""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sysopt.offload.adamw_cpu_source import CPP_SOURCE

CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp")
LDFLAGS = ("-fopenmp",)
DISABLE_ENV = "SYSOPT_OFFLOAD_KERNEL"  # "torch": never build or use the C++ kernel


@dataclass(frozen=True)
class KernelStatus:
    available: bool
    avx512: bool
    build_dir: str
    error: str | None  # why the kernel is unavailable


_lock = threading.Lock()
_module: Any | None = None
_error: str | None = None
_tried = False


def extensions_dir() -> Path:
    """TORCH_EXTENSIONS_DIR if set, else ~/.cache/sysopt/torch_extensions."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "sysopt" / "torch_extensions"


def _cpu_flags() -> str:
    """-march=native code must not run on another CPU sharing the cache directory: its flags key the build."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build_name() -> str:
    key = "\n".join(
        [CPP_SOURCE, *CFLAGS, *LDFLAGS, torch.__version__, _cpu_flags(), os.environ.get("CXX", "")]
    )
    return "sysopt_adamw_cpu_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def load(verbose: bool = False) -> Any | None:
    """The compiled ops (torch.ops.<name>: adamw_step, built_with_avx512), built on first use; None if
    unavailable. Only torch/library.h is included (not torch/extension.h): the build takes ~12 s of CPU."""
    global _module, _error, _tried
    if os.environ.get(DISABLE_ENV, "").lower() == "torch":
        return None
    with _lock:
        if _tried:
            return _module
        _tried = True
        name = _build_name()
        build_dir = extensions_dir() / name
        try:
            from torch.utils.cpp_extension import load_inline

            build_dir.mkdir(parents=True, exist_ok=True)
            load_inline(
                name=name,
                cpp_sources=[CPP_SOURCE],
                extra_cflags=[*CFLAGS, f"-DSYSOPT_OPS_NAMESPACE={name}"],
                extra_ldflags=list(LDFLAGS),
                build_directory=str(build_dir),
                verbose=verbose,
                is_python_module=False,
                no_implicit_headers=True,
            )
            _module = getattr(torch.ops, name)
        except Exception as e:  # no compiler, no ninja, a read-only cache: fall back, say why once
            _error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            warnings.warn(
                f"sysopt.offload: C++ host AdamW kernel unavailable ({_error}); using the torch reference "
                f"(slower). Install ninja and a C++ compiler, or set {DISABLE_ENV}=torch to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
        return _module


def status() -> KernelStatus:
    """Whether the kernel is usable here (builds it if not yet tried)."""
    module = load()
    error = _error
    if module is None and error is None:
        error = f"disabled by {DISABLE_ENV}={os.environ.get(DISABLE_ENV)}"
    return KernelStatus(
        available=module is not None,
        avx512=bool(module is not None and module.built_with_avx512()),
        build_dir=str(extensions_dir()),
        error=error,
    )
