"""Deferred weight gradients: DeferrableLinear equals nn.Linear, a captured backward leaves weight
gradients to W, and the executor's split backward gives single-process gradients without recompute."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sysopt.dist import launch
from sysopt.schedules import Kind, build
from sysopt.schedules.executor import ScheduleExecutor
from sysopt.schedules.wgrad import DeferrableLinear, WeightGradStore, defers_weight_grads, make_deferrable

WIDTH, ROWS = 8, 3


def _pair(bias: bool = True):
    torch.manual_seed(3)
    plain = nn.Linear(WIDTH, 5, bias=bias)
    deferrable = DeferrableLinear(WIDTH, 5, bias=bias)
    deferrable.load_state_dict(plain.state_dict())
    return plain, deferrable


@pytest.mark.parametrize("bias", [True, False])
def test_without_capture_it_is_nn_linear(bias):
    plain, deferrable = _pair(bias)
    x = torch.randn(2, ROWS, WIDTH)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [plain(xs[0]), deferrable(xs[1])]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    g = torch.randn_like(outs[0])
    for out in outs:
        out.backward(g)
    torch.testing.assert_close(xs[1].grad, xs[0].grad)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(dict(deferrable.named_parameters())[name].grad, p.grad)


def test_capture_defers_weight_grads_until_flush():
    plain, deferrable = _pair()
    norm = nn.LayerNorm(5)
    x = torch.randn(4, WIDTH)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    g = torch.randn(4, 5)
    (norm(plain(xs[0])) * g).sum().backward()
    norm_grads = [p.grad.clone() for p in norm.parameters()]
    norm.zero_grad()
    store = WeightGradStore()
    with store.capture(("stage", 0)):
        (norm(deferrable(xs[1])) * g).sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad)  # I: the input gradient ...
    for got, want in zip(norm.parameters(), norm_grads):  # ... and parameters outside deferrable layers
        torch.testing.assert_close(got.grad, want)
    assert deferrable.weight.grad is None and deferrable.bias.grad is None
    assert store.pending(("stage", 0)) == 1 and store.pending(("stage", 1)) == 0
    assert store.flush(("stage", 0)) == 1 and store.pending() == 0
    torch.testing.assert_close(deferrable.weight.grad, plain.weight.grad)
    torch.testing.assert_close(deferrable.bias.grad, plain.bias.grad)


def test_capture_reaches_a_backward_run_on_another_thread():
    """The autograd engine runs a CUDA backward on its own device thread: the capture must reach it."""
    import threading

    _, deferrable = _pair()
    x = torch.randn(4, WIDTH, requires_grad=True)
    loss = deferrable(x).sum()
    store = WeightGradStore()
    with store.capture("k"):
        worker = threading.Thread(target=loss.backward)  # stands in for the engine's device thread
        worker.start()
        worker.join()
    assert x.grad is not None and deferrable.weight.grad is None
    assert store.flush("k") == 1 and deferrable.weight.grad is not None


def test_grad_wrt_input_or_weight_computes_only_that():
    plain, deferrable = _pair()
    x = torch.randn(4, WIDTH, requires_grad=True)
    y_ref, y = plain(x), deferrable(x)
    store = WeightGradStore()
    with store.capture("k"):
        (gx,) = torch.autograd.grad(y.sum(), [x], retain_graph=True)
    assert store.pending() == 0  # the engine asked only for the input gradient: no weight GEMM stashed
    torch.testing.assert_close(gx, torch.autograd.grad(y_ref.sum(), [x], retain_graph=True)[0])
    (gw,) = torch.autograd.grad(y.sum(), [deferrable.weight])
    torch.testing.assert_close(gw, torch.autograd.grad(y_ref.sum(), [plain.weight])[0])


def test_make_deferrable_keeps_parameters():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    before = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert not defers_weight_grads(model)
    make_deferrable(model)
    assert defers_weight_grads(model)
    assert isinstance(model[0], DeferrableLinear) and isinstance(model[2][0], DeferrableLinear)
    assert all(before[n] is p for n, p in model.named_parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# ---- the executor over gloo -----------------------------------------------------------------------


class _CountBackward(torch.autograd.Function):
    """Identity that counts how often the autograd engine runs through it."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _CountBackward.calls += 1
        return g


