"""Precision training parity: the VLM trained single-process (1 thread) for a fixed number of steps in fp32 and
with each named sysopt.precision recipe; eval exact match per task and final loss against the fp32 run.

Conversion: `convert(model, recipe, filter_fn=...)` with a filter that takes every nn.Linear except the LM head
(the default filter would skip them all: the VLM's linears have fewer than MIN_FEATURES=256 features). The
suite fails unless at least MIN_CONVERTED linears were converted. Everything else is the same in every run:
initial weights (VLMConfig.seed), batches (BatchSampler is a pure function of the step), AdamW and the
warmup + cosine LR of sysopt.train (OptimConfig defaults, warmup scaled to the run length), gradient clipping,
and steps whose low-precision operands were non-finite are skipped (sysopt.precision.check_finite).

Goals per recipe: |mean eval exact match - fp32's| <= 0.01 and |final loss / fp32's - 1| <= 0.02, final loss
being the mean training loss of the last 20 steps. A control run, fp32 from other initial weights, gets the
same comparisons (informative): how far the figures move under any perturbation, i.e. the noise floor. Full mode trains STEPS steps; quick mode trains QUICK_STEPS,
too few for the model to learn the tasks, so its numbers check the plumbing and are not the parity claim.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

import sysopt.precision as P
from sysopt.benchmark import BenchContext, Record, SuiteResult, goal, register_suite
from sysopt.data import BatchSampler, DigitsDataset, DigitsTaskConfig, eval_batches, evaluate
from sysopt.hardware import intraop_threads
from sysopt.models import VLM, LMHead, VLMConfig, vlm_loss
from sysopt.train.config import OptimConfig, TrainConfig
from sysopt.train.lr import warmup_cosine_lr

STEPS = 150
QUICK_STEPS = 15
LOSS_WINDOW = 20  # final loss: mean over the last LOSS_WINDOW steps
MIN_CONVERTED = 20  # of the VLM's 21 linears, all but the LM head
ACC_TARGET = "<= 0.01"
LOSS_TARGET = "<= 0.02"
THREADS = 1
CONTROL_SEED = 1  # an fp32 run from other initial weights: the noise floor of the comparison
CONTROL = f"fp32_seed{CONTROL_SEED}"


def head_fqns(model: nn.Module) -> set[str]:
    """Fully qualified names of the LM head's linear layers."""
    return {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if isinstance(module, LMHead)
        for child, sub in module.named_children()
        if isinstance(sub, nn.Linear)
    }


def convert_all_but_head(model: nn.Module, recipe: str) -> int:
    """Convert every nn.Linear except the LM head to `recipe`; returns how many were converted."""
    skip = head_fqns(model)
    P.convert(model, recipe, filter_fn=lambda module, fqn: fqn not in skip)
    return sum(isinstance(m, P.LowPrecisionLinear) for m in model.modules())


@dataclass(frozen=True)
class TrainRun:
    """One training run: per-step losses, eval exact match per task, wall time and skipped steps."""

    recipe: str
    losses: tuple[float, ...]
    accuracy: dict
    train_s: float
    converted: int
    skipped_steps: int

    @property
    def final_loss(self) -> float:
        return statistics.fmean(self.losses[-LOSS_WINDOW:])


def _optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)  # as sysopt.train


