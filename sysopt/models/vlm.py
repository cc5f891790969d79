"""The small vision-language model: patch ViT -> MLP projector -> GPT decoder, written as one ordered
list of blocks, each forward(x, batch) -> x, so it can be cut into pipeline stages at any boundary."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sysopt.data.tokenizer import VOCAB
from sysopt.models.decoder import MLP, DecoderBlock, LMHead
from sysopt.models.vision import VisionEmbed, ViTBlock


@dataclass(frozen=True)
class VLMConfig:
    """Model shape. tokens_per_image must match the data's (1: mean-pooled patches; else one per patch)."""

    vocab_size: int = len(VOCAB)
    image_size: int = 8
    patch_size: int = 4
    vision_dim: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    tokens_per_image: int = 1
    dim: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    max_seq: int = 32
    init_std: float = 0.1  # linear and embedding weights ~ N(0, init_std); biases and positions start at 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.patch_size <= self.image_size:
            raise ValueError(
                f"patch_size={self.patch_size} must lie in [1, image_size={self.image_size}] and divide it, e.g. 4"
            )
        n_patches = (self.image_size // self.patch_size) ** 2
        if self.tokens_per_image not in (1, n_patches):
            raise ValueError(
                f"tokens_per_image={self.tokens_per_image} must be 1 (pooled) or {n_patches} (one per "
                f"{self.patch_size}x{self.patch_size} patch of a {self.image_size}x{self.image_size} image)"
            )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> VLMConfig:
        return cls(**json.loads(text))


class ImageTextMerge(nn.Module):
    """Projects image features [P, N, vision_dim] into the decoder width, embeds batch.tokens, puts each
    image embedding at its batch.image_slots position, adds positions (batch.position_ids when rows are
    packed, else 0..T-1); returns [T, B, dim]."""

    def __init__(self, config: VLMConfig) -> None:
        super().__init__()
        self.pool = config.tokens_per_image == 1
        self.ln = nn.LayerNorm(config.vision_dim)
        self.project = nn.Linear(config.vision_dim, config.dim)
        self.project_mlp = MLP(config.dim, config.dim)
        self.token_embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embed = nn.Parameter(torch.zeros(config.max_seq, 1, config.dim))

    def forward(self, x: torch.Tensor, batch) -> torch.Tensor:
        if self.pool:
            x = x.mean(0, keepdim=True)
        x = self.project(self.ln(x))
        image_tokens = (x + self.project_mlp(x)).transpose(0, 1).reshape(-1, x.shape[-1])  # [N * k, dim]
        slots = batch.image_slots.t()  # [T, B]
        if not slots.is_cuda:  # free on the host; on a GPU it would sync every forward (the trainer's config
            # check, data.tokens_per_image == model.tokens_per_image, covers that case)
            self._check_slots(int((slots >= 0).sum()), image_tokens.shape[0])
        h = self.token_embed(batch.tokens.t())
        if image_tokens.shape[0]:
            h = torch.where((slots >= 0).unsqueeze(-1), image_tokens[slots.clamp(min=0)], h)
        if getattr(batch, "position_ids", None) is not None:  # packed rows: positions restart per sample
            return h + self.pos_embed[:, 0][batch.position_ids.t()]
        return h + self.pos_embed[: h.shape[0]]

    def _check_slots(self, slots: int, image_tokens: int) -> None:
        if slots != image_tokens:
            per_image = "1 (pooled)" if self.pool else "one per patch"
            raise ValueError(
                f"the batch has {slots} image slots for {image_tokens} image tokens (the model makes {per_image} "
                "per image): data.tokens_per_image must equal model.tokens_per_image"
            )


class VLM(nn.Module):
    """blocks = [VisionEmbed, ViTBlock x vision_layers, ImageTextMerge, DecoderBlock x layers, LMHead]."""

    def __init__(self, config: VLMConfig) -> None:
        super().__init__()
        self.config = c = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.blocks = nn.ModuleList(
                [VisionEmbed(c.image_size, c.patch_size, c.vision_dim)]
                + [ViTBlock(c.vision_dim, c.vision_heads, c.mlp_ratio) for _ in range(c.vision_layers)]
                + [ImageTextMerge(c)]
                + [DecoderBlock(c.dim, c.heads, c.mlp_ratio) for _ in range(c.layers)]
                + [LMHead(c.dim, c.vocab_size)]
            )
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=c.init_std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, batch) -> torch.Tensor:
        """Logits [B, T, vocab] for batch.tokens, each position predicting the next token."""
        if batch.tokens.shape[1] > self.config.max_seq:
            raise ValueError(
                f"sequence length {batch.tokens.shape[1]} exceeds max_seq={self.config.max_seq}; raise "
                f"model.max_seq to {batch.tokens.shape[1]}, or shorten the rows (data.pack_len, "
                "data.max_relation_images)"
            )
        x = None
        for block in self.blocks:
            x = block(x, batch)
        return x

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def vlm_loss(logits: torch.Tensor, batch, normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Sum of cross-entropy over answer tokens (batch.loss_mask) / normalizer (default: their count).

    Data-parallel ranks pass the GLOBAL batch's answer count and sum-reduce gradients: that equals
    single-process training on the global batch exactly."""
    per_token = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none")
    total = (per_token * batch.loss_mask.flatten()).sum()
    if normalizer is None:
        normalizer = batch.loss_mask.sum().clamp(min=1.0)
    return total / normalizer
