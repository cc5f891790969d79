"""The trainer: data-parallel VLM training with AdamW, warmup + cosine LR, checkpoints and held-out eval
(exact match and answer-token loss).

`run_training(job, out_dir)` launches job.world_size ranks (or runs in this process when it is 1) and
returns the summary. Each rank trains on its contiguous slice of the same global batch a single process
would see; the loss is normalised by the global answer-token count and gradients are sum-reduced, so the
losses equal single-process training on the global batch up to float summation order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sysopt.data import TASKS, BatchSampler, DigitsDataset, eval_batches
from sysopt.dist import ParallelGroups, build_groups, env_world, launch
from sysopt.tensor_parallel import overlap_plans
from sysopt.train.checkpoint import (
    CheckpointError,
    atomic_write_text,
    commit_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    run_lock,
    stage_checkpoint,
)
from sysopt.train.config import ConfigError, JobConfig, validate
from sysopt.train.lr import warmup_cosine_lr
from sysopt.train.metrics import MetricsLog, write_json_atomic
from sysopt.train.parallel import ParallelVLM, tp_overlap_profile

FAULT_ENV = "SYSOPT_FAIL_AT_STEP"  # fault injection for resume tests: "STEP", "STEP:RANK" or "STEP:RANK:kill"


def _injected_fault() -> tuple[int, int | None, bool]:
    """(step, rank or None for every rank, SIGKILL instead of raising) from SYSOPT_FAIL_AT_STEP."""
    parts = os.environ.get(FAULT_ENV, "").split(":")
    if parts == [""]:
        return -1, None, False
    rank = int(parts[1]) if len(parts) > 1 else None
    return int(parts[0]), rank, len(parts) > 2 and parts[2] == "kill"


def run_training(job: JobConfig, out_dir: str | Path) -> dict[str, Any]:
    """Train `job`, writing metrics.jsonl, summary.json and checkpoints/ under out_dir.

    Spawned ranks (the default) share the directory this process prepared. Under torchrun or srun every
    rank calls this: rank 0 prepares (sets an earlier run aside, checks resumability, writes job.json)
    while the others wait, and every rank writes to rank 0's `out_dir` (Hydra's default run dir carries the
    time each process started, which can differ by a second between ranks)."""
    validate(job)  # in this process, before any rank starts
    if job.world_size > 1 and env_world() is not None:
        return launch(_env_rank_training, job.world_size, args=(job.to_json(), str(out_dir)), backend="gloo",
                      timeout_s=job.train.timeout_s,
                      collective_timeout_s=job.train.collective_timeout_s)[0]  # fmt: skip
    out_dir = Path(out_dir)
    with run_lock(out_dir):  # one run per directory (run.lock; a dead run's lock is taken over)
        _prepare_run_dir(job, out_dir)
        if job.world_size == 1:
            return train_rank(job.to_json(), str(out_dir))
        results = launch(
            train_rank,
            job.world_size,
            args=(job.to_json(), str(out_dir)),
            backend="gloo",  # the trainer's model and collectives are on the CPU, GPUs present or not
            timeout_s=job.train.timeout_s,
            collective_timeout_s=job.train.collective_timeout_s,
            log_dir=out_dir / "logs",
        )
        return results[0]


def _prepare_run_dir(job: JobConfig, out_dir: Path, *, calibrate: bool = True) -> None:
    """Before any rank trains: set an earlier run aside (train.resume=false) or check that its checkpoint
    can resume into this job, write job.json, and calibrate what tp_overlap=auto reads (without
    `calibrate`, refuse when it is not cached: under torchrun the calibration's own launch would run inside
    the job's process group)."""
    if job.parallel.tp > 1 and job.parallel.tp_overlap == "auto" and not calibrate:
        if tp_overlap_profile(job.parallel.tp) is None:
            raise ConfigError(
                f"parallel.tp_overlap=auto needs a CPU calibration with {job.parallel.tp}-rank collectives, and "
                "none is cached; under torchrun/srun it cannot be measured inside the job: run "
                f"`sysopt-probe --calibrate --quick --device cpu --threads 1 --world-size {job.parallel.tp}` once "
                "on this machine (or use parallel.tp_overlap=chunked)"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    # staging directories of saves that crashed before their commit: never a checkpoint, and a step this run
    # does not save again would keep its files forever (the caller holds run.lock: no live run stages here)
    for stale in sorted((out_dir / "checkpoints").glob(".tmp_step_*")):
        shutil.rmtree(stale, ignore_errors=True)
    if not job.train.resume:
        _set_aside_previous_run(out_dir)
    else:
        _check_resumable(job, out_dir)
    write_json_atomic(out_dir / "job.json", json.loads(job.to_json()))
    if job.parallel.tp > 1 and job.parallel.tp_overlap == "auto":  # the ranks read it from the cache
        tp_overlap_profile(job.parallel.tp, calibrate=True)


def _env_rank_training(job_json: str, out_dir: str) -> dict[str, Any]:
    """One rank started by torchrun or srun: rank 0 prepares its run dir, which every rank then trains in."""
    job = JobConfig.from_json(job_json)
    box: list[Any] = [out_dir]
    dist.broadcast_object_list(box, src=0)
    out_dir = box[0]
    failure, lock = None, None
    if dist.get_rank() == 0:
        try:
            lock = run_lock(out_dir).__enter__()
            _prepare_run_dir(job, Path(out_dir), calibrate=False)
        except Exception as exc:  # every rank must learn of it, or the others wait for rank 0 forever
            failure = exc
    box = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(box, src=0)
    try:
        if failure is not None:
            raise failure
        if box[0] is not None:
            raise ConfigError(f"rank 0 could not prepare the run directory {out_dir}: {box[0]}")
        return train_rank(job_json, out_dir)
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


REPLACED_RUNS = "replaced_runs"  # where train.resume=false moves an earlier run's outputs
RESUME_KEYS = (
    "parallel.tp",
    "parallel.pp",
    "parallel.vpp",
)  # with the model's fields: what a checkpoint fixes


# data fields that change how a drawn sample is warped, not which samples a step draws (label_noise changes
# answers, and with packing their lengths, so which samples share a row: refused with the others)
LOOKS = ("shift_px", "rotate_deg", "scale")


def _check_resumable(job: JobConfig, out_dir: Path) -> None:
    """Before any rank starts: a checkpoint in `out_dir` written by a job with another model or tp/pp/vpp
    layout (its job.json says which) cannot resume into this one; say so, with both ways out. (dp may change:
    every dp rank holds the same shards.) A changed precision recipe resumes, with a warning."""
    start_over = (
        f"or set train.resume=false to start over (the earlier run moves to {out_dir / REPLACED_RUNS}/)"
    )
    try:
        found = latest_checkpoint(out_dir / "checkpoints")
    except CheckpointError as exc:
        raise ConfigError(f"{exc}; {start_over}") from exc
    old_path = out_dir / "job.json"
    if found is None or not old_path.exists():
        return
    try:
        text = old_path.read_text()
        json.loads(text)
    except (OSError, ValueError) as exc:  # empty or torn: the machine crashed before its data reached disk
        raise ConfigError(
            f"{old_path} is unreadable ({type(exc).__name__}: {exc}) beside the checkpoint {found}: it says which "
            "model and layout wrote that checkpoint; put back a good copy, delete it to resume without that "
            f"check, {start_over}"
        ) from exc
    try:
        old = JobConfig.from_json(text)
    except (ValueError, TypeError, KeyError):
        return  # not a job this code wrote: the ranks' own checks name what does not match
    init_only = ("seed", "init_std")  # how the weights started: a resumed run loads them instead
    flat = lambda j: {  # noqa: E731
        **{f"model.{k}": v for k, v in dataclasses.asdict(j.model).items() if k not in init_only},
        **{k: getattr(j.parallel, k.split(".")[1]) for k in RESUME_KEYS},
        # at tp > 1 sequence parallelism adds scatter/gather blocks, which shifts every block's index
        "parallel.sequence_parallel": j.parallel.sequence_parallel if j.parallel.tp > 1 else None,
        # which rank holds which stage: a V schedule (zbv, dualpipev) places them otherwise than a loop
        "schedule.name (stage placement)": _stage_placement(j),
    }
    if diff := _differences(flat, old, job):
        raise ConfigError(
            f"{out_dir} holds a checkpoint ({found.name}) of a run with {diff[0]}, but this job has {diff[1]}; "
            f"resume with the earlier values, {start_over}"
        )
    # every rank loads its shard: one missing would fail that rank alone while the others wait in a collective
    # (until train.collective_timeout_s under a launcher that does not kill the job on the first failure)
    p = job.parallel
    wanted = ["trainer", *(f"{kind}_{_shard(t, s)}" for kind in ("model", "optimizer")
                           for t in range(p.tp) for s in range(p.pp))]  # fmt: skip
    missing = [f"{name}.pt" for name in wanted if not (found / f"{name}.pt").is_file()]
    if missing:
        raise ConfigError(
            f"checkpoint {found} lacks {', '.join(missing)}; delete {found} to resume from the checkpoint "
            f"before it, if there is one, {start_over}"
        )
    # which samples a step draws is a function of the data config, the global batch and the step: with another
    # one the resumed run would skip or repeat samples (n_eval_per_task only sizes the held-out eval; the
    # augmentation changes how drawn samples look, warned below)
    stream = lambda j: {  # noqa: E731
        **{
            f"data.{k}": v
            for k, v in dataclasses.asdict(j.data).items()
            if k not in ("n_eval_per_task", *LOOKS)
        },
        "train.global_batch": j.train.global_batch,
    }
    if diff := _differences(stream, old, job):
        raise ConfigError(
            f"{out_dir} holds a checkpoint ({found.name}) of a run that drew its batches with {diff[0]}, but "
            f"this job has {diff[1]}: resumed, it would skip or repeat training samples; resume with the "
            f"earlier values, {start_over}"
        )
    if old.precision.recipe != job.precision.recipe:
        warnings.warn(
            f"resuming {found.name} of a run with precision.recipe={old.precision.recipe} as "
            f"precision.recipe={job.precision.recipe}: the model is converted afresh",
            stacklevel=3,
        )
    if diff := _differences(lambda j: {f"data.{k}": getattr(j.data, k) for k in LOOKS}, old, job):
        warnings.warn(
            f"resuming {found.name} of a run trained with {diff[0]} as {diff[1]}: the same samples, augmented "
            "otherwise from the resumed step on",
            stacklevel=3,
        )
    schedule = lambda j: {  # noqa: E731 - the learning-rate curve: warmup, then cosine to step max_steps
        "optim.lr": j.optim.lr,
        "optim.warmup_steps": j.optim.warmup_steps,
        "optim.min_lr_ratio": j.optim.min_lr_ratio,
        "train.max_steps": j.train.max_steps,
    }
    before, now = schedule(old), schedule(job)
    changed = [f"{k} {before[k]} -> {now[k]}" for k in before if before[k] != now[k]]
    if changed:
        warnings.warn(
            f"resuming {found.name} with another learning-rate schedule ({', '.join(changed)}): the LR curve "
            "moves from the resumed step on, as if this job had run from the start",
            stacklevel=3,
        )
    kept = out_dir / f"job.{found.name}.json"
    if old != job and not kept.exists():  # the job that wrote the checkpoint (job.json becomes this one): the
        atomic_write_text(kept, text)  # first resume from it knows; a later one may follow a crashed resume


def _differences(view: Callable[[JobConfig], dict], old: JobConfig, new: JobConfig) -> tuple[str, str] | None:
    """Where `view` of two jobs differs: ("key=old ...", "key=new ..."), or None where it agrees."""
    before, now = view(old), view(new)
    changed = [k for k in before if before[k] != now[k]]
    if not changed:
        return None
    return " ".join(f"{k}={before[k]}" for k in changed), " ".join(f"{k}={now[k]}" for k in changed)


def _stage_placement(job: JobConfig) -> str | None:
    """'loop' or 'V': how the job's pipeline schedule places stages on ranks (None without a pipeline, or
    where the schedule cannot be built: the ranks' own checks then say why)."""
    p, s = job.parallel, job.schedule
    if p.pp == 1:
        return None
    from sysopt.schedules import ScheduleError, build
    from sysopt.schedules.builders import loop_placement

    name = ("interleaved_1f1b" if p.vpp > 1 else "1f1b") if s.name == "megatron_interleaved" else s.name
    try:
        placement = build(name, p.pp, p.vpp, s.microbatches or 2 * p.pp).stage_to_rank
    except (ValueError, ScheduleError, KeyError):
        return None
    return "loop" if placement == loop_placement(p.pp, p.vpp) else "V"


def _set_aside_previous_run(out_dir: Path) -> Path | None:
    """train.resume=false into a directory an earlier run wrote: move that run's checkpoints, metrics,
    summary, job.json (and the job.<step>.json of the jobs it resumed) and logs to <out_dir>/replaced_runs/<n>/ (nothing is deleted), so that this run starts
    clean and a relaunch of it after a crash can never resume the earlier run's checkpoint."""
    outputs = ("checkpoints", "metrics.jsonl", "summary.json")
    if not any((out_dir / name).exists() for name in outputs):
        return None
    parent = out_dir / REPLACED_RUNS
    taken = [int(p.name) for p in parent.glob("*") if p.name.isdigit()] if parent.is_dir() else []
    dest = parent / str(max(taken, default=0) + 1)
    dest.mkdir(parents=True)
    moved = []
    for name in (*outputs, "job.json", *(p.name for p in sorted(out_dir.glob("job.step_*.json"))), "logs"):
        if (out_dir / name).exists():
            os.replace(out_dir / name, dest / name)
            moved.append(name)
    warnings.warn(
        f"train.resume=false: moved the earlier run's {', '.join(moved)} from {out_dir} to {dest}; "
        f"this run starts from step 0",
        stacklevel=3,
    )
    return dest


def _dp_coords(groups: ParallelGroups | None) -> tuple[int, int]:
    if groups is None:
        return 0, 1
    return groups.coords.dp, groups.topology.dp


def _distributed_eval(
    runtime: ParallelVLM, job: JobConfig, groups: ParallelGroups | None
) -> tuple[dict[str, float], float]:
    """Exact match per task and the mean answer-token cross-entropy on the held-out split; eval batches
    are dealt round-robin over dp ranks."""
    rank, world = _dp_coords(groups)
    counts = torch.zeros(4, len(TASKS))  # [correct, samples, loss sum, answer tokens] per task
    for i, batch in enumerate(eval_batches(DigitsDataset(job.data, "eval"), job.train.eval_batch)):
        if i % world == rank:
            counts += runtime.eval_counts(batch)
    if groups is not None and world > 1:
        dist.all_reduce(counts, group=groups.dp_group)
    accuracy = {task: float(counts[0, t] / counts[1, t]) for t, task in enumerate(TASKS) if counts[1, t] > 0}
    return accuracy, float(counts[2].sum() / counts[3].sum().clamp(min=1.0))


def evaluate_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Held-out eval (exact match per task and eval_loss, as in summary.json) of a run directory's latest
    checkpoint, in this process: e.g. to score runs written before the summary carried eval_loss.

    dp replicas share one model shard, so any dp size works; tp or pp > 1 shard the model and are refused."""
    run = Path(run_dir)
    job = JobConfig.from_json((run / "job.json").read_text())
    if job.parallel.tp > 1 or job.parallel.pp > 1:
        raise ValueError(
            f"evaluate_checkpoint({str(run)!r}): the run has tp={job.parallel.tp} pp={job.parallel.pp}, but "
            f"only unsharded (tp=1, pp=1) checkpoints are evaluated in one process; read that run's "
            f"summary.json instead"
        )
    found = latest_checkpoint(run / "checkpoints")
    if found is None:
        raise CheckpointError(f"{run / 'checkpoints'} holds no checkpoint; train the run first")
    job = dataclasses.replace(job, parallel=dataclasses.replace(job.parallel, dp=1))
    sample = BatchSampler(DigitsDataset(job.data, "train"), job.train.global_batch).global_batch(0)
    state = load_checkpoint(found, ["model_tp0_pp0", "trainer"])
    runtime = ParallelVLM(job, None, sample, precision_plan=state["trainer"].get("precision_plan"))
    runtime.modules.load_state_dict(state["model_tp0_pp0"])
    accuracy, eval_loss = _distributed_eval(runtime, job, None)
    return {"step": int(state["trainer"]["step"]), "eval_accuracy": accuracy, "eval_loss": eval_loss}


def make_optimizer(
    job: JobConfig, params: list[torch.nn.Parameter], groups: ParallelGroups | None = None
) -> torch.optim.Optimizer:
    """AdamW (torch's fused kernel), or sysopt's OffloadAdamW when offload.strategy is set; weight decay
    on matrices only. Under data parallelism (`groups` with dp > 1) the replicas of an OffloadAdamW plan
    together (plan_group): placements made from each rank's own timings would differ, and with them the
    numbers."""
    dp_group = groups.dp_group if groups is not None and groups.topology.dp > 1 else None
    o, off = job.optim, job.offload
    param_groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    if off.strategy == "none":
        return torch.optim.AdamW(param_groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)
    from sysopt.offload import OffloadAdamW

    return OffloadAdamW(
        param_groups,
        lr=o.lr,
        betas=o.betas,
        eps=o.eps,
        weight_decay=o.weight_decay,
        strategy=off.strategy,
        device_budget_bytes=off.device_budget_bytes,
        fraction=off.fraction,
        state_dtype=torch.bfloat16 if off.state_dtype == "bf16" else torch.float32,
        master_dtype=torch.bfloat16 if off.master_dtype == "bf16" else torch.float32,
        seed=job.train.seed,  # the stochastic rounding of bf16 state (the same on every dp replica)
        plan_group=dp_group,
    )


def connect_grad_copies(runtime: ParallelVLM, optimizer: torch.optim.Optimizer) -> None:
    """Under data parallelism the reduction rewrites every gradient after backward: an offloading optimizer
    then copies each gradient to the host once its bucket is reduced (OffloadAdamW.grads_ready), not from
    its backward hooks, whose copies would all be stale and made again in step()."""
    if runtime.grad_sync is not None and hasattr(optimizer, "grads_ready"):
        optimizer.defer_grad_copies = True
        runtime.grad_sync.on_reduced.append(optimizer.grads_ready)


JOB_OPTIM_KEYS = ("weight_decay", "betas", "eps")  # what the job sets and a checkpoint must not override


def _apply_job_optim_values(
    optimizer: torch.optim.Optimizer, job_values: list[dict[str, Any]], found: Path, warn: bool
) -> None:
    """load_state_dict restores the saved param groups' hyperparameters; put back the job's weight decay,
    betas and eps (the learning rate is set every step by the schedule), warning where they differ."""
    changed: dict[str, str] = {}
    for group, values in zip(optimizer.param_groups, job_values):
        for key, value in values.items():
            old = group[key]
            if (tuple(old) if isinstance(old, list | tuple) else old) != value:
                changed.setdefault(key, f"optim.{key} {_plain(old)} -> {_plain(value)}")
            group[key] = value
    if changed and warn:
        warnings.warn(
            f"resuming {found} with this job's optimizer settings, which differ from the checkpoint's: "
            f"{', '.join(changed.values())}",
            stacklevel=3,
        )


def _plain(value: Any) -> Any:
    return [float(x) for x in value] if isinstance(value, list | tuple) else value


def _shard_name(job: JobConfig, groups: ParallelGroups | None) -> str:
    """Checkpoint file stem of this rank's model shard (dp replicas share one)."""
    if groups is None:
        return _shard(0, 0)
    return _shard(groups.coords.tp, groups.coords.pp)


def _shard(tp_rank: int, pp_rank: int) -> str:
    """The file stem of the model shard of tensor-parallel rank `tp_rank`, pipeline rank `pp_rank`."""
    return f"tp{tp_rank}_pp{pp_rank}"


def train_rank(job_json: str, out_dir: str) -> dict[str, Any]:
    """One rank's training loop (also the whole run when world size is 1)."""
    job = JobConfig.from_json(job_json)
    # the trainer's own randomness: torch's global generator (checkpointed, so a resume continues it) and
    # the offloading optimizer's stochastic rounding; model.seed draws the weights, data.seed the data. Every
    # rank seeds alike and draws alike (nothing in a step draws per rank: no dropout), so the checkpoint keeps
    # rank 0's generator and every rank restores it; a per-rank draw added later needs per-rank states saved
    torch.manual_seed(job.train.seed)
    # a collective waits at most train.collective_timeout_s (a rank in a longer eval or save needs it raised)
    groups = (
        build_groups(job.parallel.topology, timeout_s=job.train.collective_timeout_s)
        if dist.is_initialized()
        else None
    )
    dp_rank, dp_size = _dp_coords(groups)
    is_main = groups is None or groups.rank == 0
    out = Path(out_dir)
    o = job.optim

    sampler = BatchSampler(DigitsDataset(job.data, "train"), job.train.global_batch)
    start_step = 0
    ckpt_root = out / "checkpoints"
    found = latest_checkpoint(ckpt_root) if job.train.resume else None
    trainer_state = load_checkpoint(found, ["trainer"])["trainer"] if found is not None else None
    saved_boundaries = saved_plan = None
    if trainer_state is not None and trainer_state.get("boundaries") is not None:
        saved_boundaries = tuple(trainer_state["boundaries"])
    if trainer_state is not None:  # what precision=auto chose when the run started, on whichever machine
        saved_plan = trainer_state.get("precision_plan")
    runtime = ParallelVLM(
        job, groups, sampler.global_batch(0).shard(dp_rank, dp_size), saved_boundaries, saved_plan
    )
    optimizer = make_optimizer(job, runtime.params, groups)
    connect_grad_copies(runtime, optimizer)
    shard = _shard_name(job, groups)
    if found is not None:
        state = load_checkpoint(found, [f"model_{shard}", f"optimizer_{shard}"])
        job_values = [{k: g[k] for k in JOB_OPTIM_KEYS} for g in optimizer.param_groups]
        try:
            runtime.modules.load_state_dict(state[f"model_{shard}"])
            optimizer.load_state_dict(state[f"optimizer_{shard}"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"checkpoint {found} does not match this job's model or parallel layout ({exc}); resume "
                f"with the same model and parallel settings, or use another hydra.run.dir"
            ) from exc
        _apply_job_optim_values(optimizer, job_values, found, warn=is_main)
        start_step = int(trainer_state["step"])
        torch.set_rng_state(trainer_state["rng"])
        if start_step > job.train.max_steps and is_main:  # (equal: a finished run relaunched, as intended)
            warnings.warn(
                f"the checkpoint {found.name} is at step {start_step} > train.max_steps={job.train.max_steps}: "
                f"nothing left to train, the run only evaluates; raise train.max_steps to train on",
                stacklevel=2,
            )
    # the final loss worth comparing between runs is a mean over many batches, not the last one's loss;
    # the window travels in the checkpoint so that a resumed run reports what an uninterrupted one does
    tail_window = max(1, job.train.max_steps // 10)
    recent_losses = list(trainer_state.get("recent_losses", ())) if trainer_state is not None else []

    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start_step) if is_main else None
    progress = None
    if is_main:
        from tqdm import tqdm

        progress = tqdm(
            total=job.train.max_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )
    fail_at_step, fail_rank, fail_kill = _injected_fault()
    step_times: list[float] = []
    tokens_per_step = 0
    loss_value = float("nan")
    # steps skipped so far in the whole run: counted on from the checkpoint, as the loss window is
    skipped_steps = int(trainer_state.get("skipped_steps", 0)) if trainer_state is not None else 0
    for step in range(start_step, job.train.max_steps):
        t0 = time.perf_counter()
        lr = warmup_cosine_lr(
            step,
            lr=o.lr,
            warmup_steps=o.warmup_steps,
            max_steps=job.train.max_steps,
            min_lr_ratio=o.min_lr_ratio,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        if step == fail_at_step and fail_rank in (None, groups.rank if groups is not None else 0):
            if fail_kill:  # die like an OOM-killed or preempted process: no exception, no cleanup
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure at step {step} ({FAULT_ENV}={os.environ[FAULT_ENV]})")
        global_batch = sampler.global_batch(step)
        normalizer = global_batch.answer_token_count().clamp(min=1.0)
        loss_sum = runtime.forward_backward(global_batch.shard(dp_rank, dp_size), normalizer)
        _sync_amax_histories(runtime, groups)
        # with clipping off (grad_clip=0) the norm is still measured: the finiteness check and the log need it
        grad_norm = runtime.clip_grad_norm_(o.grad_clip)
        if _all_finite(runtime, grad_norm, groups):
            optimizer.step()
        else:  # an overflow in a low-precision GEMM or a diverging step: never train on it
            skipped_steps += 1
        optimizer.zero_grad(set_to_none=True)
        step_time_s = time.perf_counter() - t0
        step_times.append(step_time_s)
        tokens_per_step = int((global_batch.tokens != 0).sum())
        loss_value = float(loss_sum)
        recent_losses = [*recent_losses, loss_value][-tail_window:]
        last = step == job.train.max_steps - 1
        if is_main and (step % job.train.log_every == 0 or last):
            metrics.write(
                {
                    "step": step,
                    "loss": loss_value,
                    "lr": lr,
                    "step_time_s": step_time_s,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": tokens_per_step / step_time_s,
                    "skipped_steps": skipped_steps,
                }
            )
        if progress is not None:
            progress.update(1)
            if step % job.train.log_every == 0:
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        every = job.train.checkpoint_every
        if (every and (step + 1) % every == 0) or last:
            run_state = {
                "recent_losses": list(recent_losses),
                "skipped_steps": skipped_steps,
                "timing": _timing(step_times, tokens_per_step),
            }
            _save(runtime, optimizer, step + 1, ckpt_root, shard, groups, run_state)
    if progress is not None:
        progress.close()

    # what the TP linears ran in training, read before the evaluation's batches (another shape) replan them
    tp_plans = overlap_plans(runtime.model) if job.parallel.tp > 1 else {}
    accuracy, eval_loss = _distributed_eval(runtime, job, groups)
    timing = _timing(step_times, tokens_per_step)
    if not step_times and trainer_state is not None:
        # no step ran: a relaunch of a finished run, or of one that died after its final save (in eval). Report
        # the figures of the launch that trained it: its last loss ends the window, its timing was saved
        loss_value = recent_losses[-1] if recent_losses else loss_value
        timing = trainer_state.get("timing") or _summary_timing(out / "summary.json") or timing
    summary = {
        "final_loss": loss_value,
        # mean training loss of the last 10% of steps (final_loss_mean_steps of them)
        "final_loss_mean": sum(recent_losses) / len(recent_losses) if recent_losses else float("nan"),
        "final_loss_mean_steps": len(recent_losses),
        # the least training loss any model can reach here: 0 unless data.label_noise draws answers at random
        "train_loss_floor": sampler.dataset.label_noise_floor(),
        "eval_accuracy": accuracy,
        "eval_loss": eval_loss,
        "steps": job.train.max_steps,
        "resumed_from_step": start_step,
        "skipped_steps": skipped_steps,
        "step_time_s": timing["step_time_s"],
        "tokens_per_s": timing["tokens_per_s"],
        "params": runtime.model.param_count() if job.parallel.tp == 1 else None,
        "world_size": job.world_size,
        "pipeline_boundaries": list(runtime.boundaries),
        "low_precision_layers": runtime.low_precision_layers,
        "precision_plan": runtime.precision_plan,
        # the chunking each of rank 0's TP linears ran in training ("none" / "chunked:<k>"), auto's choice
        # included; empty when this launch ran no training step
        "tp_overlap_plans": tp_plans,
    }
    if is_main:
        write_json_atomic(out / "summary.json", summary)
    return summary


def _timing(step_times: list[float], tokens_per_step: int) -> dict[str, float]:
    """Median step time and tokens/s of this launch's steps, at steady state: the first steps (allocator and
    thread-pool warm-up) are left out; NaN when no step ran."""
    steady = step_times[min(len(step_times) // 10, 10) :] or step_times or [float("nan")]
    median_step_s = sorted(steady)[len(steady) // 2]
    return {"step_time_s": median_step_s, "tokens_per_s": tokens_per_step / median_step_s}


def _summary_timing(path: Path) -> dict[str, float] | None:
    """The timing of an earlier summary.json (for checkpoints written before they carried it), if finite."""
    try:
        old = json.loads(path.read_text())
        timing = {k: float(old[k]) for k in ("step_time_s", "tokens_per_s")}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return timing if all(math.isfinite(v) for v in timing.values()) else None


def _sync_amax_histories(runtime: ParallelVLM, groups: ParallelGroups | None) -> None:
    """Delayed scaling under data parallelism: every replica's amax histories become their elementwise max over
    the dp group (each replica pushed one amax per quantisation, in the same order), i.e. the amaxes of the
    global batch. Replicas then scale alike, and the histories dp rank 0 checkpoints are every replica's: a
    resumed run goes on as the uninterrupted one did. One all-reduce a step, of all histories together."""
    if groups is None or groups.topology.dp == 1:
        return
    from sysopt.precision.linear import ScalingBuffers

    histories = [
        m.amax_history
        for m in runtime.modules.modules()  # this rank's stages (what it checkpoints)
        if isinstance(m, ScalingBuffers) and m.recipe.scaling == "delayed"
    ]
    if not histories:
        return
    flat = torch.cat([h.flatten() for h in histories])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=groups.dp_group)
    with torch.no_grad():
        for h, synced in zip(histories, flat.split([h.numel() for h in histories])):
            h.copy_(synced.view_as(h))


def _all_finite(runtime: ParallelVLM, grad_norm: torch.Tensor, groups: ParallelGroups | None) -> bool:
    """False (on every rank) when the gradient norm is not finite or a low-precision GEMM flagged
    inf/NaN; the step is then skipped with a warning."""
    ok = bool(torch.isfinite(grad_norm).all()) if grad_norm.numel() else True
    if runtime.job.precision.recipe is not None:
        from sysopt.precision import check_finite

        ok = check_finite(runtime.model) and ok
    if groups is not None:
        flag = torch.tensor([0.0 if ok else 1.0])
        dist.all_reduce(flag)
        ok = flag.item() == 0.0
    if not ok:
        warnings.warn("non-finite gradients or low-precision overflow: optimizer step skipped", stacklevel=2)
    return ok


def _save(
    runtime: ParallelVLM,
    optimizer,
    step: int,
    root: Path,
    shard: str,
    groups: ParallelGroups | None,
    run_state: dict[str, Any],
) -> None:
    """Each (tp, pp) shard is written by its dp-rank-0 replica into one staging directory; after a
    barrier, world rank 0 renames it into place and moves `latest` (so a crash leaves the last one)."""
    files = {}
    if groups is None or groups.coords.dp == 0:
        files[f"model_{shard}"] = runtime.modules.state_dict()
        files[f"optimizer_{shard}"] = optimizer.state_dict()
    if groups is None or groups.rank == 0:
        files["trainer"] = {
            "step": step,
            "rng": torch.get_rng_state(),
            "boundaries": list(runtime.boundaries),
            **run_state,  # what the summary reports over the whole run: the loss window, skipped steps
            "precision_plan": dict(runtime.precision_plan),
        }
    if groups is None or groups.rank == 0:  # clear what a crashed save may have left
        shutil.rmtree(root / f".tmp_step_{step:08d}", ignore_errors=True)
    if groups is not None:
        dist.barrier()
    stage_checkpoint(root, step, files)
    if groups is not None:
        dist.barrier()
    if groups is None or groups.rank == 0:
        commit_checkpoint(root, step)
    if groups is not None:
        dist.barrier()
