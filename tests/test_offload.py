"""sysopt.offload: every strategy against torch.optim.AdamW (bitwise against fused=True), checkpoint resume
across placements, budgets, hook timing, explicit parameter waits, re-planning, and the performance model."""

from __future__ import annotations

import copy
import io
import time
from dataclasses import replace

import pytest
import torch
from torch import nn

from sysopt.offload import (
    DEVICE,
    HOST,
    CostInputs,
    OffloadAdamW,
    PhaseTimes,
    PlacementPlan,
    cost_inputs_from_profile,
    make_plan,
    partition,
    predict_iteration,
)
from sysopt.offload.subgroups import device_state_bytes_per_param
from sysopt.offload.transfers import CpuTransfers
from sysopt.offload.update import bf16_state_adamw_, fused_adamw_, stochastic_round_to_bf16_

# A GPU-like model on which offloading involves trade-offs (host and device are different processors).
GPU_LIKE = CostInputs(
    d2h_latency_s=1e-6,
    d2h_bytes_per_s=1e10,
    h2d_latency_s=1e-6,
    h2d_bytes_per_s=1e10,
    host_params_per_s=5e7,
    device_params_per_s=5e7,
    shared_processor=False,
    free_device_bytes=1 << 30,
    source="test",
)
SUBGROUP_BYTES = 1100


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a loaded 2-core machine OpenMP barriers make tiny kernels wait ~20 ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
        )
        self.unused = nn.Linear(3, 3)  # never in forward: its grads stay None and torch skips it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return Net().to(dtype)


def param_groups(model: nn.Module) -> list[dict]:
    ps = [p for n, p in model.named_parameters()]
    return [
        {"params": ps[:4], "lr": 1e-2, "weight_decay": 0.1},
        {"params": ps[4:], "lr": 3e-3, "weight_decay": 0.0},
    ]


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 8, generator=g) for _ in range(n)]


def train(model, opt, sched, xs, clip: str = "torch", accumulate: int = 1) -> None:
    for x in xs:
        opt.zero_grad()
        for part in x.chunk(accumulate):
            model(part.to(next(model.parameters()).dtype)).float().pow(2).mean().backward()
        params = [p for g in opt.param_groups for p in g["params"]]
        if clip == "torch":
            torch.nn.utils.clip_grad_norm_(params, 0.05)
        elif clip == "optimizer":
            opt.clip_grad_norm_(0.05)
        opt.step()
        sched.step()


