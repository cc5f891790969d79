"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math


def warmup_cosine_lr(
    step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float
) -> float:
    """LR for optimizer step `step` (0-based): ramps over warmup_steps, then a half cosine to
    min_lr_ratio * lr at max_steps - 1."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
