"""sysopt.planner: enumeration rules, the cost model against closed forms and the simulator, memory
rejection, ranking, explain, the CLI's JSON, calibration and the measure path (no training runs)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re

import pytest

from sysopt.data import DigitsTaskConfig
from sysopt.hardware import CPUInfo, GPUInfo, HardwareProfile, LinkFit
from sysopt.hardware.profile import Calibration, MatmulPoint
from sysopt.models import VLM, VLMConfig
from sysopt.models.parallel import block_count
from sysopt.planner import (
    CostModel,
    Machine,
    PlanConfig,
    SpaceOptions,
    Workload,
    enumerate_configs,
    explain,
    fit_op_overhead,
    layers,
    param_count,
    rank,
    violations,
)
from sysopt.planner.measure import job_for, measure_config, trainer_overrides
from sysopt.planner.space import TP_OVERLAPS
from sysopt.schedules import Costs, build, simulate
from sysopt.schedules.partition import chunk_costs
from sysopt.tensor_parallel.chunk_model import collective_time_s

# pinned (not VLMConfig()'s defaults, which may change): 7 blocks, heads 4 / vision_heads 4
MODEL = VLMConfig(vision_dim=64, vision_layers=2, vision_heads=4, dim=128, layers=2, heads=4, mlp_ratio=4)
DATA = DigitsTaskConfig()
RATE = 1e11  # FLOP/s at every size: GEMM time is exactly proportional to FLOPs


def cpu_profile(
    *, host_memory_bytes: int = 64 << 30, memcpy_bytes_per_s: float = 1e30, rates=None
) -> HardwareProfile:
    """A synthetic CPU profile: one matmul point per dtype (so rates are flat), fits with round numbers."""
    rates = rates or {"fp32": RATE}
    points = tuple(MatmulPoint(d, 512, 512, 512, 2 * 512**3 / r, r) for d, r in rates.items())
    cal = Calibration(
        device="cpu",
        matmul=points,
        matmul_flops_per_s=dict(rates),
        copy={"memcpy": LinkFit(0.0, memcpy_bytes_per_s)},
        p2p=LinkFit(1e-4, 1e9),
        allreduce=LinkFit(2e-4, 5e8),
        collective_world_size=2,
        collective_backend="gloo",
        optimizer_params_per_s={"host": 1e8, "device": 1e8},
        created="test",
    )
    cpu = CPUInfo("test cpu", 4, 4, ("avx2",), host_memory_bytes)
    return HardwareProfile(cpu, (), cal, "test")


def gpu_profile(memory_bytes: int, devices: int = 2) -> HardwareProfile:
    base = cpu_profile(rates={"bf16": 1e14, "fp32": 1e13})
    gpus = tuple(
        GPUInfo(i, "Test GPU", memory_bytes, memory_bytes, 5, 16, 0, None, None) for i in range(devices)
    )
    link = {k: LinkFit(1e-5, 2e10) for k in ("h2d_pinned", "d2h_pinned")}
    cal = dataclasses.replace(
        base.calibration, device="cuda:0", copy=link, optimizer_params_per_s={"host": 1e9, "device": 1e10}
    )
    return dataclasses.replace(base, gpus=gpus, calibration=cal)


def cost_model(profile=None, devices=2, global_batch=16, **kwargs) -> CostModel:
    workload = Workload.from_data(MODEL, DATA, global_batch)
    return CostModel(workload, Machine.from_profile(profile or cpu_profile(), devices), **kwargs)


# ---- enumeration ---------------------------------------------------------------------------------


def test_enumeration_equals_brute_force_over_the_rules():
    options = SpaceOptions(offloads=("device", "host"), precisions=(None, "int8_rowwise"), max_vpp=3)
    found = set(enumerate_configs(MODEL, 4, 16, options))
    brute = set()
    for tp, pp, vpp, dp, m, mbs in itertools.product(
        (1, 2, 4), (1, 2, 4), (1, 2, 3), (1, 2, 4), (1, 2, 4, 8, 16), (1, 2, 3, 4, 8, 16)
    ):
        for schedule, overlap, offload, precision in itertools.product(
            options.schedules, TP_OVERLAPS, options.offloads, options.precisions
        ):
            chunks = 4 if overlap == "chunked" else 1
            c = PlanConfig(tp, pp, vpp, dp, schedule, m, mbs, overlap, chunks, offload, precision)
            if not violations(c, MODEL, 4, 16):
                brute.add(c)
    assert found == brute
    assert {c.pp for c in found} == {1, 2, 4} and {c.tp for c in found} == {1, 2, 4}
    assert {c.schedule for c in found} >= {"1f1b", "interleaved_1f1b", "zbv", "dualpipev", "zb_h1", "gpipe"}


@pytest.mark.parametrize(
    "config, devices, fragment",
    [
        (PlanConfig(dp=2, micro_batch_size=8), 4, "must equal the 4 devices"),
        (PlanConfig(dp=2, micro_batch_size=4), 2, "must equal the global batch 16"),
        (PlanConfig(tp=8, dp=1, micro_batch_size=16), 8, "model.heads=4 is not divisible by tp=8"),
        (PlanConfig(pp=8, dp=1, schedule="gpipe", microbatches=16), 8, "exceed the model's 7 blocks"),
        (
            PlanConfig(pp=4, vpp=2, schedule="interleaved_1f1b", microbatches=16),
            4,
            "exceed the model's 7 blocks",
        ),
        (PlanConfig(vpp=2, dp=2, micro_batch_size=8), 2, "vpp=2 needs pp >= 2"),
        (
            PlanConfig(dp=2, schedule="gpipe", micro_batch_size=8),
            2,
            "with pp=1 is plain gradient accumulation",
        ),
        (PlanConfig(pp=2, schedule="nope", microbatches=16), 2, "is not one of"),
        (
            PlanConfig(pp=2, vpp=2, schedule="interleaved_1f1b", microbatches=1, micro_batch_size=16),
            2,
            "must be >= pp=2",
        ),
        (
            PlanConfig(pp=2, vpp=2, schedule="dualpipev", microbatches=2, micro_batch_size=8),
            2,
            "must be >= 2*pp=4",
        ),
        (PlanConfig(pp=2, vpp=2, schedule="1f1b", microbatches=16), 2, "vpp=2 is not supported by 1f1b"),
        (PlanConfig(dp=2, micro_batch_size=8, tp_overlap="chunked", tp_chunks=4), 2, "needs tp >= 2"),
        (PlanConfig(tp=2, micro_batch_size=16, tp_chunks=4), 2, "needs tp_overlap='chunked'"),
        (PlanConfig(tp=2, micro_batch_size=16, tp_overlap="t3"), 2, "tp_overlap='t3' is not one of"),
        (PlanConfig(dp=2, micro_batch_size=8, offload="disk"), 2, "offload='disk' is not one of"),
        (PlanConfig(dp=2, micro_batch_size=8, precision="fp4"), 2, "precision='fp4' is not a recipe"),
        (PlanConfig(dp=0), 2, "dp=0 must be >= 1"),
        (PlanConfig(tp=2, pp=2, dp=2, microbatches=2, micro_batch_size=2), 6, "no dp fits, since 6 is not a"),
        (PlanConfig(dp=2, micro_batch_size=4), 2, "global batch 16; use micro_batch_size=8"),
    ],
)
def test_every_rule_rejects_its_case(config, devices, fragment):
    reasons = violations(config, MODEL, devices, 16)
    assert any(fragment in r for r in reasons), reasons
    assert config not in set(enumerate_configs(MODEL, devices, 16))


def test_rows_padded_for_sequence_parallelism_must_fit_max_seq():
    """The trainer pads rows to a multiple of tp for sequence parallelism and refuses rows longer than
    model.max_seq: the planner applies the same rule (enumeration, violations, predict)."""
    from sysopt.planner.measure import base_job_for
    from sysopt.train import ConfigError

    row = DATA.row_len  # 11 tokens: tp=2 pads to 12
    tight = dataclasses.replace(MODEL, max_seq=row)
    c = PlanConfig(tp=2, microbatches=1, micro_batch_size=16)
    workload = Workload.from_data(tight, DATA, 16)
    with pytest.raises(ValueError, match="raise model.max_seq to 12"):
        CostModel(workload, Machine.from_profile(cpu_profile(), 2)).predict(c)
    reasons = violations(c, tight, 2, 16, row_len=row)
    assert any(
        "padded to 12" in r and "model.max_seq=11" in r and "raise model.max_seq to 12" in r for r in reasons
    )
    with pytest.raises(ConfigError, match="padded for sequence parallelism are 12 tokens"):
        job_for(c, base_job_for(tight, DATA, 16, 2))
    assert {x.tp for x in enumerate_configs(tight, 2, 16, row_len=row)} == {1}
    roomy = dataclasses.replace(MODEL, max_seq=row + 1)  # room for the padding: both accept tp=2
    assert violations(c, roomy, 2, 16, row_len=row) == []
    job_for(c, base_job_for(roomy, DATA, 16, 2))
    assert any(
        "exceed model.max_seq=10" in r
        for r in violations(
            PlanConfig(dp=2, micro_batch_size=8), dataclasses.replace(MODEL, max_seq=10), 2, 16, row_len=row
        )
    )


def test_a_valid_config_has_no_violations_and_overrides_name_every_knob():
    c = PlanConfig(2, 2, 1, 1, "1f1b", 4, 4, "chunked", 3, "host", "int8_rowwise")
    assert violations(c, MODEL, 4, 16) == []
    overrides = dict(o.split("=") for o in c.to_overrides(64))
    assert overrides["parallel.tp"] == "2" and overrides["schedule.microbatches"] == "4"
    assert overrides["parallel.tp_chunks"] == "3" and overrides["offload.strategy"] == "host"
    assert overrides["precision.recipe"] == "int8_rowwise" and overrides["precision.min_features"] == "64"
    assert int(overrides["train.global_batch"]) == c.global_batch == 16
    assert PlanConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_the_printed_command_for_no_offload_runs_torch_adamw_as_measured_and_fitted():
    """off:device is modelled, measured (planner --measure) and fitted with torch's fused AdamW; the printed
    command ran OffloadAdamW(strategy='device') instead."""
    from sysopt.cli.train import compose_job
    from sysopt.planner.measure import trainer_overrides

    c = PlanConfig(dp=2, micro_batch_size=8, offload="device")
    printed = compose_job(c.to_overrides())
    assert printed.offload.strategy == "none"
    assert compose_job(trainer_overrides(c)).offload == printed.offload  # the same job as --measure runs


def test_the_printed_command_for_interleaved_offload_carries_the_budget_its_plan_assumed():
    """The planner plans offload=interleaved against the device memory left after weights, gradients and
    activations; its command left offload.device_budget_bytes out, so OffloadAdamW planned against all free
    memory measured before any activation existed, a different (and on a GPU, an optimistic) placement."""
    from sysopt.cli.train import compose_job

    model = cost_model(gpu_profile(1 << 30), devices=2)
    c = PlanConfig(dp=2, micro_batch_size=8, offload="interleaved")
    p = model.predict(c)
    m = p.memory  # dp=2: both ranks hold the same
    assert p.offload_budget_bytes == model.machine.memory_bytes - (
        m.params_bytes + m.grads_bytes + m.activations_bytes
    )
    assert m.optimizer_bytes <= p.offload_budget_bytes
    assert model.predict(dataclasses.replace(c, offload="host")).offload_budget_bytes is None
    text = explain(rank(model, [c]))
    assert f"offload.device_budget_bytes={p.offload_budget_bytes}" in text
    printed = compose_job(c.to_overrides(None, None, p.offload_budget_bytes))
    assert printed.offload.strategy == "interleaved"
    assert printed.offload.device_budget_bytes == p.offload_budget_bytes
    host = dataclasses.replace(c, offload="host").to_overrides(None, None, 123)
    assert not any(
        o.startswith("offload.device_budget_bytes") for o in host
    )  # only interleaved plans with it


# ---- cost model --------------------------------------------------------------------------------


def test_packed_rows_are_pack_len_tokens_holding_several_samples():
    """With data.pack_len a trainer row is pack_len tokens holding several samples and their images: the
    workload's microbatches have that shape, so activations and ViT work grow with the packing."""
    from sysopt.data import BatchSampler, DigitsDataset

    packed = dataclasses.replace(DATA, pack_len=32, n_train=2000, n_eval_per_task=5)
    workload = Workload.from_data(MODEL, packed, 16)
    shape = workload.microbatch(16)
    assert shape.seq_len == 32 and workload.samples_per_row > 3
    sampler = BatchSampler(DigitsDataset(packed, "train"), 16)
    trained = [sampler.global_batch(step) for step in range(4)]
    assert {tuple(b.tokens.shape) for b in trained} == {(16, 32)}
    images = sum(b.images.shape[0] for b in trained) / len(trained)
    assert shape.images == pytest.approx(images, rel=0.1)
    assert Workload.from_data(MODEL, DATA, 16).microbatch(16).seq_len == DATA.seq_len  # unpacked: one sample
    machine = Machine.from_profile(cpu_profile(), 1)
    c = PlanConfig(microbatches=4, micro_batch_size=4)
    unpacked = CostModel(Workload.from_data(MODEL, DATA, 16), machine).predict(c)
    assert (
        CostModel(workload, machine).predict(c).memory.activations_bytes
        > 2 * unpacked.memory.activations_bytes
    )


