"""The vision tower: 8x8 images cut into square patches, embedded as tokens, mixed by bidirectional
transformer blocks. Activations are [patches, images, hidden], the decoder's layout."""

from __future__ import annotations

import torch
from torch import nn

from sysopt.models.decoder import TransformerBlock


class VisionEmbed(nn.Module):
    """Reads batch.images [N, H, W] (ignores x) and returns patch embeddings [P, N, vision_dim]."""

    def __init__(self, image_size: int, patch_size: int, dim: int) -> None:
        super().__init__()
        if not 1 <= patch_size <= image_size:
            raise ValueError(f"patch_size={patch_size} must lie in [1, image_size={image_size}], e.g. 2 or 4")
        if image_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide image_size={image_size}, e.g. 2 or 4")
        self.image_size, self.patch_size = image_size, patch_size
        self.n_patches = (image_size // patch_size) ** 2
        self.patch = nn.Linear(patch_size * patch_size, dim)
        self.pos = nn.Parameter(torch.zeros(self.n_patches, 1, dim))

    def forward(self, x: torch.Tensor | None, batch) -> torch.Tensor:
        images, p = batch.images, self.patch_size
        n, h, w = images.shape
        if h != self.image_size or w != self.image_size:  # the positions would broadcast over wrong patches
            raise ValueError(
                f"images are {h}x{w} but model.image_size={self.image_size}; set model.image_size={h} "
                f"(the positional table has one row per {p}x{p} patch of a square image)"
            )
        # [N, H, W] -> [N, H/p, p, W/p, p] -> [H/p, W/p, N, p, p] -> [P, N, p*p], patches in raster order
        patches = images.reshape(n, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape(-1, n, p * p)
        return self.patch(patches) + self.pos


def ViTBlock(dim: int, heads: int, mlp_ratio: int) -> TransformerBlock:  # noqa: N802 (a block "class")
    """A ViT block: bidirectional self-attention over an image's patches + MLP, on [P, N, D]."""
    return TransformerBlock(dim, heads, mlp_ratio, causal=False)
