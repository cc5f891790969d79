"""The C++ host AdamW kernel (sysopt.offload.cpu_kernel) against its torch reference twin: same bits for every
dtype combination, thread count and tail length; unbiased stochastic rounding; Kahan compensation; the
fallback when no compiler is available. Reference-path tests need no compiler."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from sysopt.offload import OffloadAdamW, cpu_kernel
from sysopt.offload.update import (
    adamw_scalars,
    bits_to_float,
    draw_seeds,
    fused_adamw_,
    host_adamw_,
    host_adamw_reference_,
    master_noise16,
    noise32,
    round_nearest_even_bits,
    round_stochastic_bits,
)

HYPER = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1, eps=1e-8)
F32, BF16 = torch.float32, torch.bfloat16
# (param, grad, moment dtype, Kahan): fp32 state, bf16 state with fp32 or bf16 grads, stochastically rounded
# bf16 masters, Kahan bf16 masters
COMBOS = [
    (F32, F32, F32, False),
    (F32, F32, BF16, False),
    (F32, BF16, BF16, False),
    (BF16, F32, BF16, False),
    (BF16, BF16, BF16, False),
    (BF16, F32, BF16, True),
    (BF16, BF16, BF16, True),
]
each_combo = pytest.mark.parametrize(
    "combo", COMBOS, ids=lambda c: "p{}-g{}-s{}{}".format(*[str(t)[6:] for t in c[:3]], "-kahan" * c[3])
)


@pytest.fixture(scope="session")
def kernel():
    """Built once per machine (cached on disk); skipped only where no compiler or ninja exists."""
    module = cpu_kernel.load()
    if module is None:
        compiler = shutil.which(os.environ.get("CXX", "c++"))
        try:
            from torch.utils.cpp_extension import verify_ninja_availability

            verify_ninja_availability()
            ninja = True
        except RuntimeError:
            ninja = False
        if compiler and ninja:
            pytest.fail(
                f"a compiler and ninja exist but the kernel did not build: {cpu_kernel.status().error}"
            )
        pytest.skip(f"no C++ toolchain here: {cpu_kernel.status().error}")
    return module


def state(n: int, pdt, gdt, sdt, kahan: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g).to(pdt)
    comp = (torch.randn(n, generator=g) * 1e-4).to(BF16) if kahan else None
    grad = torch.randn(n, generator=g).to(gdt)
    m = (torch.randn(n, generator=g) * 0.1).to(sdt)
    v = (torch.rand(n, generator=g) * 0.01).to(sdt)
    return p, comp, grad, m, v, torch.zeros(())


def run(impl: str, tensors, steps: int = 3, seed: int = 5, **hyper):
    p, comp, grad, m, v, step = tensors
    gen = torch.Generator().manual_seed(seed)
    used = set()
    for _ in range(steps):
        used.add(
            host_adamw_(
                [p],
                [grad],
                [m],
                [v],
                [step],
                **{**HYPER, **hyper},
                compensations=[comp] if comp is not None else None,
                generator=gen,
                impl=impl,
            )
        )
    return used


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == BF16 else t.view(torch.int32)


def assert_same_bits(a, b) -> None:
    for x, y in zip(a, b):
        if x is not None:
            assert torch.equal(bits(x), bits(y)), (
                f"{x.dtype}: {(bits(x) != bits(y)).sum().item()} elements differ"
            )


# ----------------------------------------------------------------------------- kernel == reference


@each_combo
@pytest.mark.parametrize("n", [1, 37, 33_000])  # scalar tail only; a vector and a tail; two work items
def test_kernel_bitwise_equal_to_torch_reference(kernel, combo, n):
    ours, ref = state(n, *combo), state(n, *combo)
    assert run("cpp", ours) == {"cpp"}
    assert run("torch", ref) == {"torch"}
    assert_same_bits(ours, ref)
    moved = ~torch.eq(bits(ours[0]), bits(state(n, *combo)[0]))
    # A stochastically rounded bf16 master moves by a whole bf16 step or not at all: one element may stay.
    assert moved.any() or (n == 1 and combo[0] == BF16 and not combo[3]), "the update should move parameters"


def test_kernel_bits_independent_of_thread_count_and_list_split(kernel):
    """Noise is a hash of (seed, element index), so neither the threads nor the split into tensors matter
    beyond each tensor's own seed."""
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            tensors = state(200_000, F32, F32, BF16, False)
            run("cpp", tensors)
            outs.append(tensors)
    finally:
        torch.set_num_threads(before)
    assert_same_bits(*outs)


