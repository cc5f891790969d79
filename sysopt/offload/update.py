"""AdamW update kernels used on both sides: torch's fused kernel (the same call torch.optim.AdamW(fused=True)
makes, so results are bitwise equal) and an opt-in variant keeping the moments in bf16."""

from __future__ import annotations

import math

import torch


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


def stochastic_round_to_bf16_(
    dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator | None = None
) -> None:
    """Write fp32 `src` into bf16 `dst` rounding up with probability equal to the dropped fraction, so
    the rounding is unbiased in expectation (small moment updates are not lost to round-to-nearest)."""
    bits = src.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = (bits + noise).bitwise_and_(-65536)  # clear the 16 low bits: exact in bf16
    finite = torch.isfinite(src)
    out = torch.where(finite, rounded.view(torch.float32), src)
    dst.copy_(out.view_as(dst))


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
) -> None:
    """AdamW on fp32 master `params` with bf16 moments, stochastically rounded on store.

    Same formula as torch's AdamW (p *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2 v + (1-b2) g^2;
    p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)); agrees with it to bf16 precision of the moments."""
    beta1, beta2 = betas
    for p, g, m16, v16, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step.add_(1)
        n = float(step.item())
        g = g.float()
        m = m16.float().lerp_(g, 1 - beta1)
        v = v16.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1**n
        bias_correction2_sqrt = math.sqrt(1 - beta2**n)
        p.mul_(1 - lr * weight_decay)
        denom = v.sqrt().div_(bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bias_correction1)
        stochastic_round_to_bf16_(m16, m, generator)
        stochastic_round_to_bf16_(v16, v, generator)
