"""The schedule executor over gloo: every builder gives the loss and gradients of a single-process run."""

import pytest
import torch
import torch.distributed as dist

from sysopt.dist import launch
from sysopt.schedules import Costs, build
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


def _split_options(options: dict) -> tuple[dict, int | None]:
    """A case's build() options and its executor receive window (default 1)."""
    options = dict(options)
    return options, options.pop("receive_ahead", 1)


def _run_cases(cases):
    """On each rank: run every (name, vpp, microbatches, options) case; return losses and local grads.
    options["receive_ahead"] (default 1) is the executor's receive window, the rest go to build()."""
    torch.manual_seed(0)
    out = []
    for name, vpp, m, options in cases:
        options, ahead = _split_options(options)
        schedule = build(name, dist.get_world_size(), vpp, m, **options)
        rank = dist.get_rank()
        modules = {s: _stage_module(s) for s in schedule.stages_of(rank)}
        executor = ScheduleExecutor(
            schedule, modules, _loss, boundary_shape=(ROWS, WIDTH), receive_ahead=ahead
        )
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
        ("zb_h1", 1, 3, {"receive_ahead": None}),  # every receive posted at the step's start
        ("interleaved_1f1b", 2, 3, {"microbatch_group_size": 3}),
        ("zb_h1", 2, 4, {"receive_ahead": 2}),
        ("zbv", 2, 3, {"receive_ahead": None}),
        ("dualpipev", 2, 5, {}),
        (
            "zb_greedy",
            2,
            3,
            {"costs": Costs([3.0, 1.0, 1.0, 2.0], [6.0, 2.0, 2.0, 4.0], [3.0, 1.0, 1.0, 2.0])},
        ),
    ],
    4: [
        ("1f1b", 1, 6, {}),
        ("interleaved_1f1b", 2, 8, {"receive_ahead": None}),
        ("interleaved_1f1b", 2, 10, {"microbatch_group_size": 5}),  # Megatron's flexible m
        ("zbv", 2, 7, {}),
        ("dualpipev", 2, 9, {}),
        ("zb_greedy", 2, 6, {"placement": "v"}),
    ],
}
SLOW_CASES = {4: [("gpipe", 1, 5, {}), ("zb_h1", 1, 6, {}), ("zb_h1", 2, 8, {})]}


def _check(world, cases):
    results = launch(_run_cases, world, args=(cases,), timeout_s=100)
    for i, (name, vpp, m, options) in enumerate(cases):
        schedule = build(name, world, vpp, m, **_split_options(options)[0])
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


# ---- per-microbatch contexts and shapes (a vision tower whose image count varies) ---------------


class _ContextStage(torch.nn.Module):
    """forward(x, ctx): stage 0 reads ctx.data (x is None); every stage adds its ctx.shift."""

    def __init__(self, stage: int):
        super().__init__()
        torch.manual_seed(2000 + stage)
        self.stage, self.linear = stage, torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, x, ctx):
        x = ctx.data if x is None else x
        return torch.tanh(self.linear(x)) + ctx.shift * (self.stage + 1)


def _context_data(microbatches: int):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(5)
    rows = [1 + mb % 3 for mb in range(microbatches)]  # varies per microbatch
    contexts = [
        SimpleNamespace(data=torch.randn(r, WIDTH, generator=g), shift=torch.randn(WIDTH, generator=g))
        for r in rows
    ]
    targets = [torch.randn(r, WIDTH, generator=g) for r in rows]
    return rows, contexts, targets


def _context_reference(num_stages: int, microbatches: int):
    modules = [_ContextStage(s) for s in range(num_stages)]
    _, contexts, targets = _context_data(microbatches)
    losses = []
    for ctx, t in zip(contexts, targets):
        x = None
        for module in modules:
            x = module(x, ctx)
        loss = _loss(x, t)
        (loss / microbatches).backward()
        losses.append(loss.item())
    return losses, {s: [p.grad for p in m.parameters()] for s, m in enumerate(modules)}


CONTEXT_CASES = [("interleaved_1f1b", 2, 4, False), ("zbv", 2, 5, False), ("zbv", 2, 5, True)]


def _run_context_cases(cases):
    from sysopt.schedules.wgrad import make_deferrable

    out = []
    for name, vpp, m, deferrable in cases:
        schedule = build(name, dist.get_world_size(), vpp, m)
        modules = {s: _ContextStage(s) for s in schedule.stages_of(dist.get_rank())}
        if deferrable:
            for module in modules.values():
                make_deferrable(module)
        rows, contexts, targets = _context_data(m)
        executor = ScheduleExecutor(
            schedule, modules, _loss, boundary_shape=lambda stage, mb, rows=rows: (rows[mb], WIDTH)
        )
        eval_losses = executor.step(None, targets, contexts, forward_only=True)
        untouched = all(p.grad is None for mod in modules.values() for p in mod.parameters())
        losses = executor.step(None, targets, contexts)
        grads = {s: [p.grad.tolist() for p in mod.parameters()] for s, mod in modules.items()}
        as_list = None if losses is None else [v.item() for v in losses]
        out.append(
            (as_list, None if eval_losses is None else [v.item() for v in eval_losses], untouched, grads)
        )
    return out


