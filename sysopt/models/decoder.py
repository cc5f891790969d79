"""Pre-norm transformer blocks over [sequence, batch, hidden] activations (Megatron's layout): the GPT
decoder uses them causally, the vision encoder bidirectionally."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def packed_causal_mask(batch) -> torch.Tensor | None:
    """Attention mask [B, 1, T, T] (True = may attend) for a batch of packed rows: causal and within one
    sample (block-diagonal); None for unpacked batches, where plain causal attention is exact."""
    segments = getattr(batch, "segment_ids", None)
    if segments is None:
        return None
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    return ((segments.unsqueeze(2) == segments.unsqueeze(1)) & causal).unsqueeze(1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, batch) -> torch.Tensor:
    """Scaled dot-product attention of [B, heads, S, head_dim] tensors; a causal layer given a packed
    batch attends block-diagonally (see packed_causal_mask)."""
    mask = packed_causal_mask(batch) if causal else None
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class SelfAttention(nn.Module):
    """Multi-head self-attention on x [S, B, D] with torch's scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden dim={dim} is not divisible by heads={heads}; pick heads dividing {dim}")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, batch=None) -> torch.Tensor:
        seq, rows, dim = x.shape
        # [S, B, 3D] -> 3 x [B, heads, S, head_dim]
        q, k, v = self.qkv(x).view(seq, rows, 3, self.heads, dim // self.heads).permute(2, 1, 3, 0, 4)
        y = attend(q, k, v, self.causal, batch)
        return self.proj(y.permute(2, 0, 1, 3).reshape(seq, rows, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class TransformerBlock(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x)); forward(x, batch) so it sits in the VLM's block list."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, causal: bool) -> None:
        super().__init__()
        self.ln_attn, self.attn = nn.LayerNorm(dim), SelfAttention(dim, heads, causal)
        self.ln_mlp, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor, batch=None) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), batch)
        return x + self.mlp(self.ln_mlp(x))


def DecoderBlock(dim: int, heads: int, mlp_ratio: int) -> TransformerBlock:  # noqa: N802 (a block "class")
    """A GPT block: causal self-attention + MLP over [S, B, D]."""
    return TransformerBlock(dim, heads, mlp_ratio, causal=True)


class LMHead(nn.Module):
    """Final LayerNorm + vocabulary projection; returns logits in [B, T, vocab] to match the batch."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, x: torch.Tensor, batch=None) -> torch.Tensor:
        return self.head(self.ln(x)).transpose(0, 1)