def reference(xs, clip="torch", accumulate=1):
    model = make_model()
    opt = torch.optim.AdamW(param_groups(model), lr=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train(model, opt, sched, xs, "torch" if clip == "optimizer" else clip, accumulate)
    return model, opt


def offload(strategy: str, **kw) -> tuple[nn.Module, OffloadAdamW, torch.optim.lr_scheduler.LRScheduler]:
    model = make_model(kw.pop("dtype", torch.float32))
    kw.setdefault("subgroup_bytes", SUBGROUP_BYTES)
    if strategy == "interleaved":
        kw.setdefault("costs", GPU_LIKE)
        kw.setdefault("measure", False)
        kw.setdefault("device_budget_bytes", 3000)
    opt = OffloadAdamW(param_groups(model), lr=1e-3, strategy=strategy, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def assert_params_equal(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name}: max diff {(p - q).abs().max().item()}"


# ----------------------------------------------------------------------------- against torch's AdamW


@pytest.mark.parametrize("clip", ["torch", "optimizer"])
@pytest.mark.parametrize("strategy", ["device", "host", "fraction", "interleaved"])
def test_every_strategy_bitwise_equal_to_fused_torch_adamw(strategy, clip):
    xs = batches(6)
    ref, _ = reference(xs, clip)
    model, opt, sched = offload(strategy)
    train(model, opt, sched, xs, clip)
    assert_params_equal(ref, model)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)
    if strategy in ("fraction", "interleaved"):
        assert {HOST, DEVICE} <= set(opt.plan.placements), "the test should mix host and device subgroups"
    if strategy != "device":  # host subgroups really copied gradients out during backward
        assert opt.stats.grad_copies_started > 0 and opt.stats.param_copies_started > 0
        # torch's clip scales gradients after their copy: those are redone; ours scales the copies too
        assert (opt.stats.grad_copies_redone > 0) == (clip == "torch")


def test_matches_default_torch_adamw_within_stated_tolerance():
    """torch's default (foreach) AdamW rounds differently from its fused kernel: last-bit differences."""
    xs = batches(6)
    model = make_model()
    ref_opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
    train(model, ref_opt, torch.optim.lr_scheduler.StepLR(ref_opt, 2, 0.5), xs)
    ours, opt, sched = offload("fraction")
    train(ours, opt, sched, xs)
    for p, q in zip(model.parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_gradient_accumulation_copies_the_final_gradient():
    xs = batches(4)
    ref, _ = reference(xs, accumulate=2)
    model, opt, sched = offload("host")
    train(model, opt, sched, xs, accumulate=2)
    assert_params_equal(ref, model)


def test_gradient_accumulation_copies_each_gradient_once_per_step_after_the_first():
    """The first step copies at every microbatch's hook; later ones only at the hook that completes the
    gradient (the count the last step saw). A step with fewer microbatches than the last still gives the
    right update: step() copies the gradients whose copy never started."""
    xs = batches(5)
    model, opt, sched = offload("host")
    used = sum(1 for p in model.parameters() if p is not model.unused.weight and p is not model.unused.bias)
    train(model, opt, sched, xs[:1], accumulate=4, clip="none")
    assert (opt.stats.grad_copies_started, opt.stats.grad_copies_skipped) == (4 * used, 0)
    train(model, opt, sched, xs[1:3], accumulate=4, clip="none")
    assert opt.stats.grad_copies_started == 4 * used + 2 * used
    assert opt.stats.grad_copies_skipped == 2 * 3 * used and opt.stats.grad_copies_redone == 0
    train(model, opt, sched, xs[3:], accumulate=2, clip="none")  # fewer microbatches than the step before
    assert opt.stats.grad_copies_redone == used  # the first such step: no hook reached the count of 4
    ref = make_model()
    ref_opt = torch.optim.AdamW(param_groups(ref), lr=1e-3, fused=True)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    for chunk, accumulate in ((xs[:1], 4), (xs[1:3], 4), (xs[3:], 2)):
        train(ref, ref_opt, ref_sched, chunk, clip="none", accumulate=accumulate)
    assert_params_equal(ref, model)


@pytest.mark.parametrize("strategy", ["device", "host"])
def test_bf16_parameters_with_fp32_master_match_adamw_on_fp32_copies(strategy):
    xs = batches(4)
    model = make_model(torch.bfloat16)
    masters = [p.detach().float().requires_grad_() for p in model.parameters()]
    groups = param_groups(model)
    ref_groups = [dict(g, params=masters[:4] if i == 0 else masters[4:]) for i, g in enumerate(groups)]
    ref_opt = torch.optim.AdamW(ref_groups, lr=1e-3, fused=True)
    ours_model, opt, _ = offload(strategy, dtype=torch.bfloat16)
    for x in xs:
        for m in (model, ours_model):
            m.zero_grad()
            m(x.bfloat16()).float().pow(2).mean().backward()
        for p, mp in zip(model.parameters(), masters):
            mp.grad = None if p.grad is None else p.grad.float()
        ref_opt.step()
        with torch.no_grad():
            for p, mp in zip(model.parameters(), masters):
                p.copy_(mp)
        opt.step()
    assert_params_equal(model, ours_model)
    ours_masters = [opt.state[p]["master_param"] for p in ours_model.parameters()]
    for a, b in zip(masters, ours_masters):
        assert torch.equal(a, b)


@pytest.mark.parametrize("attached", [False, True])
def test_external_parameter_write_refreshes_host_master(attached, slow_copies_back):
    """module.load_state_dict between steps must win over the host's fp32 master copy, also in attached mode,
    where the (slow) copies back are still in flight when the load comes: it waits for them, and the write
    must not be taken for the optimizer's own."""
    xs = batches(4)
    ref_model = make_model()
    ref_opt = torch.optim.AdamW(param_groups(ref_model), lr=1e-3, fused=True)
    model, opt, _ = offload("host")
    if attached:
        opt.attach(model)
    new_weights = {k: v + 0.25 for k, v in make_model().state_dict().items()}
    for i, x in enumerate(xs):
        for m, o in ((ref_model, ref_opt), (model, opt)):
            if i == 2:
                m.load_state_dict(new_weights)
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    opt.wait_for_params()  # attached: the last step's copies back are still in flight
    assert_params_equal(ref_model, model)


@pytest.mark.parametrize("write", ["data_mul", "amp_unscale", "grad_scaler"])
def test_gradient_writes_that_skip_the_version_counter_are_not_missed(write):
    """Some in-place writes do not bump p.grad's version (writes through .data, GradScaler's unscale, c10d
    collectives on p.grad): host subgroups must step on the written gradient, not the early copy."""
    xs = batches(3)
    results = {}
    for name in ("torch", "host"):
        model = make_model()
        if name == "torch":
            opt = torch.optim.AdamW(param_groups(model), lr=1e-3, fused=True)
        else:
            opt = OffloadAdamW(param_groups(model), lr=1e-3, strategy="host", subgroup_bytes=SUBGROUP_BYTES)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if write == "grad_scaler" else None
        for x in xs:
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            (scaler.scale(loss) if scaler is not None else loss).backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if write == "data_mul":
                for g in grads:
                    g.data.mul_(0.5)
            elif write == "amp_unscale":
                torch._amp_foreach_non_finite_check_and_unscale_(grads, torch.zeros(1), torch.full((1,), 0.5))
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        results[name] = model
        if name == "host":
            assert opt.stats.grad_copies_stale_unversioned > 0
    assert_params_equal(results["torch"], results["host"])


@pytest.mark.parametrize("clip", [False, True])
def test_unversioned_write_to_a_sparse_gradient_is_not_missed(clip):
    """An embedding whose batch touches one row: its gradient is zero at every sampled element, so only its
    norm shows that an unscale rescaled it after the early copy, also when a clip (which rescales the
    gradient and its copy alike) comes between the unscale and the step."""
    results = {}
    for name in ("torch", "host"):
        torch.manual_seed(0)
        emb = nn.Embedding(1000, 8)
        if name == "torch":
            opt = torch.optim.AdamW([emb.weight], lr=1e-3, fused=True)
        else:
            opt = OffloadAdamW([emb.weight], lr=1e-3, strategy="host", subgroup_bytes=SUBGROUP_BYTES)
        for _ in range(3):
            opt.zero_grad()
            emb(torch.full((4,), 1)).pow(2).sum().backward()
            torch._amp_foreach_non_finite_check_and_unscale_(
                [emb.weight.grad], torch.zeros(1), torch.full((1,), 0.5)
            )
            if clip and name == "torch":
                torch.nn.utils.clip_grad_norm_([emb.weight], 1e-3)
            elif clip:
                opt.clip_grad_norm_(1e-3)
            opt.step()
        results[name] = emb.weight.detach().clone()
        if name == "host":
            assert opt.stats.grad_copies_stale_unversioned == 3
    assert torch.equal(results["torch"], results["host"])


def test_attached_write_after_the_copy_landed_is_not_taken_for_the_optimizers(slow_copies_back):
    """In attached mode the optimizer marks a parameter's copy done when a forward waits for it. A write that
    comes after the copy landed but before that wait must still count as an outside write (the version the
    copy left is what the wait records), so the next step starts from the written value."""
    xs = batches(3)
    ref_model = make_model()
    ref_opt = torch.optim.AdamW(param_groups(ref_model), lr=1e-3, fused=True)
    model, opt, _ = offload("host")
    opt.attach(model)
    new_weights = [p.detach() + 0.25 for p in make_model().parameters()]
    for i, x in enumerate(xs):
        for m, o in ((ref_model, ref_opt), (model, opt)):
            if i == 1:
                if o is opt:  # the copies land; the optimizer has not waited for them yet
                    for handle, *_ in list(opt._pending_params.values()):
                        opt._transfers.wait_host(handle)
                with torch.no_grad():
                    for p, w in zip(m.parameters(), new_weights):
                        p.copy_(w)
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    opt.wait_for_params()
    assert_params_equal(ref_model, model)


def test_a_saved_placement_that_does_not_fit_is_not_adopted():
    model, opt, sched = offload(
        "interleaved", state_dtype=torch.bfloat16, replan_interval_steps=None, device_budget_bytes=10**6
    )
    train(model, opt, sched, batches(2))
    opt.observe(host_params_per_s=GPU_LIKE.host_params_per_s / 20, forward_s=0.01, backward_s=0.02)
    assert opt.replan(force=True)
    saved = opt.state_dict()
    need = opt.plan.device_state_bytes
    _, small, _ = offload(
        "interleaved", state_dtype=torch.bfloat16, replan_interval_steps=None, device_budget_bytes=10**6,
        costs=replace(GPU_LIKE, free_device_bytes=need - 1),  # the budget allows it, free memory does not
    )  # fmt: skip
    with pytest.warns(UserWarning, match="does not fit here"):
        small.load_state_dict(saved)
    assert small.plan.device_state_bytes < need


def test_a_plain_adam_checkpoint_without_weight_decay_loads():
    """Without weight decay Adam and AdamW compute the same: its decoupled_weight_decay=False is no reason
    to refuse."""
    model, opt, _ = offload("host")
    adam = torch.optim.Adam(list(model.parameters())).state_dict()
    adam["param_groups"] = [
        {**adam["param_groups"][0], "params": ids} for ids in ([0, 1, 2, 3], [4, 5, 6, 7])
    ]
    opt.load_state_dict(adam)
    assert all(g["weight_decay"] == 0 for g in opt.param_groups)


def test_a_sparse_gradient_fails_the_step_before_anything_updates():
    torch.manual_seed(0)
    dense, emb = nn.Linear(4, 4), nn.Embedding(10, 4, sparse=True)
    opt = OffloadAdamW(
        [*dense.parameters(), emb.weight], lr=1e-3, strategy="host", subgroup_bytes=SUBGROUP_BYTES
    )
    before = [p.detach().clone() for p in dense.parameters()]
    (dense(emb(torch.tensor([1, 2]))).sum()).backward()
    with pytest.raises(
        RuntimeError, match=r"param group 0, parameter 2 \(shape \(10, 4\)\) has a sparse gradient"
    ):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, dense.parameters()))