@pytest.mark.timeout(120)
def test_contexts_variable_shapes_and_forward_only():
    world = 2
    results = launch(_run_context_cases, world, args=(CONTEXT_CASES,), timeout_s=100)
    for i, (name, vpp, m, _) in enumerate(CONTEXT_CASES):
        schedule = build(name, world, vpp, m)
        ref_losses, ref_grads = _context_reference(schedule.num_stages, m)
        last = schedule.stage_to_rank[-1]
        losses, eval_losses, _, _ = results[last][i]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses))
        torch.testing.assert_close(torch.tensor(eval_losses), torch.tensor(ref_losses))
        for rank in range(world):
            assert results[rank][i][2], f"{name}: forward_only touched gradients on rank {rank}"
            for stage, grads in results[rank][i][3].items():
                for got, want in zip(grads, ref_grads[stage]):
                    torch.testing.assert_close(
                        torch.tensor(got), want, rtol=1e-5, atol=1e-7, msg=f"{name} {stage}"
                    )


def _computes_before(actions, action):
    return sum(a.kind.is_compute for a in actions[: actions.index(action)])


@pytest.mark.parametrize(
    "name,vpp,m", [("1f1b", 1, 6), ("interleaved_1f1b", 2, 8), ("zbv", 2, 7), ("dualpipev", 2, 9)]
)
@pytest.mark.parametrize("ahead", [1, 3, None])
def test_receives_are_posted_ahead(name, vpp, m, ahead):
    from sysopt.schedules import Kind, add_comms
    from sysopt.schedules.executor import receives_ahead

    receives = (Kind.RECV_F, Kind.RECV_B)
    schedule = add_comms(build(name, 4, vpp, m))
    moved = 0
    for rank, planned in schedule.actions.items():
        planned = list(planned)
        order = receives_ahead(planned, ahead)
        assert sorted(order) == sorted(planned)
        assert [a for a in order if a.kind not in receives] == [a for a in planned if a.kind not in receives]
        for a in (a for a in order if a.kind in receives):
            consumer = next(c for c in order if c.kind.is_compute and (c.stage, c.microbatch) == (a.stage, a.microbatch)
                            and (c.kind is Kind.FORWARD) == (a.kind is Kind.RECV_F))  # fmt: skip
            now, before = _computes_before(order, a), _computes_before(planned, a)
            assert now <= before, f"rank {rank}: {a} is posted later than planned"
            if ahead is None:
                assert now == 0, f"rank {rank}: {a} is not posted at the start of the step"
            else:
                assert _computes_before(order, consumer) - now <= ahead or now == before, (
                    f"rank {rank}: {a} too early"
                )
                assert _computes_before(order, consumer) - now >= min(
                    ahead, _computes_before(planned, consumer)
                ), f"rank {rank}: {a} posted later than {ahead} computes ahead"
            assert order.index(a) < order.index(consumer)
            moved += now < before
    assert moved, "the lowering posts some receives right before their consumer: these should move up"


def test_receives_ahead_rejects_a_bad_window():
    from sysopt.schedules import add_comms
    from sysopt.schedules.executor import receives_ahead

    with pytest.raises(ValueError, match="computes=0"):
        receives_ahead(add_comms(build("1f1b", 2, 1, 4)).actions[0], 0)


def _run_mismatched_message(case):
    """Stage 0 sends a tensor unlike the buffer stage 1 posts: another shape, or another dtype."""
    schedule = build("1f1b", dist.get_world_size(), 1, 2)
    rank = dist.get_rank()
    modules = {s: _stage_module(s) for s in schedule.stages_of(rank)}
    options = {"boundary_shape": (ROWS + 1, WIDTH)} if case == "shape" else {"dtype": torch.float64}
    executor = ScheduleExecutor(schedule, modules, _loss, **({"boundary_shape": (ROWS, WIDTH)} | options))
    inputs, targets = _data(2)
    executor.step(inputs if rank == 0 else None, targets)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", ["shape", "dtype"])
def test_a_message_unlike_the_receivers_buffer_fails_on_the_sender(case):
    """Before, a larger message failed inside gloo on the receiver and a smaller one left part of its buffer
    uninitialised; the sender now names both shapes and dtypes and the fix."""
    from sysopt.dist import LaunchError

    with pytest.raises(LaunchError) as info:
        launch(_run_mismatched_message, 2, args=(case,), timeout_s=60)
    assert info.value.rank == 0
    message = str(info.value)
    assert "stage 0 microbatch 0: its output has shape (3, 8)" in message and "boundary_shape" in message
    assert ("buffer of shape (4, 8)" in message) if case == "shape" else ("dtype torch.float64" in message)
