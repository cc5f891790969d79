"""schedule=megatron_interleaved: megatron-core's own pipeline schedule (get_forward_backward_func) runs the
trainer's StageChunks, as a baseline for sysopt's executor on exactly the same model, split and data.

`MegatronPipeline.step` has the shape of `ScheduleExecutor.step`, so ParallelVLM uses either one. megatron
is imported only here, lazily, and runs under the CPU shims (sysopt.dist.megatron_shims) on gloo.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from sysopt.dist import ParallelGroups

Shape = tuple[int, ...]


class MegatronChunk(nn.Module):
    """A StageChunk as megatron-core expects a model chunk: `config`, `model_type`, `set_input_tensor`;
    forward(batch) runs the chunk on the tensor megatron set (None on the first stage)."""

    def __init__(self, chunk: nn.Module, config, model_type) -> None:
        super().__init__()
        self.chunk, self.config, self.model_type = chunk, config, model_type
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, tensors: list[torch.Tensor | None]) -> None:
        self.input_tensor = tensors[0]

    def forward(self, batch) -> torch.Tensor:
        # megatron's p2p sends the output as it is and needs it contiguous (sysopt's executor copies too)
        return self.chunk(self.input_tensor, batch).contiguous()


def init_megatron_parallel_state(groups: ParallelGroups, timeout_s: float = 1800.0) -> None:
    """megatron-core's parallel_state for the trainer's tp x pp x dp grid (vpp chunks per pipeline rank),
    checked to put this rank in the same pipeline group at the same place as sysopt's topology."""
    from megatron.core import parallel_state as ps

    t = groups.topology
    vpp = t.vpp if t.vpp > 1 else None
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=t.tp,
            pipeline_model_parallel_size=t.pp,
            virtual_pipeline_model_parallel_size=vpp,
            create_gloo_process_groups=False,
            # its groups' collectives give up when sysopt's do (train.collective_timeout_s), not after its
            # default 30 min
            distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
        )
    theirs = torch.distributed.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    if (
        ps.get_tensor_model_parallel_world_size() != t.tp
        or ps.get_virtual_pipeline_model_parallel_world_size() != vpp
        or theirs != groups.pp_ranks
    ):
        raise RuntimeError(
            f"megatron-core's parallel_state (tp={ps.get_tensor_model_parallel_world_size()}, pipeline "
            f"ranks {theirs}, vpp={ps.get_virtual_pipeline_model_parallel_world_size()}) does not match the "
            f"trainer's topology {t} (pipeline ranks {groups.pp_ranks}); call "
            f"megatron.core.parallel_state.destroy_model_parallel() before training another layout"
        )


