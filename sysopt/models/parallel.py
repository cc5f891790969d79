"""The VLM for tensor and pipeline parallelism: TP decoder blocks, sequence-parallel entry/exit blocks,
pipeline chunks of consecutive blocks, and the shape of the tensor leaving each block.

The vision tower, projector and LM head stay replicated across tensor-parallel ranks (they are small);
the decoder blocks are sharded. With sequence parallelism the decoder runs on sequence shards between
a scatter block placed after the image-text merge and a gather block placed before the head.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sysopt.models.decoder import LMHead
from sysopt.models.vision import VisionEmbed
from sysopt.models.vlm import VLM, ImageTextMerge
from sysopt.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelBlock,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)


class SequenceScatter(nn.Module):
    """[T, B, H] -> this rank's sequence shard [T/tp, B, H] (backward: all-gather)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor, batch=None) -> torch.Tensor:
        return scatter_to_sequence_parallel_region(x, self.group)


class SequenceGather(nn.Module):
    """This rank's shard [T/tp, B, H] -> the full sequence [T, B, H] (backward: keep own shard)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor, batch=None) -> torch.Tensor:
        return gather_from_sequence_parallel_region(x, self.group)


def block_count(config, *, tp: int = 1, sequence_parallel: bool = True) -> int:
    """Blocks of the VLM of `config` as the pipeline cuts them: the vision embed, vision_layers ViT blocks,
    the merge, layers decoder blocks and the head, plus the sequence scatter and gather blocks that
    `tensor_parallelize` adds when tp > 1 with sequence parallelism."""
    scatter_gather = 2 if tp > 1 and sequence_parallel else 0
    return config.vision_layers + config.layers + 3 + scatter_gather


def tensor_parallelize(
    model: VLM,
    group: dist.ProcessGroup | None,
    *,
    sequence_parallel: bool = True,
    overlap: str = "none",
) -> VLM:
    """Shard the decoder blocks of `model` over `group` in place (the dense weights must be identical
    on every rank, as they are when every rank builds the VLM from the same seed)."""
    blocks = list(model.blocks)
    merge = next(i for i, b in enumerate(blocks) if isinstance(b, ImageTextMerge))
    head = next(i for i, b in enumerate(blocks) if isinstance(b, LMHead))
    decoder = [
        TensorParallelBlock.from_dense(b, group=group, sequence_parallel=sequence_parallel, overlap=overlap)
        for b in blocks[merge + 1 : head]
    ]
    for block in decoder:  # mark shards, so a global gradient norm counts replicated tensors once
        for layer in block.modules():
            if isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
                layer.weight.tensor_parallel_shard = True
                if isinstance(layer, ColumnParallelLinear) and layer.bias is not None:
                    layer.bias.tensor_parallel_shard = True
    middle = [SequenceScatter(group), *decoder, SequenceGather(group)] if sequence_parallel else decoder
    model.blocks = nn.ModuleList(blocks[: merge + 1] + middle + blocks[head:])
    return model


def block_output_shape(model: VLM, index: int, batch, tp: int = 1) -> tuple[int, ...]:
    """Shape of the tensor block `index` of `model` returns for `batch` (what a pipeline sends)."""
    c = model.config
    blocks = list(model.blocks)
    n_images = batch.images.shape[0]
    n_tokens, n_seq = batch.tokens.shape[1], batch.tokens.shape[0]
    if isinstance(blocks[index], LMHead):
        return (n_seq, n_tokens, c.vocab_size)
    merge = next(i for i, b in enumerate(blocks) if isinstance(b, ImageTextMerge))
    if index < merge:  # vision tower: [patches, images, vision_dim]
        first = blocks[0]
        assert isinstance(first, VisionEmbed)
        return (first.n_patches, n_images, c.vision_dim)
    scattered = any(isinstance(b, SequenceScatter) for b in blocks[merge + 1 : index + 1]) and not any(
        isinstance(b, SequenceGather) for b in blocks[merge + 1 : index + 1]
    )
    return (n_tokens // tp if scattered else n_tokens, n_seq, c.dim)


class StageChunk(nn.Module):
    """Consecutive blocks of the VLM run as one pipeline stage: forward(x, batch) -> x."""

    def __init__(self, blocks: list[nn.Module], first_index: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.first_index = first_index

    def forward(self, x: torch.Tensor | None, batch) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, batch)
        return x


def split_into_stages(model: VLM, boundaries: list[int] | tuple[int, ...]) -> list[StageChunk]:
    """Cut model.blocks at `boundaries` ([0, b1, ..., len(blocks)]) into len(boundaries) - 1 chunks."""
    blocks = list(model.blocks)
    if boundaries[0] != 0 or boundaries[-1] != len(blocks) or list(boundaries) != sorted(set(boundaries)):
        raise ValueError(
            f"boundaries={list(boundaries)} must rise strictly from 0 to {len(blocks)} (the block count)"
        )
    return [StageChunk(blocks[a:b], a) for a, b in zip(boundaries, boundaries[1:])]
