"""What the VLM asks of a device, layer by layer, from VLMConfig and the batch shape alone (no torch):
the GEMMs of each block, its parameters, and the activation elements it keeps for backward."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sysopt.models import VLMConfig

# [rows, width] tensors a pre-norm transformer block keeps for backward, in units of rows x dim:
# two LayerNorm inputs and outputs (4), q/k/v (3), attention output (1), residual (1), plus the MLP's
# fc output and GELU output (2 x mlp_ratio). Flash attention keeps only per-row statistics beside them.
SAVED_PER_BLOCK_BASE = 9
# Dispatched torch ops of one forward + backward per block kind, and the extra ops a linear converted to a
# low-precision recipe adds (scaling, casts, scaled GEMMs, dequantisation), per kernel backend: the fused C++
# int8 kernels (`cpp`, sysopt.kernels.cpu) dispatch fewer ops than the torch reference; fp8 goes to the
# reference on every CPU backend. Counted with a TorchDispatchMode over sysopt.models' blocks and
# sysopt.precision.convert (tests/test_planner.py recounts them under the backend it runs with). Each op
# carries a fixed host cost (dispatch, launch), so these set the per-layer overhead. Triton's counts are
# not measured here (no GPU); the torch reference's stand in for them.
OPS_PER_LAYER = {"embed": 23, "vit": 97, "merge": 88, "decoder": 98, "head": 45}
# Parameter tensors per block kind (what per-tensor costs scale with: optimizer hooks, copies, launches)
PARAM_TENSORS_PER_LAYER = {"embed": 3, "vit": 12, "merge": 10, "decoder": 12, "head": 4}
_EXTRA_OPS_TORCH = {
    "int8_rowwise": 84,
    "int8_rowwise_full": 138,
    "int8_tensorwise": 82,
    "fp8_rowwise": 223,
    "fp8_blockwise": 250,
    "fp8_tensorwise_delayed": 120,
}
EXTRA_OPS_PER_LOW_PRECISION_LINEAR = {
    "torch": _EXTRA_OPS_TORCH,
    "triton": _EXTRA_OPS_TORCH,
    "cpp": {**_EXTRA_OPS_TORCH, "int8_rowwise": 70, "int8_rowwise_full": 119, "int8_tensorwise": 79},
}
# Elements a block's memory-bound forward ops read and write, per row, in units of dim: two LayerNorms
# (read + write: 4), two residual adds (2 reads + 1 write: 6), attention's q/k/v in and output out (4);
# GELU adds 2 x hidden.
ELEMENTWISE_PER_BLOCK_BASE = 14


@dataclass(frozen=True)
class BatchShape:
    """One microbatch's shape: `sequences` of `seq_len` tokens showing `images` images."""

    sequences: int
    seq_len: int
    images: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Linear:
    """y = x @ W.T over `rows` rows; `split` is how tensor parallelism cuts it: 'column' (out_features
    split), 'row' (in_features split) or None (replicated). `swappable`: convert() may make it low precision."""

    name: str
    rows: int
    in_features: int
    out_features: int
    split: str | None = None
    swappable: bool = True

    def shape(self, tp: int) -> tuple[int, int, int]:
        """(m, n, k) of the forward GEMM on one of `tp` ranks (sequence parallel: all rows after gather)."""
        n, k = self.out_features, self.in_features
        if self.split == "column":
            n //= tp
        elif self.split == "row":
            k //= tp
        return self.rows, n, k


@dataclass(frozen=True)
class Attention:
    """Scaled dot-product attention over `batch` sequences of `seq` tokens, width `dim`, `heads` heads."""

    batch: int
    seq: int
    dim: int
    heads: int

    def gemms(self, tp: int) -> tuple[tuple[int, int, int], ...]:
        """QK^T and AV as (m, n, k) GEMMs of the same FLOPs (batch*seq rows); heads split over tp."""
        d = self.dim // tp
        return ((self.batch * self.seq, self.seq, d), (self.batch * self.seq, d, self.seq))


@dataclass(frozen=True)
class Layer:
    """One entry of VLM.blocks. `tp_ops` lists the sequence-parallel collectives of its forward as
    (kind, linear name) pairs; `split_params` of `params` are divided over tensor-parallel ranks."""

    name: str
    kind: str  # "embed", "vit", "merge", "decoder", "head"
    linears: tuple[Linear, ...]
    attention: Attention | None
    params: int
    split_params: int
    saved_elements: int  # activation elements kept for backward (before tensor-parallel splitting)
    output_elements: int  # elements of the tensor sent to the next pipeline stage
    elementwise_elements: int  # elements read + written by memory-bound ops (norms, GELU, adds) in forward
    ops: int  # dispatched torch ops in one forward + backward, high precision (OPS_PER_LAYER)
    tp_ops: tuple[tuple[str, str], ...] = ()

    @property
    def param_tensors(self) -> int:
        return PARAM_TENSORS_PER_LAYER[self.kind]

    def params_per_rank(self, tp: int) -> int:
        return self.params - self.split_params + self.split_params // tp


