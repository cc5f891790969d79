"""Training-image augmentation: a small random affine warp (shift, rotation, scale) per image view,
drawn from a seeded generator so a step's batch is the same in every process."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def random_affine(
    images: torch.Tensor, rng: np.random.Generator, shift_px: float, rotate_deg: float, scale: float
) -> torch.Tensor:
    """Warp each image [N, H, W] (background 0) by a uniform random shift in [-shift_px, shift_px] pixels
    per axis, rotation in [-rotate_deg, rotate_deg] and zoom in [1 - scale, 1 + scale], bilinearly."""
    n, h, w = images.shape
    shift, angle, zoom = rng.uniform(-1.0, 1.0, size=(3, n, 2))
    angle = torch.as_tensor(angle[:, 0] * rotate_deg * math.pi / 180.0, dtype=torch.float32)
    zoom = torch.as_tensor(1.0 + zoom[:, 0] * scale, dtype=torch.float32)
    # affine_grid maps output to input coordinates in [-1, 1]: one pixel is 2 / size
    offset = torch.as_tensor(shift * shift_px, dtype=torch.float32) * torch.tensor([2.0 / w, 2.0 / h])
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    return F.grid_sample(images[:, None], grid, align_corners=False, padding_mode="zeros")[:, 0]