def test_param_group_added_later_is_partitioned_and_planned():
    xs = batches(4)
    ref_model = make_model()
    groups = param_groups(ref_model)
    ref_opt = torch.optim.AdamW(groups[:1], lr=1e-3, fused=True)
    ref_opt.add_param_group(groups[1])
    model = make_model()
    groups = param_groups(model)
    opt = OffloadAdamW(groups[:1], lr=1e-3, strategy="fraction", subgroup_bytes=SUBGROUP_BYTES)
    n_before = len(opt.subgroups)
    opt.add_param_group(groups[1])
    assert len(opt.subgroups) > n_before and len(opt.plan.placements) == len(opt.subgroups)
    for m, o in ((ref_model, ref_opt), (model, opt)):
        train(m, o, torch.optim.lr_scheduler.StepLR(o, 2, 0.5), xs)
    assert_params_equal(ref_model, model)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "first,second",
    [("host", "device"), ("device", "host"), ("fraction", "interleaved"), ("interleaved", "torch")],
)
def test_resume_under_another_placement_is_bit_exact(first, second):
    xs = batches(6)
    ref, ref_opt = reference(xs)
    model, opt, sched = offload(first)
    train(model, opt, sched, xs[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    if second == "torch":  # our checkpoint is torch's AdamW layout
        model2 = make_model()
        opt2 = torch.optim.AdamW(param_groups(model2), lr=1e-3, fused=True)
        sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    else:
        model2, opt2, sched2 = offload(second)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optim"])
    sched2.load_state_dict(ckpt["sched"])
    steps = [opt2.state[p]["step"].item() for p in model2.parameters()]
    assert steps == [3.0] * 6 + [0.0] * 2  # the step counter survives; the unused layer never stepped
    train(model2, opt2, sched2, xs[3:])
    assert_params_equal(ref, model2)
    for p, q in zip(ref.parameters(), model2.parameters()):
        if p.grad is None:
            continue
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ref_opt.state[p][k].cpu(), opt2.state[q][k].cpu()), k


def test_torch_adamw_checkpoint_loads_into_offload():
    xs = batches(5)
    ref, _ = reference(xs)
    model = make_model()
    opt = torch.optim.AdamW(param_groups(model), lr=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train(model, opt, sched, xs[:2])
    model2, opt2, sched2 = offload("fraction")
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    train(model2, opt2, sched2, xs[2:])
    assert_params_equal(ref, model2)


# ----------------------------------------------------------------------------- budgets and plans


def state_bytes(model: nn.Module) -> int:
    return sum(8 * p.numel() for p in model.parameters())


def test_impossible_budgets_fail_before_training_with_the_numbers():
    total = state_bytes(make_model())
    with pytest.raises(ValueError, match=rf"{total} bytes in all.*device_budget_bytes=100\b"):
        offload("device", device_budget_bytes=100)
    with pytest.raises(ValueError, match=r"device_budget_bytes=1000\b"):
        offload("fraction", fraction=0.9, device_budget_bytes=1000)
    with pytest.raises(ValueError, match=r"device_budget_bytes=-1 must be >= 0"):
        offload("host", device_budget_bytes=-1)
    small = CostInputs(**{**GPU_LIKE.to_dict(), "free_device_bytes": 500})
    with pytest.raises(ValueError, match=rf"places {total} bytes .* only 500 bytes are free"):
        offload("device", costs=small)
    n = len(offload("host")[1].subgroups)
    all_device = PlacementPlan("manual", (DEVICE,) * n, (), device_state_bytes=total)
    with pytest.raises(ValueError, match=rf"places {total} bytes.*device_budget_bytes=64\b"):
        offload("host", plan=all_device, device_budget_bytes=64)
    with pytest.raises(ValueError, match=rf"plan has 2 placements but the optimizer has {n} subgroups"):
        offload("host", plan=PlacementPlan("manual", (HOST, HOST), (0, 1), 0))
    with pytest.raises(ValueError) as device_error:  # the fix named fits the strategy
        offload("device", device_budget_bytes=100)
    assert "fraction" not in str(device_error.value)
    with pytest.raises(ValueError, match=r"lower fraction to <= "):
        offload("fraction", fraction=0.9, device_budget_bytes=1000)


def test_failed_add_param_group_leaves_no_group_behind():
    model = make_model()
    groups = param_groups(model)
    fits = OffloadAdamW(
        groups[:1], lr=1e-3, strategy="device", subgroup_bytes=SUBGROUP_BYTES
    ).plan.device_state_bytes
    opt = OffloadAdamW(
        groups[:1], lr=1e-3, strategy="device", subgroup_bytes=SUBGROUP_BYTES, device_budget_bytes=fits
    )
    with pytest.raises(ValueError, match=r"device_budget_bytes="):
        opt.add_param_group(groups[1])
    assert len(opt.param_groups) == 1 and not any(p in opt.state for p in groups[1]["params"])
    opt.add_param_group({**groups[1], "params": []})  # the optimizer still works afterwards


def test_state_dict_with_amsgrad_or_maximize_is_refused():
    model, opt, _ = offload("host")
    sd = opt.state_dict()
    sd["param_groups"][1]["amsgrad"] = True
    with pytest.raises(
        ValueError, match=r"state_dict param group 1 has amsgrad=True: .* use torch.optim.AdamW"
    ):
        opt.load_state_dict(sd)


def test_adam_variants_and_float64_parameters_are_refused_not_run_as_adamw():
    """torch.optim.Adam's L2 decay (decoupled_weight_decay=False), amsgrad in a group, float64 parameters
    (trained at fp32 precision otherwise) and replan() on a fixed placement each get a clear error."""
    model, opt, _ = offload("host")
    ps = list(model.parameters())
    adam = torch.optim.Adam(ps, weight_decay=0.1).state_dict()
    adam["param_groups"] = [
        {**adam["param_groups"][0], "params": ids} for ids in ([0, 1, 2, 3], [4, 5, 6, 7])
    ]
    with pytest.raises(ValueError, match="decoupled_weight_decay=False"):
        opt.load_state_dict(adam)
    with pytest.raises(ValueError, match="param group 0 has amsgrad=True"):
        OffloadAdamW([{"params": ps, "amsgrad": True}], lr=1e-3, strategy="host")
    with pytest.raises(ValueError, match=r"dtype torch.float64.*use torch.optim.AdamW"):
        OffloadAdamW([nn.Parameter(torch.ones(4, dtype=torch.float64))], lr=1e-3, strategy="device")
    with pytest.raises(ValueError, match=r"replan\(\) re-plans strategy='interleaved' only.*strategy='host'"):
        opt.replan(force=True)


@pytest.mark.parametrize("strategy", ["host", "device"])
def test_bf16_resume_is_bit_exact_whichever_state_dict_loads_first(strategy):
    """Loading the optimizer before the model must not let the model's (bf16) load overwrite the fp32
    masters restored from the checkpoint."""
    xs = batches(6)
    straight, opt, sched = offload(strategy, dtype=torch.bfloat16)
    train(straight, opt, sched, xs)
    model, opt, sched = offload(strategy, dtype=torch.bfloat16)
    train(model, opt, sched, xs[:3])
    ckpt = {"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()}
    model2, opt2, sched2 = offload(strategy, dtype=torch.bfloat16)
    opt2.load_state_dict(ckpt["optim"])
    model2.load_state_dict(ckpt["model"])
    sched2.load_state_dict(ckpt["sched"])
    train(model2, opt2, sched2, xs[3:])
    assert_params_equal(straight, model2)


@pytest.mark.parametrize("budget", [0, 1000, 3000, 5000, 10**6])
def test_interleaved_plan_respects_the_budget_and_beats_fixed_plans(budget):
    model, opt, sched = offload("interleaved", device_budget_bytes=budget)
    subgroups = opt.subgroups
    placed = zip(opt.plan.placements, opt.subgroup_params)
    resident = sum(8 * p.numel() for where, ps in placed if where == DEVICE for p in ps)
    assert resident == opt.plan.device_state_bytes <= budget
    mine = predict_iteration(subgroups, opt.plan.placements, GPU_LIKE, PhaseTimes())
    host = make_plan("host", subgroups, device_budget_bytes=budget, costs=GPU_LIKE)
    assert mine.iteration_s <= host.predicted_iteration_s
    for f in (0.25, 0.5, 1.0):
        fixed = make_plan("fraction", subgroups, device_budget_bytes=10**9, costs=GPU_LIKE, device_fraction=f)
        if fixed.device_state_bytes <= budget:
            assert mine.iteration_s <= fixed.predicted_iteration_s + 1e-12
    train(model, opt, sched, batches(2))  # and it trains under that plan


def test_partition_covers_params_once_in_grad_ready_order_within_size():
    model = make_model()
    groups = [g["params"] for g in param_groups(model)]
    subgroups = partition(groups, SUBGROUP_BYTES)
    seen = [(s.group_index, j) for s in subgroups for j in s.param_indices]
    expected = [(gi, j) for gi in reversed(range(len(groups))) for j in reversed(range(len(groups[gi])))]
    assert seen == expected
    for s in subgroups:
        ps = [groups[s.group_index][j] for j in s.param_indices]
        assert s.numel == sum(p.numel() for p in ps)
        assert s.device_state_bytes == 8 * s.numel
        assert s.device_state_bytes <= SUBGROUP_BYTES or len(ps) == 1
    assert device_state_bytes_per_param(torch.bfloat16) == 12


def test_plan_cost_inputs_and_subgroups_round_trip_json():
    _, opt, _ = offload("interleaved")
    assert PlacementPlan.from_json(opt.plan.to_json()) == opt.plan
    assert CostInputs.from_json(GPU_LIKE.to_json()) == GPU_LIKE
    assert type(opt.subgroups[0]).from_dict(opt.subgroups[0].to_dict()) == opt.subgroups[0]
    with pytest.raises(ValueError, match="transfer_order"):
        PlacementPlan("manual", (HOST, DEVICE), (1,), 0)


def test_performance_model_closed_form():
    """Two host subgroups of 1000 params (4000 grad/param bytes) on the GPU-like links."""
    model = nn.Linear(1000, 1, bias=False)
    model2 = nn.Linear(1000, 1, bias=False)
    subs = partition([[model.weight, model2.weight]], subgroup_bytes=8000)
    assert len(subs) == 2
    d2h = h2d = GPU_LIKE.d2h_latency_s + 4000 / GPU_LIKE.d2h_bytes_per_s
    upd = 1000 / GPU_LIKE.host_params_per_s
    dev = 1000 / GPU_LIKE.device_params_per_s
    assert d2h < upd  # the closed forms below assume copies are shorter than updates
    # backward 1 s: both gradient copies hide under it; the step is update, update, then the last copy back
    p = predict_iteration(subs, (HOST, HOST), GPU_LIKE, PhaseTimes(forward_s=0.5, backward_s=1.0))
    assert p.iteration_s == pytest.approx(0.5 + 1.0 + 2 * upd + h2d)
    # no backward to hide behind: copy, update, update, copy back (second copy hidden under first update)
    p = predict_iteration(subs, (HOST, HOST), GPU_LIKE, PhaseTimes())
    assert p.iteration_s == pytest.approx(d2h + 2 * upd + h2d)
    # device subgroup runs beside the host pipeline
    p = predict_iteration(subs, (HOST, DEVICE), GPU_LIKE, PhaseTimes())
    assert p.iteration_s == pytest.approx(max(dev, d2h + upd + h2d))
    shared = CostInputs(**{**GPU_LIKE.to_dict(), "shared_processor": True})
    p = predict_iteration(subs, (HOST, DEVICE), shared, PhaseTimes(1.0, 2.0))
    assert p.iteration_s == pytest.approx(3.0 + d2h + upd + h2d + dev)


def test_cost_inputs_from_hardware_profile():
    profile_mod = pytest.importorskip("sysopt.hardware.profile")
    d = {
        "cpu": {"model": "x", "cores": 32, "threads": 64, "isa": ["avx2"], "host_memory_bytes": 2**40},
        "gpus": [
            {
                "index": 0,
                "name": "H100",
                "memory_total_bytes": 80 * 2**30,
                "memory_free_bytes": 70 * 2**30,
                "pcie_gen": 5,
                "pcie_width": 16,
                "nvlink_links": 18,
                "sm_clock_mhz": None,
                "memory_clock_mhz": None,
            }
        ],
        "calibration": {
            "device": "cuda:0",
            "matmul": [],
            "matmul_flops_per_s": {"fp32": 5e13},
            "copy": {
                "h2d_pinned": {"latency_s": 1e-5, "bytes_per_s": 2.5e10},
                "d2h_pinned": {"latency_s": 2e-5, "bytes_per_s": 2.0e10},
            },
            "p2p": None,
            "allreduce": None,
            "collective_world_size": 1,
            "collective_backend": "nccl",
            "optimizer_params_per_s": {"host": 2e9, "device": 8e10},
            "created": "now",
        },
        "created": "now",
    }
    profile = profile_mod.HardwareProfile.from_dict(d)
    c = cost_inputs_from_profile(profile, "cuda:0")
    assert (c.h2d_bytes_per_s, c.d2h_bytes_per_s, c.d2h_latency_s) == (2.5e10, 2.0e10, 2e-5)
    assert (c.host_params_per_s, c.device_params_per_s) == (2e9, 8e10)
    assert c.free_device_bytes == 70 * 2**30 and not c.shared_processor


def test_a_profile_gives_rates_but_not_the_free_memory_placement_checks_against():
    # the profile's memory figure is from when it was probed (on CPU the host's total): placing against it
    # refused a plan that fits (here) or, on a GPU, allowed one past what is free once the model is there
    profile_mod = pytest.importorskip("sysopt.hardware.profile")
    d = {
        "cpu": {"model": "x", "cores": 2, "threads": 2, "isa": [], "host_memory_bytes": 1 << 10},
        "gpus": [],
        "calibration": {
            "device": "cpu", "matmul": [], "matmul_flops_per_s": {"fp32": 1e11},
            "copy": {"memcpy": {"latency_s": 1e-6, "bytes_per_s": 1e10}}, "p2p": None, "allreduce": None,
            "collective_world_size": 1, "collective_backend": "", "created": "now",
            "optimizer_params_per_s": {"host": 1e9, "device": 1e9},
        },
        "created": "now",
    }  # fmt: skip
    profile = profile_mod.HardwareProfile.from_dict(d)
    assert cost_inputs_from_profile(profile, "cpu").free_device_bytes == 1 << 10  # the projection's figure
    model = nn.Linear(64, 64)
    opt = OffloadAdamW(model.parameters(), lr=1e-3, strategy="device", profile=profile)  # 33 KB of state
    assert opt.costs.free_device_bytes > 1 << 20
    assert opt.costs.host_params_per_s == 1e9  # the rates are still the profile's


def test_pinned_host_state_is_checked_as_the_caching_host_allocator_rounds_it():
    # torch's caching host allocator rounds each pinned request up to a power of two: a plan whose exact
    # bytes fit the host could fail in cudaHostAlloc (or swap) once its buffers are pinned
    from sysopt.offload.optimizer import pinned_allocation_bytes
    from sysopt.offload.placement import PlacementPlan, check_plan
    from sysopt.offload.subgroups import partition

    assert [pinned_allocation_bytes(n) for n in (1, 4, 5, 4096, 4097, 180 << 20)] == [
        1,
        4,
        8,
        4096,
        8192,
        256 << 20,
    ]
    params = [nn.Parameter(torch.empty(300_000)) for _ in range(2)]  # 1.2 MB buffers: 2 MiB each when pinned
    subs = partition([params], subgroup_bytes=1 << 40)
    plan = PlacementPlan("host", ("host",) * len(subs), tuple(range(len(subs))), 0)
    exact = sum(s.host_state_bytes for s in subs)
    check_plan(plan, subs, 0, free_host_bytes=exact)
    pinned = lambda s: 2 * 4 * (2 << 20) + 2 * 4  # noqa: E731 - two params x four 2 MiB buffers, two steps
    with pytest.raises(
        ValueError, match=r"on the host \(as pinned buffers, each rounded up to a power of two\)"
    ):
        check_plan(plan, subs, 0, free_host_bytes=exact, host_bytes_of=pinned)
    opt = OffloadAdamW(params, lr=1e-3, strategy="host")
    assert sum(opt._pinned_bytes(s) for s in opt.subgroups) == pinned(None)  # what CUDA would allocate


def test_a_consumed_gradient_is_not_kept_alive_after_step():
    # fp32 parameters kept their gradient's copy record past step(), and with it the gradient itself, until
    # the optimizer's own zero_grad: a loop that frees gradients through the model kept them through the
    # next forward (on a GPU, the device memory offloading is meant to free)
    import gc
    import weakref

    torch.manual_seed(0)
    fp32, bf16 = nn.Linear(32, 32), nn.Linear(32, 32).bfloat16()
    opt = OffloadAdamW([*fp32.parameters(), *bf16.parameters()], lr=1e-3, strategy="host")
    x = torch.randn(4, 32)
    (fp32(x).sum() + bf16(x.bfloat16()).float().sum()).backward()
    grads = [weakref.ref(p.grad) for m in (fp32, bf16) for p in m.parameters()]
    opt.step()
    fp32.zero_grad(set_to_none=True)  # the modules', not the optimizer's
    bf16.zero_grad(set_to_none=True)
    gc.collect()
    assert [g() is None for g in grads] == [True] * 4


def test_projection_for_gpu_node_from_profile_json_plans_without_a_gpu():
    """7e9 parameters in 256 MiB subgroups on the GPU defaults: the plan uses the budget and predicts."""
    params = [torch.empty(50_000_000, device="meta") for _ in range(140)]
    subs = partition([params], subgroup_bytes=400_000_000)
    from sysopt.offload import DEFAULT_GPU_COSTS

    budget = 40 * 2**30
    phases = PhaseTimes(forward_s=1.0, backward_s=2.0)
    plan = make_plan("interleaved", subs, device_budget_bytes=budget, costs=DEFAULT_GPU_COSTS, phases=phases)
    host = make_plan("host", subs, device_budget_bytes=budget, costs=DEFAULT_GPU_COSTS, phases=phases)
    assert 0 < plan.device_state_bytes <= budget
    assert plan.predicted_iteration_s < host.predicted_iteration_s


# ----------------------------------------------------------------------------- hooks, waits, re-planning


class _Probe(torch.autograd.Function):
    """Identity whose backward records the optimizer's copy counter when gradient reaches it."""

    seen: list[int] = []

    @staticmethod
    def forward(ctx, x, opt):
        ctx.opt = opt
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _Probe.seen.append(ctx.opt.stats.grad_copies_started)
        return g, None


def test_gradient_copies_start_inside_backward():
    model, opt, _ = offload("host")
    first, rest = model.layers[0], model.layers[1:]
    _Probe.seen = []
    out = rest(_Probe.apply(first(batches(1)[0]), opt))
    out.pow(2).mean().backward()
    later = sum(1 for p in rest.parameters())
    # when backward reached the probe, the later layers' gradients were already being copied ...
    assert _Probe.seen == [later]
    # ... and the first layer's copies started after it, still inside the same backward call
    assert opt.stats.grad_copies_started == later + 2
    opt.step()
    assert opt.stats.grad_copies_redone == 0


def _slow_copies(monkeypatch, slowed: str) -> None:
    """CPU copies in direction `slowed` ('h2d' or 'd2h') take 50 ms each, so they are still in flight later."""
    run = CpuTransfers._run

    def slow_run(self, direction, dsts, srcs):
        if direction == slowed:
            time.sleep(0.05)
        run(self, direction, dsts, srcs)

    monkeypatch.setattr(CpuTransfers, "_run", slow_run)


@pytest.fixture
def slow_copies_back(monkeypatch):
    """Parameter copies back to the device take 50 ms each, so they are still in flight after step()."""
    _slow_copies(monkeypatch, "h2d")


def test_attached_forward_waits_for_slow_parameter_copies(slow_copies_back):
    xs = batches(3)
    ref, _ = reference(xs, clip="none")
    model, opt, sched = offload("host")
    opt.attach(model)
    outputs = []
    for x in xs:
        opt.zero_grad()
        out = model(x)
        outputs.append(out.detach())
        out.pow(2).mean().backward()
        opt.step()
        sched.step()
        assert opt._pending_params, "copies back are still in flight after step()"
    model(xs[0])  # the forward itself waits, module by module
    assert not opt._pending_params
    assert opt.stats.param_waits == opt.stats.param_copies_started
    assert_params_equal(ref, model)


def test_attach_calls_add_up(slow_copies_back):
    """attach(a) then attach(b): a's forward still waits for a's copies back."""
    xs = batches(1)
    ref, _ = reference(xs, clip="none")
    model, opt, sched = offload("host")
    first, last = model.layers[0], model.layers[4]
    opt.attach(first)
    opt.attach(last)
    opt.zero_grad()
    model(xs[0]).pow(2).mean().backward()
    opt.step()
    assert opt._pending_params
    first(xs[0])  # waits for its own parameters
    assert torch.equal(first.weight, ref.layers[0].weight) and torch.equal(first.bias, ref.layers[0].bias)


def test_a_nan_gradient_is_not_mistaken_for_a_changed_one():
    model, opt, _ = offload("host")
    opt.zero_grad()
    (model(batches(1)[0]).sum() * float("nan")).backward()
    opt.step()
    assert opt.stats.grad_copies_stale_unversioned == 0 and opt.stats.grad_copies_redone == 0


def test_attached_waits_cover_groups_added_later_and_model_state_dict(slow_copies_back):
    """attach() then add_param_group(): the added parameters' forwards wait for their copies too; and a
    model.state_dict() right after step() holds the updated weights."""
    xs = batches(3)
    ref = make_model()
    ref_groups = param_groups(ref)
    ref_opt = torch.optim.AdamW(ref_groups[1:], lr=1e-3, fused=True)
    ref_opt.add_param_group(ref_groups[0])
    model = make_model()
    groups = param_groups(model)
    opt = OffloadAdamW(groups[1:], lr=1e-3, strategy="host", subgroup_bytes=SUBGROUP_BYTES)
    opt.attach(model)
    opt.add_param_group(groups[0])
    for x in xs:
        outs = []
        for m, o in ((ref, ref_opt), (model, opt)):
            o.zero_grad()
            outs.append(m(x))  # the first layer's forward must wait for its (slow) copy back
            outs[-1].pow(2).mean().backward()
            o.step()
        assert torch.equal(outs[0], outs[1])
        saved = model.state_dict()  # waits for the copies back (state_dict pre-hooks)
        assert all(torch.equal(saved[k], v) for k, v in ref.state_dict().items())
    assert_params_equal(ref, model)


def test_replans_when_measured_timings_drift_and_stays_exact():
    xs = batches(8)
    ref, _ = reference(xs)
    model, opt, sched = offload("interleaved", replan_interval_steps=2, device_budget_bytes=10**6)
    start = opt.plan
    train(model, opt, sched, xs[:2])
    assert opt.plan == start and opt.stats.replans == 0  # nothing measured, nothing drifted
    slow_host = GPU_LIKE.host_params_per_s / 20
    opt.observe(host_params_per_s=slow_host, forward_s=0.01, backward_s=0.02)
    train(model, opt, sched, xs[2:4])
    assert opt.stats.replans == 1
    expected = make_plan(
        "interleaved",
        opt.subgroups,
        device_budget_bytes=10**6,
        costs=GPU_LIKE.with_rates(host_params_per_s=slow_host),
        phases=PhaseTimes(0.01, 0.02),
    )
    assert opt.plan.placements == expected.placements
    assert len(opt.plan.host_subgroups) < len(start.host_subgroups)
    opt.observe(host_params_per_s=slow_host * 1.05)  # within tolerance: no re-plan
    train(model, opt, sched, xs[4:])
    assert opt.stats.replans == 1
    assert_params_equal(ref, model)


def test_bf16_interleaved_resume_keeps_the_replanned_placement():
    """With bf16 host state the numbers follow the placement (host subgroups bf16 moments, device ones fp32):
    an optimizer resumed after a re-plan must take the placement saved with the state, not its initial plan,
    and then continue bit-exactly."""

    def make():
        return offload(
            "interleaved", state_dtype=torch.bfloat16, replan_interval_steps=None, device_budget_bytes=10**6
        )

    xs = batches(6)
    model, opt, sched = make()
    start = opt.plan
    train(model, opt, sched, xs[:2])
    opt.observe(host_params_per_s=GPU_LIKE.host_params_per_s / 20, forward_s=0.01, backward_s=0.02)
    assert opt.replan(force=True) and opt.plan.placements != start.placements
    train(model, opt, sched, xs[2:3])
    ckpt = copy.deepcopy(
        {"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()}
    )
    train(model, opt, sched, xs[3:])
    model2, opt2, sched2 = make()
    assert opt2.plan.placements == start.placements
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optim"])
    sched2.load_state_dict(ckpt["sched"])
    assert opt2.plan.placements == opt.plan.placements and opt2.stats.steps == 3
    train(model2, opt2, sched2, xs[3:])
    assert_params_equal(model, model2)


def test_self_measuring_optimizer_measures_and_stays_exact():
    xs = batches(6)
    ref, _ = reference(xs)
    model, opt, sched = offload(
        "interleaved", costs=None, measure=True, replan_interval_steps=2, device_budget_bytes=2000
    )
    assert opt.costs.source == "measured" and opt.costs.shared_processor
    train(model, opt, sched, xs)
    m = opt.measured.values
    assert m["backward_s"] > 0 and m["forward_s"] > 0 and m["device_params_per_s"] > 0
    assert opt.predict() > m["forward_s"] + m["backward_s"]
    assert_params_equal(ref, model)


# ----------------------------------------------------------------------------- bf16 host state


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 1.0 + 2**-10)  # between bf16 neighbours 1.0 and 1.0078125
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_to_bf16_(out, x, torch.Generator().manual_seed(0))
    assert set(out.float().unique().tolist()) == {1.0, 1.0078125}
    assert out.float().mean().item() == pytest.approx(x[0].item(), abs=2e-4)
    assert x.bfloat16().float().mean().item() == 1.0  # round-to-nearest would lose the offset


def test_bf16_state_update_follows_fp32_adamw():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(4096, generator=g)
    ref = [p.clone()], [torch.zeros(4096)], [torch.zeros(4096)], [torch.zeros(())]
    ours = [p.clone()], [torch.zeros(4096, dtype=torch.bfloat16)], [torch.zeros(4096, dtype=torch.bfloat16)]
    ours_step = [torch.zeros(())]
    for _ in range(20):
        grad = torch.randn(4096, generator=g)
        fused_adamw_(
            ref[0], [grad], ref[1], ref[2], ref[3], lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1, eps=1e-8
        )
        bf16_state_adamw_(
            ours[0],
            [grad],
            ours[1],
            ours[2],
            ours_step,
            lr=1e-2,
            betas=(0.9, 0.999),
            weight_decay=0.1,
            eps=1e-8,
            generator=g,
        )
    assert ours_step[0].item() == ref[3][0].item() == 20
    drift = (ours[0][0] - ref[0][0]).abs()
    moved = (ref[0][0] - p).abs()
    assert drift.mean() < 0.02 * moved.mean()


def test_bf16_host_state_optimizer_trains_close_and_resumes():
    xs = batches(4)
    ref, _ = reference(xs)
    model, opt, sched = offload("host", state_dtype=torch.bfloat16)
    train(model, opt, sched, xs)
    assert opt.state[next(model.parameters())]["exp_avg"].dtype == torch.bfloat16
    for p, q in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=2e-3)
    # checkpoint (with the rounding generator) continues identically in a twin
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    twin_model, twin, _ = offload("host", state_dtype=torch.bfloat16, seed=123)
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(torch.load(buf, weights_only=True))
    for m, o in ((model, opt), (twin_model, twin)):
        o.zero_grad()
        m(xs[0]).pow(2).mean().backward()
        o.step()
    assert_params_equal(model, twin_model)


def test_bf16_master_host_state_trains_close_resumes_and_halves_the_master():
    """master_dtype=bf16: host masters are bf16 (rounded stochastically), parameters hold bf16 values exactly,
    training follows fp32 AdamW to bf16 precision, and a checkpoint continues bit-exactly."""
    xs = batches(6)
    ref, _ = reference(xs)
    model, opt, sched = offload("host", state_dtype=torch.bfloat16, master_dtype=torch.bfloat16)
    train(model, opt, sched, xs)
    params = [p for p in model.parameters() if p.grad is not None]
    assert all(opt._master(p).dtype == torch.bfloat16 for p in params)
    for p in params:  # the device parameter is exactly its bf16 master, upcast
        assert torch.equal(p, opt._master(p).float())
    moved = max((q - make_model().get_parameter(n)).abs().max().item() for n, q in ref.named_parameters())
    for p, q in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0.15 * moved)
    plain = offload("host", state_dtype=torch.bfloat16)[1]
    assert sum(s.host_state_bytes for s in opt.subgroups) < sum(s.host_state_bytes for s in plain.subgroups)
    sd = opt.state_dict()
    assert all("master_param" not in st for st in sd["state"].values())  # the fp32 parameter holds it
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    twin_model, twin, _ = offload("host", state_dtype=torch.bfloat16, master_dtype=torch.bfloat16, seed=9)
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(torch.load(buf, weights_only=True))
    for m, o in ((model, opt), (twin_model, twin)):
        for x in xs[:2]:
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    assert_params_equal(model, twin_model)


def test_bf16_parameters_with_bf16_masters_train_close_to_fp32_masters():
    """A bf16 model: its host master is bf16 too (rounded stochastically), the parameter equals it after each
    step, and training stays close to the fp32-master run."""
    xs = batches(6)
    runs = {}
    for master in (torch.float32, torch.bfloat16):
        model, opt, sched = offload(
            "host", dtype=torch.bfloat16, state_dtype=torch.bfloat16, master_dtype=master
        )
        train(model, opt, sched, xs)
        runs[master] = model, opt
    model, opt = runs[torch.bfloat16]
    params = [p for p in model.parameters() if p.grad is not None]
    assert all(opt._master(p).dtype == torch.bfloat16 and torch.equal(opt._master(p), p) for p in params)
    assert all(opt.state[p]["master_param"].dtype == torch.bfloat16 for p in params)
    initial = make_model(torch.bfloat16)
    for (name, p), q in zip(model.named_parameters(), runs[torch.float32][0].parameters()):
        moved = (q.float() - initial.get_parameter(name).float()).abs().max().item()
        torch.testing.assert_close(p.float(), q.float(), rtol=0, atol=0.2 * moved + 2**-8)


def test_bf16_master_copy_back_is_bf16_and_the_performance_model_counts_it():
    model, opt, _ = offload("host", state_dtype=torch.bfloat16, master_dtype=torch.bfloat16, measure=False)
    plain = offload("host", state_dtype=torch.bfloat16, measure=False)[1]
    assert [2 * s.param_bytes for s in opt.subgroups] == [s.param_bytes for s in plain.subgroups]
    model(batches(1)[0]).pow(2).mean().backward()
    opt.step()
    with_grad = sum(p.numel() for p in model.parameters() if p.grad is not None)
    assert opt._transfers.stats.h2d_bytes == 2 * with_grad  # what the model predicts is what crossed


def test_bf16_master_needs_bf16_moments_and_names_the_fix():
    model = make_model()
    with pytest.raises(ValueError, match="master_dtype=torch.bfloat16 needs state_dtype=torch.bfloat16"):
        OffloadAdamW(model.parameters(), strategy="host", master_dtype=torch.bfloat16)
    with pytest.raises(
        ValueError, match="master_dtype=torch.float16 must be torch.float32 or torch.bfloat16"
    ):
        OffloadAdamW(model.parameters(), strategy="host", master_dtype=torch.float16)


def test_bf16_master_rounding_keeps_small_updates_on_average():
    """Updates far below a bf16 step: round-to-nearest masters never move, stochastic ones move by the
    right amount on average (the mean over many elements tracks the fp32 master)."""
    n, steps = 20_000, 30
    hyper = dict(lr=1e-4, betas=(0.0, 0.999), weight_decay=0.0, eps=1e-8)  # each step moves p by ~lr
    p0 = torch.full((n,), 1.0)  # the bf16 step below 1.0 is 2**-8 = 0.0039: each update is ~1/40 of it
    grad = torch.ones(n)

    def run(master_dtype):
        p = p0.clone().to(master_dtype)
        m, v = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
        step, gen = torch.zeros(()), torch.Generator().manual_seed(0)
        for _ in range(steps):
            bf16_state_adamw_([p], [grad], [m], [v], [step], **hyper, generator=gen)
        return p.float()

    exact = run(torch.float32)
    sr = run(torch.bfloat16)
    moved = (p0 - exact).mean().item()
    assert moved == pytest.approx(steps * 1e-4, rel=0.05)
    assert torch.equal(sr, sr.bfloat16().float()) and (sr == 1.0).float().mean() > 0.3  # whole bf16 steps
    assert (p0 - sr).mean().item() == pytest.approx(moved, rel=0.05)
    assert torch.tensor(1.0 - 1e-4).bfloat16().item() == 1.0  # round-to-nearest: every update is lost


def test_backward_ends_only_after_the_gradient_copies_it_started(monkeypatch):
    """An in-place write after backward that bumps no version (GradScaler's unscale, a c10d all_reduce on
    p.grad) must not meet a copy still reading that gradient: the end of a backward pass waits for the host
    copies its hooks started. Copies are slowed here so that they would still run when backward returns."""
    _slow_copies(monkeypatch, "d2h")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    opt = OffloadAdamW(model.parameters(), lr=1e-3, strategy="host", subgroup_bytes=SUBGROUP_BYTES)
    model(torch.randn(3, 8)).square().sum().backward()
    handles = [rec.handle for rec in opt._grad_copies.values()]
    assert len(handles) == 4 and all(h is not None and h.done() for h in handles)
    for p in model.parameters():  # an unversioned in-place write now cannot tear a copy
        p.grad.data.mul_(0.5)
    opt.step()
    assert opt.stats.grad_copies_stale_unversioned == 4  # caught by the samples, copied again


def _replicas_plan(use_group: bool, free_per_rank: tuple[int, int] | None = None):
    """One data-parallel replica: the same model, data and gradients as the other, but its own timings
    (rank 1's host update measured 20x slower) and, with `free_per_rank`, its own free device memory."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = dist.get_rank()
    model = make_model()
    costs = GPU_LIKE if free_per_rank is None else replace(GPU_LIKE, free_device_bytes=free_per_rank[rank])
    budget = 10**6 if free_per_rank is None else None  # planned against free memory alone
    opt = OffloadAdamW(param_groups(model), lr=1e-3, strategy="interleaved", state_dtype=torch.bfloat16,
                       subgroup_bytes=SUBGROUP_BYTES, costs=costs, measure=False, device_budget_bytes=budget,
                       replan_interval_steps=1, plan_group=dist.group.WORLD if use_group else None)  # fmt: skip
    for x in batches(4):
        slow = 20 if rank == 1 else 1
        opt.observe(host_params_per_s=GPU_LIKE.host_params_per_s / slow, forward_s=0.01, backward_s=0.02)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return opt.plan.placements, [p.detach().clone() for p in model.parameters()], opt.plan.device_state_bytes


@pytest.mark.timeout(90)
def test_data_parallel_replicas_with_a_plan_group_place_and_step_alike():
    from sysopt.dist import launch

    apart = launch(_replicas_plan, 2, (False,), backend="gloo", timeout_s=60)
    assert apart[0][0] != apart[1][0]  # without the group their own timings place them differently
    together = launch(_replicas_plan, 2, (True,), backend="gloo", timeout_s=60)
    assert together[0][0] == together[1][0] == apart[0][0]  # rank 0's plan, on both
    assert all(torch.equal(a, b) for a, b in zip(together[0][1], together[1][1]))
    # replicas with different free device memory plan for the one with the least (rank 1's card here)
    tight = launch(_replicas_plan, 2, (True, (10**6, 2000)), backend="gloo", timeout_s=60)
    assert tight[0][0] == tight[1][0] and tight[0][2] <= 2000


def test_frozen_parameters_get_state_only_once_they_train():
    """As torch allocates AdamW state lazily: a parameter frozen when the optimizer is built gets no state
    and takes no budget; unfrozen later, it gets both at its first step; a checkpoint holding its state
    loads it back even while it is frozen again. Parameters equal torch's throughout."""
    xs = batches(6)
    models, opts = {}, {}
    for name in ("torch", "offload"):
        model = models[name] = make_model()
        model.layers[0].requires_grad_(False)
        if name == "torch":
            opts[name] = torch.optim.AdamW(param_groups(model), lr=1e-3, fused=True)
        else:
            opts[name] = OffloadAdamW(
                param_groups(model), lr=1e-3, strategy="device", subgroup_bytes=SUBGROUP_BYTES
            )
    trainable = sum(p.numel() for p in models["offload"].parameters() if p.requires_grad)
    everything = sum(p.numel() for p in models["offload"].parameters())
    assert opts["offload"].plan.device_state_bytes == 8 * trainable  # the frozen take no budget

    def steps(batch_list):
        for x in batch_list:
            for name in ("torch", "offload"):
                opts[name].zero_grad()
                models[name](x).pow(2).mean().backward()
                opts[name].step()

    frozen = list(models["offload"].layers[0].parameters())
    steps(xs[:2])
    assert all(not opts["offload"].state.get(p) for p in frozen)
    assert_params_equal(models["torch"], models["offload"])
    for name in models:
        models[name].layers[0].requires_grad_(True)
    steps(xs[2:4])  # the first of these gives them state
    assert all(opts["offload"].state[p]["step"].item() == 2 for p in frozen)
    assert opts["offload"].plan.device_state_bytes == 8 * everything
    assert_params_equal(models["torch"], models["offload"])
    saved = copy.deepcopy(opts["offload"].state_dict())
    model2 = copy.deepcopy(models["offload"])
    model2.layers[0].requires_grad_(False)
    opt2 = OffloadAdamW(param_groups(model2), lr=1e-3, strategy="device", subgroup_bytes=SUBGROUP_BYTES)
    opt2.load_state_dict(saved)
    frozen2 = list(model2.layers[0].parameters())
    assert all(
        torch.equal(opt2.state[p]["exp_avg"], opts["offload"].state[q]["exp_avg"])
        for p, q in zip(frozen2, frozen)
    )


def test_replan_budget_counts_state_it_moved_off_that_the_caching_allocator_keeps(monkeypatch):
    """A simulated CUDA caching allocator: blocks freed by moving state to the host stay reserved, so the
    driver's free memory does not grow back. Once outside pressure goes away, a re-plan must see the budget it
    had before and restore the first placement (counting only driver-free memory plus the state in use, each
    move to the host shrank every later budget by what it freed)."""
    import sysopt.offload.optimizer as optimizer_module

    sim = {"total": 10**6, "outside": 0, "high": 0, "opt": None}  # high: reserved by state, never returned

    def in_use():
        return sim["opt"].plan.device_state_bytes if sim["opt"] is not None else 0

    monkeypatch.setattr(
        optimizer_module, "free_device_bytes", lambda d: sim["total"] - sim["outside"] - sim["high"]
    )
    monkeypatch.setattr(optimizer_module, "cached_device_bytes", lambda d: sim["high"] - in_use())
    model, opt, sched = offload("interleaved", costs=replace(GPU_LIKE, free_device_bytes=None),
                                measure=True, device_budget_bytes=None, replan_interval_steps=None)  # fmt: skip
    sim["opt"] = opt
    first = opt.plan
    assert first.device_subgroups, "the test needs state on the device to move"
    sim["high"] = first.device_state_bytes
    sim["total"] = first.device_state_bytes + 64  # from now on the first placement just fits
    sim["outside"] = first.device_state_bytes // 2  # another allocation takes half of it
    assert opt.replan(force=True) and opt.plan.device_state_bytes < first.device_state_bytes
    sim["outside"] = 0  # and frees it again
    opt.replan(force=True)
    assert opt.plan.placements == first.placements