def test_param_count_matches_the_model():
    for config in (
        MODEL,
        VLMConfig(dim=96, heads=6, layers=3, vision_layers=1, tokens_per_image=4, mlp_ratio=2),
    ):
        assert param_count(config) == VLM(config).param_count()


def _tensor_parallel_blocks(config_json: str, sequences: int, tokens: int, images: int):
    """On each rank of a tp group: the trainer's blocks (tensor_parallelize) as (kind, parameters held on
    this rank, elements of the output this rank sends on)."""
    import math
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from sysopt.models import LMHead, TransformerBlock, VisionEmbed
    from sysopt.models.parallel import SequenceGather, SequenceScatter, block_output_shape, tensor_parallelize
    from sysopt.models.vlm import ImageTextMerge
    from sysopt.tensor_parallel import TensorParallelBlock

    kinds = {
        VisionEmbed: "embed",
        TransformerBlock: "vit",  # a dense transformer block: only the vision tower keeps them
        ImageTextMerge: "merge",
        SequenceScatter: "scatter",
        TensorParallelBlock: "decoder",
        SequenceGather: "gather",
        LMHead: "head",
    }
    model = tensor_parallelize(VLM(VLMConfig.from_json(config_json)), dist.group.WORLD)
    batch = SimpleNamespace(tokens=torch.zeros(sequences, tokens), images=torch.zeros(images, 8, 8))
    tp = dist.get_world_size()
    return [
        (
            kinds[type(block)],
            sum(p.numel() for p in block.parameters()),
            math.prod(block_output_shape(model, i, batch, tp)),
        )
        for i, block in enumerate(model.blocks)
    ]


@pytest.mark.timeout(120)
def test_tensor_parallel_layers_are_the_trainers_blocks():
    """At tp=2 the trainer shards only the decoder blocks (ViT, merge and head stay replicated) and adds
    the sequence scatter/gather blocks: the planner's layers match it block by block (kind, parameters held
    per rank, elements sent on), and its memory holds the parameters a rank really holds."""
    from sysopt.dist import launch
    from sysopt.planner.workload import BatchShape

    shape = BatchShape(4, DATA.seq_len, 9)  # 11-token rows: sequence parallelism pads them to 12
    blocks = launch(_tensor_parallel_blocks, 2, (MODEL.to_json(), 4, 12, 9), backend="gloo", timeout_s=90)
    assert blocks[0] == blocks[1]
    planned = layers(MODEL, shape, tp=2)
    assert len(planned) == len(blocks[0]) == block_count(MODEL, tp=2)
    for layer, (kind, params, sent) in zip(planned, blocks[0]):
        assert (layer.kind, layer.params_per_rank(2)) == (kind, params), layer.name
        assert layer.output_elements // (2 if layer.output_sharded else 1) == sent, layer.name
        if kind in ("vit", "merge", "head"):  # replicated: nothing split, no tensor-parallel collective
            assert layer.split_params == 0 and not layer.tp_ops and not layer.sharded
    held = sum(params for _, params, _ in blocks[0])
    assert held > param_count(MODEL) // 2  # the replicated tower and head dominate this small model
    p = cost_model(devices=2).predict(PlanConfig(tp=2, microbatches=1, micro_batch_size=16))
    assert p.memory.params_bytes == p.memory.grads_bytes == 4 * held


def test_replicated_blocks_cost_the_same_at_any_tp():
    """The ViT blocks and the head run whole on every tp rank: their GEMMs are not divided by tp, they
    add no collective, and the head keeps its full logits; only the decoder blocks shard."""
    model = cost_model(devices=2)
    tp1 = {layer.name: layer for layer in model.layers(8)}
    tp2 = {layer.name: layer for layer in model.layers(8, 2)}
    costs1 = dict(zip(tp1, model.layer_costs(8, 1, "none", 1, None)))
    costs2 = dict(zip(tp2, model.layer_costs(8, 2, "none", 1, None)))
    for name in ("embed", "vit0", "vit1", "merge"):
        assert costs2[name] == costs1[name]
        assert model.gemm_s(tp2[name], 2, None) == model.gemm_s(tp1[name], 1, None)
    assert costs2["head"].tp_forward_s == costs2["head"].tp_backward_s == 0
    assert tp2["head"].output_elements == 8 * (DATA.seq_len + 1) * MODEL.vocab_size
    tokens_bytes = 8 * (DATA.seq_len + 1) * MODEL.dim * 4  # the sequence all-gathers move [tokens, dim]
    gather = collective_time_s(model.profile, "all_gather", tokens_bytes, 2)
    assert (
        costs2["sp_gather"].tp_forward_s == pytest.approx(gather) and costs2["sp_gather"].tp_backward_s == 0
    )
    assert (
        costs2["sp_scatter"].tp_backward_s == pytest.approx(gather) and costs2["sp_scatter"].tp_forward_s == 0
    )
    # the dp all-reduce moves every parameter a rank holds, replicated ones included
    held = sum(layer.params_per_rank(2) for layer in tp2.values())
    assert held > param_count(MODEL) / 2
    p = cost_model(devices=4).predict(PlanConfig(tp=2, dp=2, micro_batch_size=8))
    assert p.memory.params_bytes == 4 * held


