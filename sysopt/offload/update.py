"""AdamW update kernels used on both sides: torch's fused kernel (the same call torch.optim.AdamW(fused=True)
makes, so results are bitwise equal) and low-precision host variants (bf16 moments with stochastic rounding,
optionally bf16 master weights with Kahan compensation), run by the C++ kernel in sysopt.offload.cpu_kernel
or, where it cannot be built, by the torch reference twin below, which gives the same bits."""

from __future__ import annotations

import math

import torch

from sysopt.offload import cpu_kernel

IMPLS = ("auto", "cpp", "torch")
_CHUNK = 1 << 20  # elements per reference chunk: bounds the int64 temporaries of the noise hash


def fused_adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
) -> None:
    """Increment each step counter, then one fused, vectorised and multithreaded AdamW update in place."""
    if not params:
        return
    torch._foreach_add_(steps, 1)
    torch._fused_adamw_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        amsgrad=False,
        lr=lr,
        beta1=betas[0],
        beta2=betas[1],
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
        grad_scale=None,
        found_inf=None,
    )


# ----------------------------------------------------------------------------- shared by kernel and reference


def adamw_scalars(
    lr: float, betas: tuple[float, float], weight_decay: float, eps: float, step: float
) -> tuple[float, ...]:
    """The nine per-tensor scalars, in double, in the kernel's order: decay = 1 - lr*wd, lr*wd, beta1,
    1 - beta1, beta2, 1 - beta2, lr / bias_correction1, 1 / sqrt(bias_correction2), eps. Both sides round
    each to fp32 once (torch does so for a Python float operand of an fp32 tensor)."""
    beta1, beta2 = betas
    return (
        1 - lr * weight_decay,
        lr * weight_decay,
        beta1,
        1 - beta1,
        beta2,
        1 - beta2,
        lr / (1 - beta1**step),
        1 / math.sqrt(1 - beta2**step),
        eps,
    )


def draw_seeds(generator: torch.Generator | None, n: int) -> list[int]:
    """Two 32-bit words per tensor from `generator` (torch's default generator when None)."""
    words = torch.randint(0, 1 << 32, (n, 2), dtype=torch.int64, generator=generator)
    return words.flatten().tolist()


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for uint32 values held in int64, without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The first half of murmur3's 32-bit finaliser (one multiply), a bijection."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    return x ^ (x >> 13)


def noise32(index: torch.Tensor, seed_lo: int, seed_hi: int) -> torch.Tensor:
    """The kernel's counter-based noise, SplitMix style: mix32(seed_lo + i * golden) ^ seed_hi, with the
    index's high word mixed in by a second odd constant (int64 in, uint32 values out)."""
    lo, hi = index & 0xFFFFFFFF, index >> 32
    x = (_mul32(lo, 0x9E3779B9) + _mul32(hi, 0x85EBCA77) + seed_lo) & 0xFFFFFFFF
    return _mix32(x) ^ seed_hi


def master_noise16(noise: torch.Tensor) -> torch.Tensor:
    """A stochastically rounded bf16 master's noise from the moments' hash: the xor of its halves, uniform and
    independent of each half alone (of the first moment's rounding noise, and of the second's)."""
    return (noise & 0xFFFF) ^ (noise >> 16)


def _high_half(u: torch.Tensor, add: torch.Tensor | int) -> torch.Tensor:
    """int16 bf16 bit patterns: the high halves of fp32 bits `u` + `add` (add < 2**16: infinities, whose low
    halves are 0, stay infinite), every NaN becoming the canonical 0x7FC0 as c10::BFloat16 makes it."""
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    out = torch.where(nan, torch.full_like(u, 0x7FC0), (u + add) >> 16)
    return torch.where(out >= 1 << 15, out - (1 << 16), out).to(torch.int16)