def test_kernel_multi_tensor_call_equals_reference(kernel):
    sizes = [5, 4096, 33, 70_000]
    lists = {}
    for impl in ("cpp", "torch"):
        ts = [state(n, F32, BF16, BF16, False, seed=i) for i, n in enumerate(sizes)]
        gen = torch.Generator().manual_seed(3)
        for _ in range(2):
            host_adamw_(*[[t[k] for t in ts] for k in (0, 2, 3, 4, 5)], **HYPER, generator=gen, impl=impl)
        lists[impl] = ts
    for a, b in zip(lists["cpp"], lists["torch"]):
        assert_same_bits(a, b)


def test_same_seed_same_bits_other_seed_other_bits(kernel):
    a, b, c = (state(10_000, F32, F32, BF16, False) for _ in range(3))
    run("cpp", a, seed=7)
    run("cpp", b, seed=7)
    run("cpp", c, seed=8)
    assert_same_bits(a, b)
    assert not torch.equal(bits(a[3]), bits(c[3])), "a different seed must round some moments differently"


def test_kernel_stochastic_rounding_is_unbiased(kernel):
    """beta1 = 0 makes the stored first moment SR(grad): its mean over many elements is the grad."""
    n = 200_000
    x = 1.0 + 2**-10  # an eighth of the way from the bf16 neighbour 1.0 to the next, 1.0078125
    p, grad = torch.zeros(n), torch.full((n,), x)
    m, v = torch.zeros(n, dtype=BF16), torch.zeros(n, dtype=BF16)
    host_adamw_([p], [grad], [m], [v], [torch.zeros(())], **{**HYPER, "betas": (0.0, 0.999)}, impl="cpp")
    assert set(m.float().unique().tolist()) == {1.0, 1.0078125}
    assert m.float().mean().item() == pytest.approx(x, abs=2e-4)  # round-to-nearest would give exactly 1.0
    assert m.float().mean().item() != 1.0


@each_combo
def test_kernel_non_finite_values(kernel, combo):
    """inf keeps its sign, NaN stays NaN (canonical 0x7FC0 in bf16), exactly as in the reference, in the
    vector body (48 elements: whole vectors) for every dtype combination, Kahan included."""
    outs = []
    for impl in ("cpp", "torch"):
        p, comp, grad, m, v, step = state(48, *combo)
        grad[3], grad[20], grad[40] = float("inf"), float("-inf"), float("nan")
        host_adamw_(
            [p], [grad], [m], [v], [step], **HYPER, compensations=[comp] if comp is not None else None,
            generator=torch.Generator().manual_seed(0), impl=impl,
        )  # fmt: skip
        outs.append((p, comp, m, v))
    assert_same_bits(*outs)
    m = outs[0][2]
    assert m[3].item() == float("inf") and m[20].item() == float("-inf") and m[40].isnan()
    assert outs[0][0][40].isnan() and not outs[0][0][:3].isnan().any()
    if m.dtype == BF16:
        assert m.view(torch.int16)[40].item() == 0x7FC0


def test_kernel_rejects_mismatched_inputs_with_the_numbers(kernel):
    p, _, grad, m, v, step = state(16, F32, F32, BF16, False)
    with pytest.raises(RuntimeError, match="exp_avg_sqs\\[0\\] has 15 elements, the parameter 16"):
        kernel.adamw_step(
            [p], [], [grad], [m], [v[:15]], list(adamw_scalars(1e-3, (0.9, 0.99), 0, 1e-8, 1)), [1, 2]
        )
    with pytest.raises(ValueError, match="bf16 params need bf16 moments"):
        host_adamw_([p.bfloat16()], [grad], [m.float()], [v.float()], [step], **HYPER)
    with pytest.raises(
        ValueError, match=r"compensations= \(Kahan buffers\) go with bf16 params, got \['torch.float32'\]"
    ):
        host_adamw_([p], [grad], [m], [v], [step], **HYPER, compensations=[m.clone()])
    with pytest.raises(RuntimeError, match="bf16 params need bfloat16 moments"):
        kernel.adamw_step(
            [p.bfloat16()], [], [grad], [m.float()], [v.float()], list(adamw_scalars(1e-3, (0.9, 0.99), 0, 1e-8, 1)),
            [1, 2],
        )  # fmt: skip


# ----------------------------------------------------------------------------- reference path (no compiler)


