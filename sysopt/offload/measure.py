"""Running measurements of phase times, copy bandwidths and update rates, and the drift test that tells
the interleaved strategy to re-plan."""

from __future__ import annotations

from dataclasses import replace

from sysopt.offload.costs import CostInputs
from sysopt.offload.placement import PhaseTimes

RATE_KEYS = ("d2h_bytes_per_s", "h2d_bytes_per_s", "host_params_per_s", "device_params_per_s")
PHASE_KEYS = ("forward_s", "backward_s")


def relative_change(old: float, new: float) -> float:
    """|old - new| relative to the larger of the two (so 0 -> anything positive is a change of 1)."""
    scale = max(abs(old), abs(new))
    return 0.0 if scale == 0 else abs(old - new) / scale


class Measurements:
    """Exponential moving averages of what the optimizer measures (or is told) while it runs."""

    def __init__(self, smoothing: float = 0.5) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing={smoothing} must be in (0, 1]")
        self.smoothing = smoothing
        self.values: dict[str, float] = {}

    def add(self, key: str, value: float) -> None:
        if key not in RATE_KEYS + PHASE_KEYS:
            raise KeyError(f"unknown measurement {key!r}; use one of {RATE_KEYS + PHASE_KEYS}")
        old = self.values.get(key)
        self.values[key] = value if old is None else old + self.smoothing * (value - old)

    def set(self, key: str, value: float) -> None:
        self.values.pop(key, None)
        self.add(key, value)

    def costs(self, base: CostInputs) -> CostInputs:
        rates = {k: self.values[k] for k in RATE_KEYS if k in self.values and self.values[k] > 0}
        return base.with_rates(**rates) if rates else base

    def phases(self, base: PhaseTimes) -> PhaseTimes:
        return replace(base, **{k: self.values[k] for k in PHASE_KEYS if k in self.values})


def drifted(
    old_costs: CostInputs,
    old_phases: PhaseTimes,
    new_costs: CostInputs,
    new_phases: PhaseTimes,
    tolerance: float,
) -> list[str]:
    """Names of the model inputs whose relative change exceeds `tolerance`."""
    pairs = [(k, getattr(old_costs, k), getattr(new_costs, k)) for k in RATE_KEYS]
    pairs += [(k, getattr(old_phases, k), getattr(new_phases, k)) for k in PHASE_KEYS]
    return [k for k, a, b in pairs if relative_change(a, b) > tolerance]
