"""The schedule executor over gloo: every builder gives the loss and gradients of a single-process run."""

import pytest
import torch
import torch.distributed as dist

from sysopt.dist import launch
from sysopt.schedules import build
from sysopt.schedules.executor import ScheduleExecutor

WIDTH, ROWS = 8, 3  # features, rows per microbatch


def _stage_module(stage: int) -> torch.nn.Module:
    torch.manual_seed(1000 + stage)
    return torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, WIDTH))


def _data(microbatches: int):
    g = torch.Generator().manual_seed(7)
    inputs = [torch.randn(ROWS, WIDTH, generator=g) for _ in range(microbatches)]
    targets = [torch.randn(ROWS, WIDTH, generator=g) for _ in range(microbatches)]
    return inputs, targets


def _loss(output, target):
    return torch.nn.functional.mse_loss(output, target)


def _reference(num_stages: int, microbatches: int):
    """Single process: the whole model, mean loss over microbatches, one backward per microbatch."""
    modules = [_stage_module(s) for s in range(num_stages)]
    inputs, targets = _data(microbatches)
    losses = []
    for x, t in zip(inputs, targets):
        for module in modules:
            x = module(x)
        loss = _loss(x, t)
        (loss / microbatches).backward()
        losses.append(loss.detach())
    grads = {s: [p.grad.clone() for p in m.parameters()] for s, m in enumerate(modules)}
    return torch.stack(losses), grads


def _run_cases(cases):
    """On each rank: run every (name, vpp, microbatches, options) case; return losses and local grads."""
    torch.manual_seed(0)
    out = []
    for name, vpp, m, options in cases:
        schedule = build(name, dist.get_world_size(), vpp, m, **options)
        rank = dist.get_rank()
        modules = {s: _stage_module(s) for s in schedule.stages_of(rank)}
        executor = ScheduleExecutor(schedule, modules, _loss, boundary_shape=(ROWS, WIDTH))
        inputs, targets = _data(m)
        losses = executor.step(inputs, targets)
        # plain lists: tensors sent back through the launcher's queue would need shared memory
        grads = {s: [p.grad.tolist() for p in mod.parameters()] for s, mod in modules.items()}
        out.append((None if losses is None else torch.stack(losses).tolist(), grads))
    return out


CASES = {
    2: [  # m not a multiple of pp for the single-chunk schedules
        ("gpipe", 1, 3, {}),
        ("1f1b", 1, 3, {}),
        ("zb_h1", 1, 3, {}),
        ("interleaved_1f1b", 2, 3, {"microbatch_group_size": 3}),
        ("zb_h1", 2, 4, {}),
        ("zbv", 2, 3, {}),
        ("dualpipev", 2, 5, {}),
    ],
    4: [
        ("1f1b", 1, 6, {}),
        ("interleaved_1f1b", 2, 8, {}),
        ("interleaved_1f1b", 2, 10, {"microbatch_group_size": 5}),  # Megatron's flexible m
        ("zbv", 2, 7, {}),
        ("dualpipev", 2, 9, {}),
    ],
}
SLOW_CASES = {4: [("gpipe", 1, 5, {}), ("zb_h1", 1, 6, {}), ("zb_h1", 2, 8, {})]}


def _check(world, cases):
    results = launch(_run_cases, world, args=(cases,), timeout_s=100)
    for i, (name, vpp, m, options) in enumerate(cases):
        schedule = build(name, world, vpp, m, **options)
        ref_losses, ref_grads = _reference(schedule.num_stages, m)
        last_rank = schedule.stage_to_rank[-1]
        losses, _ = results[last_rank][i]
        torch.testing.assert_close(
            torch.tensor(losses), ref_losses, rtol=1e-6, atol=1e-7, msg=f"{name}: losses"
        )
        for rank in range(world):
            if rank != last_rank:
                assert results[rank][i][0] is None
            for stage, grads in results[rank][i][1].items():
                for got, want in zip(grads, ref_grads[stage]):
                    torch.testing.assert_close(
                        torch.tensor(got), want, rtol=1e-5, atol=1e-7, msg=f"{name}: stage {stage}"
                    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4])
def test_every_schedule_matches_single_process(world):
    _check(world, CASES[world])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_more_schedules_at_world_four():
    _check(4, SLOW_CASES[4])
