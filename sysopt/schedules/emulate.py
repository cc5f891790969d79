"""Emulated-compute pipeline stages for schedule benchmarks on machines with few cores.

An ``EmulatedStage`` does a cheap elementwise op on a real activation and then sleeps out a set time
per forward (F), input-gradient (I) and weight-gradient (W) pass; sleeping uses no CPU, so several
ranks share two cores while real tensors move over real gloo. Its weight gradient is a deferrable
closure (``sysopt.schedules.wgrad``), so a split backward's W is a real deferred action.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from sysopt.schedules.wgrad import accumulate, defer, needs_grad


@dataclass(frozen=True)
class StageCost:
    """Seconds one microbatch spends in a stage: forward, input gradient (I), weight gradient (W);
    a full backward B costs ``input_s + weight_s``."""

    forward_s: float
    input_s: float
    weight_s: float

    @property
    def backward_s(self) -> float:
        return self.input_s + self.weight_s

    def to_dict(self) -> dict:
        return asdict(self)


def layer_costs_to_stages(
    boundaries: Sequence[int], forward_s: Sequence[float], input_s: Sequence[float], weight_s: Sequence[float]
) -> list[StageCost]:
    """Per-layer costs summed over each chunk ``boundaries[c]:boundaries[c+1]``."""
    return [
        StageCost(sum(forward_s[a:b]), sum(input_s[a:b]), sum(weight_s[a:b]))
        for a, b in zip(boundaries[:-1], boundaries[1:])
    ]


SPIN_S = 3e-4  # wake this early and spin to the deadline: sleep alone overshoots by ~0.1-1 ms


def _sleep_until(deadline: float) -> None:
    """Sleep (no CPU) to just before ``deadline``, then spin the last SPIN_S, as compute would end."""
    remaining = deadline - time.perf_counter()
    if remaining > SPIN_S:
        time.sleep(remaining - SPIN_S)
    while time.perf_counter() < deadline:
        pass


class _EmulatedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, owner):
        start = time.perf_counter()
        ctx.save_for_backward(x, weight)
        ctx.owner, ctx.input_done = owner, False
        y = x * weight
        _sleep_until(start + owner.cost.forward_s)  # the op counts as part of the forward's time
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        owner = ctx.owner
        if not ctx.input_done:  # the backward through the stage's layers (I), paid once per microbatch
            ctx.input_done = True  # even on stage 0, whose input needs no gradient
            start = time.perf_counter()
            ctx.grad_x = grad_out * weight if needs_grad(ctx, 0) else None
            _sleep_until(start + owner.cost.input_s)
        grad_x = ctx.grad_x if needs_grad(ctx, 0) else None
        if not needs_grad(ctx, 1):
            return grad_x, None, None

        def weight_grad() -> torch.Tensor:
            start = time.perf_counter()
            grad_w = (grad_out * x).reshape(-1, x.shape[-1]).sum(0)
            _sleep_until(start + owner.cost.weight_s)
            return grad_w

        if defer(lambda: accumulate([owner.weight], [weight_grad()])):
            return grad_x, None, None
        return grad_x, weight_grad(), None


class EmulatedStage(nn.Module):
    """forward(x) = x * weight (weight: one value per feature), taking ``cost`` seconds per pass."""

    defers_weight_grad = True

    def __init__(self, cost: StageCost, features: int) -> None:
        super().__init__()
        self.cost = cost
        self.weight = nn.Parameter(torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if not x.requires_grad else x.view_as(x)  # a non-leaf edge the engine can be asked about
        return _EmulatedFn.apply(x, self.weight.view_as(self.weight), self)
