"""The planner's one cost model: per-layer GEMM times from the profile (precision-aware, via
sysopt.precision.auto), TP collectives exposed per the chunked-overlap model (sysopt.tensor_parallel.
chunk_model), pipeline stages split and timed by sysopt.schedules (partition + simulate), bucketed DP
all-reduce overlapped with the last backward, and the optimizer step from the offload placement model.
Memory per device: parameters, gradients, optimizer state (by offload plan) and peak activations."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from sysopt.offload.costs import cost_inputs_from_profile
from sysopt.offload.placement import HOST, PhaseTimes, make_plan, predict_iteration
from sysopt.offload.subgroups import DEFAULT_SUBGROUP_BYTES
from sysopt.planner.context import Machine, PlannerCalibration, Workload
from sysopt.planner.device import dp_exposed_s, offload_subgroups, peak_activation_bytes
from sysopt.planner.space import PlanConfig, row_length_error
from sysopt.planner.workload import EXTRA_OPS_PER_LOW_PRECISION_LINEAR, Layer, Linear, layers
from sysopt.precision.auto import step_time_s as linear_step_time_s
from sysopt.precision.convert import MIN_FEATURES
from sysopt.precision.recipe import RECIPES
from sysopt.schedules import Costs, Simulation, build, partition, simulate
from sysopt.schedules.ir import B, F, I, W
from sysopt.schedules.partition import chunk_costs, even_boundaries, min_max_boundaries
from sysopt.schedules.simulate import step_time
from sysopt.tensor_parallel.chunk_model import (
    GemmCollective,
    chunk_overhead_s,
    collective_time_s,
    pipeline_time_s,
    profile_costs,
)


def unfold_sequence_parallel(
    series: tuple[tuple[float, ...], ...], model_layers: tuple[Layer, ...]
) -> tuple[tuple[float, ...], ...]:
    """Measured per-block series on the trainer's block list. A fit made before the planner counted the
    sequence-parallel blocks timed the scatter into the merge and the gather into the head: such series
    (two short at tp > 1) get a zero for each, their time staying where it was measured."""
    sp = [i for i, layer in enumerate(model_layers) if layer.sp_all_gather is not None]
    if not sp or len(series[0]) != len(model_layers) - len(sp):
        return series
    out = []
    for s in series:
        values = list(s)
        for i in sp:
            values.insert(i, 0.0)
        out.append(tuple(values))
    return tuple(out)


# Up to this many ways to split the layers, sysopt.schedules.partition searches them all (as it does
# itself); beyond it, its refinement would simulate thousands of splits per config, so the planner takes
# the better of partition's seeds (even split, min-max DP on forward + backward).
EXHAUSTIVE_PARTITION_LIMIT = 300


@dataclass(frozen=True)
class LayerCost:
    """One layer on one rank for one microbatch, seconds: forward, backward in one pass, and backward
    split as zero-bubble schedules run it (`input_s` then `weight_s`, which together may cost more than
    the one pass: the executor walks the graph twice). Each includes the TP collective time left exposed;
    `tp_forward_s` and `tp_backward_s` are that part. `measured`: from the calibration's LayerTimes (the
    collectives then sit inside the timed figures and the tp parts are the TP model's estimate of them);
    else modelled from GEMM rates, memory traffic and op counts."""

    name: str
    forward_s: float
    backward_s: float
    input_s: float
    weight_s: float
    tp_forward_s: float
    tp_backward_s: float
    measured: bool = False

    @classmethod
    def modelled(
        cls, name: str, compute_s: float, overhead_s: float, tp_forward_s: float, tp_backward_s: float
    ) -> LayerCost:
        """From one forward's compute and overhead: backward is twice the forward's work (input and weight
        gradients) plus its collectives; the weight gradient is half of that work."""
        work = compute_s + overhead_s
        backward = 2 * work + tp_backward_s
        return cls(name, work + tp_forward_s, backward, backward - work, work, tp_forward_s, tp_backward_s)


@dataclass(frozen=True)
class Memory:
    """Bytes one device holds at its peak; `host_bytes` is optimizer state it offloaded to the host."""

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    host_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_bytes": self.total_bytes}


@dataclass(frozen=True)
class Prediction:
    """Predicted step of one config. step_s = compute_s + tp_comm_s + bubble_s + dp_comm_s +
    optimizer_s + overhead_s, all on `critical_rank` (the rank that finishes last)."""

    config: PlanConfig
    step_s: float
    compute_s: float
    tp_comm_s: float
    bubble_s: float
    dp_comm_s: float
    optimizer_s: float
    overhead_s: float
    critical_rank: int
    peak_memory_bytes: int
    memory: Memory  # of the rank with the most memory
    host_memory_bytes: int  # offloaded optimizer state over all ranks
    boundaries: tuple[int, ...]  # chunk c holds layers boundaries[c]:boundaries[c+1]
    # offload=interleaved: the device budget for optimizer state its plans assumed (the least over ranks:
    # the trainer's offload.device_budget_bytes is one value for every rank); None for other strategies
    offload_budget_bytes: int | None = None

    def breakdown(self) -> dict[str, float]:
        return {
            "compute_s": self.compute_s,
            "tp_comm_s": self.tp_comm_s,
            "bubble_s": self.bubble_s,
            "dp_comm_s": self.dp_comm_s,
            "optimizer_s": self.optimizer_s,
            "overhead_s": self.overhead_s,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "predicted_step_s": self.step_s,
            "breakdown": self.breakdown(),
            "critical_rank": self.critical_rank,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory": self.memory.to_dict(),
            "host_memory_bytes": self.host_memory_bytes,
            "boundaries": list(self.boundaries),
            "offload_budget_bytes": self.offload_budget_bytes,
        }


@dataclass(frozen=True)
class _Pipeline:
    costs: tuple[LayerCost, ...]
    layers: tuple[Layer, ...]
    boundaries: tuple[int, ...]
    simulation: Simulation
    schedule: Any  # sysopt.schedules.Schedule


class CostModel:
    """Predicts step time and memory of PlanConfigs for one workload on one machine.

    `subgroup_bytes`: offload subgroup size (OffloadAdamW's default); `min_features`: linears narrower
    than this stay in high precision under a recipe (precision.convert's rule)."""

    def __init__(
        self,
        workload: Workload,
        machine: Machine,
        calibration: PlannerCalibration | None = None,
        subgroup_bytes: int = DEFAULT_SUBGROUP_BYTES,
        min_features: int = MIN_FEATURES,
    ) -> None:
        self.workload, self.machine = workload, machine
        self.calibration = calibration or PlannerCalibration()
        self.profile = machine.profile
        self.subgroup_bytes = subgroup_bytes
        self.min_features = min_features
        self.offload_costs = cost_inputs_from_profile(self.profile, "cuda:0" if machine.on_gpu else "cpu")
        self._layer_costs: dict[tuple, tuple[LayerCost, ...]] = {}
        self._pipelines: dict[tuple, _Pipeline] = {}
        self._chunk_choices: dict[tuple, int] = {}

    # ---- per layer ----------------------------------------------------------------------------
    def layers(self, micro_batch_size: int, tp: int = 1) -> tuple[Layer, ...]:
        """The blocks one of `tp` tensor-parallel ranks runs (workload.layers: the trainer's block list)."""
        return layers(self.workload.model, self.workload.microbatch(micro_batch_size), tp)

    def linear_s(self, linear: Linear, tp: int, precision: str | None) -> float:
        """Forward + grad-input + grad-weight GEMMs of one linear on one rank (precision.auto's model).

        A recipe applies where convert() would swap the layer (see `converted`)."""
        m, n, k = linear.shape(tp)
        recipe = RECIPES[precision] if self.converted(linear, precision) else None
        return linear_step_time_s(self.profile, recipe, m, n, k, self.machine.high)

    def converted(self, linear: Linear, precision: str | None) -> bool:
        """Whether convert() swaps `linear` under `precision`: swappable (not the model's first or last
        linear) and both features >= min_features."""
        return (
            precision is not None
            and linear.swappable
            and min(linear.in_features, linear.out_features) >= self.min_features
        )

    def ops(self, layer: Layer, precision: str | None) -> int:
        """Dispatched ops of one forward + backward of `layer`, its converted linears' extra ops included."""
        low = sum(self.converted(lin, precision) for lin in layer.linears)
        if not low:
            return layer.ops
        extra = EXTRA_OPS_PER_LOW_PRECISION_LINEAR[self.machine.kernel_backend]
        if precision not in extra:
            raise ValueError(
                f"precision={precision!r} has no op count in EXTRA_OPS_PER_LOW_PRECISION_LINEAR"
                f"[{self.machine.kernel_backend!r}] ({sorted(extra)}); count its ops and add it"
            )
        return layer.ops + low * extra[precision]

    def gemm_s(self, layer: Layer, tp: int, precision: str | None) -> float:
        """GEMM time of one forward: a third of each linear's three GEMMs plus the attention GEMMs
        (those always in the training dtype; heads split over tp only in sharded blocks)."""
        gemms = sum(self.linear_s(lin, tp, precision) for lin in layer.linears) / 3
        if layer.attention is not None:
            gemms += sum(
                self.profile.matmul_time_s(m, n, k, self.machine.high)
                for m, n, k in layer.attention.gemms(tp if layer.sharded else 1)
            )
        return gemms

    def elementwise_s(self, layer: Layer, tp: int) -> float:
        """Memory-bound ops of one forward (norms, GELU, residual adds) at the memory bandwidth; a sharded
        block runs them on its sequence shard, a replicated one on all rows."""
        split = tp if layer.sharded else 1
        nbytes = layer.elementwise_elements * self.machine.param_itemsize / split
        return nbytes / self.machine.memory_touch_bytes_per_s

    def tp_ops(self, layer: Layer, tp: int, gemms_per_block: int = 1) -> list[GemmCollective]:
        """The layer's sequence-parallel GEMM+collective pairs on a tp group."""
        if tp == 1:
            return []
        by_name = {lin.name: lin for lin in layer.linears}
        ops = []
        for kind, name in layer.tp_ops:
            m, n, k = by_name[name].shape(tp)
            ops.append(GemmCollective(kind, math.ceil(m / tp), n, k, tp, self.machine.high, gemms_per_block))
        return ops

    def sequence_parallel_s(self, layer: Layer, tp: int, phase: str) -> float:
        """The all-gather a sequence-parallel scatter (in backward) or gather (in forward) block runs
        on the whole [tokens, dim] tensor; nothing to hide it behind."""
        if tp == 1 or layer.sp_all_gather != phase:
            return 0.0
        nbytes = layer.output_elements * self.machine.param_itemsize
        return collective_time_s(self.profile, "all_gather", nbytes, tp)

    def exposed_collective_s(self, op: GemmCollective, overlap: str, chunks: int) -> float:
        """Collective time not hidden behind the GEMM: all of it without overlap; with 'chunked', the
        chunk pipeline's time beyond the unchunked GEMM (chunk_model.pipeline_time_s)."""
        costs = profile_costs(
            self.profile, op, chunk_overhead_s(self.profile)
        )  # as the trainer's `auto` reads it
        compute_s, comm_s, local_s = costs(1)
        if overlap == "none":
            return comm_s
        k = min(chunks, op.rows)
        return max(0.0, pipeline_time_s(op.kind, k, *costs(k)) - (compute_s + local_s))

    def choose_tp_chunks(self, tp: int, micro_batch_size: int, max_chunks: int = 16) -> int:
        """The chunk count (smallest on ties) that leaves the least collective time exposed over a
        decoder block's forward and backward GEMM+collective pairs, per the TP overlap model."""
        key = ("chunks", tp, micro_batch_size, max_chunks)
        if key not in self._chunk_choices:
            self._chunk_choices[key] = self._choose_tp_chunks(tp, micro_batch_size, max_chunks)
        return self._chunk_choices[key]

    def _choose_tp_chunks(self, tp: int, micro_batch_size: int, max_chunks: int) -> int:
        decoder = next(
            (layer for layer in self.layers(micro_batch_size, tp) if layer.kind == "decoder"), None
        )
        if decoder is None or tp == 1:
            return 1
        ops = self.tp_ops(decoder, tp) + self.tp_ops(decoder, tp, gemms_per_block=2)
        limit = min(max_chunks, min(op.rows for op in ops))
        return min(
            range(1, limit + 1), key=lambda k: sum(self.exposed_collective_s(op, "chunked", k) for op in ops)
        )

    def layer_costs(
        self, micro_batch_size: int, tp: int, tp_overlap: str, tp_chunks: int, precision: str | None
    ) -> tuple[LayerCost, ...]:
        """Per-layer costs: measured (the calibration's LayerTimes) where it holds this case, else modelled."""
        key = (micro_batch_size, tp, tp_overlap, tp_chunks, precision)
        if key not in self._layer_costs:
            cal = self.calibration
            model_layers = self.layers(micro_batch_size, tp)
            found = None
            if cal.layer_times is not None:
                found = cal.layer_times.lookup(precision, tp, tp_overlap, tp_chunks, micro_batch_size)
                if found is not None:
                    found = unfold_sequence_parallel(found, model_layers)
                if found is not None and len(found[0]) != len(model_layers):
                    raise ValueError(
                        f"the planner calibration times {len(found[0])} blocks but the model has "
                        f"{len(model_layers)} at tp={tp}; refit with sysopt-plan --fit for this model"
                    )
            out = []
            for i, layer in enumerate(model_layers):
                fwd = sum(
                    self.exposed_collective_s(op, tp_overlap, tp_chunks) for op in self.tp_ops(layer, tp)
                )
                fwd += self.sequence_parallel_s(layer, tp, "forward")
                bwd = sum(
                    self.exposed_collective_s(op, tp_overlap, tp_chunks) for op in self.tp_ops(layer, tp, 2)
                )
                bwd += self.sequence_parallel_s(layer, tp, "backward")
                if found is not None:
                    f_s, b_s, i_s, w_s = (series[i] for series in found)
                    out.append(LayerCost(layer.name, f_s, b_s, i_s, w_s, min(fwd, f_s), min(bwd, b_s), True))
                    continue
                compute_s = cal.gemm_scale * self.gemm_s(layer, tp, precision) + self.elementwise_s(layer, tp)
                overhead_s = cal.op_overhead_s * self.ops(layer, precision) / 3  # forward's third
                out.append(LayerCost.modelled(layer.name, compute_s, overhead_s, fwd, bwd))
            self._layer_costs[key] = tuple(out)
        return self._layer_costs[key]

    # ---- pipeline -----------------------------------------------------------------------------
    def output_bytes(self, layer: Layer, tp: int) -> int:
        """Bytes of one microbatch's output of `layer` on one rank: the sequence shard after the scatter
        and in the decoder, the whole tensor elsewhere (sysopt.models.parallel.block_output_shape)."""
        return layer.output_elements * self.machine.param_itemsize // (tp if layer.output_sharded else 1)

    def p2p_s(self, layer: Layer, tp: int) -> float:
        """Send one microbatch's output of `layer` to the next stage."""
        return self.profile.p2p_time_s(self.output_bytes(layer, tp))

    def pipeline(self, c: PlanConfig, boundaries: tuple[int, ...] | None = None) -> _Pipeline:
        """The pipeline of `c`: its split (the cost-based partition, or `boundaries` when given, e.g. the
        split a measured run used), per-stage costs and simulated step."""
        key = (c.micro_batch_size, c.tp, c.tp_overlap, c.tp_chunks, c.precision, c.pp, c.vpp, c.schedule)
        key += (c.microbatches, None if boundaries is None else tuple(boundaries))
        if key in self._pipelines:
            return self._pipelines[key]
        costs = self.layer_costs(c.micro_batch_size, c.tp, c.tp_overlap, c.tp_chunks, c.precision)
        model_layers = self.layers(c.micro_batch_size, c.tp)
        schedule = build(c.schedule, c.pp, c.vpp, c.microbatches)
        split = any(a.kind is W for acts in schedule.actions.values() for a in acts)
        f = [lc.forward_s for lc in costs]
        b = [lc.input_s + lc.weight_s if split else lc.backward_s for lc in costs]
        w = [min(lc.weight_s, bb) for lc, bb in zip(costs, b)]  # (used by split schedules only)

        a = self.calibration.action_overhead_s
        # each stage's forward receives from the stage before and sends to the one after where they sit on
        # other ranks (its backward likewise, the other way): every such message costs the rank
        # message_overhead_s of its own time (posting, matching and completing it)
        owner = schedule.stage_to_rank
        last = len(owner) - 1
        messages = [
            int(s > 0 and owner[s - 1] != owner[s]) + int(s < last and owner[s + 1] != owner[s])
            for s in range(len(owner))
        ]
        msg = [self.calibration.message_overhead_s * n for n in messages]
        hop = self.calibration.hop_latency_s

        def stage_costs(bounds: tuple[int, ...]) -> Costs:
            sf, sb, sw = chunk_costs(bounds, f, b, w)
            p2p = [self.p2p_s(model_layers[end - 1], c.tp) + hop if c.pp > 1 else 0.0 for end in bounds[1:]]
            # F pays one action overhead; a backward two (I and W), which split schedules pay separately
            return Costs(
                [x + a + m for x, m in zip(sf, msg)],
                [x + 2 * a + m for x, m in zip(sb, msg)],
                [x + a for x in sw],
                p2p,
            )

        chunks = c.pp * c.vpp
        if boundaries is not None:
            boundaries = tuple(boundaries)
            if len(boundaries) != chunks + 1 or boundaries[0] != 0 or boundaries[-1] != len(costs):
                raise ValueError(
                    f"boundaries={list(boundaries)} do not cut {len(costs)} layers into pp*vpp={chunks} chunks"
                )
        elif chunks == 1:
            boundaries = (0, len(costs))
        elif math.comb(len(costs) - 1, chunks - 1) <= EXHAUSTIVE_PARTITION_LIMIT:
            p2p_max = max(self.p2p_s(layer, c.tp) for layer in model_layers)
            found = partition(  # the order this config simulates, kept on every split
                f, b, w, pp=c.pp, vpp=c.vpp, schedule=schedule, microbatches=c.microbatches, p2p=p2p_max
            )
            boundaries = found.boundaries
        else:  # too many splits to search per config: the better of partition's two seeds
            seeds = {
                even_boundaries(len(costs), chunks),
                min_max_boundaries([x + y for x, y in zip(f, b)], chunks),
            }
            boundaries = min(sorted(seeds), key=lambda bounds: step_time(schedule, stage_costs(bounds)))
        sim = simulate(schedule, stage_costs(boundaries), check=False)
        self._pipelines[key] = _Pipeline(costs, model_layers, boundaries, sim, schedule)
        return self._pipelines[key]

    # ---- whole step ---------------------------------------------------------------------------
    def predict(self, config: PlanConfig, boundaries: tuple[int, ...] | None = None) -> Prediction:
        """Step time and peak memory per device of `config` (raises ValueError if it cannot be modelled or
        the trainer cannot run its rows), on the planner's own pipeline split or on `boundaries`."""
        problem = row_length_error(self.workload.model, self.workload.seq_len, config.tp)
        if problem:
            raise ValueError(problem)
        pipe = self.pipeline(config, boundaries)
        ranks = []
        for rank in sorted(pipe.simulation.timeline):
            ranks.append(self._rank(config, pipe, rank))
        critical = max(ranks, key=lambda r: r["total_s"])
        fullest = max(ranks, key=lambda r: r["memory"].total_bytes)
        return Prediction(
            config=config,
            step_s=critical["total_s"],
            compute_s=critical["busy_s"] - critical["tp_s"],
            tp_comm_s=critical["tp_s"],
            bubble_s=critical["end_s"] - critical["busy_s"],
            dp_comm_s=critical["dp_s"],
            optimizer_s=critical["optimizer_s"],
            overhead_s=self.calibration.step_overhead_s,
            critical_rank=critical["rank"],
            peak_memory_bytes=fullest["memory"].total_bytes,
            memory=fullest["memory"],
            host_memory_bytes=sum(r["memory"].host_bytes for r in ranks) * config.tp * config.dp,
            boundaries=pipe.boundaries,
            offload_budget_bytes=(
                min(r["offload_budget_bytes"] for r in ranks) if config.offload == "interleaved" else None
            ),
        )

    def _rank(self, c: PlanConfig, pipe: _Pipeline, rank: int) -> dict[str, Any]:
        sched, spans = pipe.schedule, pipe.simulation.timeline[rank]
        stages = [s for s, r in enumerate(sched.stage_to_rank) if r == rank]
        stage_layers = {s: range(pipe.boundaries[s], pipe.boundaries[s + 1]) for s in stages}
        tp_f = {s: sum(pipe.costs[i].tp_forward_s for i in stage_layers[s]) for s in stages}
        tp_b = {s: sum(pipe.costs[i].tp_backward_s for i in stage_layers[s]) for s in stages}
        tp_s = sum(tp_f[sp.action.stage] if sp.action.kind is F else 0.0 for sp in spans)
        tp_s += sum(tp_b[sp.action.stage] if sp.action.kind in (B, I) else 0.0 for sp in spans)
        end_s = max(sp.end for sp in spans)
        busy_s = sum(sp.end - sp.start for sp in spans)
        last = c.microbatches - 1
        window_s = sum(
            sp.end - sp.start for sp in spans if sp.action.microbatch == last and sp.action.kind in (B, I, W)
        )
        # layers in the order backward finishes their gradients: later stages first, last layer first
        ready = [pipe.layers[i] for s in sorted(stages, reverse=True) for i in reversed(stage_layers[s])]
        numel = sum(layer.params_per_rank(c.tp) for layer in ready)
        itemsize = self.machine.param_itemsize
        # the trainer reduces buckets during the last microbatch's backward without a pipeline, and after
        # the executor's step under one (sysopt.train.parallel), where it is all exposed
        dp_s = dp_exposed_s(self.profile, numel * itemsize, window_s if c.pp == 1 else 0.0, c.dp)
        stage_bytes = {
            s: sum(
                pipe.layers[i].saved_elements * itemsize // (c.tp if pipe.layers[i].sharded else 1)
                for i in idx
            )
            for s, idx in stage_layers.items()
        }
        # the trainer posts every receive at the step's start on gloo, one compute ahead on NCCL (small)
        boundary_bytes = None
        if not self.machine.on_gpu:
            boundary_bytes = {  # a stage's last layer output (as p2p_s sends it)
                s: self.output_bytes(pipe.layers[pipe.boundaries[s + 1] - 1], c.tp)
                for s in range(len(pipe.boundaries) - 1)
            }
        act_bytes = peak_activation_bytes(pipe.schedule, rank, stage_bytes, boundary_bytes)
        base = 2 * numel * itemsize + act_bytes
        subgroups = offload_subgroups(
            [layer.params_per_rank(c.tp) for layer in ready], itemsize, self.subgroup_bytes
        )
        plan_budget = sum(g.device_state_bytes for g in subgroups)
        if c.offload == "interleaved":
            plan_budget = max(0, self.machine.memory_bytes - base)
        phases = PhaseTimes(forward_s=end_s - window_s, backward_s=window_s)
        plan = make_plan(
            c.offload, subgroups, device_budget_bytes=plan_budget, costs=self.offload_costs, phases=phases
        )
        optimizer_s = predict_iteration(subgroups, plan.placements, self.offload_costs, phases).step_s
        host_bytes = sum(g.host_state_bytes for g, p in zip(subgroups, plan.placements) if p == HOST)
        # per host-resident parameter tensor: its gradient hook, copy submissions and waits (fitted)
        all_host_bytes = sum(g.host_state_bytes for g in subgroups)
        tensors = sum(layer.param_tensors for layer in ready)
        host_tensors = tensors * host_bytes / all_host_bytes if all_host_bytes else 0.0
        optimizer_s += self.calibration.host_tensor_overhead_s * host_tensors
        # on a CPU the host is the device: offloaded state stays in the same memory
        optimizer_bytes = plan.device_state_bytes + (0 if self.machine.on_gpu else host_bytes)
        memory = Memory(numel * itemsize, numel * itemsize, optimizer_bytes, act_bytes, host_bytes)
        total_s = end_s + dp_s + optimizer_s + self.calibration.step_overhead_s
        return {
            "rank": rank,
            "total_s": total_s,
            "end_s": end_s,
            "busy_s": busy_s,
            "tp_s": tp_s,
            "dp_s": dp_s,
            "optimizer_s": optimizer_s,
            "memory": memory,
            "offload_budget_bytes": plan_budget,
        }