def test_tp_pipelines_cut_the_trainers_blocks():
    """With tp > 1 and pp > 1 the planner splits the trainer's block list (sequence scatter/gather
    included), so the trainer runs the split it prints; and it allows as many chunks as the trainer does."""
    from sysopt.planner.measure import base_job_for
    from sysopt.planner.space import num_blocks

    base = base_job_for(MODEL, DATA, 16, 2)
    model = cost_model(devices=4)
    c = PlanConfig(tp=2, pp=2, schedule="1f1b", microbatches=4, micro_batch_size=4)
    p = model.predict(c)
    assert p.boundaries[-1] == block_count(MODEL, tp=2) == 9
    overrides = c.to_overrides(64, p.boundaries)
    assert f"parallel.boundaries=[{','.join(map(str, p.boundaries))}]" in overrides
    assert job_for(c, base, 64, p.boundaries).parallel.boundaries == p.boundaries  # the trainer accepts it
    # a split the trainer ran (as a measured record reports it) is predicted on the same blocks
    assert model.predict(c, (0, 4, 9)).boundaries == (0, 4, 9)
    # 8 chunks over 9 blocks: the trainer runs it, so the planner must not reject it
    wide = PlanConfig(tp=2, pp=4, vpp=2, schedule="interleaved_1f1b", microbatches=8, micro_batch_size=2)
    assert violations(wide, MODEL, 8, 16) == []
    job_for(wide, base, 64)
    assert any("9 blocks" in r for r in violations(dataclasses.replace(wide, vpp=3), MODEL, 8, 16))
    shape = Workload.from_data(MODEL, DATA, 16).microbatch(4)
    for tp in (1, 2, 4):  # the planner's rule is the trainer's
        assert num_blocks(MODEL, tp) == block_count(MODEL, tp=tp) == len(layers(MODEL, shape, tp))


def test_layer_times_of_a_fit_that_folded_the_sequence_blocks_still_apply():
    """A fit made before the planner counted the scatter/gather blocks timed them inside the merge and the
    head (two entries short at tp=2): those series get zeros for the two blocks."""
    from sysopt.planner import PlannerCalibration

    folded = _layer_times(sizes=(4, 8), tp=2)  # one entry per dense block
    model = CostModel(
        Workload.from_data(MODEL, DATA, 16),
        Machine.from_profile(cpu_profile(), 2),
        PlannerCalibration(layer_times=folded),
    )
    costs = model.layer_costs(4, 2, "none", 1, None)
    names = [layer.name for layer in model.layers(4, 2)]
    f = folded.lookup(None, 2, "none", 1, 4)[0]
    assert len(costs) == len(f) + 2 and all(c.measured for c in costs)
    assert [c.forward_s for c in costs] == [*f[:4], 0.0, *f[4:6], 0.0, *f[6:]]
    assert names[4] == "sp_scatter" and names[7] == "sp_gather"


def matmul_total_s(profile: HardwareProfile, layers, tp: int = 1) -> float:
    """Forward + both backward GEMMs of every linear and 3x the attention GEMMs, straight from the profile."""
    total = 0.0
    for layer in layers:
        for lin in layer.linears:
            m, n, k = lin.shape(tp)
            total += sum(profile.matmul_time_s(*s) for s in ((m, n, k), (m, k, n), (n, k, m)))
        if layer.attention is not None:
            total += 3 * sum(profile.matmul_time_s(*s) for s in layer.attention.gemms(tp))
    return total