def images_per_sequence(data) -> float:
    """Expected images per training sequence of a DigitsTaskConfig: caption 1, sum 2, largest
    uniform in [min_relation_images, max_relation_images], weighted by task_mix."""
    relation = (data.min_relation_images + data.max_relation_images) / 2
    weights = data.task_mix
    return (weights[0] * 1 + weights[1] * 2 + weights[2] * relation) / sum(weights)


def batch_shape(sequences: int, data) -> BatchShape:
    """The shape of a microbatch of `sequences` drawn from the DigitsTaskConfig `data`."""
    return BatchShape(sequences, data.seq_len, max(1, round(sequences * images_per_sequence(data))))


def _block(name: str, kind: str, dim: int, heads: int, mlp_ratio: int, batch: int, seq: int) -> Layer:
    rows, hidden = batch * seq, mlp_ratio * dim
    linears = (
        Linear(f"{name}.attn.qkv", rows, dim, 3 * dim, "column"),
        Linear(f"{name}.attn.proj", rows, dim, dim, "row"),
        Linear(f"{name}.mlp.fc", rows, dim, hidden, "column"),
        Linear(f"{name}.mlp.proj", rows, hidden, dim, "row"),
    )
    split = 3 * dim * dim + 3 * dim + dim * dim + dim * hidden + hidden + hidden * dim
    params = split + 2 * dim + 4 * dim  # row-parallel biases and the two LayerNorms are replicated
    ops = (
        ("all_gather", linears[0].name),
        ("reduce_scatter", linears[1].name),
        ("all_gather", linears[2].name),
        ("reduce_scatter", linears[3].name),
    )
    return Layer(
        name,
        kind,
        linears,
        Attention(batch, seq, dim, heads),
        params,
        split,
        rows * dim * (SAVED_PER_BLOCK_BASE + 2 * mlp_ratio),
        rows * dim,
        rows * (ELEMENTWISE_PER_BLOCK_BASE * dim + 2 * hidden),
        OPS_PER_LAYER[kind],
        ops,
    )


def layers(model: VLMConfig, shape: BatchShape) -> tuple[Layer, ...]:
    """The VLM's blocks in order: VisionEmbed, ViT blocks, ImageTextMerge, decoder blocks, LMHead."""
    c = model
    patch_dim = c.patch_size * c.patch_size
    n_patches = (c.image_size // c.patch_size) ** 2
    image_rows = shape.images * n_patches
    tokens = shape.sequences * shape.seq_len
    merged_rows = shape.images * c.tokens_per_image
    out: list[Layer] = [
        Layer(
            "embed",
            "embed",
            (Linear("embed.patch", image_rows, patch_dim, c.vision_dim, swappable=False),),
            None,
            patch_dim * c.vision_dim + c.vision_dim + n_patches * c.vision_dim,
            0,
            image_rows * (patch_dim + c.vision_dim),
            image_rows * c.vision_dim,
            image_rows * (2 * patch_dim + 3 * c.vision_dim),  # patchify copy, + positions
            OPS_PER_LAYER["embed"],
        )
    ]
    for i in range(c.vision_layers):
        out.append(
            _block(f"vit{i}", "vit", c.vision_dim, c.vision_heads, c.mlp_ratio, shape.images, n_patches)
        )
    merge_linears = (
        Linear("merge.project", merged_rows, c.vision_dim, c.dim),
        Linear("merge.project_mlp.fc", merged_rows, c.dim, c.dim),
        Linear("merge.project_mlp.proj", merged_rows, c.dim, c.dim),
    )
    merge_params = 2 * c.vision_dim + c.vision_dim * c.dim + c.dim + 2 * (c.dim * c.dim + c.dim)
    merge_params += c.vocab_size * c.dim + c.max_seq * c.dim
    out.append(
        Layer(
            "merge",
            "merge",
            merge_linears,
            None,
            merge_params,
            0,
            image_rows * c.vision_dim + 4 * merged_rows * c.dim + 2 * tokens * c.dim,
            tokens * c.dim,
            # LayerNorm + pooling of image features, residual of the projector, embedding gather,
            # placing image tokens, adding positions
            image_rows * 5 * c.vision_dim + merged_rows * 3 * c.dim + tokens * 9 * c.dim,
            OPS_PER_LAYER["merge"],
        )
    )
    for i in range(c.layers):
        out.append(_block(f"dec{i}", "decoder", c.dim, c.heads, c.mlp_ratio, shape.sequences, shape.seq_len))
    out.append(
        Layer(
            "head",
            "head",
            (Linear("head.out", tokens, c.dim, c.vocab_size, "column", swappable=False),),
            None,
            2 * c.dim + c.dim * c.vocab_size + c.vocab_size,
            c.dim * c.vocab_size + c.vocab_size,
            tokens * (2 * c.dim + 2 * c.vocab_size),
            tokens * c.vocab_size,
            tokens * (4 * c.dim + 3 * c.vocab_size),  # LayerNorm, log-softmax + cross-entropy
            OPS_PER_LAYER["head"],
            (("all_gather", "head.out"),),
        )
    )
    return tuple(out)


def param_count(model: VLMConfig) -> int:
    """Parameters of VLM(model), counted from its shape (equals VLM(model).param_count())."""
    return sum(layer.params for layer in layers(model, BatchShape(1, 1, 1)))