class MegatronPipeline:
    """This rank's `stages` ({stage: StageChunk}, megatron's placement: stage s on pipeline rank s % pp)
    run by megatron-core's schedule: interleaved 1F1B when the topology has vpp > 1, its plain 1F1B else.

    Microbatches reach the chunks as side inputs through megatron's data iterators (one per chunk, each
    yielding the microbatch Batches in order). `loss_fn(logits, batch)` must already be normalised the way
    the caller wants (the trainer divides by the global answer-token count), so megatron is told not to
    rescale it: calculate_per_token_loss=True and no finalize_model_grads_func. Gradients accumulate in
    the chunks' .grad, as with the sysopt executor.

    p2p shapes: megatron sends [seq_length, micro_batch_size, hidden_size] at every boundary. When every
    boundary tensor of a step has that one shape (cuts inside the decoder) it gets exactly that; when they
    differ (a cut inside the vision tower sends [patches, images, vision_dim], and images per microbatch
    vary) the step sets config.variable_seq_lengths, so megatron exchanges each tensor's shape before it.
    """

    def __init__(
        self,
        stages: Mapping[int, nn.Module],
        groups: ParallelGroups,
        loss_fn: Callable[[torch.Tensor, object], torch.Tensor],
        *,
        microbatches: int,
        hidden_size: int,
        num_attention_heads: int,
        timeout_s: float = 1800.0,
    ) -> None:
        from megatron.core.enums import ModelType
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.transformer import TransformerConfig

        t = groups.topology
        order = sorted(stages)
        expected = [groups.coords.pp + chunk * t.pp for chunk in range(t.vpp)]
        if order != expected:
            raise ValueError(
                f"pipeline rank {groups.coords.pp} holds stages {order}, but megatron-core's schedule runs "
                f"stages {expected} there (stage s on rank s % pp); place the chunks with the "
                f"interleaved_1f1b (vpp > 1) or 1f1b layout"
            )
        init_megatron_parallel_state(groups, timeout_s)
        self.config = TransformerConfig(
            num_layers=t.pp * t.vpp,
            hidden_size=hidden_size,
            num_attention_heads=num_attention_heads,
            pipeline_model_parallel_size=t.pp,
            virtual_pipeline_model_parallel_size=t.vpp if t.vpp > 1 else None,
            pipeline_dtype=torch.float32,
            params_dtype=torch.float32,
            use_cpu_initialization=True,
            batch_p2p_comm=False,
            batch_p2p_sync=False,
            overlap_p2p_comm=t.vpp > 1,  # megatron's faster setting; its plain 1F1B does not support it
            calculate_per_token_loss=True,  # loss_fn already applied the global normaliser
        )
        self.chunks = [MegatronChunk(stages[s], self.config, ModelType.encoder_or_decoder) for s in order]
        self.num_stages = t.pp * t.vpp
        self.microbatches = microbatches
        self.loss_fn = loss_fn
        self.is_last = order[-1] == self.num_stages - 1
        self.forward_backward = get_forward_backward_func()

    def step(
        self,
        inputs: Sequence[torch.Tensor | None] | None,
        targets: Sequence[object],
        contexts: Sequence[object],
        *,
        boundary_shape: Callable[[int, int], Shape],
        forward_only: bool = False,
    ) -> list[torch.Tensor] | None:
        """One step over `contexts` (the microbatch Batches; `targets` must be the same objects, as the
        trainer passes them, since each chunk's forward reads its microbatch from megatron's data
        iterator). `boundary_shape(stage, microbatch)` is the shape of the tensor `stage` sends for
        `microbatch`. Returns the per-microbatch losses on the last stage's rank, else None."""
        if inputs is not None and any(x is not None for x in inputs):
            raise ValueError(
                "MegatronPipeline reads everything from the microbatch contexts; pass inputs=None"
            )
        if len(contexts) != self.microbatches or any(t is not c for t, c in zip(targets, contexts)):
            raise ValueError(
                f"expected {self.microbatches} microbatch Batches as both targets and contexts, got "
                f"{len(contexts)} contexts; pass the same list twice"
            )
        seq_length, micro_batch_size = self._p2p_shape(boundary_shape)
        loss_fn = self.loss_fn

        def forward_step(data_iterator, model):
            batch = next(data_iterator)

            def loss_func(logits):
                loss = loss_fn(logits, batch)
                # (loss, tokens, logged): with calculate_per_token_loss megatron keeps the loss as is
                return loss, batch.loss_mask.sum().to(torch.int), {"loss": loss.detach()}

            return model(batch), loss_func

        from sysopt.dist.megatron_shims import megatron_cpu_shims

        with megatron_cpu_shims(
            force=True
        ):  # the trainer's model is on the CPU (the shims no-op synchronize)
            reduced = self.forward_backward(
                forward_step_func=forward_step,
                data_iterator=[iter(contexts) for _ in self.chunks],
                model=self.chunks,
                num_microbatches=self.microbatches,
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                forward_only=forward_only,
            )
        for chunk in self.chunks:
            chunk.input_tensor = None  # drop the last received activation
        return [d["loss"] for d in reduced] if self.is_last else None

    def _p2p_shape(self, boundary_shape: Callable[[int, int], Shape]) -> tuple[int, int]:
        """(seq_length, micro_batch_size) for megatron; sets config.variable_seq_lengths when the
        boundary tensors of this step do not all have the shape [seq_length, micro_batch_size, hidden]."""
        shapes = {
            tuple(boundary_shape(stage, mb))
            for stage in range(self.num_stages - 1)
            for mb in range(self.microbatches)
        }
        bad = sorted(s for s in shapes if len(s) != 3)
        if bad:
            raise ValueError(
                f"boundary tensors of shape {bad[0]} are not 3-D; megatron-core's p2p sends "
                f"[sequence, batch, hidden] tensors (and 3-int shapes with variable_seq_lengths)"
            )
        (first, *rest) = sorted(shapes)
        fixed = not rest and first[2] == self.config.hidden_size
        self.config.variable_seq_lengths = not fixed
        return first[0], first[1]


def time_schedules(job_json: str, schedules: list[str], boundaries: list[int], steps: int) -> dict:
    """Per rank, under sysopt.dist.launch: seconds of ParallelVLM.forward_backward per step for each of
    `schedules` on one pipeline split of the job, the schedules taking turns step by step on the same
    batches (so load drifts on a shared machine hit all of them alike), each step between barriers.
    Returns {schedule: [seconds per step]} and the global losses under "losses"."""
    import dataclasses

    import torch.distributed as dist

    from sysopt.data import BatchSampler, DigitsDataset
    from sysopt.dist import build_groups
    from sysopt.train.config import JobConfig, ScheduleConfig
    from sysopt.train.parallel import ParallelVLM

    job = JobConfig.from_json(job_json)
    groups = build_groups(job.parallel.topology, timeout_s=job.train.collective_timeout_s)
    sampler = BatchSampler(DigitsDataset(job.data, "train"), job.train.global_batch)
    runtimes = {}
    for name in schedules:
        variant = dataclasses.replace(job, schedule=ScheduleConfig(name, job.schedule.microbatches))
        runtimes[name] = ParallelVLM(variant, groups, sampler.global_batch(0), tuple(boundaries))
    out: dict = {name: [] for name in schedules} | {"losses": {name: [] for name in schedules}}
    for step in range(steps):
        batch = sampler.global_batch(step)
        normalizer = batch.answer_token_count().clamp(min=1.0)
        for name in schedules if step % 2 == 0 else schedules[::-1]:
            dist.barrier()
            start = time.perf_counter()
            loss = runtimes[name].forward_backward(batch, normalizer)
            dist.barrier()
            out[name].append(time.perf_counter() - start)
            out["losses"][name].append(float(loss))
            for param in runtimes[name].params:
                param.grad = None
    return out
