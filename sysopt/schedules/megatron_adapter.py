"""megatron-core's forward_backward_func, backed by a sysopt schedule and the ScheduleExecutor.

``make_forward_backward_func("zb_h1")`` returns a function with the keyword signature of
megatron-core 0.16.1's ``forward_backward_pipelining_with_interleaving``, so a training loop written
for megatron-core drives any sysopt schedule: it calls ``forward_step_func(data_iterator, chunk)``
-> ``(output_tensor, loss_func)`` for every forward, reduces the loss exactly like megatron-core
(its own ``forward_step_calc_loss``), and returns megatron's list of loss-reduced dicts (empty off
the last stage). ``model[i]`` must hold stage ``schedule.stages_of(rank)[i]``: for looped schedules
(interleaved_1f1b, zb_h1) that is megatron's virtual stage i; for V schedules (zbv, dualpipev)
chunk 1 of rank r holds stage 2*pp-1-r.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from sysopt.schedules.builders import BUILDERS, build
from sysopt.schedules.executor import ScheduleExecutor, ShapeSpec
from sysopt.schedules.ir import Kind, Schedule


class _ChunkStage(torch.nn.Module):
    """One model chunk as an executor stage: forward(x, microbatch) runs megatron's forward step."""

    def __init__(self, chunk: torch.nn.Module, run: _Run, chunk_index: int, is_last: bool) -> None:
        super().__init__()
        self.chunk, self.run, self.chunk_index, self.is_last = chunk, run, chunk_index, is_last

    def forward(self, x: torch.Tensor | None, microbatch: int) -> torch.Tensor:
        return self.run.forward_step(self, x, microbatch)


class _Run:
    """State of one forward_backward call (the callable the stages call back into)."""

    def __init__(self, *, forward_step_func, data_iterator, config, num_microbatches, cp_size, forward_only,
                 collect_non_loss_data, first_val_step) -> None:  # fmt: skip
        self.forward_step_func, self.data_iterator, self.config = forward_step_func, data_iterator, config
        self.num_microbatches, self.cp_size = num_microbatches, cp_size
        self.forward_only, self.collect_non_loss_data = forward_only, collect_non_loss_data
        self.first_val_step = first_val_step
        self.forward_data_store: list = []
        self.total_num_tokens = torch.zeros([], dtype=torch.int)

    def forward_step(self, stage: _ChunkStage, x: torch.Tensor | None, microbatch: int) -> torch.Tensor:
        from megatron.core.pipeline_parallel import schedules as mcore
        from megatron.core.utils import get_attr_wrapped_model

        chunk = stage.chunk
        if self.config.timers is not None:  # forward_step_calc_loss stops it
            self.config.timers("forward-compute", log_level=2).start()
        first = mcore.check_first_val_step(self.first_val_step, self.forward_only, microbatch == 0)
        if first and hasattr(chunk, "set_is_first_microbatch"):
            chunk.set_is_first_microbatch()
        mcore.set_current_microbatch(chunk, microbatch)
        get_attr_wrapped_model(chunk, "set_input_tensor")([x])
        iterator = self.data_iterator[stage.chunk_index]
        output, loss_func = self.forward_step_func(iterator, chunk)
        output, num_tokens = mcore.forward_step_calc_loss(
            chunk,
            output,
            loss_func,
            self.config,
            None,  # vp_stage: chunk order follows the sysopt placement, not megatron's vp_stage
            self.collect_non_loss_data,
            self.num_microbatches,
            self.forward_data_store,
            cp_group_size=self.cp_size,
            is_last_stage=stage.is_last,
        )
        self.total_num_tokens += num_tokens
        return output


