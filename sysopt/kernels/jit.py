"""Build a C++ op library once (torch.utils.cpp_extension.load_inline, cached on disk per source, flags, torch
version and CPU) and hand out its ops; None, with the reason kept, where it cannot be built (callers then run
their torch reference). Used by the host AdamW kernel (sysopt.offload.cpu_kernel) and the CPU quantisation
kernels (sysopt.kernels.cpu)."""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp")
LDFLAGS = ("-fopenmp",)


@dataclass(frozen=True)
class KernelStatus:
    available: bool
    avx512: bool
    build_dir: str
    error: str | None  # why the kernel is unavailable
    vector_isa: str = ""  # the widest SIMD path compiled in: "avx512", "avx2" or "scalar" ("" if unavailable)


def extensions_dir() -> Path:
    """TORCH_EXTENSIONS_DIR if set, else ~/.cache/sysopt/torch_extensions."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "sysopt" / "torch_extensions"


def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> str:
    """-march=native code must not run on another CPU sharing the cache directory: its features key the build
    (x86's "flags" line, aarch64's "Features", with the model/part lines) and the machine name (all a host
    without /proc/cpuinfo gives, e.g. macOS)."""
    keys = ("flags", "Features", "model name", "CPU implementer", "CPU part")
    lines = {platform.machine()}
    try:
        with open(cpuinfo) as f:
            lines |= {line.strip() for line in f if line.startswith(keys)}
    except OSError:
        pass
    return "\n".join(sorted(lines))


class JitOps:
    """A C++ source registering ops under the namespace macro SYSOPT_OPS_NAMESPACE (and a
    `built_with_avx512() -> bool` op), built on first `load()`. `disable_env`=torch turns it off;
    `what` names it in the warning printed once when it cannot be built."""

    def __init__(self, prefix: str, source: str, disable_env: str, what: str) -> None:
        self.prefix, self.source, self.disable_env, self.what = prefix, source, disable_env, what
        self._lock = threading.Lock()
        self._module: Any | None = None
        self._error: str | None = None
        self._tried = False

    def build_name(self) -> str:
        key = "\n".join(
            [self.source, *CFLAGS, *LDFLAGS, torch.__version__, _cpu_flags(), os.environ.get("CXX", "")]
        )
        return f"{self.prefix}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def disabled(self) -> bool:
        return os.environ.get(self.disable_env, "").lower() == "torch"

    def load(self, verbose: bool = False) -> Any | None:
        """The compiled ops (torch.ops.<name>), built on first use; None if unavailable. Only
        torch/library.h-level headers are included (not torch/extension.h): a build takes ~10-20 s of CPU."""
        if self.disabled():
            return None
        with self._lock:
            if self._tried:
                return self._module
            self._tried = True
            name = self.build_name()
            build_dir = extensions_dir() / name
            try:
                from torch.utils.cpp_extension import load_inline

                build_dir.mkdir(parents=True, exist_ok=True)
                load_inline(
                    name=name,
                    cpp_sources=[self.source],
                    extra_cflags=[*CFLAGS, f"-DSYSOPT_OPS_NAMESPACE={name}"],
                    extra_ldflags=list(LDFLAGS),
                    build_directory=str(build_dir),
                    verbose=verbose,
                    is_python_module=False,
                    no_implicit_headers=True,
                )
                self._module = getattr(torch.ops, name)
            except Exception as e:  # no compiler, no ninja, a read-only cache: fall back, say why once
                message = str(e).strip()
                self._error = f"{type(e).__name__}: {message.splitlines()[-1] if message else ''}"
                warnings.warn(
                    f"sysopt: {self.what} unavailable ({self._error}); using the torch reference (slower). "
                    f"Install ninja and a C++ compiler, or set {self.disable_env}=torch to silence this.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return self._module

    def status(self) -> KernelStatus:
        """Whether the kernel is usable here (builds it if not yet tried)."""
        module = self.load()
        error = self._error
        if module is None and error is None:
            error = f"disabled by {self.disable_env}={os.environ.get(self.disable_env)}"
        return KernelStatus(
            available=module is not None,
            avx512=bool(module is not None and module.built_with_avx512()),
            build_dir=str(extensions_dir()),
            error=error,
            vector_isa=_vector_isa(module),
        )


def _vector_isa(module: Any | None) -> str:
    if module is None:
        return ""
    if module.built_with_avx512():
        return "avx512"
    try:  # only some sources have an 8-lane path (and the op that reports it)
        avx2 = module.built_with_avx2
    except (AttributeError, RuntimeError):
        return "scalar"
    return "avx2" if avx2() else "scalar"
