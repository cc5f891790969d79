"""What one device does besides its pipeline actions, as plain functions: the activation memory its
schedule holds at peak, the DP gradient all-reduce left exposed after backward, and the offload subgroups
its parameters form."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sysopt.hardware.profile import HardwareProfile
from sysopt.offload.subgroups import Subgroup
from sysopt.schedules import Schedule
from sysopt.schedules.ir import B, F, I, W
from sysopt.tensor_parallel.chunk_model import collective_time_s

DP_BUCKET_BYTES = 1 << 20  # sysopt.dist.BucketedGradSync's default


def peak_activation_bytes(
    schedule: Schedule,
    rank: int,
    stage_bytes: Mapping[int, int],
    boundary_bytes: Mapping[int, int] | None = None,
) -> int:
    """Most activation bytes `rank` holds: + a stage's bytes at each F, - at the B or W that frees them
    (the simulator's peak_activations rule, weighted by each stage's bytes per microbatch).

    With `boundary_bytes` (bytes of the tensor leaving each stage, one microbatch) every receive of the
    step is posted at its start, as the trainer does on gloo (schedule.receive_ahead=null): each buffer is
    alive from the start until the F (activation) or B/I (gradient) that consumes it."""
    owner = schedule.stage_to_rank
    last = len(owner) - 1

    def received(action) -> int:  # bytes of the buffer this compute action consumes from another rank
        if boundary_bytes is None:
            return 0
        if action.kind is F and action.stage > 0 and owner[action.stage - 1] != rank:
            return boundary_bytes[action.stage - 1]
        if action.kind in (B, I) and action.stage < last and owner[action.stage + 1] != rank:
            return boundary_bytes[action.stage]
        return 0

    live = peak = sum(received(a) for a in schedule.actions[rank])
    for action in schedule.actions[rank]:
        live -= received(action)
        if action.kind is F:
            live += stage_bytes[action.stage]
            peak = max(peak, live)
        elif action.kind in (B, W):
            live -= stage_bytes[action.stage]
    return peak


def dp_exposed_s(
    profile: HardwareProfile, grad_bytes: int, window_s: float, dp: int, bucket_bytes: int = DP_BUCKET_BYTES
) -> float:
    """Bucketed all-reduce of `grad_bytes` over `dp` ranks: buckets fill evenly over the last backward
    (`window_s`) and reduce one at a time as they fill; the time past the end of backward is exposed."""
    if dp == 1 or grad_bytes == 0:
        return 0.0
    sizes = [bucket_bytes] * (grad_bytes // bucket_bytes)
    if grad_bytes % bucket_bytes:
        sizes.append(grad_bytes % bucket_bytes)
    link_free_s, done = 0.0, 0
    for size in sizes:
        done += size
        ready_s = window_s * done / grad_bytes
        link_free_s = max(link_free_s, ready_s) + collective_time_s(profile, "all_reduce", size, dp)
    return max(0.0, link_free_s - window_s)


def offload_subgroups(
    params_in_ready_order: Sequence[int], itemsize: int, subgroup_bytes: int
) -> tuple[Subgroup, ...]:
    """Offload subgroups of about `subgroup_bytes` of device optimizer state, cut from per-layer parameter
    counts given in the order backward finishes them (what sysopt.offload.partition does per tensor)."""
    device_per_param = 8 + (0 if itemsize == 4 else 4)  # fp32 moments (+ an fp32 master for 16-bit params)
    host_per_param = 8 + 4 + itemsize  # moments, fp32 master, gradient staging buffer
    limit = max(1, subgroup_bytes // device_per_param)
    pieces, current = [], 0
    for n in params_in_ready_order:
        while n > 0:
            take = min(n, limit - current)
            current += take
            n -= take
            if current == limit:
                pieces.append(current)
                current = 0
    if current:
        pieces.append(current)
    return tuple(
        Subgroup(i, 0, (i,), n, n * itemsize, n * itemsize, n * device_per_param, n * host_per_param)
        for i, n in enumerate(pieces)
    )