@pytest.mark.parametrize("microbatches", [1, 4])
def test_pp1_tp1_step_is_the_sum_of_matmul_times_plus_the_optimizer(microbatches):
    profile = cpu_profile()  # memcpy at 1e30 B/s: memory-bound ops cost nothing
    model = cost_model(profile, devices=1)
    c = PlanConfig(microbatches=microbatches, micro_batch_size=16 // microbatches)
    p = model.predict(c)
    expected_compute = microbatches * matmul_total_s(profile, model.layers(c.micro_batch_size))
    assert p.compute_s == pytest.approx(expected_compute, rel=1e-9)
    assert p.optimizer_s == pytest.approx(param_count(MODEL) / 1e8, rel=1e-9)  # shared processor: all adds up
    assert p.bubble_s == pytest.approx(0.0, abs=1e-12) and p.tp_comm_s == 0 and p.dp_comm_s == 0
    assert p.step_s == pytest.approx(expected_compute + p.optimizer_s, rel=1e-9)


def test_pipeline_bubble_and_step_match_the_simulator():
    model = cost_model(devices=2)
    c = PlanConfig(pp=2, schedule="1f1b", microbatches=4, micro_batch_size=4)
    p = model.predict(c)
    costs = model.layer_costs(4, 1, "none", 1, None)
    f, b, w = chunk_costs(
        p.boundaries, [x.forward_s for x in costs], [x.backward_s for x in costs], [x.weight_s for x in costs]
    )
    layers = model.layers(4)
    p2p = [model.profile.p2p_time_s(layers[end - 1].output_elements * 4) for end in p.boundaries[1:]]
    sim = simulate(build("1f1b", 2, 1, 4), Costs(f, b, w, p2p))
    rank = p.critical_rank
    end = max(span.end for span in sim.timeline[rank])
    assert p.bubble_s == pytest.approx(end - sim.busy_time[rank], rel=1e-9)
    assert p.compute_s == pytest.approx(sim.busy_time[rank], rel=1e-9)
    # closed form for 1F1B with the slower stage setting the pace: at least (m + p - 1) slots of it
    assert sim.step_time >= 4 * max(fi + bi for fi, bi in zip(f, b))
    assert p.bubble_s > 0 and p.step_s == pytest.approx(end + p.optimizer_s, rel=1e-9)


def test_doubling_tp_halves_gemm_time_and_adds_the_collectives():
    model = cost_model(devices=2)
    # at tp=2 sequence parallelism pads the 11-token rows to 12, as the trainer does
    decoder = next(layer for layer in model.layers(8, 2) if layer.kind == "decoder")
    assert model.gemm_s(decoder, 2, None) == pytest.approx(model.gemm_s(decoder, 1, None) / 2, rel=1e-9)
    tp1 = model.layer_costs(8, 1, "none", 1, None)
    tp2 = model.layer_costs(8, 2, "none", 1, None)
    i1 = [layer.name for layer in model.layers(8)].index(decoder.name)
    i = [layer.name for layer in model.layers(8, 2)].index(decoder.name)
    dense_s = model.gemm_s(decoder, 1, None) + model.elementwise_s(decoder, 1)
    assert tp2[i].weight_s == pytest.approx(dense_s / 2, rel=1e-9)  # modelled: GEMMs + memory traffic
    tokens, dim, hidden = 8 * (DATA.seq_len + 1), MODEL.dim, MODEL.mlp_ratio * MODEL.dim
    # sequence parallel: all-gather the [tokens, dim] input of qkv and fc, reduce-scatter proj outputs
    expected = 2 * collective_time_s(model.profile, "all_gather", tokens * dim * 4, 2)
    expected += 2 * collective_time_s(model.profile, "reduce_scatter", tokens * dim * 4, 2)
    assert tp1[i1].tp_forward_s == 0 and tp2[i].tp_forward_s == pytest.approx(expected, rel=1e-9)
    assert hidden > dim  # (the fc all-gather moves the input, not the hidden activations)
    # on a bandwidth-bound link (no latency) chunking hides part of the collectives behind the GEMMs
    slow = cpu_profile(rates={"fp32": 1e10})
    slow_link = dataclasses.replace(slow.calibration, allreduce=LinkFit(0.0, 1e8), p2p=LinkFit(0.0, 1e8))
    bandwidth_bound = cost_model(dataclasses.replace(slow, calibration=slow_link), devices=2)
    k = bandwidth_bound.choose_tp_chunks(2, 8)
    none = bandwidth_bound.layer_costs(8, 2, "none", 1, None)[i]
    chunked = bandwidth_bound.layer_costs(8, 2, "chunked", k, None)[i]
    assert k >= 1 and chunked.tp_forward_s < none.tp_forward_s and chunked.tp_backward_s < none.tp_backward_s
    # the per-chunk host cost comes from the calibration, as the trainer's overlap='auto' reads it
    by_overhead = {}
    for overhead in (1e-7, 1e-1):
        cal = dataclasses.replace(slow_link, tp_chunk_overhead_s=overhead)
        m = cost_model(dataclasses.replace(slow, calibration=cal), devices=2)
        by_overhead[overhead] = (
            m.choose_tp_chunks(2, 8),
            m.layer_costs(8, 2, "chunked", 4, None)[i].tp_forward_s,
        )
    assert by_overhead[1e-1][0] < by_overhead[1e-7][0] and by_overhead[1e-1][1] > by_overhead[1e-7][1]


def test_dp_allreduce_is_exposed_only_past_the_last_backward():
    model = cost_model(devices=2)
    p = model.predict(PlanConfig(dp=2, micro_batch_size=8))
    grad_bytes = param_count(MODEL) * 4
    full = sum(
        collective_time_s(model.profile, "all_reduce", size, 2) for size in [1 << 20] * (grad_bytes >> 20)
    )
    assert 0 < p.dp_comm_s <= full + collective_time_s(model.profile, "all_reduce", grad_bytes % (1 << 20), 2)


def test_precision_uses_the_lower_precision_rate_where_convert_would_swap():
    rates = {"fp32": 1e10, "int8": 1e12}
    model = cost_model(cpu_profile(rates=rates), devices=1, min_features=64)
    high = model.layer_costs(16, 1, "none", 1, None)
    low = model.layer_costs(16, 1, "none", 1, "int8_tensorwise")
    by_name = {layer.name: layer.kind for layer in model.layers(16)}
    for h, lo in zip(high, low):
        if by_name[h.name] in ("vit", "decoder"):
            assert lo.forward_s < h.forward_s
        if by_name[h.name] in ("embed", "head"):  # first and last linears stay high precision
            assert lo.forward_s == pytest.approx(h.forward_s)


# ---- memory, ranking, explain ------------------------------------------------------------------


def test_memory_accounts_params_grads_optimizer_and_activations():
    model = cost_model(devices=1)
    p = model.predict(PlanConfig(microbatches=2, micro_batch_size=8))
    n = param_count(MODEL)
    assert p.memory.params_bytes == p.memory.grads_bytes == 4 * n
    assert p.memory.optimizer_bytes == 8 * n  # fp32 moments on the device
    per_microbatch = sum(layer.saved_elements * 4 for layer in model.layers(8))
    assert p.memory.activations_bytes == per_microbatch  # 1f1b at pp=1 holds one microbatch
    host = model.predict(PlanConfig(microbatches=2, micro_batch_size=8, offload="host"))
    assert host.memory.host_bytes == (8 + 4 + 4) * n


def test_memory_rejection_names_the_sizes_and_the_fix():
    configs = list(enumerate_configs(MODEL, 2, 16))
    needs = sorted(cost_model(devices=2).predict(c).peak_memory_bytes for c in configs)
    capacity = needs[len(needs) // 2]  # per core: about half the configs fit
    model = cost_model(cpu_profile(host_memory_bytes=2 * capacity), devices=2)
    ranking = rank(model, configs)
    assert len(ranking.rejected) == sum(n > capacity for n in needs) > 0 and ranking.ranked
    reason = ranking.rejected[0].reason
    assert "GiB per device" in reason and "activations" in reason and "offload" in reason
    for p in ranking.ranked:
        assert p.peak_memory_bytes <= model.machine.memory_bytes
    big = rank(cost_model(gpu_profile(1 << 20), devices=2), [PlanConfig(dp=2, micro_batch_size=8)])
    assert not big.ranked and "needs" in big.rejected[0].reason
    with pytest.raises(ValueError, match="no configuration fits"):
        _ = big.top


def test_ranking_is_sorted_and_explain_names_the_top_and_runner_up():
    model = cost_model(devices=2)
    ranking = rank(model, enumerate_configs(MODEL, 2, 16, SpaceOptions(offloads=("device", "host"))))
    steps = [p.step_s for p in ranking.ranked]
    assert steps == sorted(steps) and len(steps) > 10
    text = explain(ranking)
    assert ranking.top.config.label() in text
    assert "compute" in text and "bubble" in text and "optimizer" in text
    assert "Runner-up" in text


# ---- calibration, measure, CLI -----------------------------------------------------------------


def test_fit_reproduces_the_measured_step():
    workload = Workload.from_data(MODEL, DATA, 16)
    machine = Machine.from_profile(cpu_profile(), 1)
    config = PlanConfig(micro_batch_size=16)
    base = CostModel(workload, machine).predict(config).step_s
    slow = fit_op_overhead(workload, machine, config, 3 * base)
    assert slow.op_overhead_s > 0 and slow.gemm_scale == 1
    assert CostModel(workload, machine, slow).predict(config).step_s == pytest.approx(3 * base, rel=1e-4)
    fast = fit_op_overhead(workload, machine, config, 0.9 * base)
    assert fast.op_overhead_s == 0 and fast.gemm_scale < 1
    assert CostModel(workload, machine, fast).predict(config).step_s == pytest.approx(0.9 * base, rel=1e-4)
    # a step faster than the model's non-GEMM costs alone: no gemm_scale reproduces it, and the fit says so
    with pytest.raises(ValueError, match=r"with GEMMs taking no time at all"):
        fit_op_overhead(workload, machine, config, 1e-9)


def test_a_missing_calibration_file_is_an_error_not_an_uncalibrated_plan(tmp_path, capsys):
    from sysopt.cli import plan

    args = ["--profile", write_profile(tmp_path, cpu_profile()), "--devices", "2", "--global-batch", "16"]
    with pytest.raises(SystemExit, match=r"--calibration .*nope.json does not exist"):
        plan.main([*args, "--calibration", str(tmp_path / "nope.json")])


@pytest.mark.parametrize("text", ['{"op_overhead_s": 1e-', "null", "[]"])
def test_a_torn_calibration_is_a_clear_error_when_named_and_ignored_when_cached(
    tmp_path, monkeypatch, capsys, text
):
    """PlannerCalibration.save wrote in place, so a --fit killed mid-write left half a file, and every later
    sysopt-plan failed on it with a bare JSONDecodeError."""
    import sysopt.planner
    from sysopt.cli import plan

    torn = tmp_path / "planner-fit.json"
    torn.write_text(text)
    args = ["--devices", "2", "--global-batch", "16"]
    with pytest.raises(SystemExit, match=r"--calibration .*planner-fit.json is not a planner calibration"):
        plan.main([*args, "--profile", write_profile(tmp_path, cpu_profile()), "--calibration", str(torn)])
    monkeypatch.setattr(sysopt.planner, "default_calibration_path", lambda: torn)
    monkeypatch.setattr(plan, "load_profile", lambda args: cpu_profile())
    plan.main(args)  # this host's cached fit: planned without it, saying why
    err = capsys.readouterr().err
    assert f"ignoring {torn} is not a planner calibration" in err and "run --fit" in err


def test_a_planner_calibration_is_written_atomically(tmp_path, monkeypatch):
    from sysopt.planner import PlannerCalibration

    path = tmp_path / "fit.json"
    PlannerCalibration(op_overhead_s=1e-5).save(path)
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("killed mid-write")))
    with pytest.raises(OSError, match="killed mid-write"):
        PlannerCalibration(op_overhead_s=2e-5).save(path)
    assert PlannerCalibration.load(path).op_overhead_s == 1e-5  # the previous fit, whole
    assert [p.name for p in tmp_path.iterdir()] == ["fit.json"]  # no temporary left behind


def test_joint_fit_recovers_known_overheads_from_several_runs():
    """Runs 'measured' by the model itself under known terms: the joint fit finds terms that reproduce all
    of them (the terms themselves are not identifiable beyond what the runs constrain)."""
    import dataclasses

    from sysopt.planner import PlannerCalibration, fit_calibration

    workload = Workload.from_data(MODEL, DATA, 16)
    machine = Machine.from_profile(cpu_profile(), 2)
    truth = PlannerCalibration(
        op_overhead_s=4e-5, gemm_scale=0.5, step_overhead_s=2e-3, action_overhead_s=4e-4
    )
    configs = [
        PlanConfig(dp=2, micro_batch_size=8),
        PlanConfig(dp=2, microbatches=4, micro_batch_size=2),
        PlanConfig(pp=2, schedule="1f1b", microbatches=4, micro_batch_size=4),
        PlanConfig(dp=2, micro_batch_size=8, precision="int8_rowwise"),
    ]
    runs = [(c, CostModel(workload, machine, truth).predict(c).step_s) for c in configs]
    fitted = fit_calibration(workload, machine, runs)
    for c, measured in runs:
        assert CostModel(workload, machine, fitted).predict(c).step_s == pytest.approx(measured, rel=0.03)
    assert "fitted to 4 runs" in fitted.source
    # one run: falls back to the one-term fit, which reproduces that run exactly
    single = fit_calibration(workload, machine, runs[:1])
    assert dataclasses.replace(single, source="", profile_created="") != PlannerCalibration()
    assert CostModel(workload, machine, single).predict(configs[0]).step_s == pytest.approx(
        runs[0][1], rel=1e-4
    )
    with pytest.raises(ValueError, match="at least one"):
        fit_calibration(workload, machine, [])


