"""End-to-end suite: tokens/s and step time of the trainer's default config (configs/train.yaml)
1. at tp=pp=dp=1 against the same model in a plain single-process PyTorch loop (same VLM, same batches from
   sysopt.data's BatchSampler, torch's fused AdamW, same LR schedule and clipping; 1 thread each): the
   trainer's overhead; plus the default dp=2 job's figures as a record;
2. at pp=2 vpp=2 with sysopt's interleaved_1f1b against schedule=megatron_interleaved (megatron-core's own
   interleaved 1F1B in the same trainer), on the decoder-only split (the goal: megatron-core needs no p2p
   shape exchange there) and on the trainer's cost-based split (informative: it cuts inside the vision
   encoder, where megatron-core exchanges shapes before every tensor). On each split both resume from one
   shared checkpoint, so they run the same split, weights and data.
   Whole runs on a shared 2-core machine are at the mercy of load that drifts over seconds, so the two
   schedules are also timed in one launch taking turns step by step (forward+backward only), on the
   trainer's split and on a decoder-only split where megatron-core needs no p2p shape exchange.

Figures are the trainer's summary.json (median steady-state step, warm-up steps skipped) and, for the
plain loop, the same statistic computed the same way; each record is the median over repeats of runs
taken in alternating order.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sysopt.benchmark import BenchContext, Record, SuiteResult, goal_ratio, register_suite
from sysopt.cli.train import compose_job
from sysopt.hardware import intraop_threads
from sysopt.train import JobConfig, run_training, warmup_cosine_lr

STEPS, QUICK_STEPS = 60, 30
OVERHEAD_TARGET, MEGATRON_TARGET = "<= 1.10", ">= 1.0"
SINGLE = ["parallel=single"]
PIPELINE = ["parallel=single", "parallel.pp=2", "parallel.vpp=2"]  # microbatches: the default 2 * pp
SCHEDULES = ("interleaved_1f1b", "megatron_interleaved")
# blocks of the default VLM: embed, vit, vit, merge, dec, dec, head; cuts after the merge all send one
# shape, [tokens, sequences, dim], so megatron-core needs no p2p shape exchange
DECODER_SPLIT = [0, 4, 5, 6, 7]


def job_from(overrides: list[str]) -> JobConfig:
    """The job `sysopt-train OVERRIDES` would run (configs/train.yaml composed by Hydra)."""
    return compose_job(overrides)


def steady_median_s(step_times: list[float]) -> float:
    """The trainer's summary statistic (sysopt.train.loop.train_rank): median step after skipping the
    first min(n // 10, 10) steps (allocator and thread-pool warm-up)."""
    steady = step_times[min(len(step_times) // 10, 10) :] or step_times
    return sorted(steady)[len(steady) // 2]


def plain_pytorch(job: JobConfig) -> dict:
    """The same training in a plain loop: VLM, loss normalised by the batch's answer tokens, backward,
    global-norm clipping, fused AdamW (weight decay on matrices), the trainer's LR schedule."""
    from sysopt.data import BatchSampler, DigitsDataset
    from sysopt.models import VLM, vlm_loss

    o, t = job.optim, job.train
    model = VLM(job.model)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=o.betas,
        eps=o.eps,
        fused=True,
    )
    sampler = BatchSampler(DigitsDataset(job.data, "train"), t.global_batch)
    step_times, loss_value = [], float("nan")
    for step in range(t.max_steps):
        start = time.perf_counter()
        lr = warmup_cosine_lr(
            step, lr=o.lr, warmup_steps=o.warmup_steps, max_steps=t.max_steps, min_lr_ratio=o.min_lr_ratio
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sampler.global_batch(step)
        loss = vlm_loss(model(batch), batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        step_times.append(time.perf_counter() - start)
    step_s = steady_median_s(step_times)
    tokens = int((batch.tokens != 0).sum())  # the last step's, as the trainer's summary counts them
    return {"step_time_s": step_s, "tokens_per_s": tokens / step_s, "final_loss": loss_value}


def _one_thread(fn: Callable[[], dict]) -> dict:
    with intraop_threads(1):
        return fn()


def _records(prefix: str, runs: list[dict], config: dict) -> list[Record]:
    """step_time_s and tokens_per_s records: medians over the runs, with each run's final loss."""
    config = {**config, "final_loss": [r["final_loss"] for r in runs]}
    out = []
    for key, unit in (("step_time_s", "s"), ("tokens_per_s", "tokens/s")):
        values = [r[key] for r in runs]
        out.append(
            Record(
                f"{prefix}/{key}",
                statistics.median(values),
                unit,
                len(values),
                min(values),
                max(values),
                config,
            )
        )
    return out


def _alternate(ctx: BenchContext, runners: dict[str, Callable[[int], dict]], what: str) -> dict[str, list]:
    """Each runner `ctx.repeats` times, the order flipping every repeat (slow drifts hit both alike)."""
    names = list(runners)
    runs: dict[str, list] = {name: [] for name in names}
    for repeat in ctx.track(range(ctx.repeats), what):
        for name in names if repeat % 2 == 0 else names[::-1]:
            runs[name].append(runners[name](repeat))
    return runs


def _cli(overrides: list[str]) -> str:
    return "sysopt-train " + " ".join(overrides)


def single_process(ctx: BenchContext, work: Path, steps: int) -> tuple[list[Record], list]:
    overrides = [*SINGLE, f"train.max_steps={steps}", f"optim.warmup_steps={steps // 5}"]
    job = job_from(overrides)

    def trainer(repeat: int) -> dict:
        return _one_thread(lambda: run_training(job, work / f"single_{repeat}"))

    runs = _alternate(
        ctx,
        {"sysopt": trainer, "plain_pytorch": lambda _: _one_thread(lambda: plain_pytorch(job))},
        "tp=pp=1",
    )
    for trained, plain_run in zip(runs["sysopt"], runs["plain_pytorch"]):  # the same work, or no comparison
        if abs(trained["final_loss"] - plain_run["final_loss"]) > 1e-5 * abs(plain_run["final_loss"]):
            raise RuntimeError(
                f"trainer and plain loop diverged (final loss {trained['final_loss']} vs "
                f"{plain_run['final_loss']}): they no longer train the same model on the same batches"
            )
    config = {
        "command": _cli(overrides),
        "threads": 1,
        "global_batch": job.train.global_batch,
        "steps": steps,
    }
    sysopt = _records("tp1_pp1_dp1/sysopt", runs["sysopt"], config)
    plain = _records(
        "tp1_pp1_dp1/plain_pytorch",
        runs["plain_pytorch"],
        {**config, "command": "bench/e2e.py plain_pytorch"},
    )
    overhead = goal_ratio(
        "sysopt trainer step time vs plain PyTorch loop (tp=pp=dp=1, 1 thread)",
        sysopt[0],
        plain[0],
        OVERHEAD_TARGET,
    )
    return sysopt + plain, [overhead]


def default_dp2(ctx: BenchContext, work: Path, steps: int) -> list[Record]:
    overrides = [f"train.max_steps={steps}", f"optim.warmup_steps={steps // 5}"]  # the default: dp=2
    job = job_from(overrides)
    runs = _alternate(
        ctx, {"sysopt": lambda repeat: run_training(job, work / f"dp2_{repeat}")}, "default dp=2"
    )
    return _records(
        "default_dp2/sysopt",
        runs["sysopt"],
        {
            "command": _cli(overrides),
            "threads_per_rank": 1,
            "global_batch": job.train.global_batch,
            "steps": steps,
        },
    )


def _pipeline_runs(
    ctx: BenchContext, work: Path, steps: int, split: list[int] | None, label: str
) -> tuple[list[Record], dict[str, list[Record]], list[int]]:
    """interleaved_1f1b and megatron_interleaved whole runs on one split (`split`, or the trainer's cost-based
    one when None), each resumed from one checkpoint written after step 1 there: same split, weights, data."""
    cut = [] if split is None else ["parallel.boundaries=[" + ",".join(map(str, split)) + "]"]
    common = [*PIPELINE, *cut, f"train.max_steps={steps + 1}", f"optim.warmup_steps={steps // 5}"]
    seed_overrides = [
        *PIPELINE,
        *cut,
        "train.max_steps=1",
        "optim.warmup_steps=1",
        "schedule=interleaved_1f1b",
    ]
    seed_dir = work / f"pipeline_seed_{label}"
    seed = run_training(job_from(seed_overrides), seed_dir)
    jobs = {name: job_from([*common, f"schedule={name}"]) for name in SCHEDULES}

    def runner(name: str) -> Callable[[int], dict]:
        def run(repeat: int) -> dict:
            out = work / f"{label}_{name}_{repeat}"
            shutil.copytree(seed_dir / "checkpoints", out / "checkpoints")
            summary = run_training(jobs[name], out)
            if summary["resumed_from_step"] != 1:
                raise RuntimeError(f"{name} run did not resume from the shared checkpoint: {summary}")
            return summary

        return run

    runs = _alternate(ctx, {name: runner(name) for name in jobs}, f"pp=2 vpp=2, {label}")
    records, named = [], {}
    for name, job in jobs.items():
        config = {
            "command": _cli([*common, f"schedule={name}"]) + " (resumed from one shared step-1 checkpoint)",
            "threads_per_rank": 1,
            "global_batch": job.train.global_batch,
            "microbatches": job.schedule.resolved_microbatches(job.parallel.pp),
            "pipeline_boundaries": [r["pipeline_boundaries"] for r in runs[name]],
            "steps": steps,
        }
        named[name] = _records(f"pp2_vpp2/{label}/{name}", runs[name], config)
        records += named[name]
    return records, named, list(seed["pipeline_boundaries"])


def pipeline(ctx: BenchContext, work: Path, steps: int) -> tuple[list[Record], list]:
    """interleaved_1f1b against megatron_interleaved in whole trainer runs, on two splits:
    - the decoder-only split, where every boundary sends one shape and megatron-core needs no p2p shape
      exchange: the goal (the comparison of the schedules, without a cost only the other split gives megatron);
    - the trainer's cost-based split, which cuts inside the vision encoder: boundary shapes differ there, which
      turns on megatron-core's `variable_seq_lengths` (a shape exchange before every tensor): informative.
    Plus both schedules taking turns step by step in one launch on each split (records only)."""
    records, goals, trainer_split = [], [], None
    for label, split, what in (
        ("decoder_split", DECODER_SPLIT, "decoder-only split"),
        ("trainer_split", None, "the trainer's split; informative: megatron-core exchanges shapes there"),
    ):
        runs, named, ran = _pipeline_runs(ctx, work, steps, split, label)
        trainer_split = ran if split is None else trainer_split
        records += runs
        goals.append(
            goal_ratio(
                f"sysopt interleaved_1f1b vs megatron-core interleaved in the trainer (tokens/s, pp=2 vpp=2, {what})",
                named["interleaved_1f1b"][1],
                named["megatron_interleaved"][1],
                MEGATRON_TARGET,
            )
        )
    splits = {"trainer_split": trainer_split, "decoder_split": DECODER_SPLIT}
    job = job_from(
        [
            *PIPELINE,
            f"train.max_steps={steps + 1}",
            f"optim.warmup_steps={steps // 5}",
            "schedule=interleaved_1f1b",
        ]
    )
    for label, boundaries in splits.items():  # records only: the goals are the whole-run figures above
        records += step_interleaved(job, label, boundaries, steps)
    return records, goals


def step_interleaved(job: JobConfig, label: str, boundaries: list[int], steps: int) -> list[Record]:
    """forward_backward of both schedules in one launch on one split, taking turns step by step: the
    load on a shared machine drifts over seconds, which whole-run comparisons cannot cancel. (Taking
    turns is not the trainer's condition: a schedule's step may run differently after the other's.)"""
    from sysopt.dist import launch
    from sysopt.train.megatron_baseline import time_schedules

    timed = launch(
        time_schedules,
        job.world_size,
        backend="gloo",  # the trainer's CPU model
        args=(job.to_json(), list(SCHEDULES), boundaries, steps),
        timeout_s=600,
    )[0]
    losses = timed["losses"]
    if not torch.allclose(torch.tensor(losses[SCHEDULES[0]]), torch.tensor(losses[SCHEDULES[1]]), rtol=1e-5):
        raise RuntimeError(f"the schedules computed different losses on {label}: {losses}")
    records = {}
    for name in SCHEDULES:
        seconds = timed[name][min(steps // 10, 10) :]  # the trainer's warm-up skip
        config = {
            "pipeline_boundaries": list(boundaries),
            "steps": steps,
            "threads_per_rank": 1,
            "what": "barrier-to-barrier ParallelVLM.forward_backward, schedules alternating per step",
        }
        records[name] = Record(
            f"pp2_vpp2_ab/{label}/{name}/forward_backward_s",
            statistics.median(seconds),
            "s",
            len(seconds),
            min(seconds),
            max(seconds),
            config,
        )
    return list(records.values())


@register_suite("e2e")
def run(ctx: BenchContext) -> SuiteResult:
    steps = QUICK_STEPS if ctx.quick else STEPS
    with tempfile.TemporaryDirectory(prefix="sysopt_e2e_") as tmp:
        work = Path(tmp)
        single_records, single_goals = single_process(ctx, work, steps)
        dp2_records = default_dp2(ctx, work, steps)
        pipe_records, pipe_goals = pipeline(ctx, work, steps)
    return ctx.result("e2e", single_records + dp2_records + pipe_records, single_goals + pipe_goals)