def make_forward_backward_func(
    schedule_name: str,
    *,
    group: dist.ProcessGroup | None = None,
    boundary_shape: ShapeSpec | None = None,
    **schedule_options,
) -> Callable[..., list]:
    """A megatron-core ``forward_backward_func`` running sysopt schedule ``schedule_name``.

    ``group`` is the pipeline group (default: ``pg_collection.pp`` or ``p2p_communicator.pp_group``
    when the call passes one, else megatron's parallel_state pipeline group when initialised, else
    WORLD). ``boundary_shape`` overrides megatron's ``[seq_length, micro_batch_size, hidden_size]``
    (e.g. a function of (stage, microbatch) for a vision tower). ``schedule_options`` go to the
    builder; interleaved builders get ``config.microbatch_group_size_per_vp_stage`` unless given.
    """
    if schedule_name not in BUILDERS:
        raise ValueError(f"unknown schedule {schedule_name!r}; choose one of {sorted(BUILDERS)}")
    executors: dict[tuple, ScheduleExecutor] = {}

    def forward_backward_func(
        *,
        forward_step_func: Callable,
        data_iterator: Iterator | Sequence[Iterator] | None,
        model: torch.nn.Module | Sequence[torch.nn.Module],
        num_microbatches: int,
        seq_length: int,
        micro_batch_size: int,
        decoder_seq_length: int | None = None,
        forward_only: bool = False,
        collect_non_loss_data: bool = False,
        first_val_step: bool | None = None,
        adjust_tensor_shapes_fn: Callable | None = None,
        p2p_communicator=None,
        pg_collection=None,
        force_all_reduce: bool | None = False,
    ) -> list:
        from megatron.core.utils import get_model_config

        chunks = list(model) if isinstance(model, list | tuple) else [model]
        iterators = (
            list(data_iterator) if isinstance(data_iterator, list | tuple) else [data_iterator] * len(chunks)
        )
        if len(iterators) != len(chunks):
            raise ValueError(
                f"data_iterator has {len(iterators)} entries but model has {len(chunks)} chunks; "
                "give one iterator per model chunk (megatron's interleaved convention)"
            )
        config = get_model_config(chunks[0])
        pp_group = _pipeline_group(group, p2p_communicator, pg_collection)
        cp_size = _group_size(pg_collection, "cp", "get_context_parallel_world_size")
        shape = _megatron_shape(config, seq_length, micro_batch_size, cp_size, pg_collection)
        if adjust_tensor_shapes_fn is not None:
            _, send_shapes = adjust_tensor_shapes_fn([shape], [shape])
            shape = tuple(send_shapes[0])
        # the boundary shape is part of the key: another seq_length needs receive buffers of its own size
        # (a function of (stage, microbatch) keys by identity: the same function gives the same shapes)
        boundary_key = boundary_shape if callable(boundary_shape) else tuple(boundary_shape or shape)
        key = (num_microbatches, tuple(id(c) for c in chunks), id(pp_group), boundary_key)
        if key not in executors:
            executors[key] = _executor(
                schedule_name,
                schedule_options,
                config,
                chunks,
                num_microbatches,
                pp_group,
                boundary_shape or shape,
            )
        executor = executors[key]
        run = _Run(
            forward_step_func=forward_step_func,
            data_iterator=iterators,
            config=config,
            num_microbatches=num_microbatches,
            cp_size=cp_size,
            forward_only=forward_only,
            collect_non_loss_data=collect_non_loss_data,
            first_val_step=first_val_step,
        )
        for stage in executor.modules.values():
            stage.run = run
        if config.timers is not None:
            config.timers("forward-backward", log_level=1).start(barrier=config.barrier_with_L1_time)
        sync_param = _per_chunk(None if forward_only else config.param_sync_func, len(chunks))
        for chunk, sync in zip(chunks, sync_param):
            sync(chunk.parameters())
        with _no_sync(config):
            executor.step(
                None, [None] * num_microbatches, list(range(num_microbatches)), forward_only=forward_only
            )
        if not forward_only:
            for chunk, sync in zip(chunks, _per_chunk(config.grad_sync_func, len(chunks))):
                sync(chunk.parameters())
            if config.finalize_model_grads_func is not None:
                config.finalize_model_grads_func(
                    chunks,
                    run.total_num_tokens if config.calculate_per_token_loss else None,
                    pg_collection=pg_collection,
                    force_all_reduce=force_all_reduce,
                )
        if config.timers is not None:
            config.timers("forward-backward").stop()
        return run.forward_data_store

    forward_backward_func.schedule_name = schedule_name
    return forward_backward_func