def test_the_cached_fit_serves_only_the_model_and_data_it_was_fitted_to(tmp_path, monkeypatch, capsys):
    """sysopt-plan's cached fit holds measured block times of one model: another model or data config
    (same profile) must not be predicted with them."""
    import argparse

    from sysopt.cli.plan import resolve_calibration
    from sysopt.planner import fit_calibration

    profile = cpu_profile()
    machine = Machine.from_profile(profile, 1)
    workload = Workload.from_data(MODEL, DATA, 16)
    fitted = fit_calibration(workload, machine, [(PlanConfig(micro_batch_size=16), 0.5)])
    assert fitted.workload_key == workload.key() and fitted.profile_created == profile.created
    path = fitted.save(tmp_path / "planner.json")
    monkeypatch.setattr("sysopt.planner.default_calibration_path", lambda: path)
    args = argparse.Namespace(
        calibration=None, no_calibration=False, op_overhead_s=None, profile=None, min_features=64
    )
    assert resolve_calibration(args, profile, machine, workload) == fitted
    # nor with another --min-features: its low-precision blocks convert other linears
    dataclasses.replace(fitted, min_features=256).save(path)
    assert resolve_calibration(args, profile, machine, workload).source == "uncalibrated"
    assert "fitted with --min-features 256, this plan uses 64" in capsys.readouterr().err
    dataclasses.replace(fitted, min_features=64).save(path)
    assert resolve_calibration(args, profile, machine, workload).min_features == 64
    fitted.save(path)
    wider = Workload.from_data(dataclasses.replace(MODEL, dim=256), DATA, 16)
    packed = Workload.from_data(MODEL, dataclasses.replace(DATA, pack_len=32), 16)
    for other in (wider, packed, None):
        assert resolve_calibration(args, profile, machine, other).source == "uncalibrated"
        assert "fitted to another model/data config" in capsys.readouterr().err
    # what does not change the blocks' work keeps the key (the number of training samples, the batch)
    assert Workload.from_data(MODEL, dataclasses.replace(DATA, n_train=10), 64).key() == workload.key()
    # a fit saved before fits were keyed (no workload_key) is not trusted either
    dataclasses.replace(fitted, workload_key="").save(path)
    assert resolve_calibration(args, profile, machine, workload).source == "uncalibrated"


def test_spread_spans_the_knobs_before_filling_by_rank():
    from sysopt.cli.plan import spread

    model = cost_model(devices=2)
    ranking = rank(model, enumerate_configs(MODEL, 2, 16, SpaceOptions(offloads=("device", "host"))))
    picked = spread(ranking.ranked, 8)
    assert len(picked) == 8 and picked[0] is ranking.ranked[0] and len(set(map(id, picked))) == 8
    for knob in ("tp", "pp", "dp", "offload"):
        values = {getattr(p.config, knob) for p in ranking.ranked}
        assert {getattr(p.config, knob) for p in picked} == values or len(values) > 8


def test_measure_reports_configs_the_trainer_refuses_instead_of_crashing():
    from sysopt.planner.measure import base_job_for

    base = base_job_for(MODEL, DATA, 16, 2)
    bad = PlanConfig(tp=8, micro_batch_size=16)  # heads=4 cannot split over 8 ranks: the trainer says so
    record = measure_config(bad, 0.1, base)
    assert record.status == "not runnable yet" and "tp" in record.detail and record.measured_step_s is None
    job = job_for(PlanConfig(dp=2, micro_batch_size=8), base)
    assert (job.parallel.dp, job.parallel.tp, job.train.global_batch) == (2, 1, 16)
    assert not any(
        o.startswith(("offload.", "precision.", "schedule.")) for o in trainer_overrides(PlanConfig())
    )
    # one chunk is the knob's neutral value only without overlap: chunked:1 must not run as the default 4
    chunked1 = job_for(PlanConfig(tp=2, micro_batch_size=16, tp_overlap="chunked", tp_chunks=1), base)
    assert (chunked1.parallel.tp_overlap, chunked1.parallel.tp_chunks) == ("chunked", 1)
    assert job_for(PlanConfig(tp=2, micro_batch_size=16), base).parallel.tp_chunks is None


def write_profile(tmp_path, profile) -> str:
    path = tmp_path / "profile.json"
    profile.save(path)
    return str(path)


def test_measured_runs_use_the_planned_split_or_keep_the_trainers_first(monkeypatch):
    from sysopt.planner import measure as measure_module
    from sysopt.planner.measure import base_job_for
    from sysopt.train import ConfigError

    base = base_job_for(MODEL, DATA, 16, 2)
    planned = (0, 2, 4, 5, len(VLM(MODEL).blocks))
    c = PlanConfig(pp=2, vpp=2, schedule="interleaved_1f1b", microbatches=2, micro_batch_size=8)
    job = job_for(c, base, boundaries=planned)
    assert job.parallel.boundaries == planned  # the trainer cuts where the planner did
    assert not any(o.startswith("parallel.boundaries") for o in trainer_overrides(PlanConfig(), None, (0, 7)))
    with pytest.raises(ConfigError, match=r"parallel.boundaries=\[0, 2, 2"):
        job_for(c, base, boundaries=(0, 2, 2, 5, planned[-1]))
    calls = []
    trainer_split = (0, 1, 3, 5, planned[-1])

    def fake_measure(config, predicted_step_s, base_job, out_dir=None, min_features=None, boundaries=None):
        calls.append((config, boundaries))
        ran = trainer_split if boundaries is None else boundaries
        return measure_module.MeasureRecord(config, predicted_step_s, 0.1, "measured", boundaries=ran)

    monkeypatch.setattr(measure_module, "measure_config", fake_measure)
    other = dataclasses.replace(c, microbatches=4, micro_batch_size=4)
    records = measure_module.measure_many([(c, 0.1, planned), (other, 0.1)], base, repeats=3)
    assert [b for cfg, b in calls if cfg == c] == [planned] * 3
    # without a planned split the trainer partitions once; later rounds rerun that split
    assert [b for cfg, b in calls if cfg == other] == [None, trainer_split, trainer_split]
    assert [r.boundaries for r in records] == [planned, trainer_split]
    assert records[0].to_dict()["boundaries"] == list(planned)


def test_a_prediction_on_a_given_split_uses_it():
    model = cost_model(devices=2)
    c = PlanConfig(pp=2, schedule="1f1b", microbatches=4, micro_batch_size=4)
    own = model.predict(c)
    n = own.boundaries[-1]
    other = (0, 1, n) if own.boundaries != (0, 1, n) else (0, n - 1, n)
    forced = model.predict(c, other)
    assert forced.boundaries == other and model.predict(c).boundaries == own.boundaries
    assert forced.step_s != own.step_s  # another split, another pipeline
    with pytest.raises(ValueError, match="do not cut"):
        model.predict(c, (0, n))


def test_cli_ranks_and_writes_json(tmp_path, capsys, monkeypatch):
    from sysopt.cli import plan
    from sysopt.planner import measure as measure_module

    def fake_measure(config, predicted_step_s, base_job, out_dir=None, min_features=None, boundaries=None):
        return measure_module.MeasureRecord(config, predicted_step_s, 1.25 * predicted_step_s, "measured")

    monkeypatch.setattr(measure_module, "measure_config", fake_measure)
    out = tmp_path / "plan.json"
    args = ["--profile", write_profile(tmp_path, cpu_profile()), "--devices", "2", "--global-batch", "16"]
    args += ["--precision", "none", "--json", str(out), "--measure", "2", "--where", "pp=1", "model.layers=3"]
    assert plan.main(args) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    top = data["ranking"][0]
    assert set(top) >= {"config", "predicted_step_s", "breakdown", "peak_memory_bytes"}
    assert PlanConfig.from_dict(top["config"]).label() in printed
    assert all(r["config"]["pp"] == 1 for r in data["ranking"])
    assert data["workload"]["model"]["layers"] == 3
    assert [r["config"] for r in data["records"]] == [r["config"] for r in data["ranking"][:2]]
    for record in data["records"]:
        assert record["measured_step_s"] == pytest.approx(1.25 * record["predicted_step_s"])
    steps = [r["predicted_step_s"] for r in data["ranking"]]
    assert steps == sorted(steps)


def test_the_printed_train_command_trains_the_planned_model_and_data(tmp_path, capsys, monkeypatch):
    """explain's sysopt-train line carries the model.* / data.* settings given to sysopt-plan (and a
    --model YAML's values): composed as sysopt-train composes it, it trains the model that was planned."""
    from sysopt.cli import plan
    from sysopt.cli.train import compose_job

    def train_line(argv):
        assert plan.main(argv) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("sysopt-train "))
        return line.split()[1:]

    args = ["--profile", write_profile(tmp_path, cpu_profile()), "--devices", "2", "--global-batch", "16"]
    args += ["--precision", "none", "--where", "pp=1"]
    overrides = train_line([*args, "model.layers=3", "data.pack_len=32", "model.dim=96", "model.heads=6"])
    assert {"model.layers=3", "data.pack_len=32", "model.dim=96"} <= set(overrides)
    job = compose_job(overrides)
    assert (job.model.layers, job.model.dim, job.model.heads, job.data.pack_len) == (3, 96, 6, 32)
    yaml_model = tmp_path / "tiny.yaml"
    yaml_model.write_text("vision_dim: 32\nvision_layers: 1\nlayers: 1\ndim: 64\nheads: 2\nvision_heads: 2\n")
    overrides = train_line([*args, "--model", str(yaml_model)])
    job = compose_job(overrides)
    assert (job.model.vision_layers, job.model.layers, job.model.dim) == (1, 1, 64)
    assert not any(o.startswith("model=") for o in train_line(args))  # the default model: nothing to add