def _uint_bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def round_stochastic_bits(x: torch.Tensor, noise16: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 bits rounding up with probability equal to the dropped fraction (noise16 uniform in
    [0, 2**16)), so the rounding is unbiased in expectation."""
    return _high_half(_uint_bits(x), noise16)


def round_nearest_even_bits(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 bits, round to nearest even (denormals kept, unlike some hardware conversions)."""
    u = _uint_bits(x)
    return _high_half(u, 0x7FFF + ((u >> 16) & 1))


def bits_to_float(bits16: torch.Tensor) -> torch.Tensor:
    return (bits16.to(torch.int32) << 16).view(torch.float32)


def stochastic_round_to_bf16_(
    dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator | None = None
) -> None:
    """Write fp32 `src` into bf16 `dst` rounding up with probability equal to the dropped fraction, so
    the rounding is unbiased in expectation (small moment updates are not lost to round-to-nearest)."""
    seed_lo, seed_hi = draw_seeds(generator, 1)
    index = torch.arange(src.numel(), dtype=torch.int64)
    noise = noise32(index, seed_lo, seed_hi) & 0xFFFF
    dst.view(torch.int16).copy_(round_stochastic_bits(src.float().flatten(), noise).view(dst.shape))


# ----------------------------------------------------------------------------- reference twin


def _reference_chunk(p, c, g, m, v, start: int, s: tuple[float, ...], seed_lo: int, seed_hi: int) -> None:
    decay, wdlr, b1, omb1, b2, omb2, step_size, inv_bc2_sqrt, eps = s
    gi = g.float()
    mi = m.float().mul(b1).add_(gi.mul(omb1))
    vi = v.float().mul(b2).add_(gi.mul(gi).mul_(omb2))
    # torch's fp32 sqrt is not always correctly rounded (the kernel's vsqrtps is): go through fp64.
    denom = vi.double().sqrt_().float().mul_(inv_bc2_sqrt).add_(eps)
    step = mi.div(denom).mul_(step_size)
    if m.dtype == torch.bfloat16:
        noise = noise32(torch.arange(start, start + p.numel(), dtype=torch.int64), seed_lo, seed_hi)
        m.view(torch.int16).copy_(round_stochastic_bits(mi, noise & 0xFFFF))
        v.view(torch.int16).copy_(round_stochastic_bits(vi, noise >> 16))
    else:
        m.copy_(mi)
        v.copy_(vi)
    if c is None and p.dtype == torch.bfloat16:  # bf16 master, stochastically rounded
        p.view(torch.int16).copy_(
            round_stochastic_bits(p.float().mul_(decay).sub_(step), master_noise16(noise))
        )
        return
    if c is None:
        p.mul_(decay).sub_(step)
        return
    pi = p.float()
    u = c.float().sub(pi.mul(wdlr).add_(step))
    t16 = round_nearest_even_bits(pi.add(u))
    lost = u.sub(bits_to_float(t16).sub(pi))
    p.view(torch.int16).copy_(t16)
    c.view(torch.int16).copy_(round_nearest_even_bits(lost))


def host_adamw_reference_(params, compensations, grads, exp_avgs, exp_avg_sqs, scalars, seeds) -> None:
    """The torch twin of the C++ kernel's adamw_step (same arguments, same bits), in chunks."""
    for j, p in enumerate(params):
        c = compensations[j] if compensations else None
        flat = [t.view(-1) if t is not None else None for t in (p, c, grads[j], exp_avgs[j], exp_avg_sqs[j])]
        s = tuple(scalars[9 * j : 9 * j + 9])
        for start in range(0, p.numel(), _CHUNK):
            part = [t[start : start + _CHUNK] if t is not None else None for t in flat]
            _reference_chunk(*part, start, s, seeds[2 * j], seeds[2 * j + 1])


# ----------------------------------------------------------------------------- dispatch


def _check_contiguous(tensors: list[torch.Tensor]) -> None:
    bad = [tuple(t.shape) for t in tensors if not t.is_contiguous()]
    if bad:
        raise ValueError(
            f"host AdamW updates in place through flat views: tensors of shapes {bad} are not "
            "contiguous; allocate the state with torch.empty/zeros (contiguous)"
        )


def host_adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    compensations: list[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    impl: str = "auto",
) -> str:
    """AdamW in place on host tensors; returns which implementation ran ("cpp" or "torch").

    params: fp32 masters; bf16 masters rounded stochastically (no compensations: unbiased, 16 bytes of
    state traffic a parameter with fp32 grads); or bf16 weights with bf16 Kahan `compensations` (the low bits
    lost to rounding, carried into the next update). Moments fp32 or bf16 (bf16 with bf16 params) (bf16: stochastically rounded with noise from
    `generator`, one seed pair per tensor). Grads fp32 or bf16. Formula as torch's AdamW (decoupled decay):
    p <- p (1 - lr wd) - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if not params:
        return "torch"
    for name, ts in (
        ("grads", grads),
        ("exp_avgs", exp_avgs),
        ("exp_avg_sqs", exp_avg_sqs),
        ("steps", steps),
    ):
        if len(ts) != len(params):
            raise ValueError(f"{name} has {len(ts)} tensors for {len(params)} params; pass one per param")
    kahan = compensations is not None and len(compensations) > 0
    pdtypes = {p.dtype for p in params}
    if kahan and pdtypes != {torch.bfloat16}:
        raise ValueError(
            f"compensations= (Kahan buffers) go with bf16 params, got {sorted(map(str, pdtypes))}"
        )
    if len(pdtypes) > 1 or not pdtypes <= {torch.float32, torch.bfloat16}:
        raise ValueError(
            f"params have dtypes {sorted(map(str, pdtypes))}: pass fp32 masters or bf16 ones (one dtype per call)"
        )
    if torch.bfloat16 in pdtypes and any(m.dtype != torch.bfloat16 for m in [*exp_avgs, *exp_avg_sqs]):
        raise ValueError("bf16 params need bf16 moments (exp_avgs, exp_avg_sqs)")
    grads = [g if g.dtype in (torch.float32, torch.bfloat16) else g.float() for g in grads]
    # The kernel wants one grad dtype and one moment dtype per call.
    if len({g.dtype for g in grads}) > 1:
        grads = [g.float() for g in grads]
    torch._foreach_add_(steps, 1)
    scalars = [x for st in steps for x in adamw_scalars(lr, betas, weight_decay, eps, float(st.item()))]
    seeds = draw_seeds(generator, len(params))
    comps = list(compensations) if kahan else []
    kernel = None if impl == "torch" else cpu_kernel.load()
    if impl == "cpp" and kernel is None:
        raise RuntimeError(f"impl='cpp' but the C++ kernel is unavailable: {cpu_kernel.status().error}")
    tensors = [*params, *comps, *grads, *exp_avgs, *exp_avg_sqs]
    _check_contiguous(tensors)
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    if kernel is not None and on_cpu and len({m.dtype for m in exp_avgs}) == 1:
        kernel.adamw_step(params, comps, grads, exp_avgs, exp_avg_sqs, scalars, seeds)
        return "cpp"
    if impl == "cpp":
        raise ValueError("impl='cpp' needs CPU tensors and one moment dtype per call")
    with torch.no_grad():
        host_adamw_reference_(params, comps, grads, exp_avgs, exp_avg_sqs, scalars, seeds)
    return "torch"


def bf16_state_adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    generator: torch.Generator | None = None,
    impl: str = "auto",
) -> str:
    """AdamW on fp32 master `params` (or bf16 ones, also rounded stochastically) with bf16 moments,
    stochastically rounded on store (host_adamw_).

    Same formula as torch's AdamW; agrees with it to bf16 precision of the moments (and masters)."""
    return host_adamw_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        steps,
        lr=lr,
        betas=betas,
        weight_decay=weight_decay,
        eps=eps,
        generator=generator,
        impl=impl,
    )
