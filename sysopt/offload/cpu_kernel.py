"""Build the C++ host AdamW kernel once (sysopt.kernels.jit: cached on disk per source, flags, torch version and
CPU) and hand it out; None, with the reason kept, where it cannot be built (then the torch reference in
sysopt.offload.update runs instead). SYSOPT_OFFLOAD_KERNEL=torch turns the kernel off."""

from __future__ import annotations

from typing import Any

from sysopt.kernels.jit import JitOps, KernelStatus, extensions_dir
from sysopt.offload.adamw_cpu_source import CPP_SOURCE

DISABLE_ENV = "SYSOPT_OFFLOAD_KERNEL"  # "torch": never build or use the C++ kernel

_ops = JitOps("sysopt_adamw_cpu", CPP_SOURCE, DISABLE_ENV, "sysopt.offload: C++ host AdamW kernel")


def load(verbose: bool = False) -> Any | None:
    """The compiled ops (torch.ops.<name>: adamw_step, built_with_avx512), built on first use; None if
    unavailable."""
    return _ops.load(verbose)


def status() -> KernelStatus:
    """Whether the kernel is usable here (builds it if not yet tried)."""
    return _ops.status()


__all__ = ["DISABLE_ENV", "KernelStatus", "extensions_dir", "load", "status"]
