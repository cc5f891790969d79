"""Tensor parallelism with sequence parallelism and software T3: column/row parallel linears whose
GEMMs overlap their collectives in chunks on any torch.distributed backend (gloo included)."""

from sysopt.tensor_parallel.block import TensorParallelBlock
from sysopt.tensor_parallel.chunk_model import (
    ChunkChoice,
    GemmCollective,
    choose_chunks,
    choose_chunks_for,
    collective_time_s,
    pipeline_time_s,
    profile_costs,
)
from sysopt.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, overlap_plans
from sysopt.tensor_parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from sysopt.tensor_parallel.overlap import ChunkPlan, OverlapPolicy, chunk_bounds, resolve_overlap
from sysopt.tensor_parallel.runtime import EmulatedCompute, TorchCompute, recording, use_compute
from sysopt.tensor_parallel.timeline import OverlapSummary, Span, Timeline, plot_timelines, summarize

__all__ = [
    "ChunkChoice",
    "ChunkPlan",
    "ColumnParallelLinear",
    "EmulatedCompute",
    "GemmCollective",
    "OverlapPolicy",
    "OverlapSummary",
    "RowParallelLinear",
    "Span",
    "TensorParallelBlock",
    "Timeline",
    "TorchCompute",
    "overlap_plans",
    "choose_chunks",
    "choose_chunks_for",
    "chunk_bounds",
    "collective_time_s",
    "copy_to_tensor_parallel_region",
    "gather_from_sequence_parallel_region",
    "pipeline_time_s",
    "plot_timelines",
    "profile_costs",
    "recording",
    "reduce_from_tensor_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "resolve_overlap",
    "scatter_to_sequence_parallel_region",
    "summarize",
    "use_compute",
]
