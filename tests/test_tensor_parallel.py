"""Tensor-parallel layers and block against dense single-process references (and megatron-core),
for every overlap strategy, over gloo at tp=2 and tp=4. Each launch batches many checks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sysopt.dist import launch
from sysopt.hardware.profile import Calibration, CPUInfo, HardwareProfile, LinkFit, MatmulPoint
from sysopt.tensor_parallel import (
    ColumnParallelLinear,
    OverlapPolicy,
    RowParallelLinear,
    TensorParallelBlock,
    Timeline,
    gather_from_sequence_parallel_region,
    recording,
    resolve_overlap,
    scatter_to_sequence_parallel_region,
)

SEQ, BATCH, IN, OUT = 12, 3, 16, 24  # rows per rank: 18 at tp=2, 9 at tp=4 (chunks 2 and 5 split unevenly)


def fake_profile(
    flops_per_s: float = 5e10, latency_s: float = 5e-5, bytes_per_s: float = 2e9
) -> HardwareProfile:
    cal = Calibration(
        device="cpu",
        matmul=(MatmulPoint("fp32", 64, 64, 64, 2 * 64**3 / flops_per_s, flops_per_s),),
        matmul_flops_per_s={"fp32": flops_per_s},
        copy={"memcpy": LinkFit(1e-6, 1e10)},
        p2p=LinkFit(latency_s, bytes_per_s),
        allreduce=LinkFit(latency_s, bytes_per_s),
        collective_world_size=2,
        collective_backend="gloo",
        optimizer_params_per_s={"host": 1e8, "device": 1e8},
        created="test",
    )
    cpu = CPUInfo("test", 2, 2, (), 1 << 30)
    return HardwareProfile(cpu=cpu, gpus=(), calibration=cal, created="test")


OVERLAPS = ["none", "chunked:2", "chunked:5", OverlapPolicy("auto", max_chunks=8, profile=fake_profile())]


def _shard(t: torch.Tensor, dim: int) -> torch.Tensor:
    tp, rank = dist.get_world_size(), dist.get_rank()
    part = t.shape[dim] // tp
    return t.narrow(dim, rank * part, part)


def _check(failures: list[str], name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32-tight closeness (torch.testing.assert_close would import DTensor: seconds per rank)."""
    if actual.shape != expected.shape:
        failures.append(
            f"rank {dist.get_rank()} {name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        )
        return
    err = (actual.detach() - expected.detach()).abs().max().item()
    if not err <= 1e-5 + 1e-5 * expected.detach().abs().max().item():
        failures.append(f"rank {dist.get_rank()} {name}: max abs error {err:.3g}")


def _raises(failures: list[str], name: str, fn, match: str) -> None:
    try:
        fn()
    except ValueError as exc:
        if match not in str(exc):
            failures.append(f"{name}: message {exc} lacks {match!r}")
        return
    failures.append(f"{name}: no ValueError")


def _layer_checks() -> list[str]:
    failures: list[str] = []
    torch.manual_seed(0)  # every rank draws the same dense layers and data
    for kind in ("column", "row"):
        for sp in (False, True):
            for overlap in OVERLAPS:
                dense = nn.Linear(IN, OUT)
                x = torch.randn(SEQ, BATCH, IN)
                grad_out = torch.randn(SEQ, BATCH, OUT)
                x_ref = x.clone().requires_grad_()
                y_ref = dense(x_ref)
                (y_ref * grad_out).sum().backward()
                name = f"{kind} sp={sp} overlap={resolve_overlap(overlap).strategy}/{resolve_overlap(overlap).chunks}"
                if kind == "column":
                    layer = ColumnParallelLinear.from_dense(dense, sequence_parallel=sp, overlap=overlap)
                    x_in = (_shard(x, 0) if sp else x).clone().requires_grad_()
                    y = layer(x_in)
                    (y * _shard(grad_out, 2)).sum().backward()
                    _check(failures, f"{name} output", y, _shard(y_ref, 2))
                    _check(
                        failures, f"{name} input grad", x_in.grad, _shard(x_ref.grad, 0) if sp else x_ref.grad
                    )
                    _check(failures, f"{name} weight grad", layer.weight.grad, _shard(dense.weight.grad, 0))
                    _check(failures, f"{name} bias grad", layer.bias.grad, _shard(dense.bias.grad, 0))
                else:
                    layer = RowParallelLinear.from_dense(dense, sequence_parallel=sp, overlap=overlap)
                    x_in = x.clone().requires_grad_()
                    y = layer(_shard(x_in, 2))  # a non-contiguous view, as a slice of a wider output
                    (y * (_shard(grad_out, 0) if sp else grad_out)).sum().backward()
                    _check(failures, f"{name} output", y, _shard(y_ref, 0) if sp else y_ref)
                    _check(failures, f"{name} input grad", _shard(x_in.grad, 2), _shard(x_ref.grad, 2))
                    _check(failures, f"{name} weight grad", layer.weight.grad, _shard(dense.weight.grad, 1))
                    _check(failures, f"{name} bias grad", layer.bias.grad, dense.bias.grad)
                if kind == "row":  # the bias is replicated: every rank must get the same bits
                    copies = [torch.empty_like(layer.bias.grad) for _ in range(dist.get_world_size())]
                    dist.all_gather(copies, layer.bias.grad)
                    if not all(torch.equal(c, copies[0]) for c in copies):
                        failures.append(f"{name}: the replicated bias's grads differ across ranks")
                # auto's plans for the collectives this layer runs come from the chunk model (a predicted
                # time), not from a fallback; the one phase without a collective (column forward, row
                # backward without sequence parallelism) runs no plan
                communicating = [p for p in layer.last_plans.values() if p.overlap]
                if resolve_overlap(overlap).strategy == "auto" and (
                    len(communicating) != (2 if sp else 1)
                    or any(p.predicted_s is None or not 1 <= p.chunks <= 8 for p in communicating)
                ):
                    failures.append(f"{name}: auto plans {layer.last_plans} not from the chunk model")

    tp = dist.get_world_size()
    row_sp = RowParallelLinear(IN, OUT, sequence_parallel=True, overlap="chunked:2")
    _raises(failures, "uneven sequence", lambda: row_sp(torch.randn(tp + 1, 2, IN // tp)), f"tp={tp}")
    too_many = ColumnParallelLinear(IN, OUT, sequence_parallel=True, overlap="chunked:50")
    _raises(failures, "too many chunks", lambda: too_many(torch.randn(2, 3, IN)), "chunks=50")
    _raises(failures, "indivisible features", lambda: ColumnParallelLinear(IN, tp * 3 + 1), f"tp={tp}")

    # autocast through the chunked collectives: bf16 products, as the dense layer gives under autocast
    torch.manual_seed(6)
    dense, x = nn.Linear(IN, OUT), torch.randn(SEQ, BATCH, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = dense(x).float()
        for sp in (False, True):
            col = ColumnParallelLinear.from_dense(dense, sequence_parallel=sp, overlap="chunked:3")
            row = RowParallelLinear.from_dense(dense, sequence_parallel=sp, overlap="chunked:3")
            outputs = {
                "column": (col(_shard(x, 0) if sp else x), _shard(y_ref, 2)),
                "row": (row(_shard(x, 2)), _shard(y_ref, 0) if sp else y_ref),
            }
            for kind, (y, want) in outputs.items():
                err = (y.float() - want).abs().max().item()
                if y.dtype != torch.bfloat16 or not err <= 2e-2 * want.abs().max().item():
                    failures.append(f"autocast {kind} sp={sp}: dtype {y.dtype}, max abs error {err:.3g}")

    # the collectives' own checks name the fix
    from sysopt.tensor_parallel import comm

    _raises(
        failures, "reduce_scatter rows", lambda: comm.reduce_scatter(torch.ones(tp + 1, 2), None), "pad dim 0"
    )
    _raises(
        failures, "all_reduce strides", lambda: comm.all_reduce(torch.ones(3, 2).t(), None), "x.contiguous()"
    )
    if tp > 2:
        _raises(failures, "exchange blocks", lambda: comm.exchange(torch.ones(tp, 2), None), "to_every_other")

    # an input with no rows (an expert that got no tokens) gives nn.Linear's empty output, no collectives
    for sp in (False, True):
        col = ColumnParallelLinear(IN, OUT, sequence_parallel=sp, overlap="chunked:2")
        row = RowParallelLinear(OUT, IN, sequence_parallel=sp, overlap="chunked:2")
        x_in = torch.randn(0, BATCH, IN, requires_grad=True)
        y = row(col(x_in))
        y.sum().backward()
        if y.shape != (0, BATCH, IN) or x_in.grad.shape != x_in.shape:
            failures.append(f"empty input sp={sp}: output {tuple(y.shape)}, input grad {x_in.grad}")
        if any(p.grad is None or p.grad.abs().sum() != 0 for p in (*col.parameters(), *row.parameters())):
            failures.append(f"empty input sp={sp}: parameters did not get zero gradients")
        batchless = col(torch.randn(SEQ // tp, 0, IN) if sp else torch.randn(SEQ, 0, IN))
        if batchless.shape != (SEQ, 0, OUT // tp):
            failures.append(f"empty batch sp={sp}: column output {tuple(batchless.shape)}")

    # the layers equal the dense layer they were initialised alongside (same seed on every rank)
    torch.manual_seed(7)
    dense = nn.Linear(IN, OUT)
    torch.manual_seed(7)
    col = ColumnParallelLinear(IN, OUT)
    torch.manual_seed(7)
    row = RowParallelLinear(IN, OUT)
    _check(failures, "column init", col.weight, _shard(dense.weight, 0))
    _check(failures, "row init", row.weight, _shard(dense.weight, 1))

    # a chunked row layer with sequence parallelism issues one collective per chunk, each after its GEMM
    # (of the other ranks' rows), and multiplies this rank's own rows last, after the last one started
    timeline = Timeline()
    with recording(timeline):
        RowParallelLinear(IN, OUT, sequence_parallel=True, overlap="chunked:3")(
            torch.randn(SEQ, BATCH, IN // tp)
        )
    comms = [s for s in timeline.spans if s.kind == "comm"]
    gemms = [s for s in timeline.spans if s.kind == "compute"]
    if (
        len(comms) != 3
        or len(gemms) != 4
        or any(c.start_s < g.end_s for c, g in zip(comms, gemms))
        or not gemms[3].name.endswith("[local]")
        or gemms[3].start_s < comms[2].start_s
    ):
        failures.append(
            f"timeline: expected 3 GEMMs each followed by its collective, then the local GEMM, got {timeline.spans}"
        )
    return failures


def _agreement_and_bf16_checks() -> list[str]:
    failures: list[str] = []
    tp, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(4)
    dense = nn.Linear(IN, OUT)
    x = torch.randn(SEQ, BATCH, IN)

    # `auto` planned from different profiles still runs one plan on every rank, the first rank's (alone,
    # the first rank's profile gives 1 chunk and the others' 3 or 6: gloo aborts on the mismatched sizes)
    policies = [
        OverlapPolicy("auto", max_chunks=8, profile=fake_profile()),
        OverlapPolicy("auto", max_chunks=8, profile=fake_profile(1e8, 1e-9, 1e7), chunk_overhead_s=0.0),
    ]
    policy = policies[min(rank, 1)]
    layer = ColumnParallelLinear.from_dense(dense, sequence_parallel=True, overlap=policy)
    y = layer(_shard(x, 0))
    plans = [None] * tp
    dist.all_gather_object(plans, {k: p.chunks for k, p in layer.last_plans.items()})
    if any(p != plans[0] for p in plans):
        failures.append(f"auto from different profiles: plans differ across ranks: {plans}")
    _check(failures, "auto from different profiles: output", y, _shard(dense(x), 2))

    # planning that fails on the first rank (any exception) fails every rank instead of leaving them waiting
    broken = OverlapPolicy("auto", max_chunks=8, profile=object() if rank == 0 else fake_profile())
    layer = ColumnParallelLinear.from_dense(dense, sequence_parallel=True, overlap=broken)
    try:
        layer(_shard(x, 0))
        failures.append(f"rank {rank}: auto planning that failed on rank 0 raised nothing here")
    except AttributeError:
        if rank != 0:
            failures.append(f"rank {rank}: got rank 0's AttributeError itself")
    except ValueError as exc:
        if rank == 0 or "planning failed on the TP group's first rank: AttributeError" not in str(exc):
            failures.append(f"rank {rank}: unexpected {exc!r}")

    # bf16 weight and bias grads summed over 8 chunks are about as accurate as over one block
    # (accumulated in fp32, rounded once): relative error against fp64 on the same bf16 inputs
    def rel(got: torch.Tensor, want: torch.Tensor) -> float:
        return ((got.double() - want).norm() / want.norm()).item()

    col_dense, row_dense = nn.Linear(IN, OUT).bfloat16(), nn.Linear(OUT, IN).bfloat16()
    x16, h16 = x.bfloat16(), torch.randn(SEQ, BATCH, OUT).bfloat16()
    g_col, g_row = torch.randn(SEQ, BATCH, OUT).bfloat16(), torch.randn(SEQ, BATCH, IN).bfloat16()
    rows = lambda t: t.double().flatten(0, 1)  # noqa: E731
    want = (
        rows(_shard(g_col, 2)).t() @ rows(x16),  # column dW (this rank's output rows)
        rows(g_row).t() @ rows(_shard(h16, 2)),  # row dW (this rank's input columns)
        rows(g_row).sum(0),  # row db
    )
    errors = {}
    for overlap in ("none", "chunked:8"):
        col = ColumnParallelLinear.from_dense(col_dense, sequence_parallel=True, overlap=overlap)
        col(_shard(x16, 0)).backward(_shard(g_col, 2))
        row = RowParallelLinear.from_dense(row_dense, sequence_parallel=True, overlap=overlap)
        row(_shard(h16, 2)).backward(_shard(g_row, 0))
        errors[overlap] = [
            rel(got, w) for got, w in zip((col.weight.grad, row.weight.grad, row.bias.grad), want)
        ]
    for what, chunked, whole in zip(("column dW", "row dW", "row db"), errors["chunked:8"], errors["none"]):
        if not chunked <= 2 * whole + 1e-4:
            failures.append(
                f"bf16 {what}: relative error {chunked:.2e} over 8 chunks, {whole:.2e} in one block"
            )
    return failures


def _qkv_rank_major_grad(grad: torch.Tensor, tp: int) -> torch.Tensor:
    dim = grad.shape[1]
    return _shard(grad.view(3, tp, dim // tp, dim).transpose(0, 1).reshape(3 * dim, dim), 0)


def _block_checks() -> list[str]:
    from sysopt.models import DecoderBlock

    failures: list[str] = []
    tp = dist.get_world_size()
    torch.manual_seed(1)
    dense = DecoderBlock(32, 4, 2)
    x = torch.randn(8, 2, 32)
    grad_out = torch.randn(8, 2, 32)
    x_ref = x.clone().requires_grad_()
    y_ref = dense(x_ref)
    (y_ref * grad_out).sum().backward()
    for sp in (False, True):
        for overlap in ("none", "chunked:3"):
            name = f"block sp={sp} {overlap}"
            block = TensorParallelBlock.from_dense(dense, sequence_parallel=sp, overlap=overlap)
            x_in = x.clone().requires_grad_()
            h = scatter_to_sequence_parallel_region(x_in) if sp else x_in
            y = block(h)
            y = gather_from_sequence_parallel_region(y) if sp else y
            (y * grad_out).sum().backward()
            _check(failures, f"{name} output", y, y_ref)
            _check(failures, f"{name} input grad", x_in.grad, x_ref.grad)
            for ln in ("ln_attn", "ln_mlp"):
                for p in ("weight", "bias"):
                    got = getattr(getattr(block, ln), p).grad
                    _check(failures, f"{name} {ln}.{p} grad", got, getattr(getattr(dense, ln), p).grad)
            a, m = dense.attn, dense.mlp
            _check(
                failures,
                f"{name} qkv grad",
                block.qkv.weight.grad,
                _qkv_rank_major_grad(a.qkv.weight.grad, tp),
            )
            _check(failures, f"{name} proj grad", block.proj.weight.grad, _shard(a.proj.weight.grad, 1))
            _check(failures, f"{name} proj bias grad", block.proj.bias.grad, a.proj.bias.grad)
            _check(failures, f"{name} fc grad", block.fc.weight.grad, _shard(m.fc.weight.grad, 0))
            _check(failures, f"{name} fc bias grad", block.fc.bias.grad, _shard(m.fc.bias.grad, 0))
            _check(failures, f"{name} fc2 grad", block.fc2.weight.grad, _shard(m.proj.weight.grad, 1))
    return failures


def _megatron_checks() -> list[str]:
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear as MegatronColumn
    from megatron.core.tensor_parallel import RowParallelLinear as MegatronRow

    from sysopt.dist.megatron_shims import megatron_cpu_shims

    failures: list[str] = []
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=False)
    try:
        for sp in (False, True):
            torch.manual_seed(2)
            fc, proj = nn.Linear(IN, OUT), nn.Linear(OUT, IN)
            x = torch.randn(SEQ, BATCH, IN)
            grad_out = torch.randn(SEQ, BATCH, IN)
            cfg = ModelParallelConfig(
                tensor_model_parallel_size=tp,
                sequence_parallel=sp,
                use_cpu_initialization=True,
                gradient_accumulation_fusion=False,
                params_dtype=torch.float32,
            )
            with megatron_cpu_shims(force=True):  # megatron shards the dense weight itself (its own CPU init)
                m_fc = MegatronColumn(
                    IN,
                    OUT,
                    config=cfg,
                    init_method=lambda w, src=fc.weight: w.copy_(src),
                    bias=True,
                    gather_output=False,
                )
                m_proj = MegatronRow(
                    OUT, IN, config=cfg, init_method=lambda w, src=proj.weight: w.copy_(src), bias=True,
                    input_is_parallel=True, skip_bias_add=False,
                )  # fmt: skip
            with torch.no_grad():  # megatron zero-initialises biases
                m_fc.bias.copy_(_shard(fc.bias, 0))
                m_proj.bias.copy_(proj.bias)
            for overlap in ("none", "chunked:2"):
                name = f"vs megatron sp={sp} {overlap}"
                ours_fc = ColumnParallelLinear.from_dense(fc, sequence_parallel=sp, overlap=overlap)
                ours_proj = RowParallelLinear.from_dense(proj, sequence_parallel=sp, overlap=overlap)
                x_ours = (_shard(x, 0) if sp else x).clone().requires_grad_()
                x_meg = x_ours.detach().clone().requires_grad_()
                g = _shard(grad_out, 0) if sp else grad_out
                y_ours = ours_proj(F.gelu(ours_fc(x_ours)))
                (y_ours * g).sum().backward()
                for p in (*m_fc.parameters(), *m_proj.parameters()):
                    p.grad = None
                with megatron_cpu_shims(force=True):
                    y_meg = m_proj(F.gelu(m_fc(x_meg)[0]))[0]
                    (y_meg * g).sum().backward()
                if sp:  # megatron leaves sequence-parallel bias grads partial until finalize_model_grads
                    dist.all_reduce(m_proj.bias.grad)
                _check(failures, f"{name} output", y_ours, y_meg)
                _check(failures, f"{name} input grad", x_ours.grad, x_meg.grad)
                for ours, theirs, label in ((ours_fc, m_fc, "column"), (ours_proj, m_proj, "row")):
                    _check(failures, f"{name} {label} weight", ours.weight, theirs.weight)
                    _check(failures, f"{name} {label} weight grad", ours.weight.grad, theirs.weight.grad)
                    _check(failures, f"{name} {label} bias grad", ours.bias.grad, theirs.bias.grad)
    finally:
        parallel_state.destroy_model_parallel()
    return failures


def _layer_and_block_checks() -> list[str]:
    return _layer_checks() + _block_checks() + _agreement_and_bf16_checks()


def _assert_no_failures(per_rank: list[list[str]]) -> None:
    failures = [f for rank in per_rank for f in rank]
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("world_size", [2, 4])
def test_parallel_layers_and_block_match_dense(world_size):
    _assert_no_failures(launch(_layer_and_block_checks, world_size, backend="gloo", timeout_s=80))


@pytest.mark.slow  # ~12 s idle, ~30 s on a loaded 2-core machine: importing megatron-core per rank
@pytest.mark.timeout(120)
def test_parallel_layers_match_megatron_core():
    """Same dense weights sharded by megatron-core's own CPU initialisation: equal outputs and grads
    (tp=2; importing megatron-core costs ~10 s per rank on 2 cores)."""
    _assert_no_failures(launch(_megatron_checks, 2, backend="gloo", timeout_s=110))


def test_single_process_layers_equal_dense():
    torch.manual_seed(3)
    dense = nn.Linear(IN, OUT)
    x = torch.randn(SEQ, BATCH, IN)
    col = ColumnParallelLinear.from_dense(dense, overlap="chunked:3")
    row = RowParallelLinear.from_dense(dense, overlap="chunked:3")
    torch.testing.assert_close(col(x), dense(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(row(x), dense(x), rtol=1e-6, atol=1e-6)
    col, row = col.double(), row.to(torch.float64)  # nn.Module's conversions work on the layers
    assert col.weight.dtype == row.bias.dtype == torch.float64
    torch.testing.assert_close(col(x.double()), dense.double()(x.double()))


@pytest.mark.parametrize(
    "overlap,match",
    [
        ("sometimes", "must be an OverlapPolicy"),
        ("chunked:x", "must be an integer"),
        ("chunked:0", "positive"),
    ],
)
def test_bad_overlap_names_are_clear_errors(overlap, match):
    with pytest.raises(ValueError, match=match):
        resolve_overlap(overlap)


@pytest.mark.parametrize("sp", [False, True])
def test_empty_input_under_autocast_gives_the_autocast_dtype(sp):
    """As nn.Linear under autocast: an input with no rows still comes out in bf16 (the row layer's fp32 bias
    must not promote it)."""
    col = ColumnParallelLinear(IN, OUT, sequence_parallel=sp)
    row = RowParallelLinear(OUT, IN, sequence_parallel=sp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = row(col(torch.randn(0, BATCH, IN)))
        want = nn.Linear(IN, OUT)(torch.randn(0, BATCH, IN))
    assert y.shape == (0, BATCH, IN) and y.dtype == want.dtype == torch.bfloat16


def test_wrong_input_width_names_the_fix():
    with pytest.raises(ValueError, match="full hidden size"):
        ColumnParallelLinear(IN, OUT)(torch.randn(2, 2, IN + 1))


def test_resolve_overlap_names():
    assert resolve_overlap("chunked:8") == OverlapPolicy("chunked", chunks=8)
    assert resolve_overlap("none").strategy == "none"
    for policy in (OverlapPolicy("auto", max_chunks=6), OverlapPolicy("auto", device="cpu")):
        assert OverlapPolicy.from_dict(policy.to_dict()) == policy  # device too: it picks the profile


@pytest.mark.parametrize("sp", [False, True])
def test_layers_under_autocast_compute_in_its_dtype(sp):
    """Under torch.autocast(bf16) the layers run in bf16 like nn.Linear does (fp32 parameters get fp32
    grads), instead of failing in backward or writing bf16 products into fp32 buffers."""
    torch.manual_seed(6)
    dense = nn.Linear(IN, OUT)
    x = torch.randn(SEQ, BATCH, IN)
    for cls in (ColumnParallelLinear, RowParallelLinear):
        layer = cls.from_dense(dense, sequence_parallel=sp, overlap="chunked:3")
        ref = nn.Linear(IN, OUT)
        ref.load_state_dict(dense.state_dict())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_ref = layer(x), ref(x)
        assert y.dtype == y_ref.dtype == torch.bfloat16
        torch.testing.assert_close(y, y_ref, rtol=1e-2, atol=1e-2)  # bf16: the bias may round separately
        y.float().square().sum().backward()
        y_ref.float().square().sum().backward()
        assert layer.weight.grad.dtype == torch.float32
        for got, want in ((layer.weight.grad, ref.weight.grad), (layer.bias.grad, ref.bias.grad)):
            assert (got - want).norm() <= 1e-2 * want.norm()  # bf16 sums, added in another order


def test_block_from_dense_keeps_norm_dtype_and_frozen_parameters():
    from sysopt.models import DecoderBlock

    dense = DecoderBlock(32, 4, 2).bfloat16()
    dense.ln_attn.weight.requires_grad_(False)
    dense(torch.randn(4, 2, 32).bfloat16()).sum().backward()  # the dense block's grads stay its own
    block = TensorParallelBlock.from_dense(dense)
    assert all(p.grad is None for p in block.parameters())
    assert block.ln_attn.weight.dtype == block.ln_mlp.bias.dtype == torch.bfloat16
    assert not block.ln_attn.weight.requires_grad and block.ln_mlp.weight.requires_grad
    assert block.ln_attn.weight is not dense.ln_attn.weight  # a copy, not shared


def test_from_dense_keeps_frozen_linears_frozen():
    """A frozen dense weight or bias (e.g. a frozen decoder under a trainable adapter) stays frozen when
    sharded, in the layers and in the block's linears (qkv goes through a row reordering first)."""
    from sysopt.models import DecoderBlock

    dense = nn.Linear(16, 24)
    dense.weight.requires_grad_(False)
    col, row = ColumnParallelLinear.from_dense(dense), RowParallelLinear.from_dense(dense)
    for layer in (col, row):
        assert not layer.weight.requires_grad and layer.bias.requires_grad
    dense_block = DecoderBlock(32, 4, 2)
    dense_block.attn.qkv.requires_grad_(False)
    dense_block.mlp.proj.bias.requires_grad_(False)
    block = TensorParallelBlock.from_dense(dense_block)
    assert not block.qkv.weight.requires_grad and not block.qkv.bias.requires_grad
    assert block.fc2.weight.requires_grad and not block.fc2.bias.requires_grad
    assert block.fc.weight.requires_grad and block.proj.weight.requires_grad