class _Stage(nn.Module):
    def __init__(self, stage: int):
        super().__init__()
        torch.manual_seed(500 + stage)
        self.first, self.norm, self.second = (
            nn.Linear(WIDTH, WIDTH),
            nn.LayerNorm(WIDTH),
            nn.Linear(WIDTH, WIDTH),
        )

    def forward(self, x):
        return self.second(_CountBackward.apply(torch.tanh(self.norm(self.first(x)))))


def _data(m):
    g = torch.Generator().manual_seed(11)
    return [torch.randn(ROWS, WIDTH, generator=g) for _ in range(m)], [
        torch.randn(ROWS, WIDTH, generator=g) for _ in range(m)
    ]


def _loss(y, t):
    return nn.functional.mse_loss(y, t)


def _reference(num_stages, m):
    modules = [_Stage(s) for s in range(num_stages)]
    inputs, targets = _data(m)
    for x, t in zip(inputs, targets):
        for module in modules:
            x = module(x)
        (_loss(x, t) / m).backward()
    return {s: {n: p.grad for n, p in mod.named_parameters()} for s, mod in enumerate(modules)}


def _snapshot(module):
    linear = [p.grad.clone() if p.grad is not None else None for p in (*module.first.parameters(), *module.second.parameters())]  # fmt: skip
    other = [p.grad.clone() if p.grad is not None else None for p in module.norm.parameters()]
    return linear, other


def _changed(before, after):
    return any((a is None) != (b is None) or (a is not None and not torch.equal(a, b)) for a, b in zip(before, after))  # fmt: skip


def _run(cases):
    out = []
    for name, vpp, m, deferrable in cases:
        schedule = build(name, dist.get_world_size(), vpp, m)
        modules = {s: _Stage(s) for s in schedule.stages_of(dist.get_rank())}
        if deferrable:
            for module in modules.values():
                make_deferrable(module)
        executor = ScheduleExecutor(schedule, modules, _loss, boundary_shape=(ROWS, WIDTH))
        log = []
        for kind in (Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT):
            run = executor.handlers[kind]

            def watched(a, run=run, kind=kind, modules=modules, log=log):
                before = _snapshot(modules[a.stage])
                run(a)
                after = _snapshot(modules[a.stage])
                log.append(
                    (kind.value, a.stage, _changed(before[0], after[0]), _changed(before[1], after[1]))
                )

            executor.handlers[kind] = watched
        _CountBackward.calls = 0
        inputs, targets = _data(m)
        executor.step(inputs, targets)
        grads = {s: {n: p.grad.tolist() for n, p in mod.named_parameters()} for s, mod in modules.items()}
        out.append((grads, log, _CountBackward.calls))
    return out


CASES = [("zb_h1", 2, 8, True), ("zbv", 2, 7, True), ("dualpipev", 2, 9, True), ("zb_h1", 2, 8, False)]


@pytest.mark.timeout(120)
def test_executor_split_backward_with_the_store():
    world = 4
    results = launch(_run, world, args=(CASES,), timeout_s=100)
    for i, (name, vpp, m, deferrable) in enumerate(CASES):
        schedule = build(name, world, vpp, m)
        reference = _reference(schedule.num_stages, m)
        for rank in range(world):
            grads, log, calls = results[rank][i]
            for stage, named in grads.items():
                for pname, got in named.items():
                    torch.testing.assert_close(
                        torch.tensor(got),
                        reference[stage][pname],
                        rtol=1e-5,
                        atol=1e-7,
                        msg=f"{name} {pname}",
                    )
            stages = schedule.stages_of(rank)
            splits = [e for e in log if e[0] == "I"]
            if deferrable:
                # I changes no linear weight gradient but does set the norm's; W sets only linear ones
                assert splits and all(not lin and other for _, _, lin, other in splits), (name, rank, log)
                assert all(lin and not other for kind, _, lin, other in log if kind == "W"), (name, rank, log)
                assert calls == len(stages) * m  # one backward walk per (stage, microbatch): no recompute
            else:
                # the fallback walks the graph in I (except on stage 0, whose input needs no gradient)
                # and again in W
                assert calls == sum(m * (2 if s > 0 else 1) for s in stages)
