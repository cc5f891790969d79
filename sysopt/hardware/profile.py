"""What the machine is and what it measured: frozen dataclasses that round-trip to JSON, plus the
cost-model queries (matmul, copy, collective, optimizer times) that planners ask of them."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
MATMUL_DTYPES = ("fp32", "bf16", "int8", "fp8")
_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float8_e4m3fn": "fp8",
    "e4m3": "fp8",
}


# what loading a JSON file written by another version, torn, or not the expected object raises
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file of its own in the same folder, renamed over `path`: a
    reader (or a writer killed midway, or one running beside it) never leaves or sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class CPUInfo:
    model: str
    cores: int
    threads: int
    isa: tuple[str, ...]  # subset of ISA_FLAGS, in that order
    host_memory_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "isa": list(self.isa)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CPUInfo:
        return cls(
            d["model"], int(d["cores"]), int(d["threads"]), tuple(d["isa"]), int(d["host_memory_bytes"])
        )


@dataclass(frozen=True)
class GPUInfo:
    index: int
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    pcie_gen: int | None
    pcie_width: int | None
    nvlink_links: int
    sm_clock_mhz: int | None
    memory_clock_mhz: int | None
    compute_capability: tuple[int, int] | None = None  # CUDA (major, minor); None: not known (older profiles)
    uuid: str | None = None  # NVML's UUID (GPU-... or, for a MIG slice, MIG-...); None: not known
    mig: bool = False  # a MIG slice of a card (memory is the slice's, where NVML reports it)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPUInfo:
        cc = d.get("compute_capability")
        return cls(**{**d, "compute_capability": None if cc is None else (int(cc[0]), int(cc[1]))})


@dataclass(frozen=True)
class LinkFit:
    """Alpha-beta model: time(n_bytes) = latency_s + n_bytes / bytes_per_s."""

    latency_s: float
    bytes_per_s: float

    def time_s(self, n_bytes: float) -> float:
        return self.latency_s + n_bytes / self.bytes_per_s

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinkFit:
        return cls(float(d["latency_s"]), float(d["bytes_per_s"]))


@dataclass(frozen=True)
class MatmulPoint:
    dtype: str
    m: int
    n: int
    k: int
    seconds: float
    flops_per_s: float

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MatmulPoint:
        return cls(**d)


def _fit_or_none(d: dict[str, Any] | None) -> LinkFit | None:
    return None if d is None else LinkFit.from_dict(d)


@dataclass(frozen=True)
class Calibration:
    device: str  # where compute ran: "cpu" or "cuda:0"
    matmul: tuple[MatmulPoint, ...]
    matmul_flops_per_s: dict[str, float]  # best per dtype; a dtype that failed to run is absent
    copy: dict[str, LinkFit]  # "h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable"; or "memcpy"
    p2p: LinkFit | None
    allreduce: LinkFit | None
    collective_world_size: int
    collective_backend: str
    optimizer_params_per_s: dict[str, float]  # "host" and "device"
    created: str
    # per-op fits of the tensor-parallel collectives ("all_gather", "reduce_scatter") as the TP layers run
    # them (asynchronous, issued in bursts), on collective_world_size ranks; n = the full tensor's bytes
    tp_collectives: dict[str, LinkFit] = field(default_factory=dict)
    tp_chunk_overhead_s: float | None = None  # host seconds one more chunk costs a chunked TP layer
    # torch intra-op threads the GEMM, copy and optimizer figures were measured with (None = not known); the
    # collective fits and tp_chunk_overhead_s come from launched ranks, one thread each, whatever this says
    threads: int | None = None
    quick: bool | None = None  # measured by calibrate(quick=True) (fewer sizes and repeats); None = not known
    # fingerprint of the code that measured it (sysopt.hardware.cache.calibrating_code); "" = unknown.
    # Not part of equality: it says which code measured the figures, not what they are
    code: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "matmul": [p.to_dict() for p in self.matmul],
            "matmul_flops_per_s": dict(self.matmul_flops_per_s),
            "copy": {k: v.to_dict() for k, v in self.copy.items()},
            "p2p": None if self.p2p is None else self.p2p.to_dict(),
            "allreduce": None if self.allreduce is None else self.allreduce.to_dict(),
            "collective_world_size": self.collective_world_size,
            "collective_backend": self.collective_backend,
            "optimizer_params_per_s": dict(self.optimizer_params_per_s),
            "created": self.created,
            "tp_collectives": {k: v.to_dict() for k, v in self.tp_collectives.items()},
            "tp_chunk_overhead_s": self.tp_chunk_overhead_s,
            "threads": self.threads,
            "quick": self.quick,
            "code": self.code,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(
            device=d["device"],
            matmul=tuple(MatmulPoint.from_dict(p) for p in d["matmul"]),
            matmul_flops_per_s={k: float(v) for k, v in d["matmul_flops_per_s"].items()},
            copy={k: LinkFit.from_dict(v) for k, v in d["copy"].items()},
            p2p=_fit_or_none(d["p2p"]),
            allreduce=_fit_or_none(d["allreduce"]),
            collective_world_size=int(d["collective_world_size"]),
            collective_backend=d["collective_backend"],
            optimizer_params_per_s={k: float(v) for k, v in d["optimizer_params_per_s"].items()},
            created=d["created"],
            tp_collectives={k: LinkFit.from_dict(v) for k, v in d.get("tp_collectives", {}).items()},
            tp_chunk_overhead_s=d.get("tp_chunk_overhead_s"),
            threads=None if d.get("threads") is None else int(d["threads"]),
            quick=d.get("quick"),
            code=d.get("code", ""),
        )


def _interpolated_rate(points: list[MatmulPoint], flops: float) -> float:
    """FLOP/s at `flops`, linear in log(flops) between measured points, held flat outside them."""
    by_size: dict[int, list[float]] = {}
    for p in points:
        by_size.setdefault(p.flops, []).append(p.flops_per_s)
    xs = sorted(by_size)
    rates = [sum(by_size[x]) / len(by_size[x]) for x in xs]
    if flops <= xs[0]:
        return rates[0]
    if flops >= xs[-1]:
        return rates[-1]
    for i in range(1, len(xs)):
        if flops <= xs[i]:
            t = (math.log(flops) - math.log(xs[i - 1])) / (math.log(xs[i]) - math.log(xs[i - 1]))
            return rates[i - 1] + t * (rates[i] - rates[i - 1])
    return rates[-1]  # unreachable


@dataclass(frozen=True)
class HardwareProfile:
    cpu: CPUInfo
    gpus: tuple[GPUInfo, ...]
    calibration: Calibration | None
    created: str

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu.to_dict(),
            "gpus": [g.to_dict() for g in self.gpus],
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HardwareProfile:
        cal = d.get("calibration")
        return cls(
            cpu=CPUInfo.from_dict(d["cpu"]),
            gpus=tuple(GPUInfo.from_dict(g) for g in d["gpus"]),
            calibration=None if cal is None else Calibration.from_dict(cal),
            created=d["created"],
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> HardwareProfile:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temporary file + rename) so a reader never sees half a file."""
        return write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> HardwareProfile:
        return cls.from_json(Path(path).read_text())

    # ---- cost-model queries -------------------------------------------------------------------
    def _cal(self, what: str) -> Calibration:
        if self.calibration is None:
            raise ValueError(
                f"{what} needs a calibrated HardwareProfile but calibration is None; "
                "use sysopt.hardware.load_or_calibrate() or calibrate(profile) first"
            )
        return self.calibration

    def matmul_time_s(self, m: int, n: int, k: int, dtype: str = "fp32") -> float:
        """Seconds for an (m x k) @ (k x n) matmul: 2mnk FLOPs at the rate measured near that size.

        The rate is interpolated in log(FLOPs) between calibrated shapes of `dtype` and held flat
        beyond them; a dtype that was not calibrated falls back to fp32."""
        cal = self._cal("matmul_time_s")
        if min(m, n, k) <= 0:
            raise ValueError(f"matmul_time_s(m={m}, n={n}, k={k}): all sizes must be positive")
        name = _DTYPE_ALIASES.get(dtype, dtype)
        if name not in cal.matmul_flops_per_s:
            name = "fp32"
        if name not in cal.matmul_flops_per_s:
            raise ValueError(
                f"matmul_time_s(dtype={dtype!r}): neither {dtype!r} nor fp32 was calibrated "
                f"(have {sorted(cal.matmul_flops_per_s)}); recalibrate with calibrate(refresh)"
            )
        flops = 2.0 * m * n * k
        points = [p for p in cal.matmul if p.dtype == name]
        rate = _interpolated_rate(points, flops) if points else cal.matmul_flops_per_s[name]
        return flops / rate

    def copy_time_s(self, nbytes: int, pinned: bool = True, direction: str = "h2d") -> float:
        """Seconds to move `nbytes` between host and device (`direction` "h2d" or "d2h");
        on a CPU-only profile this is a host memcpy."""
        cal = self._cal("copy_time_s")
        if direction not in ("h2d", "d2h"):
            raise ValueError(f"copy_time_s(direction={direction!r}): use 'h2d' or 'd2h'")
        key = f"{direction}_{'pinned' if pinned else 'pageable'}"
        fit = cal.copy.get(key) or cal.copy.get("memcpy")
        if fit is None:
            raise ValueError(
                f"copy_time_s: no {key!r} or 'memcpy' fit in calibration (have {sorted(cal.copy)})"
            )
        return fit.time_s(nbytes)

    def p2p_time_s(self, nbytes: int) -> float:
        return self._collective("p2p_time_s", self._cal("p2p_time_s").p2p).time_s(nbytes)

    def allreduce_time_s(self, nbytes: int) -> float:
        """All-reduce of `nbytes` per rank at the calibrated world size (collective_world_size)."""
        return self._collective("allreduce_time_s", self._cal("allreduce_time_s").allreduce).time_s(nbytes)

    def _collective(self, what: str, fit: LinkFit | None) -> LinkFit:
        if fit is None:
            raise ValueError(
                f"{what}: calibration has no collective fit (world_size < 2 or the launch failed); "
                "recalibrate with calibrate(world_size=2)"
            )
        return fit

    def optimizer_update_time_s(self, n_params: int, where: str = "host") -> float:
        cal = self._cal("optimizer_update_time_s")
        if where not in cal.optimizer_params_per_s:
            raise ValueError(
                f"optimizer_update_time_s(where={where!r}): not calibrated "
                f"(have {sorted(cal.optimizer_params_per_s)}); use 'host' or 'device'"
            )
        return n_params / cal.optimizer_params_per_s[where]