def test_reference_fp32_state_follows_torch_fused_adamw():
    """Same formula as torch's AdamW, only the operation order differs: last-bit differences."""
    p, _, grad, m, v, step = state(4096, F32, F32, F32, False)
    ref = [t.clone() for t in (p, grad, m, v, step)]
    for _ in range(5):
        host_adamw_([p], [grad], [m], [v], [step], **HYPER, impl="torch")
        fused_adamw_(*[[t] for t in ref], **HYPER)
    torch.testing.assert_close(p, ref[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(v, ref[3], rtol=1e-5, atol=0)


def test_noise_is_uniform_and_uncorrelated_in_both_halves():
    """Chi-square over 256 buckets of each 16-bit half (the two moments' rounding noise) and of a bf16 master's
    noise, and no correlation between neighbouring elements, between any two of the three, or between two
    steps' seeds."""
    seeds = draw_seeds(torch.Generator().manual_seed(0), 2)
    index = torch.arange(1 << 18)
    h, h_next_step = noise32(index, *seeds[:2]), noise32(index, *seeds[2:])
    master = master_noise16(h)  # a bf16 master's noise: uniform, uncorrelated with either moment's
    for half in (h & 0xFFFF, h >> 16, (h >> 8) & 0xFFFF, master):
        counts = torch.bincount((half >> 8).long(), minlength=256).double()
        expected = counts.sum() / 256
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 400, f"chi2={chi2:.0f} over 255 degrees of freedom"  # p ~ 1e-7 for a fair source
    lo, hi, lo_next = (h & 0xFFFF).double(), (h >> 16).double(), (h_next_step & 0xFFFF).double()
    pm = master.double()
    for a, b in (
        (lo[:-1], lo[1:]),
        (hi[:-1], hi[1:]),
        (lo, hi),
        (lo, lo_next),
        (pm, lo),
        (pm, hi),
        (pm[:-1], pm[1:]),
    ):
        r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(r) < 0.01, r  # ~5 standard errors of r for 2**18 independent pairs


def test_rounding_helpers_against_torch_and_bit_arithmetic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g) * torch.exp(torch.randn(100_000, generator=g) * 5)
    ne = round_nearest_even_bits(x)
    assert torch.equal(ne, x.bfloat16().view(torch.int16))  # torch rounds to nearest even too
    down = round_stochastic_bits(x, torch.zeros_like(ne, dtype=torch.int64))
    assert torch.equal(bits_to_float(down), (x.view(torch.int32) & -65536).view(torch.float32))  # truncation
    up = round_stochastic_bits(x, torch.full_like(ne, 0xFFFF, dtype=torch.int64))
    exact = (x.view(torch.int32) & 0xFFFF) == 0
    assert torch.equal(up[exact], down[exact]) and torch.equal(up[~exact], down[~exact] + 1)


def test_kahan_compensated_bf16_master_tracks_fp32_master_better_than_plain_bf16():
    """Many small updates: a bf16 master loses them to rounding, the Kahan pair keeps them."""
    n, steps = 1024, 200
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(n, generator=g).bfloat16().float()  # all three start from the same (bf16) values
    grads = [torch.randn(n, generator=g) * 0.1 for _ in range(steps)]
    hyper = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)

    def train(p, comp, m, v):
        step, gen = torch.zeros(()), torch.Generator().manual_seed(1)
        for grad in grads:
            host_adamw_(
                [p], [grad], [m], [v], [step], **hyper, compensations=comp, generator=gen, impl="torch"
            )
        return p.float() + (comp[0].float() if comp else 0)

    def moments():
        return torch.zeros(n, dtype=BF16), torch.zeros(n, dtype=BF16)

    def plain_bf16_master():  # the fp32 update rounded to a bf16 master after every step
        p, step, gen = p0.bfloat16().float(), torch.zeros(()), torch.Generator().manual_seed(1)
        m, v = moments()
        for grad in grads:
            host_adamw_([p], [grad], [m], [v], [step], **hyper, generator=gen, impl="torch")
            p.copy_(p.bfloat16().float())
        return p

    exact = train(p0.clone(), None, *moments())
    kahan = train(p0.bfloat16(), [torch.zeros(n, dtype=BF16)], *moments())
    plain = plain_bf16_master()
    moved = (exact - p0).abs().mean()
    kahan_err, plain_err = (kahan - exact).abs().mean(), (plain - exact).abs().mean()
    assert kahan_err < 0.1 * moved
    assert plain_err > 0.5 * moved  # most of the movement lost to rounding
    assert kahan_err < 0.1 * plain_err


# ----------------------------------------------------------------------------- fallback and integration