def test_the_8xh100_profile_ranks_8_gpu_configs():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "profiles" / "8xh100_nvlink.json"
    profile = HardwareProfile.load(path)
    machine = Machine.from_profile(profile)
    assert machine.on_gpu and machine.devices == 8 and machine.memory_bytes > 70 * 2**30
    model = CostModel(Workload.from_data(MODEL, DATA, 64), machine)
    options = SpaceOptions(schedules=("1f1b", "interleaved_1f1b"), offloads=("device",), max_microbatches=8)
    ranking = rank(model, enumerate_configs(MODEL, 8, 64, options, model.choose_tp_chunks))
    assert ranking.ranked and all(p.config.world_size == 8 for p in ranking.ranked)
    assert {p.config.tp for p in ranking.ranked} == {1, 2, 4}


class _CountOps:
    """Counts every aten op dispatched inside the `with` block."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.n += 1
                return func(*args, **(kwargs or {}))

        self.n, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_op_counts_match_the_model_blocks(backend, monkeypatch):
    """The planner's per-layer op counts (its overhead model) against ops dispatched by sysopt.models,
    in high precision and converted to low-precision recipes, on each CPU kernel backend."""
    import torch

    from sysopt.data import BatchSampler, DigitsDataset
    from sysopt.kernels import cpu
    from sysopt.kernels.dispatch import backend_for
    from sysopt.models import vlm_loss
    from sysopt.precision import convert, recipe

    if backend == "cpp" and cpu.load() is None:
        pytest.skip(f"the C++ CPU kernels do not build here: {cpu.status().error}")
    monkeypatch.setenv("SYSOPT_KERNEL_BACKEND", backend)
    assert backend_for("cpu") == backend

    batch = BatchSampler(DigitsDataset(dataclasses.replace(DATA, n_train=64, n_eval_per_task=5), "train"), 4)
    batch = batch.global_batch(0)
    machine = Machine.from_profile(cpu_profile(), 1, kernel_backend=backend)
    model = CostModel(Workload.from_data(MODEL, DATA, 16), machine, min_features=64)
    for precision in (None, "int8_rowwise", "int8_rowwise_full", "int8_tensorwise", "fp8_tensorwise_delayed"):
        vlm = VLM(MODEL) if precision is None else convert(VLM(MODEL), recipe(precision), min_features=64)
        inputs, x = [], None
        with torch.no_grad():
            for block in vlm.blocks:
                inputs.append(x)
                x = block(x, batch)
        for layer, block, x in zip(model.layers(4), vlm.blocks, inputs):
            x = None if x is None else x.detach().requires_grad_(True)
            with _CountOps() as counted:
                y = block(x, batch)
                (vlm_loss(y, batch) if layer.kind == "head" else y.sum()).backward()
            assert model.ops(layer, precision) == pytest.approx(counted.n, rel=0.1), (precision, layer.name)


def test_a_machine_names_a_known_kernel_backend():
    assert Machine.from_profile(cpu_profile(), 1).kernel_backend == "cpp"
    with pytest.raises(ValueError, match="kernel_backend='cuda'"):
        Machine.from_profile(cpu_profile(), 1, kernel_backend="cuda")


def test_a_machine_of_zero_devices_is_an_error_not_every_device():
    assert Machine.from_profile(cpu_profile(), None).devices == cpu_profile().cpu.cores
    for devices in (0, -1):
        with pytest.raises(ValueError, match=f"devices={devices} must be >= 1; pass None"):
            Machine.from_profile(cpu_profile(), devices)


def test_cli_where_reads_values_as_the_field_holds_them():
    """tp_overlap's 'none' is a string, precision's 'none' is None; a non-integer for an int field is an error."""
    from sysopt.cli import plan

    assert plan.where_filter(["tp_overlap=none"])(PlanConfig(tp_overlap="none"))
    assert not plan.where_filter(["tp_overlap=none"])(PlanConfig(tp_overlap="chunked", tp_chunks=2))
    assert plan.where_filter(["precision=none"])(PlanConfig(precision=None))
    keep = plan.where_filter(["precision=none,int8_rowwise", "pp=1,2"])
    assert keep(PlanConfig(pp=2, precision="int8_rowwise")) and not keep(PlanConfig(pp=4))
    with pytest.raises(SystemExit, match="pp takes integers, not 'one'"):
        plan.where_filter(["pp=one"])


@pytest.mark.parametrize(
    "flag, value, fragment",
    [
        ("--measure", "-1", "-1 must be >= 0"),
        ("--top", "-2", "-2 must be >= 0"),
        ("--devices", "0", "0 must be >= 1 (devices to plan for); leave --devices out"),
        ("--repeats", "0", "0 must be >= 1"),
        ("--steps", "0", "0 must be >= 1"),
        ("--op-overhead-s", "nan", "nan must be a finite number of seconds >= 0"),
        ("--op-overhead-s", "-0.5", "-0.5 must be a finite number of seconds >= 0"),
    ],
)
def test_cli_rejects_counts_out_of_range_naming_the_value_and_the_fix(flag, value, fragment, capsys):
    from sysopt.cli import plan

    with pytest.raises(SystemExit):
        plan._parser().parse_args([flag, value])
    assert f"argument {flag}: {fragment}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, pp, vpp, m",
    [("gpipe", 2, 1, 4), ("1f1b", 4, 1, 8), ("interleaved_1f1b", 2, 2, 4), ("zbv", 2, 2, 6)],
)
def test_peak_activation_bytes_is_the_simulators_peak_times_the_bytes(name, pp, vpp, m):
    from sysopt.planner.device import peak_activation_bytes

    schedule = build(name, pp, vpp, m)
    sim = simulate(schedule, Costs(1.0, 2.0, 1.0))
    uniform = dict.fromkeys(range(pp * vpp), 1000)
    for r in range(pp):
        assert peak_activation_bytes(schedule, r, uniform) == 1000 * sim.peak_activations[r]


def test_receive_buffers_posted_at_the_step_start_add_to_the_peak():
    from sysopt.planner.device import peak_activation_bytes

    schedule = build("1f1b", 2, 1, 4)  # rank 0: F0 F1 B0 F2 B1 F3 B2 B3; rank 1: F0 B0 F1 B1 ...
    act, grad = {0: 100, 1: 100}, {0: 7, 1: 7}
    # rank 0 receives the 4 gradients of stage 0's output: all 4 buffers are alive at its 2-forward peak
    assert peak_activation_bytes(schedule, 0, act, grad) == 2 * 100 + 4 * 7
    # rank 1 receives 4 activations: the first is consumed by F0, which then holds its own activations
    assert peak_activation_bytes(schedule, 1, act, grad) == 3 * 7 + 100
    big = {0: 1000, 1: 1000}  # buffers larger than a stage's activations: the peak is at the start
    assert peak_activation_bytes(schedule, 1, act, big) == 4 * 1000
    assert peak_activation_bytes(schedule, 0, act, None) == 2 * 100


def test_dp_exposure_closed_forms_and_subgroups_cover_the_parameters():
    from sysopt.planner.device import dp_exposed_s, offload_subgroups

    profile = cpu_profile()
    grad_bytes = 5 * (1 << 20) + 123
    buckets = [1 << 20] * 5 + [123]
    serial = sum(collective_time_s(profile, "all_reduce", b, 4) for b in buckets)
    assert dp_exposed_s(profile, grad_bytes, 0.0, 4) == pytest.approx(serial)  # nothing to hide behind
    last = collective_time_s(profile, "all_reduce", 1 << 20, 4)
    # with a long backward only the last bucket, ready as backward ends, sticks out
    assert dp_exposed_s(profile, 5 << 20, 100.0, 4) == pytest.approx(last)
    assert dp_exposed_s(profile, grad_bytes, 0.0, 1) == 0
    groups = offload_subgroups([10, 25, 7], itemsize=4, subgroup_bytes=8 * 12)
    assert [g.numel for g in groups] == [12, 12, 12, 6]
    assert all(g.device_state_bytes == 8 * g.numel and g.host_state_bytes == 16 * g.numel for g in groups)


# ---- measured block times ----------------------------------------------------------------------


def _layer_times(sizes=(4, 8), tp=1, precision=None, scale=1.0):
    """Synthetic block times: forward 1 ms x size, backward 2x, split backward 1.5x + 1x, per block."""
    from sysopt.planner.layer_times import BlockTimes, LayerTimes

    n = len(layers(MODEL, Workload.from_data(MODEL, DATA, 16).microbatch(1)))
    entries = []
    for size in sizes:
        f = tuple(scale * 1e-3 * size * (1 + i) for i in range(n))
        entries.append(
            BlockTimes(
                precision, tp, "none", 1, size, f, tuple(2 * x for x in f), tuple(1.5 * x for x in f), f
            )
        )
    return LayerTimes(tuple(entries), "synthetic")


def test_layer_times_look_up_interpolate_and_round_trip_through_the_calibration():
    from sysopt.planner import PlannerCalibration

    times = _layer_times()
    f4, b4, i4, w4 = times.lookup(None, 1, "none", 1, 4)
    f6 = times.lookup(None, 1, "chunked", 3, 6)[0]  # tp=1: the overlap knob is ignored
    assert f6 == pytest.approx(tuple(1.5 * x for x in f4))  # halfway between sizes 4 and 8
    assert b4 == tuple(2 * x for x in f4) and i4 == tuple(1.5 * x for x in f4) and w4 == f4
    assert times.lookup(None, 1, "none", 1, 16) is None  # outside the measured sizes: no extrapolation
    assert times.lookup("int8_rowwise", 1, "none", 1, 4) is None  # another precision was not timed
    cal = PlannerCalibration(step_overhead_s=1e-3, host_tensor_overhead_s=2e-4, layer_times=times)
    assert PlannerCalibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal


def test_measured_block_times_replace_the_modelled_costs():
    from sysopt.planner import PlannerCalibration

    workload = Workload.from_data(MODEL, DATA, 8)
    machine = Machine.from_profile(cpu_profile(), 2)
    times = _layer_times(sizes=(4, 8))
    model = CostModel(workload, machine, PlannerCalibration(layer_times=times))
    f, b, i, w = times.lookup(None, 1, "none", 1, 8)
    costs = model.layer_costs(8, 1, "none", 1, None)
    assert [c.forward_s for c in costs] == list(f) and [c.backward_s for c in costs] == list(b)
    assert all(c.measured for c in costs)
    # one device, one microbatch: the step is every block's forward and one-pass backward, plus the optimizer
    one = model.predict(PlanConfig(micro_batch_size=8))
    assert one.compute_s == pytest.approx(sum(f) + sum(b), rel=1e-9)
    # a split-backward schedule runs I + W (the executor walks the graph twice), a fused one B
    split = CostModel(workload, machine, PlannerCalibration(layer_times=times))
    zb = split.pipeline(PlanConfig(pp=2, schedule="zb_h1", microbatches=2, micro_batch_size=4))
    fused = split.pipeline(PlanConfig(pp=2, schedule="1f1b", microbatches=2, micro_batch_size=4))
    assert sum(zb.simulation.busy_time) > sum(fused.simulation.busy_time)
    # a case the table does not cover falls back to the model
    assert not any(c.measured for c in model.layer_costs(16, 1, "none", 1, None))


def test_two_term_fit_is_nonnegative_least_squares():
    from sysopt.planner.calibrate import _nonnegative_two_term_fit

    base, per_h = [0.01, 0.02, 0.03], [0.0, 50.0, 0.0]
    measured = [b + 0.004 + 2e-4 * d for b, d in zip(base, per_h)]
    assert _nonnegative_two_term_fit(base, per_h, measured) == pytest.approx((0.004, 2e-4), rel=1e-6)
    # runs faster than the base leave nothing to explain: both terms stay at 0, never negative
    assert _nonnegative_two_term_fit(base, per_h, [0.9 * b for b in base]) == (0.0, 0.0)


def test_fit_with_layer_times_recovers_step_and_host_tensor_overheads():
    from sysopt.planner import PlannerCalibration, fit_calibration

    workload = Workload.from_data(MODEL, DATA, 16)
    machine = Machine.from_profile(cpu_profile(), 2)
    times = _layer_times(sizes=(2, 4, 8))
    truth = PlannerCalibration(
        step_overhead_s=3e-3, host_tensor_overhead_s=1e-4, action_overhead_s=2e-4, layer_times=times
    )
    configs = [
        PlanConfig(dp=2, micro_batch_size=8),
        PlanConfig(dp=2, microbatches=2, micro_batch_size=4),
        PlanConfig(dp=2, micro_batch_size=8, offload="host"),
        PlanConfig(pp=2, microbatches=2, micro_batch_size=8),
        PlanConfig(pp=2, microbatches=8, micro_batch_size=2),
    ]
    runs = [(c, CostModel(workload, machine, truth).predict(c).step_s) for c in configs]
    fitted = fit_calibration(workload, machine, runs, layer_times=times)
    assert fitted.gemm_scale == 1 and fitted.op_overhead_s == 0 and fitted.layer_times == times
    assert fitted.step_overhead_s == pytest.approx(3e-3, rel=0.05)
    assert fitted.host_tensor_overhead_s == pytest.approx(1e-4, rel=0.05)
    for c, measured in runs:
        assert CostModel(workload, machine, fitted).predict(c).step_s == pytest.approx(measured, rel=0.02)


def test_param_tensor_counts_match_the_model_blocks():
    vlm = VLM(MODEL)
    counted = [len(list(block.parameters())) for block in vlm.blocks]
    assert [
        layer.param_tensors for layer in layers(MODEL, Workload.from_data(MODEL, DATA, 4).microbatch(4))
    ] == counted


@pytest.mark.timeout(240)
def test_measure_layer_times_times_the_trainers_blocks(tmp_path):
    """Real timing of one dense and one tensor-parallel (tp=2, gloo) case: one entry per block, positive
    times, the first block has no input gradient; the cost model then uses them."""
    from sysopt.planner import PlannerCalibration
    from sysopt.planner.layer_times import cases_of, measure_layer_times
    from sysopt.planner.measure import base_job_for

    job = base_job_for(MODEL, dataclasses.replace(DATA, n_eval_per_task=5), 4, 2)
    configs = [
        PlanConfig(micro_batch_size=2),
        PlanConfig(tp=2, micro_batch_size=4),
        PlanConfig(micro_batch_size=2),
    ]
    cases = cases_of(configs)
    assert cases == [(None, 1, "none", 1, 2), (None, 2, "none", 1, 4)]
    times = measure_layer_times(job, cases, repeats=1, rounds=2, progress=False)
    assert [(e.tp, e.micro_batch_size) for e in times.entries] == [(1, 2), (2, 4)]
    for e in times.entries:  # one figure per trainer block: at tp=2 the sequence scatter and gather too
        n = block_count(MODEL, tp=e.tp)
        assert n == len(VLM(MODEL).blocks) + (2 if e.tp > 1 else 0)
        assert all(len(series) == n for series in e.times())
        assert min(e.forward_s) > 0 and min(e.backward_s) > 0 and min(e.weight_s) > 0
        assert e.input_s[0] < min(e.input_s[1:])  # the embedding block has no input gradient: nothing run
    workload = Workload.from_data(MODEL, DATA, 4)
    model = CostModel(workload, Machine.from_profile(cpu_profile(), 2), PlannerCalibration(layer_times=times))
    assert all(c.measured for c in model.layer_costs(4, 2, "none", 1, None))


def test_cli_fit_times_the_cases_the_space_needs_and_saves_them(tmp_path, capsys, monkeypatch):
    from sysopt.cli import plan
    from sysopt.planner import PlannerCalibration
    from sysopt.planner import layer_times as layer_times_module
    from sysopt.planner import measure as measure_module
    from sysopt.planner.layer_times import BlockTimes, LayerTimes

    asked = []

    def fake_times(base_job, cases, **kwargs):
        asked.extend(cases)
        n = len(VLM(dataclasses.replace(MODEL, layers=3)).blocks)
        entries = []
        for precision, tp, overlap, chunks, size in cases:
            f = tuple(1e-4 * size / tp for _ in range(n))
            entries.append(BlockTimes(precision, tp, overlap, chunks, size, f, f, f, f))
        return LayerTimes(tuple(entries), "fake")

    def fake_measure(config, predicted_step_s, base_job, out_dir=None, min_features=None, boundaries=None):
        step = 0.02 + 1e-3 * config.microbatches + (5e-3 if config.offload == "host" else 0.0)
        return measure_module.MeasureRecord(config, predicted_step_s, step, "measured")

    monkeypatch.setattr(layer_times_module, "measure_layer_times", fake_times)
    monkeypatch.setattr(measure_module, "measure_config", fake_measure)
    cal_path = tmp_path / "cal.json"
    args = ["--profile", write_profile(tmp_path, cpu_profile()), "--devices", "2", "--global-batch", "16"]
    args += [
        "--precision",
        "none",
        "--fit",
        "--calibration",
        str(cal_path),
        "--json",
        str(tmp_path / "p.json"),
    ]
    assert plan.main([*args, "model.layers=3"]) == 0
    assert "blocks timed here" in capsys.readouterr().out
    saved = PlannerCalibration.load(cal_path)
    assert saved.layer_times is not None and len(saved.layer_times.entries) == len(set(asked))
    ranked = json.loads((tmp_path / "p.json").read_text())["ranking"]
    for r in ranked:  # every ranked config's case was timed
        c = PlanConfig.from_dict(r["config"])
        assert saved.layer_times.lookup(c.precision, c.tp, c.tp_overlap, c.tp_chunks, c.micro_batch_size)
    assert {c[1] for c in asked} == {1, 2}  # tensor-parallel cases too


def test_cli_fit_with_measure_refits_on_references_measured_beside_the_picked_configs(
    tmp_path, capsys, monkeypatch
):
    """--fit --measure: references once for the first fit, then again in the same rounds as the picked
    configs; the final calibration is fitted to the second measurement and predicts the records."""
    from collections import Counter

    from sysopt.cli import plan
    from sysopt.planner import PlannerCalibration
    from sysopt.planner import layer_times as layer_times_module
    from sysopt.planner import measure as measure_module
    from sysopt.planner.layer_times import BlockTimes, LayerTimes

    calls, phase = Counter(), {"slow": 1.5}  # the machine is 1.5x slower during the first fit

    def fake_measure(config, predicted_step_s, base_job, out_dir=None, min_features=None, boundaries=None):
        calls[config] += 1
        step = phase["slow"] * (0.02 + 1e-3 * config.microbatches)
        return measure_module.MeasureRecord(config, predicted_step_s, step, "measured")

    real_fit = plan.fit_here

    def fit_then_speed_up(*args, **kwargs):
        out = real_fit(*args, **kwargs)
        phase["slow"] = 1.0
        return out

    def fake_times(base_job, cases, **kwargs):
        n = len(VLM(dataclasses.replace(MODEL, layers=3)).blocks)
        rows = [
            BlockTimes(*case, *([tuple(1e-4 * case[4] / case[1] for _ in range(n))] * 4)) for case in cases
        ]
        return LayerTimes(tuple(rows), "fake")

    monkeypatch.setattr(layer_times_module, "measure_layer_times", fake_times)
    monkeypatch.setattr(measure_module, "measure_config", fake_measure)
    monkeypatch.setattr(plan, "fit_here", fit_then_speed_up)
    cal_path, out = tmp_path / "cal.json", tmp_path / "p.json"
    args = ["--profile", write_profile(tmp_path, cpu_profile()), "--devices", "2", "--global-batch", "16"]
    args += ["--precision", "none", "--fit", "--calibration", str(cal_path)]
    args += ["--measure", "3", "--repeats", "2", "--json", str(out), "model.layers=3"]
    assert plan.main(args) == 0
    references = plan.reference_configs(2, 16)
    assert all(calls[c] == 1 + 2 for c in references)  # one round for the first fit, two beside the picks
    saved = PlannerCalibration.load(cal_path)
    workload = Workload.from_data(dataclasses.replace(MODEL, layers=3), DATA, 16)
    model = CostModel(workload, Machine.from_profile(cpu_profile(), 2), saved, min_features=64)
    for r in json.loads(out.read_text())["records"]:
        config = PlanConfig.from_dict(r["config"])
        assert r["predicted_step_s"] == pytest.approx(model.predict(config).step_s)
    # fitted to the fast second round: the dp reference is reproduced at its fast time
    dp = references[0]
    assert model.predict(dp).step_s == pytest.approx(0.02 + 1e-3 * dp.microbatches, rel=0.2)


def test_plan_refuses_to_measure_a_gpu_plan_with_the_cpu_trainer(capsys):
    """--measure/--fit train here with sysopt-train, whose model runs on the CPU: against a GPU plan (an H100
    profile) they would compare GPU predictions with CPU steps, so the CLI stops and says how to plan for the
    CPU instead."""
    from pathlib import Path

    from sysopt.cli import plan

    path = Path(__file__).resolve().parents[1] / "bench" / "profiles" / "8xh100_nvlink.json"
    for flag in (["--measure", "1"], ["--fit"]):
        assert plan.main(["--profile", str(path), *flag, "--top", "1"]) == 2
        assert "whose model runs on the CPU, but this plan is for 8 GPU(s)" in capsys.readouterr().err


def test_plan_cli_names_bad_inputs_instead_of_planning_nothing(tmp_path, capsys):
    """A missing or foreign --profile, an unknown --model, schedule or --where value, and a zero batch are
    refused by name (they used to be tracebacks, or silently emptied the space: "no configuration fits", rc 0)."""
    from pathlib import Path

    from sysopt.cli import plan

    h100 = str(Path(__file__).resolve().parents[1] / "bench" / "profiles" / "8xh100_nvlink.json")
    (tmp_path / "foreign.json").write_text('{"foo": 1}')
    cases = [
        (["--profile", str(tmp_path / "nope.json")], r"nope.json: no such file"),
        (["--profile", str(tmp_path / "foreign.json")], r"foreign.json is not a HardwareProfile JSON"),
        (
            ["--profile", h100, "--model", "nosuch"],
            r"--model nosuch: no .*nosuch.yaml; use one of \[.*'vlm_small'",
        ),
        (["--profile", h100, "--schedules", "zbvv"], r"--schedules: \['zbvv'\] not among \[.*'zbv'"),
        (["--profile", h100, "--where", "offload=hots"], r"--where 'offload=hots': \['hots'\] not among"),
        (["--profile", h100, "--where", "schedule=zbvv"], r"\['zbvv'\] not among schedule's"),
        (
            ["--profile", h100, "--where", "tp=3"],
            r"no configuration matches --where tp=3 \(of \d+ enumerated",
        ),
        (
            ["--profile", h100, "model.heads=3"],
            r"sysopt-train would refuse these model/data settings: .*heads=3",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            plan.main(argv)
        assert re.search(message, str(info.value)), (argv, info.value)
    with pytest.raises(SystemExit):
        plan.main(["--profile", h100, "--global-batch", "0"])
    assert "--global-batch" in capsys.readouterr().err


def test_block_times_are_scaled_to_add_up_to_the_chunk_a_stage_runs(monkeypatch):
    """Each block timed alone pays a pass of its own: the planner scales the blocks after the first so they add
    up to those blocks timed as one chunk (per kind: forward, backward, input grad, weight grad)."""
    import types

    from sysopt.planner import layer_times
    from sysopt.planner.measure import base_job_for

    a = ([1.0, 2.0, 2.0], [3.0, 4.0, 4.0], [1.0, 1.0, 3.0], [0.5, 0.0, 0.0])
    b = ([3.0, 4.0, 4.0], [3.0, 4.0, 4.0], [1.0, 1.0, 3.0], [0.5, 0.0, 0.0])  # a slower moment of the machine
    scaled = layer_times.as_one_chunk(
        [a, b, a], [(3.0, 8.0, 2.0, 0.0), (6.0, 8.0, 2.0, 0.0), (4.0, 8.0, 2.0, 0.0)]
    )
    # per-block medians (a's), scaled by the median of the paired ratios: forward 3/4, 6/8, 4/4 -> 0.75
    assert scaled == ([1.0, 1.5, 1.5], [3.0, 4.0, 4.0], [1.0, 0.5, 1.5], [0.5, 0.0, 0.0])
    # wired into the timing of every case: a fake model whose chunk runs in half its blocks' summed time
    import sysopt.train.parallel as parallel

    monkeypatch.setattr(parallel, "time_blocks", lambda model, batch, repeats, split: ([1.0, 2.0, 6.0],) * 4)
    monkeypatch.setattr(parallel, "time_chunk", lambda model, batch, repeats: (4.0,) * 4)
    monkeypatch.setattr(parallel, "ParallelVLM", lambda job, groups, batch: types.SimpleNamespace(
        model=None, _prepare=lambda b: b))  # fmt: skip
    job = base_job_for(VLMConfig(), DigitsTaskConfig(), 16, 2)
    for times in layer_times._time_blocks(job.to_json(), 4, 1, None):
        assert times == [1.0, 1.0, 3.0]


def test_plan_cli_rejects_chunked_configs_a_profile_without_collective_fits_cannot_model(tmp_path):
    """A one-device calibration has no all-reduce fit: choosing the TP chunk count used to raise out of the
    enumeration (a traceback); now ranking rejects those configurations and says why."""
    from sysopt.cli import plan

    profile = cpu_profile()
    profile = dataclasses.replace(
        profile, calibration=dataclasses.replace(profile.calibration, allreduce=None)
    )
    out = tmp_path / "plan.json"
    argv = ["--profile", write_profile(tmp_path, profile), "--devices", "2", "--global-batch", "16"]
    argv += ["--precision", "none", "--no-calibration", "--where", "tp=2", "--json", str(out)]
    assert plan.main(argv) in (0, 1)
    rejected = json.loads(out.read_text())["rejected"]
    assert rejected and all("cannot be modelled" in r["reason"] for r in rejected)


def test_plan_cli_names_a_profile_without_the_offload_models_figures(tmp_path):
    """A calibration without a host optimizer rate raised a ValueError out of the planner's cost model."""
    from sysopt.cli import plan

    profile = cpu_profile()
    cal = dataclasses.replace(profile.calibration, optimizer_params_per_s={})
    argv = [
        "--profile",
        write_profile(tmp_path, dataclasses.replace(profile, calibration=cal)),
        "--devices",
        "2",
    ]
    with pytest.raises(
        SystemExit, match="cannot be planned with: profile calibration lacks optimizer_params_per_s"
    ):
        plan.main([*argv, "--global-batch", "16", "--no-calibration"])
