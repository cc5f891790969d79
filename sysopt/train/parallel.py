"""The VLM laid out over tp x pp x dp for one rank: which blocks it holds, how a step's microbatches run
through them (plain loop or the schedule executor), gradient reduction and the global gradient norm.

Every rank builds the same dense VLM from the same seed, then keeps its share: decoder blocks sharded
over the tp group, the block list cut into pp * vpp chunks by the cost-based partitioner, and the chunks
the schedule places on this pipeline rank.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sysopt.data import TASKS, Batch
from sysopt.dist import BucketedGradSync, ParallelGroups
from sysopt.models import VLM, vlm_loss
from sysopt.models.parallel import (
    SequenceGather,
    SequenceScatter,
    block_output_shape,
    split_into_stages,
    tensor_parallelize,
)
from sysopt.tensor_parallel import TensorParallelBlock
from sysopt.train.config import JobConfig


def pad_sequence(batch: Batch, multiple: int) -> Batch:
    """`batch` with its sequence padded at the end to a multiple of `multiple` (pad tokens, no images, no
    loss; a packed batch's padding is its own segment): causal attention never lets a real position see
    the padding, so the result is unchanged."""
    length = batch.tokens.shape[1]
    extra = -length % multiple
    if extra == 0:
        return batch
    pad = lambda t, value: torch.nn.functional.pad(t, (0, extra), value=value)  # noqa: E731
    return dataclasses.replace(
        batch,
        tokens=pad(batch.tokens, 0),
        targets=pad(batch.targets, 0),
        image_slots=pad(batch.image_slots, -1),
        loss_mask=pad(batch.loss_mask, 0.0),
        segment_ids=None if batch.segment_ids is None else pad(batch.segment_ids, -1),
        position_ids=None if batch.position_ids is None else pad(batch.position_ids, 0),
    )


def _timed_pass(forward, x_in: torch.Tensor | None, params: list, split: bool) -> tuple:
    """forward(x_in) and a backward of it with unit gradients: (output, forward s, backward s), or with
    `split` (output, forward s, input-gradient s, weight-gradient s): a pass w.r.t. x_in (graph kept), then
    one w.r.t. `params` (the graph walked again), as the schedule executor splits a backward."""
    t0 = time.perf_counter()
    out = forward(x_in)
    forward_s = time.perf_counter() - t0
    grad = torch.ones_like(out)
    t0 = time.perf_counter()
    if not split:
        torch.autograd.backward(out, grad)
        return out, forward_s, time.perf_counter() - t0
    if x_in is not None:
        torch.autograd.backward(out, grad, inputs=[x_in], retain_graph=True)
    t1 = time.perf_counter()
    if params:
        torch.autograd.backward(out, grad, inputs=params)
    return out, forward_s, t1 - t0, time.perf_counter() - t1


def time_blocks(
    model: VLM, batch: Batch, repeats: int = 3, *, split: bool = False
) -> tuple[list[float], ...]:
    """Seconds of each block of `model` on `batch`, medians of `repeats`: (forward, backward) with the
    backward in one autograd pass; with `split`, also (input gradient, weight gradient) timed as the schedule
    executor splits a backward on stages without deferrable layers: a pass w.r.t. the block input (graph
    kept), then one w.r.t. the block's parameters (the graph walked again)."""
    blocks = list(model.blocks)
    samples: list[list[list[float]]] = [[[] for _ in blocks] for _ in range(4 if split else 2)]
    for _ in range(repeats):
        x = None
        for i, block in enumerate(blocks):
            x_in = x.detach().requires_grad_(True) if x is not None else None
            params = [q for q in block.parameters() if q.requires_grad]
            for split_pass in (False, True) if split else (False,):
                out, *seconds = _timed_pass(
                    lambda x_in, block=block: block(x_in, batch), x_in, params, split_pass
                )
                kinds = (2, 3) if split_pass else (0, 1)  # (input grad, weight grad) or (forward, backward)
                for kind, s in zip(kinds, seconds[1:] if split_pass else seconds):
                    samples[kind][i].append(s)
            x = out.detach()
    model.zero_grad(set_to_none=True)
    return tuple([statistics.median(cell) for cell in row] for row in samples)


def time_chunk(model: VLM, batch: Batch, repeats: int = 3) -> tuple[float, float, float, float]:
    """Seconds of the blocks after the first run as one pipeline chunk, as the schedule executor runs a stage:
    a forward through them all, then the backward in one autograd pass, or split (as time_blocks splits it)
    into one pass w.r.t. the chunk's input (graph kept) and one w.r.t. its parameters. Medians of `repeats`:
    (forward, backward, input gradient, weight gradient). Against the sum of time_blocks' per-block figures it
    shows what timing each block alone adds (a pass per block, caches cooled by the block's own backward):
    10-20% more at 1-4 sequences a microbatch here, 0-5% at sixteen (paired timings)."""
    blocks = list(model.blocks)
    with torch.no_grad():
        x0 = blocks[0](None, batch)
    params = [q for block in blocks[1:] for q in block.parameters() if q.requires_grad]
    samples: list[list[float]] = [[] for _ in range(4)]

    def chunk(x: torch.Tensor) -> torch.Tensor:
        for block in blocks[1:]:
            x = block(x, batch)
        return x

    for _ in range(repeats):
        for split in (False, True):
            _, *seconds = _timed_pass(chunk, x0.detach().requires_grad_(True), params, split)
            for kind, s in zip((2, 3) if split else (0, 1), seconds[1:] if split else seconds):
                samples[kind].append(s)
    model.zero_grad(set_to_none=True)
    f, b, i, w = (statistics.median(s) for s in samples)
    return f, b, i, w


def measure_block_costs(model: VLM, batch: Batch, repeats: int = 3) -> tuple[list[float], list[float]]:
    """Forward and backward seconds of each block of `model` on `batch` (median of repeats)."""
    forward, backward = time_blocks(model, batch, repeats)
    return forward, backward


def auto_profile():
    """The HardwareProfile precision=auto decides from, for the trainer's model, which runs on the CPU: a
    cached calibration measured on the CPU, else the probed hardware without its GPUs (on a GPU host the plan
    would otherwise be made for the GPU, e.g. fp8, and saved into the checkpoints)."""
    import dataclasses

    from sysopt.hardware import load_cached, probe

    return load_cached(device="cpu") or dataclasses.replace(probe(), gpus=())


class ParallelVLM:
    """This rank's part of the VLM and the machinery to train and evaluate it."""

    def __init__(
        self,
        job: JobConfig,
        groups: ParallelGroups | None,
        sample_batch: Batch,
        boundaries: tuple[int, ...] | None = None,
        precision_plan: dict[str, str] | None = None,
    ) -> None:
        """`boundaries` fixes the pipeline split (a resumed run must cut where its checkpoint did), else
        parallel.boundaries does; with neither, block costs are measured and partitioned. Likewise
        `precision_plan` ({layer: recipe name}, a checkpoint's) fixes what precision=auto converts; without
        it the plan is made here from this machine's HardwareProfile and the microbatch's GEMM rows."""
        self.job, self.groups = job, groups
        p = job.parallel
        if boundaries is not None and p.boundaries is not None and tuple(boundaries) != tuple(p.boundaries):
            raise ValueError(
                f"parallel.boundaries={list(p.boundaries)} but the checkpoint was cut at {list(boundaries)}; "
                f"set parallel.boundaries={list(boundaries)} (or null) to resume it"
            )
        # where a given split came from, for the error when it does not fit this model's blocks
        self._boundaries_from = "checkpoint" if boundaries is not None else "config"
        boundaries = p.boundaries if boundaries is None else boundaries
        self.microbatches = job.schedule.resolved_microbatches(p.pp)
        model = VLM(job.model)
        costs = None
        # time dense blocks before sharding (no collectives inside): for the partitioner, and for zb_greedy,
        # which plans its order on the stage costs at every start (the order does not change the numbers:
        # each stage still accumulates its microbatches' weight gradients in microbatch order)
        if p.pp > 1 and (boundaries is None or job.schedule.name == "zb_greedy"):
            costs = self._dense_block_costs(model, sample_batch)
        if p.tp > 1:
            tensor_parallelize(
                model, groups.tp_group, sequence_parallel=p.sequence_parallel, overlap=_overlap_policy(p)
            )
            if costs is not None:
                costs = _costs_after_tp(model, costs, p.tp)
        if job.precision.recipe is not None:
            from sysopt.precision import convert

            recipe = job.precision.resolved_recipe()
            if recipe == "auto":
                recipe = (
                    precision_plan if precision_plan is not None else self._auto_plan(model, sample_batch)
                )
            convert(model, recipe, min_features=job.precision.min_features, keep_first_last=True)
        # the layers whose GEMMs run in low precision (dense and tensor-parallel linears alike) and how
        self.precision_plan = {
            n: m.recipe.name for n, m in model.named_modules() if hasattr(m, "scaling_state")
        }
        self.low_precision_layers = list(self.precision_plan)
        self.model = model
        self.schedule = None
        self.executor = None
        self.boundaries: tuple[int, ...] = (0, len(model.blocks))
        if p.pp > 1:
            self._build_pipeline(costs, boundaries)
            self.modules = nn.ModuleList(self.stages.values())
        else:
            self.modules = nn.ModuleList([model])
        self.params = [q for q in self.modules.parameters() if q.requires_grad]
        dp = groups.topology.dp if groups is not None else 1
        self.grad_sync = None
        if dp > 1:  # without a pipeline, buckets reduce during the last microbatch's backward (see
            # forward_backward); under one the executor interleaves microbatches, so they reduce after it
            self.grad_sync = BucketedGradSync(self.params, groups.dp_group)
            self.grad_sync.enabled = p.pp == 1

    def _auto_plan(self, model: VLM, sample_batch: Batch) -> dict[str, str]:
        """precision=auto's choice per layer on this machine (its cached calibrated HardwareProfile, else the
        probed one) for the GEMM rows of one microbatch; rank 0's choice on every rank."""
        from sysopt.precision import auto_plan

        rows, row_len = sample_batch.tokens.shape
        tokens = max(1, rows // self.microbatches) * row_len
        plan = auto_plan(
            model,
            profile=auto_profile(),
            tokens=tokens,
            keep_first_last=True,
            min_features=1 if self.job.precision.min_features is None else self.job.precision.min_features,
        )
        if dist.is_initialized():  # the ranks' shards must agree on it, even if their profiles did not
            box = [plan]
            dist.broadcast_object_list(box, src=0)
            plan = box[0]
        return plan

    # ---- pipeline construction ------------------------------------------------------------------
    def _dense_block_costs(self, model: VLM, sample_batch: Batch) -> tuple[list[float], list[float]]:
        """Forward/backward seconds per dense block, timed on world rank 0 and broadcast so that every
        rank cuts the model at the same places."""
        payload = [None]
        if dist.get_rank() == 0:
            payload = [measure_block_costs(model, sample_batch.shard(0, self.microbatches))]
        dist.broadcast_object_list(payload, src=0)
        return payload[0]

    def _build_pipeline(self, costs, boundaries: tuple[int, ...] | None) -> None:
        from sysopt.schedules import build, partition
        from sysopt.schedules.executor import ScheduleExecutor

        p, sched = self.job.parallel, self.job.schedule
        megatron = sched.name == "megatron_interleaved"
        # megatron-core's schedule places and orders chunks as sysopt's interleaved_1f1b (1f1b at vpp=1):
        # that twin gives the placement, the partition and the evaluation order
        name = ("interleaved_1f1b" if p.vpp > 1 else "1f1b") if megatron else sched.name
        self.schedule = build(name, p.pp, p.vpp, self.microbatches)
        if boundaries is None:
            forward, backward = costs  # the cost-based split (W taken as half of the backward)
            found = partition(
                forward,
                backward,
                [b / 2 for b in backward],
                pp=p.pp,
                vpp=p.vpp,
                schedule=name,
                microbatches=self.microbatches,
            )
            boundaries = found.boundaries
        n_blocks, chunks = len(self.model.blocks), p.pp * p.vpp
        if len(boundaries) != chunks + 1 or boundaries[0] != 0 or boundaries[-1] != n_blocks:
            if self._boundaries_from == "checkpoint":
                raise ValueError(
                    f"the checkpoint's pipeline boundaries {list(boundaries)} do not cut this job's {n_blocks} "
                    f"blocks into pp*vpp={chunks} chunks: it was written with another model or parallel "
                    f"layout; resume with that run's settings, or use another run directory"
                )
            raise ValueError(
                f"parallel.boundaries={list(boundaries)} do not cut the {n_blocks} blocks of this model and "
                f"tp layout into pp*vpp={chunks} chunks: give {chunks + 1} increasing integers from 0 to "
                f"{n_blocks}, or null to partition by cost"
            )
        payload = [tuple(boundaries)]
        dist.broadcast_object_list(payload, src=0)
        self.boundaries = tuple(payload[0])
        if name == "zb_greedy":  # re-plan on this partition's stage costs (identical on every rank)
            from sysopt.schedules import Costs

            forward, backward = costs
            f, b = (
                [sum(x[a:z]) for a, z in zip(self.boundaries, self.boundaries[1:])]
                for x in (forward, backward)
            )
            self.schedule = build(name, p.pp, p.vpp, self.microbatches, costs=Costs(f, b, [x / 2 for x in b]))
        chunks = split_into_stages(self.model, self.boundaries)
        pp_rank = self.groups.coords.pp
        self.stages = {s: chunks[s] for s in self.schedule.stages_of(pp_rank)}
        if megatron:
            from sysopt.train.megatron_baseline import MegatronPipeline

            self.executor = MegatronPipeline(
                self.stages,
                self.groups,
                self._loss,
                microbatches=self.microbatches,
                hidden_size=self.job.model.dim,
                num_attention_heads=self.job.model.heads,
                timeout_s=self.job.train.collective_timeout_s,
            )
            return
        self.executor = ScheduleExecutor(
            self.schedule,
            self.stages,
            self._loss,
            boundary_shape=self._shape,
            group=self.groups.pp_group,
            loss_scale=1.0,
            receive_ahead=_receive_window(sched.receive_ahead, self.groups.pp_group),
        )

    def _shape(
        self, stage: int, microbatch: int | None = None, batch: Batch | None = None
    ) -> tuple[int, ...]:
        last_block = self.boundaries[stage + 1] - 1
        mb = self._current[microbatch] if batch is None else batch
        return block_output_shape(self.model, last_block, mb, tp=self.job.parallel.tp)

    def _loss(self, logits: torch.Tensor, mb: Batch) -> torch.Tensor:
        return vlm_loss(logits, mb, self._normalizer)

    # ---- one step -------------------------------------------------------------------------------
    def forward_backward(self, local: Batch, normalizer: torch.Tensor) -> torch.Tensor:
        """Run every microbatch of this rank's batch forward and backward; gradients accumulate in
        .grad and are reduced over dp. Returns the global loss (summed over pp and dp) on every rank."""
        micro = [self._prepare(local.shard(i, self.microbatches)) for i in range(self.microbatches)]
        self._normalizer = normalizer
        loss_sum = torch.zeros(())
        if self.executor is None:
            for i, mb in enumerate(micro):
                if self.grad_sync is not None:  # reduce during the last microbatch's backward only
                    self.grad_sync.enabled = i == len(micro) - 1
                loss = vlm_loss(self.model(mb), mb, normalizer)
                loss.backward()
                loss_sum += loss.detach()
        else:
            self._current = micro
            losses = self.executor.step(None, micro, micro, boundary_shape=self._shape)
            if losses:
                loss_sum += sum(float(x) for x in losses)
            dist.all_reduce(loss_sum, group=self.groups.pp_group)
        if self.grad_sync is not None:
            self.grad_sync.wait()
            dist.all_reduce(loss_sum, group=self.groups.dp_group)
        return loss_sum

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the whole model's gradient across tp and pp ranks (tp-replicated
        parameters counted once), like torch.nn.utils.clip_grad_norm_ on the unsharded model. Returns
        that norm; `max_norm` <= 0 (clipping off) only measures it, leaving the gradients as they are."""
        grads = [q.grad for q in self.params if q.grad is not None]
        if self.groups is None or (self.job.parallel.tp == 1 and self.job.parallel.pp == 1):
            total = torch.nn.utils.get_total_norm(grads)
            if max_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(self.params, max_norm, total)
            return total
        tp_rank = self.groups.coords.tp
        squares = torch.zeros((), dtype=torch.float64)
        for q in self.params:
            if q.grad is None:
                continue
            sharded = getattr(q, "tensor_parallel_shard", False)
            if sharded or tp_rank == 0:
                squares += q.grad.double().square().sum()
        if self.job.parallel.tp > 1:
            dist.all_reduce(squares, group=self.groups.tp_group)
        if self.job.parallel.pp > 1:
            dist.all_reduce(squares, group=self.groups.pp_group)
        total = squares.sqrt().float()
        if max_norm <= 0:
            return total
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)
        return total

    # ---- evaluation -----------------------------------------------------------------------------
    def _prepare(self, batch: Batch) -> Batch:
        p = self.job.parallel
        return pad_sequence(batch, p.tp) if p.tp > 1 and p.sequence_parallel else batch

    @torch.no_grad()
    def eval_counts(self, batch: Batch) -> torch.Tensor:
        """[4, tasks] tensor of `batch`, on every rank: exact-match hits, samples, summed answer-token
        cross-entropy and answer tokens."""
        batch = self._prepare(batch)
        if self.executor is None:
            self.model.eval()
            out = _eval_counts(self.model(batch), batch)
            self.model.train()
            return out
        # forward only, stage after stage: simple and schedule-free (eval is not the hot path)
        owner = self.schedule.stage_to_rank
        pp_ranks = self.groups.pp_ranks  # global rank of each pipeline rank, in pp order
        me = self.groups.coords.pp
        x = None
        out = torch.zeros(4, len(TASKS))
        for m in self.modules:
            m.eval()
        for stage in range(self.schedule.num_stages):
            if owner[stage] != me:
                continue
            if stage > 0 and owner[stage - 1] != me:
                x = torch.empty(self._shape(stage - 1, batch=batch))
                dist.recv(x, src=pp_ranks[owner[stage - 1]])
            x = self.stages[stage](x, batch)
            if stage == self.schedule.num_stages - 1:
                out = _eval_counts(x, batch)
            elif owner[stage + 1] != me:
                dist.send(x.contiguous(), dst=pp_ranks[owner[stage + 1]])
        for m in self.modules:
            m.train()
        dist.all_reduce(out, group=self.groups.pp_group)
        return out


def _costs_after_tp(model: VLM, costs: tuple[list[float], list[float]], tp: int):
    """Dense per-block costs mapped onto the tensor-parallel block list: sharded decoder blocks cost
    1/tp, the inserted sequence scatter/gather blocks nothing."""
    forward, backward = costs
    out_f, out_b, dense = [], [], 0
    for block in model.blocks:
        if isinstance(block, (SequenceScatter, SequenceGather)):
            out_f.append(0.0)
            out_b.append(0.0)
            continue
        share = 1.0 / tp if isinstance(block, TensorParallelBlock) else 1.0
        out_f.append(forward[dense] * share)
        out_b.append(backward[dense] * share)
        dense += 1
    return out_f, out_b


def _eval_counts(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per task: exact-match hits, samples, summed answer-token cross-entropy, answer tokens."""
    hit = (logits.argmax(-1) == batch.targets) | (batch.loss_mask == 0)
    ok = hit.all(dim=1).float()
    mask = batch.loss_mask.float()
    per_token = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none")
    out = torch.zeros(4, len(TASKS))
    out[0].index_add_(0, batch.task_ids, ok)
    out[1].index_add_(0, batch.task_ids, torch.ones_like(ok))
    out[2].index_add_(0, batch.task_ids, (per_token.view_as(mask) * mask).sum(dim=1))
    out[3].index_add_(0, batch.task_ids, mask.sum(dim=1))
    return out


def tp_overlap_profile(tp: int, *, calibrate: bool = False):
    """The calibration tp_overlap=auto plans from: measured on the CPU (where the trainer's TP layers run, also
    on a GPU host) with one thread per rank and collectives among `tp` ranks, as the TP group runs. With
    `calibrate`, a quick one is measured and cached when none is (run_training does, before launching);
    else None then."""
    from sysopt.hardware.cache import load_cached, load_or_calibrate

    found = load_cached(device="cpu", world_size=tp, threads=1)
    if found is None and calibrate:
        print(f"tp_overlap=auto: calibrating this CPU's GEMMs and {tp}-rank collectives once (quick, cached)")
        found = load_or_calibrate(quick=True, device="cpu", world_size=tp, threads=1)
    return found


def _overlap_policy(p):
    """The TP layers' overlap for parallel.tp_overlap / tp_chunks ("chunked:<k>" when a count is set; "auto"
    plans from tp_overlap_profile)."""
    from sysopt.tensor_parallel import OverlapPolicy

    if p.tp_overlap == "chunked" and p.tp_chunks is not None:
        return f"chunked:{p.tp_chunks}"
    if p.tp_overlap == "auto":
        profile = tp_overlap_profile(p.tp)
        if profile is None:
            raise ValueError(
                f"parallel.tp_overlap=auto needs a CPU calibration with {p.tp}-rank collectives and none is "
                "cached; run_training (sysopt-train) measures one before launching, or call "
                f"sysopt.train.parallel.tp_overlap_profile({p.tp}, calibrate=True) once"
            )
        return OverlapPolicy("auto", profile=profile)
    return p.tp_overlap


def _receive_window(receive_ahead: int | None, group: dist.ProcessGroup | None) -> int | None:
    """The executor's receive_ahead for schedule.receive_ahead: null (every receive at the step's start)
    holds on gloo only. NCCL runs a rank pair's sends and receives in order on one stream, so a receive
    posted before a send the peer is waiting for would stall the pair; there null means one ahead."""
    if receive_ahead is None and dist.get_backend(group) != "gloo":
        return 1
    return receive_ahead