def _executor(name, options, config, chunks, num_microbatches, group, shape) -> ScheduleExecutor:
    pp = dist.get_world_size(group)
    options = dict(options)
    builder_args = inspect.signature(BUILDERS[name]).parameters
    group_size = getattr(config, "microbatch_group_size_per_vp_stage", None)
    if "microbatch_group_size" in builder_args and len(chunks) > 1 and group_size is not None:
        options.setdefault("microbatch_group_size", group_size)
    schedule = build(name, pp, len(chunks), num_microbatches, **options)
    _check_forward_order(schedule)
    rank = dist.get_rank(group)
    stages = schedule.stages_of(rank)
    modules = {
        stage: _ChunkStage(chunk, None, index, stage == schedule.num_stages - 1)
        for index, (stage, chunk) in enumerate(zip(stages, chunks))
    }

    def loss_fn(loss: torch.Tensor, _target) -> torch.Tensor:
        # forward_step_calc_loss already scaled it megatron's way; backward_step then applies the optimizer's
        # loss scaling (config.grad_scale_func, read at each call: the optimizer may set it later)
        return loss if config.grad_scale_func is None else config.grad_scale_func(loss)

    return ScheduleExecutor(
        schedule,
        modules,
        loss_fn,
        boundary_shape=shape,
        dtype=config.pipeline_dtype or torch.float32,
        device=_device(chunks[0]),
        group=group,
        loss_scale=1.0,
    )


def _check_forward_order(schedule: Schedule) -> None:
    """forward_step_func reads each chunk's data iterator in order: every stage must run its forwards
    for microbatches 0, 1, 2, ... (true of every sysopt builder)."""
    for rank, actions in schedule.actions.items():
        seen: dict[int, int] = {}
        for a in actions:
            if a.kind is Kind.FORWARD:
                if a.microbatch != seen.get(a.stage, 0):
                    raise ValueError(
                        f"{schedule.name}: rank {rank} runs {a} out of microbatch order; megatron-style "
                        "data iterators need each stage's forwards in microbatch order"
                    )
                seen[a.stage] = a.microbatch + 1


def _pipeline_group(group, p2p_communicator, pg_collection) -> dist.ProcessGroup | None:
    if group is not None:
        return group
    if pg_collection is not None and getattr(pg_collection, "pp", None) is not None:
        return pg_collection.pp
    if p2p_communicator is not None:
        return p2p_communicator.pp_group
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_pipeline_model_parallel_group()
    return None


def _group_size(pg_collection, name: str, parallel_state_fn: str) -> int:
    if pg_collection is not None and getattr(pg_collection, name, None) is not None:
        return getattr(pg_collection, name).size()
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return getattr(parallel_state, parallel_state_fn)()
    return 1


def _megatron_shape(config, seq_length, micro_batch_size, cp_size, pg_collection) -> tuple[int, ...]:
    """megatron-core's p2p tensor shape: [seq_length / cp (/ tp with sequence parallel), mbs, hidden]."""
    seq = seq_length // cp_size
    if config.sequence_parallel:
        seq //= _group_size(pg_collection, "tp", "get_tensor_model_parallel_world_size")
    return (seq, micro_batch_size, config.hidden_size)


def _per_chunk(funcs, n: int) -> list[Callable]:
    if funcs is None:
        return [lambda _params: None] * n
    return list(funcs) if isinstance(funcs, list | tuple) else [funcs] * n


def _no_sync(config):
    """megatron's no_sync_func (one per chunk or one for all) around the whole step."""
    funcs = config.no_sync_func
    if funcs is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for fn in funcs if isinstance(funcs, list | tuple) else [funcs]:
        stack.enter_context(fn())
    return stack


def _device(chunk: torch.nn.Module) -> torch.device:
    param = next(chunk.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