def test_fallback_without_a_compiler_runs_the_reference(tmp_path):
    """A fresh build directory and a compiler that does not exist: a warning, then the torch reference."""
    code = textwrap.dedent(
        """
        import warnings, torch
        from sysopt.offload import cpu_kernel
        from sysopt.offload.update import host_adamw_
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p, g, m, v = torch.ones(8), torch.ones(8), torch.zeros(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.bfloat16)
            used = host_adamw_([p], [g], [m], [v], [torch.zeros(())], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0, eps=1e-8)
        status = cpu_kernel.status()
        assert used == "torch", used
        assert not status.available and status.error, status
        assert any("C++ host AdamW kernel unavailable" in str(w.message) for w in caught), caught
        assert torch.all(p < 1), p
        print("ok")
        """
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop(cpu_kernel.DISABLE_ENV, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_disabled_by_environment_uses_reference(monkeypatch):
    monkeypatch.setenv(cpu_kernel.DISABLE_ENV, "torch")
    assert cpu_kernel.load() is None
    p, _, grad, m, v, step = state(64, F32, F32, BF16, False)
    assert host_adamw_([p], [grad], [m], [v], [step], **HYPER) == "torch"
    with pytest.raises(RuntimeError, match="impl='cpp' but the C\\+\\+ kernel is unavailable"):
        host_adamw_([p], [grad], [m], [v], [step], **HYPER, impl="cpp")


def test_bf16_state_optimizer_same_bits_with_kernel_and_reference(kernel, monkeypatch):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3)).bfloat16()
    xs = [torch.randn(16, 24, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(4)]
    results = []
    for disabled in (False, True):
        if disabled:
            monkeypatch.setenv(cpu_kernel.DISABLE_ENV, "torch")
        model = torch.nn.Sequential(
            *[torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3)]
        ).bfloat16()
        model.load_state_dict(base.state_dict())
        opt = OffloadAdamW(
            model.parameters(), lr=1e-2, strategy="host", state_dtype=BF16, subgroup_bytes=2000
        )
        for x in xs:
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            opt.step()
        opt.close()
        results.append(model)
    for p, q in zip(results[0].parameters(), results[1].parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(results[0][0].weight, base[0].weight)


def test_reference_twin_is_what_the_kernel_wrapper_calls_without_kernel(monkeypatch):
    """host_adamw_reference_ is the documented twin: same arguments as the kernel's adamw_step."""
    monkeypatch.setenv(cpu_kernel.DISABLE_ENV, "torch")
    a, b = state(100, F32, F32, BF16, False), state(100, F32, F32, BF16, False)
    run("auto", a, steps=1, seed=9)
    step_b = b[5].add_(1)
    scalars = list(
        adamw_scalars(HYPER["lr"], HYPER["betas"], HYPER["weight_decay"], HYPER["eps"], step_b.item())
    )
    host_adamw_reference_(
        [b[0]], [], [b[2]], [b[3]], [b[4]], scalars, draw_seeds(torch.Generator().manual_seed(9), 1)
    )
    assert_same_bits(a, b)


# ----------------------------------------------------------------------------- CPU performance model


def test_cpu_model_overlaps_copies_only_with_a_spare_core():
    """CPU-only: one thread updates (device subgroups first), one copy thread moves gradients out during
    backward and parameters back, first in first out. Without a spare core everything adds up."""
    from torch import nn

    from sysopt.offload import DEVICE, HOST, CostInputs, PhaseTimes, partition, predict_iteration
    from sysopt.offload.costs import default_cost_inputs

    a, b = nn.Linear(1000, 1, bias=False), nn.Linear(1000, 1, bias=False)
    subs = partition([[a.weight, b.weight]], subgroup_bytes=8000)
    cpu = CostInputs(1e-6, 1e10, 1e-6, 1e10, 5e7, 4e7, shared_processor=True, copies_overlap=True)
    copy = 1e-6 + 4000 / 1e10
    upd, dev = 1000 / 5e7, 1000 / 4e7
    phases = PhaseTimes(forward_s=0.5, backward_s=1.0)
    # both gradient copies hide under backward; the first copy back hides under the second update
    p = predict_iteration(subs, (HOST, HOST), cpu, phases)
    assert p.iteration_s == pytest.approx(1.5 + 2 * upd + copy)
    # the device update runs on the same thread, before the host update (not beside it as on a GPU)
    p = predict_iteration(subs, (HOST, DEVICE), cpu, phases)
    assert p.iteration_s == pytest.approx(1.5 + dev + upd + copy)
    no_core = CostInputs(**{**cpu.to_dict(), "copies_overlap": False})
    assert predict_iteration(subs, (HOST, DEVICE), no_core, phases).iteration_s == pytest.approx(
        1.5 + copy + dev + upd + copy
    )
    assert CostInputs.from_json(cpu.to_json()) == cpu
    cores, before = os.cpu_count() or 1, torch.get_num_threads()
    try:
        torch.set_num_threads(cores)
        assert not default_cost_inputs(torch.device("cpu")).copies_overlap
        if cores > 1:
            torch.set_num_threads(1)
            assert default_cost_inputs(torch.device("cpu")).copies_overlap
    finally:
        torch.set_num_threads(before)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def test_kernel_reports_the_simd_path_this_cpu_gets(kernel):
    """-march=native: the AVX-512 path where the CPU has AVX-512F and BW, else AVX2, else scalar."""
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    expected = "avx512" if {"avx512f", "avx512bw"} <= flags else "avx2" if "avx2" in flags else "scalar"
    status = cpu_kernel.status()
    assert status.vector_isa == expected, (status, sorted(f for f in flags if f.startswith("avx")))
    assert status.avx512 == (expected == "avx512")