def train_vlm(
    recipe: str | None,
    steps: int,
    train_set: DigitsDataset | None = None,
    eval_set: list | None = None,
    init_seed: int | None = None,
) -> tuple[nn.Module, TrainRun]:
    """Train VLM(VLMConfig()) for `steps` steps (recipe None: fp32) on `train_set` (default: the digits tasks'
    training split) and evaluate it on the batches `eval_set` (default: the held-out split). `init_seed`
    replaces VLMConfig's seed (the noise-floor control). Returns (model, TrainRun)."""
    o, batch_size = OptimConfig(), TrainConfig().global_batch
    train_set = train_set or DigitsDataset(DigitsTaskConfig(), "train")
    if eval_set is None:
        eval_set = eval_batches(DigitsDataset(train_set.config, "eval"), TrainConfig().eval_batch)
    warmup = max(1, round(o.warmup_steps * steps / TrainConfig().max_steps))
    config = VLMConfig() if init_seed is None else dataclasses.replace(VLMConfig(), seed=init_seed)
    model = VLM(config)
    converted = 0 if recipe is None else convert_all_but_head(model, recipe)
    if recipe is not None and converted < MIN_CONVERTED:
        raise RuntimeError(
            f"recipe {recipe}: only {converted} linears were converted, expected >= {MIN_CONVERTED}; "
            "check convert()'s filter_fn"
        )
    optimizer = _optimizer(model, o)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sampler = BatchSampler(train_set, batch_size)
    losses, skipped = [], 0
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        lr = warmup_cosine_lr(
            step, lr=o.lr, warmup_steps=warmup, max_steps=steps, min_lr_ratio=o.min_lr_ratio
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sampler.global_batch(step)
        loss = vlm_loss(model(batch), batch)
        loss.backward()
        if P.check_finite(model):
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            optimizer.step()
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    train_s = time.perf_counter() - start
    accuracy = evaluate(model, eval_set)
    label = (recipe or "fp32") + ("" if init_seed is None else f"_seed{init_seed}")
    return model, TrainRun(label, tuple(losses), accuracy, train_s, converted, skipped)


def records_for(run: TrainRun, steps: int) -> list[Record]:
    config = {"steps": steps, "threads": THREADS, "converted_linears": run.converted,
              "skipped_steps": run.skipped_steps, "loadavg_1min": os.getloadavg()[0]}  # fmt: skip
    window = run.losses[-LOSS_WINDOW:]
    prefix = f"parity/{run.recipe}"
    records = [
        Record(f"{prefix}/final_loss", run.final_loss, "loss", len(window), min(window), max(window), config),
        Record(f"{prefix}/train_s", run.train_s, "s", 1, run.train_s, run.train_s, config),
    ]
    for task, acc in run.accuracy.items():
        records.append(Record(f"{prefix}/eval_exact_match/{task}", acc, "accuracy", 1, acc, acc, config))
    mean = statistics.fmean(run.accuracy.values())
    records.append(Record(f"{prefix}/eval_exact_match/mean", mean, "accuracy", 1, mean, mean, config))
    return records


def goals_for(runs: list[TrainRun]) -> list:
    """Per recipe against the fp32 run (runs[0]); the control (fp32, another init seed) gets the same two
    comparisons, marked as the noise floor: what any perturbation of the run moves these figures by."""
    base = runs[0]
    base_acc = statistics.fmean(base.accuracy.values())
    goals = []
    for run in runs[1:]:
        label = run.recipe if run.recipe != CONTROL else f"control {CONTROL} (noise floor, informative)"
        acc = statistics.fmean(run.accuracy.values())
        names = [f"parity/{r}/eval_exact_match/mean" for r in (run.recipe, base.recipe)]
        goals.append(goal(f"{label}: |eval exact match - fp32|", abs(acc - base_acc), ACC_TARGET, names))
        names = [f"parity/{r}/final_loss" for r in (run.recipe, base.recipe)]
        ratio = abs(run.final_loss / base.final_loss - 1.0)
        goals.append(goal(f"{label}: |final loss / fp32 - 1|", ratio, LOSS_TARGET, names))
    return goals


@register_suite("precision_parity")
def run(ctx: BenchContext) -> SuiteResult:
    steps = QUICK_STEPS if ctx.quick else STEPS
    runs: list[TrainRun] = []
    train_set = DigitsDataset(DigitsTaskConfig(), "train")
    eval_set = eval_batches(DigitsDataset(DigitsTaskConfig(), "eval"), TrainConfig().eval_batch)
    with intraop_threads(THREADS):
        for recipe in ctx.track([None, *sorted(P.RECIPES)], "precision parity: training"):
            runs.append(train_vlm(recipe, steps, train_set, eval_set)[1])
        runs.append(train_vlm(None, steps, train_set, eval_set, init_seed=CONTROL_SEED)[1])
    records = [r for run_ in runs for r in records_for(run_, steps)]
    result = ctx.result("precision_parity", records, goals_for(runs))
    _plot_losses(runs, steps, ctx.out_dir / "precision_parity_loss.png")
    return result


def _plot_losses(runs: list[TrainRun], steps: int, path) -> None:
    """Training loss per step of every run (a 10-step moving average), fp32 in black."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for run_ in runs:
        losses = torch.tensor(run_.losses)
        k = min(10, len(losses))
        smooth = losses.unfold(0, k, 1).mean(1)
        style = {"linewidth": 1}
        if run_.recipe == "fp32":
            style = {"color": "black", "linewidth": 2}
        elif run_.recipe == CONTROL:
            style = {"color": "gray", "linewidth": 1.5, "linestyle": "--"}
        ax.plot(range(k - 1, len(losses)), smooth, label=run_.recipe, **style)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss ({min(10, steps)}-step mean)")
    ax.set_title(
        f"VLM loss parity, {steps} steps, 1 thread, all linears but the LM head converted", fontsize=9
    )
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
