"""Low-precision tensor-parallel linears: convert() swaps sysopt's column/row layers, and over gloo at tp=2
a column -> row pair gives the outputs and gradients of the same low-precision GEMMs run shard by shard
in one process (so the collectives, layouts and gradient flow are right), with and without sequence
parallelism, for an int8 and an fp8 recipe."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sysopt.dist import launch
from sysopt.precision import (
    LowPrecisionColumnParallelLinear,
    LowPrecisionRowParallelLinear,
    ScalingState,
    convert,
    low_precision_linear,
    recipe,
)
from sysopt.tensor_parallel import ColumnParallelLinear, RowParallelLinear

SEQ, BATCH, DIM, HIDDEN = 8, 2, 64, 128
RECIPES = ("int8_rowwise", "fp8_rowwise")


def _state(r):
    return ScalingState(r, torch.zeros(3, r.amax_history_len), torch.zeros(3, dtype=torch.bool))


def _reference(x, fc, proj, r, tp):
    """The pair computed shard by shard in one process: sum over ranks of row(column(x))."""
    out = 0
    part_h = HIDDEN // tp
    for rank in range(tp):
        rows = slice(rank * part_h, (rank + 1) * part_h)
        h = low_precision_linear(x, fc.weight[rows], fc.bias[rows], _state(r))
        out = out + low_precision_linear(h, proj.weight[:, rows], None, _state(r))
    return out + proj.bias


def _worker(sequence_parallel: bool) -> list[str]:
    torch.manual_seed(0)
    tp, rank = dist.get_world_size(), dist.get_rank()
    failures: list[str] = []
    for name in RECIPES:
        r = recipe(name)
        fc, proj = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)
        x = torch.randn(SEQ, BATCH, DIM)
        g = torch.randn(SEQ, BATCH, DIM)
        model = nn.Sequential(
            ColumnParallelLinear.from_dense(fc, group=None, sequence_parallel=sequence_parallel),
            RowParallelLinear.from_dense(proj, group=None, sequence_parallel=sequence_parallel),
        )
        tp_params = [p for p in model.parameters()]
        convert(model, r, keep_first_last=False, min_features=1)
        if not (
            isinstance(model[0], LowPrecisionColumnParallelLinear)
            and isinstance(model[1], LowPrecisionRowParallelLinear)
        ):
            failures.append(f"{name}: convert did not swap the TP layers: {model}")
            continue
        if [p for p in model.parameters()] != tp_params:
            failures.append(f"{name}: converted layers do not share the original parameters")
        shard = slice(rank * SEQ // tp, (rank + 1) * SEQ // tp) if sequence_parallel else slice(None)
        x_local = x[shard].clone().requires_grad_()
        out = model(x_local)
        (out * g[shard]).sum().backward()

        x_ref = x.clone().requires_grad_()
        ref = _reference(x_ref, fc, proj, r, tp)
        (ref * g).sum().backward()
        hidden = slice(rank * HIDDEN // tp, (rank + 1) * HIDDEN // tp)
        pairs = {
            "output": (out, ref[shard]),
            "dx": (x_local.grad, x_ref.grad[shard]),
            "fc.weight.grad": (model[0].weight.grad, fc.weight.grad[hidden]),
            "fc.bias.grad": (model[0].bias.grad, fc.bias.grad[hidden]),
            "proj.weight.grad": (model[1].weight.grad, proj.weight.grad[:, hidden]),
            "proj.bias.grad": (model[1].bias.grad, proj.bias.grad),
        }
        for what, (got, want) in pairs.items():
            if got is None or got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                err = "missing" if got is None else (got - want).abs().max().item()
                failures.append(f"{name} sp={sequence_parallel} rank {rank} {what}: {err}")
        # and it really ran in low precision: the output differs from the fp32 pair
        dense = proj(fc(x))[shard]
        if torch.allclose(out, dense, rtol=1e-6, atol=1e-6):
            failures.append(f"{name}: output equals fp32, so no low-precision GEMM ran")
    return failures


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sequence_parallel", [True, False], ids=["sp", "no-sp"])
def test_low_precision_tp_pair_equals_shardwise_reference(sequence_parallel):
    results = launch(_worker, world_size=2, args=(sequence_parallel,), timeout_s=150)
    assert results == [[], []]


def test_convert_respects_local_shard_size_for_min_features():
    """Without a process group (tp=1) the layers are plain; min_features is judged on the local GEMM."""
    model = nn.Sequential(ColumnParallelLinear(32, 256), RowParallelLinear(256, 32))
    convert(model, "int8_rowwise", keep_first_last=False, min_features=64)
    assert type(model[0]) is ColumnParallelLinear  # in=32 < 64 stays high precision
    assert type(model[1]) is RowParallelLinear
    model = nn.Sequential(ColumnParallelLinear(64, 256), RowParallelLinear(256, 64))
    convert(model, "int8_rowwise", keep_first_last=False, min_features=64)
    assert isinstance(model[0], LowPrecisionColumnParallelLinear)
    assert isinstance(model[1], LowPrecisionRowParallelLinear)
