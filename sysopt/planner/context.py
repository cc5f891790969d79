"""What the planner plans for: the workload (model, batch), the machine (profile, devices, memory) and
the planner's own calibration (per-layer overhead fitted to one measured run), each a frozen dataclass."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sysopt.hardware.profile import HardwareProfile, write_text_atomic
from sysopt.kernels.dispatch import BACKENDS as KERNEL_BACKENDS
from sysopt.models import VLMConfig
from sysopt.planner.layer_times import LayerTimes
from sysopt.planner.workload import BatchShape, images_per_sequence

NOMINAL_GPU_MEMORY_BYTES_PER_S = 2.0e12  # HBM3 achieved bandwidth, H100-class (assumed, not measured)
NOMINAL_CPU_MEMORY_BYTES_PER_S = 2.0e10  # when a CPU profile lacks a memcpy fit


@dataclass(frozen=True)
class Workload:
    """The model and the global batch of `global_batch` training rows ("sequences") of `seq_len` tokens
    showing `images_per_sequence` images each on average. A row holds one sample, or with packing
    (data.pack_len) `samples_per_row` samples on average."""

    model: VLMConfig
    global_batch: int
    seq_len: int
    images_per_sequence: float
    samples_per_row: float = 1.0

    @classmethod
    def from_data(cls, model: VLMConfig, data, global_batch: int) -> Workload:
        """From a DigitsTaskConfig (sysopt.data) and the global batch: rows of data.seq_len tokens, one
        sample each; with data.pack_len > 0, rows of pack_len tokens holding the samples (and their images)
        sysopt.data's packing puts there (sysopt.data.batching.expected_packing)."""
        if data.pack_len:
            from sysopt.data.batching import expected_packing

            samples, images = expected_packing(data)
            return cls(model, global_batch, data.pack_len, images, samples)
        return cls(model, global_batch, data.seq_len, images_per_sequence(data))

    def microbatch(self, sequences: int) -> BatchShape:
        return BatchShape(sequences, self.seq_len, max(1, round(sequences * self.images_per_sequence)))

    def key(self) -> str:
        """A fingerprint of what sets the blocks' costs: the model config and the rows (tokens, images and
        samples per row). A planner fit (its measured block times) holds for one key."""
        rows = {
            "seq_len": self.seq_len,
            "images_per_sequence": round(self.images_per_sequence, 6),
            "samples_per_row": round(self.samples_per_row, 6),
        }
        text = json.dumps({"model": asdict(self.model), **rows}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model": asdict(self.model)}


@dataclass(frozen=True)
class Machine:
    """`devices` ranks, each with `memory_bytes`. On a CPU-only profile a device is one core (one rank
    at one thread) sharing host memory evenly; on a GPU profile a device is one GPU."""

    profile: HardwareProfile
    devices: int
    memory_bytes: int
    host_memory_bytes: int
    on_gpu: bool
    # the kernel backend low-precision linears run on (sysopt.kernels.dispatch.BACKENDS): it sets their op
    # counts. from_profile assumes Triton on GPUs and the fused C++ kernels on CPUs; callers that know (the
    # CLI asks sysopt.kernels.dispatch.backend_for) pass it.
    kernel_backend: str = "torch"

    @property
    def high(self) -> str:
        """The training dtype's matmul rate name: bf16 on GPUs, fp32 on CPUs."""
        return "bf16" if self.on_gpu else "fp32"

    @property
    def param_itemsize(self) -> int:
        return 2 if self.on_gpu else 4

    @property
    def memory_touch_bytes_per_s(self) -> float:
        """Bytes per second memory-bound ops read plus write: twice the calibrated memcpy rate on a CPU
        (a copy of n bytes touches 2n); GPU profiles carry no HBM figure, so a nominal H100-class 2 TB/s."""
        cal = self.profile.calibration
        if not self.on_gpu and cal is not None and "memcpy" in cal.copy:
            return 2 * cal.copy["memcpy"].bytes_per_s
        return NOMINAL_GPU_MEMORY_BYTES_PER_S if self.on_gpu else NOMINAL_CPU_MEMORY_BYTES_PER_S

    @classmethod
    def from_profile(
        cls, profile: HardwareProfile, devices: int | None = None, kernel_backend: str | None = None
    ) -> Machine:
        if devices is not None and devices < 1:  # 0 would otherwise read as "not given": every device
            raise ValueError(
                f"devices={devices} must be >= 1; pass None (or leave it out) for every GPU or CPU core"
            )
        cal = profile.calibration
        on_gpu = bool(profile.gpus) and (cal is None or str(cal.device).startswith("cuda"))
        if on_gpu:
            count = devices if devices is not None else len(profile.gpus)
            memory = min(g.memory_total_bytes for g in profile.gpus)
        else:
            count = devices if devices is not None else profile.cpu.cores
            memory = profile.cpu.host_memory_bytes // count
        if count < 1:
            raise ValueError(f"devices={count} must be >= 1")
        backend = kernel_backend or ("triton" if on_gpu else "cpp")
        if backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend={backend!r} must be one of {KERNEL_BACKENDS}")
        return cls(profile, count, memory, profile.cpu.host_memory_bytes, on_gpu, backend)


@dataclass(frozen=True)
class PlannerCalibration:
    """Terms the profile does not measure, fitted once to a measured training run.

    A layer's forward + backward costs `gemm_scale` x its modelled GEMM time (x3) plus `op_overhead_s`
    for each torch op it dispatches (launch, dispatch, Python: Layer.ops, more in low precision), so its
    overhead grows with its op count and with every microbatch; `action_overhead_s` is paid by every
    forward, input-gradient and weight-gradient action of every stage. `step_overhead_s` is added once per step
    (data, gradient clipping). `source` says what the numbers were fitted to."""

    op_overhead_s: float = 0.0
    gemm_scale: float = 1.0
    step_overhead_s: float = 0.0
    # fixed cost of each forward / backward action of each (stage, microbatch): the executor's dispatch,
    # posting and completing its messages, the hop latency a profile's p2p fit does not see
    action_overhead_s: float = 0.0
    # rank time per point-to-point message a stage's forward or backward sends or receives across ranks
    # (posting, matching and completing an isend/irecv between busy processes; the p2p fit is the wire)
    message_overhead_s: float = 0.0
    # latency of each cross-rank message beyond the profile's p2p fit (the receiver waits for it; other work
    # on the rank, e.g. a zero-bubble schedule's W, can hide it, unlike message_overhead_s)
    hop_latency_s: float = 0.0
    # per parameter tensor whose optimizer state lives on the host, per step: the offloading optimizer's
    # gradient hook, copy submissions and waits, which the profile's copy and update rates do not see
    host_tensor_overhead_s: float = 0.0
    source: str = "uncalibrated"
    profile_created: str = ""  # the HardwareProfile (its `created`) the fit was made against
    workload_key: str = ""  # the Workload (its key(): model and rows) the fit was made for; "" = unknown
    # precision.min_features the fit's low-precision block times were measured with (which linears were
    # converted); None = unknown
    min_features: int | None = None
    # measured per-block forward/backward seconds: where they cover a case, the model uses them instead
    # of GEMM rates and op counts (gemm_scale and op_overhead_s then apply only to uncovered cases)
    layer_times: LayerTimes | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_times"] = None if self.layer_times is None else self.layer_times.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlannerCalibration:
        """From to_dict's output; terms this version does not know (a cached fit from another version) are
        dropped, so such a file still loads (sysopt-plan --fit refits)."""
        known = {f.name for f in dataclasses.fields(cls)}
        times = d.get("layer_times")
        kept = {k: v for k, v in d.items() if k in known}
        return cls(**{**kept, "layer_times": None if times is None else LayerTimes.from_dict(times)})

    def save(self, path: str | os.PathLike) -> Path:
        """Atomically: a --fit killed while writing leaves the previous fit, not half a file."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PlannerCalibration:
        return cls.from_dict(json.loads(Path(path).read_text()))
