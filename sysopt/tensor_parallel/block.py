"""A tensor-parallel pre-norm GPT block over [S, B, H]: x + attn(ln(x)), then x + mlp(ln(x)), with
attention heads and MLP columns split across tp. With sequence parallelism the block takes and
returns this rank's sequence shard, and the layernorms and residuals run on that shard."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sysopt.models.decoder import attend
from sysopt.tensor_parallel import comm
from sysopt.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from sysopt.tensor_parallel.mappings import copy_to_tensor_parallel_region
from sysopt.tensor_parallel.overlap import OverlapPolicy


def _qkv_rank_major(qkv: nn.Linear, tp: int) -> nn.Linear:
    """The dense [Q; K; V] projection with rows reordered [Q_0 K_0 V_0 | Q_1 K_1 V_1 | ...] so that
    rank r's contiguous column-parallel shard holds the q, k, v rows of its own heads."""
    dim = qkv.in_features
    out = nn.Linear.__new__(nn.Linear)  # built from tensors: no RNG draw, no meta-device machinery
    nn.Module.__init__(out)
    out.in_features, out.out_features = dim, 3 * dim
    weight = qkv.weight.detach().view(3, tp, dim // tp, dim).transpose(0, 1).reshape(3 * dim, dim)
    out.weight = nn.Parameter(weight, requires_grad=qkv.weight.requires_grad)
    bias = (
        None
        if qkv.bias is None
        else qkv.bias.detach().view(3, tp, dim // tp).transpose(0, 1).reshape(3 * dim)
    )
    out.bias = None if bias is None else nn.Parameter(bias, requires_grad=qkv.bias.requires_grad)
    return out


class TensorParallelBlock(nn.Module):
    """Causal (or bidirectional) self-attention + GELU MLP, sharded over `group`.

    Initialised from the current RNG state exactly as sysopt.models.TransformerBlock (qkv, proj,
    fc, fc2 in that order), so with the same seed on every rank it equals that dense block.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: int = 4,
        *,
        causal: bool = True,
        group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
        overlap: str | OverlapPolicy = "none",
    ) -> None:
        super().__init__()
        dense = [
            nn.Linear(dim, 3 * dim),
            nn.Linear(dim, dim),
            nn.Linear(dim, mlp_ratio * dim),
            nn.Linear(mlp_ratio * dim, dim),
        ]
        self._build(
            dim,
            heads,
            causal,
            nn.LayerNorm(dim),
            nn.LayerNorm(dim),
            *dense,
            group,
            sequence_parallel,
            overlap,
        )

    @classmethod
    def from_dense(
        cls,
        block: nn.Module,
        *,
        group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
        overlap: str | OverlapPolicy = "none",
    ) -> TensorParallelBlock:
        """Shard a dense block shaped like sysopt.models.TransformerBlock: ln_attn, attn.qkv ([Q; K; V]
        rows), attn.proj, attn.heads, attn.causal, ln_mlp, mlp.fc, mlp.proj."""
        attn, mlp = block.attn, block.mlp
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._build(
            attn.qkv.in_features, attn.heads, attn.causal, block.ln_attn, block.ln_mlp,
            attn.qkv, attn.proj, mlp.fc, mlp.proj, group, sequence_parallel, overlap,
        )  # fmt: skip
        return layer

    def _build(
        self, dim, heads, causal, ln_attn, ln_mlp, qkv, proj, fc, fc2, group, sequence_parallel, overlap
    ):
        tp = comm.group_size(group)
        if dim % heads or heads % tp:
            raise ValueError(
                f"TensorParallelBlock: need hidden dim={dim} divisible by heads={heads} and heads divisible "
                f"by tp={tp}; pick heads as a multiple of {tp} dividing {dim}"
            )
        self.group, self.sequence_parallel, self.causal = group, bool(sequence_parallel), causal
        self.local_heads, self.head_dim = heads // tp, dim // heads
        self.ln_attn, self.ln_mlp = _copy_norm(ln_attn), _copy_norm(ln_mlp)
        kw = dict(group=group, sequence_parallel=sequence_parallel, overlap=overlap)
        self.qkv = ColumnParallelLinear.from_dense(_qkv_rank_major(qkv, tp), **kw)
        self.proj = RowParallelLinear.from_dense(proj, **kw)
        self.fc = ColumnParallelLinear.from_dense(fc, **kw)
        self.fc2 = RowParallelLinear.from_dense(fc2, **kw)

    def _norm(self, ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        weight, bias = ln.weight, ln.bias
        if self.sequence_parallel:  # each rank sees part of the sequence: sum the parameter grads
            weight = copy_to_tensor_parallel_region(weight, self.group)
            bias = copy_to_tensor_parallel_region(bias, self.group)
        return F.layer_norm(x, ln.normalized_shape, weight, bias, ln.eps)

    def _attention(self, h: torch.Tensor, batch=None) -> torch.Tensor:
        qkv = self.qkv(h)  # [S, B, 3 * local_heads * head_dim]
        seq, rows = qkv.shape[:2]
        q, k, v = qkv.view(seq, rows, 3, self.local_heads, self.head_dim).permute(2, 1, 3, 0, 4)
        y = attend(q, k, v, self.causal, batch)  # [B, heads, S, head_dim]
        return self.proj(y.permute(2, 0, 1, 3).reshape(seq, rows, self.local_heads * self.head_dim))

    def forward(self, x: torch.Tensor, batch=None) -> torch.Tensor:
        x = x + self._attention(self._norm(self.ln_attn, x), batch)
        return x + self.fc2(F.gelu(self.fc(self._norm(self.ln_mlp, x))))


def _copy_norm(ln: nn.LayerNorm) -> nn.LayerNorm:
    """A copy (not shared with the dense block) keeping dtype, device and requires_grad, without the dense
    block's gradients."""
    out = copy.deepcopy(ln)
    for p in out.parameters():
        p.grad = None
    return out
