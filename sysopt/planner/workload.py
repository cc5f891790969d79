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
# The sequence-parallel scatter and gather blocks (tp > 1) dispatch a slice or one all-gather each way.
OPS_PER_LAYER = {"embed": 23, "vit": 97, "merge": 88, "scatter": 3, "decoder": 98, "gather": 3, "head": 45}
# Parameter tensors per block kind (what per-tensor costs scale with: optimizer hooks, copies, launches)
PARAM_TENSORS_PER_LAYER = {
    "embed": 3,
    "vit": 12,
    "merge": 10,
    "scatter": 0,
    "decoder": 12,
    "gather": 0,
    "head": 4,
}
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
    """One block of the VLM as the trainer runs it on one tensor-parallel rank (sysopt.models.parallel).
    `tp_ops` lists the sequence-parallel GEMM+collective pairs of its forward as (kind, linear name)
    pairs; `split_params` of `params` are divided over tensor-parallel ranks. `sharded`: the block runs on
    this rank's share (its heads and its sequence shard: the decoder blocks, and the scatter writing the
    shard); else every tp rank runs all of it (vision tower, merge, head). `output_sharded`: what it sends
    on is this rank's sequence shard (1/tp of `output_elements`). `sp_all_gather`: the sequence-parallel
    all-gather of `output_elements` a scatter ("backward") or gather ("forward") block runs."""

    name: str
    kind: str  # "embed", "vit", "merge", "scatter", "decoder", "gather", "head"
    linears: tuple[Linear, ...]
    attention: Attention | None
    params: int
    split_params: int
    saved_elements: int  # activation elements kept for backward (before tensor-parallel splitting)
    output_elements: int  # elements of the tensor sent to the next pipeline stage
    elementwise_elements: int  # elements read + written by memory-bound ops (norms, GELU, adds) in forward
    ops: int  # dispatched torch ops in one forward + backward, high precision (OPS_PER_LAYER)
    tp_ops: tuple[tuple[str, str], ...] = ()
    sharded: bool = False
    output_sharded: bool = False
    sp_all_gather: str | None = None  # None, "forward" (gather) or "backward" (scatter)

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


def _block(
    name: str, kind: str, dim: int, heads: int, mlp_ratio: int, batch: int, seq: int, sharded: bool
) -> Layer:
    """A pre-norm transformer block; `sharded`: tensor parallel with sequence parallelism when tp > 1
    (column / row split linears, their all-gather / reduce-scatter), else replicated on every tp rank."""
    rows, hidden = batch * seq, mlp_ratio * dim
    column, row = ("column", "row") if sharded else (None, None)
    linears = (
        Linear(f"{name}.attn.qkv", rows, dim, 3 * dim, column),
        Linear(f"{name}.attn.proj", rows, dim, dim, row),
        Linear(f"{name}.mlp.fc", rows, dim, hidden, column),
        Linear(f"{name}.mlp.proj", rows, hidden, dim, row),
    )
    split = 3 * dim * dim + 3 * dim + dim * dim + dim * hidden + hidden + hidden * dim
    params = split + 2 * dim + 4 * dim  # row-parallel biases and the two LayerNorms are replicated
    ops = (
        ("all_gather", linears[0].name),
        ("reduce_scatter", linears[1].name),
        ("all_gather", linears[2].name),
        ("reduce_scatter", linears[3].name),
    )
    if not sharded:
        split, ops = 0, ()
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
        sharded=sharded,
        output_sharded=sharded,
    )


def sequence_parallel_row_len(row_len: int, tp: int) -> int:
    """Tokens per row the trainer runs at `tp`: sequence parallelism (tp > 1) pads rows to a multiple of
    tp (sysopt.train.parallel.pad_sequence)."""
    return row_len + (-row_len % tp if tp > 1 else 0)


def _sequence_parallel(name: str, kind: str, tokens: int, dim: int) -> Layer:
    """The scatter (after the merge: full sequence in, this rank's shard out; all-gather in backward) or
    gather (before the head: shard in, full sequence out by all-gather) block of sequence parallelism."""
    scatter = kind == "scatter"
    return Layer(
        name,
        kind,
        (),
        None,
        0,
        0,
        0,
        tokens * dim,
        2 * tokens * dim if scatter else tokens * dim,  # scatter: copy out the shard; gather: write it all
        OPS_PER_LAYER[kind],
        sharded=scatter,
        output_sharded=scatter,
        sp_all_gather="backward" if scatter else "forward",
    )


def layers(model: VLMConfig, shape: BatchShape, tp: int = 1) -> tuple[Layer, ...]:
    """The VLM's blocks in order as the trainer runs them on one of `tp` tensor-parallel ranks
    (sysopt.models.parallel.tensor_parallelize): VisionEmbed, ViT blocks, ImageTextMerge, decoder blocks,
    LMHead. Only the decoder blocks are sharded; the vision tower, merge (projector, embeddings) and head
    are replicated on every tp rank. With tp > 1 sequence parallelism pads each row to a multiple of tp and
    adds a scatter block after the merge and a gather block before the head (block_count's rule)."""
    c = model
    patch_dim = c.patch_size * c.patch_size
    n_patches = (c.image_size // c.patch_size) ** 2
    image_rows = shape.images * n_patches
    seq_len = sequence_parallel_row_len(shape.seq_len, tp)
    tokens = shape.sequences * seq_len
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
            _block(
                f"vit{i}", "vit", c.vision_dim, c.vision_heads, c.mlp_ratio, shape.images, n_patches, False
            )
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
    if tp > 1:
        out.append(_sequence_parallel("sp_scatter", "scatter", tokens, c.dim))
    for i in range(c.layers):
        out.append(_block(f"dec{i}", "decoder", c.dim, c.heads, c.mlp_ratio, shape.sequences, seq_len, True))
    if tp > 1:
        out.append(_sequence_parallel("sp_gather", "gather", tokens, c.dim))
    out.append(
        Layer(
            "head",
            "head",
            (Linear("head.out", tokens, c.dim, c.vocab_size, swappable=False),),
            None,
            2 * c.dim + c.dim * c.vocab_size + c.vocab_size,
            0,
            tokens * (2 * c.dim + 2 * c.vocab_size),
            tokens * c.vocab_size,
            tokens * (4 * c.dim + 3 * c.vocab_size),  # LayerNorm, log-softmax + cross-entropy
            OPS_PER_LAYER["head"],
        )
    )
    return tuple(out)


def param_count(model: VLMConfig) -> int:
    """Parameters of VLM(model), counted from its shape (equals VLM(model).param_count())."""
    return sum(layer.params for layer in layers(model, BatchShape(1, 1, 1)))
