"""The trainer: data-parallel VLM training with AdamW, warmup + cosine LR, checkpoints and exact-match eval.

`run_training(job, out_dir)` launches job.world_size ranks (or runs in this process when it is 1) and
returns the summary. Each rank trains on its contiguous slice of the same global batch a single process
would see; the loss is normalised by the global answer-token count and gradients are sum-reduced, so the
losses equal single-process training on the global batch up to float summation order.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sysopt.data import TASKS, BatchSampler, DigitsDataset, eval_batches, evaluate
from sysopt.dist import BucketedGradSync, ParallelGroups, build_groups, launch
from sysopt.models import VLM, vlm_loss
from sysopt.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sysopt.train.config import JobConfig
from sysopt.train.lr import warmup_cosine_lr
from sysopt.train.metrics import MetricsLog, write_json_atomic

FAULT_ENV = "SYSOPT_FAIL_AT_STEP"  # fault injection for resume tests: raise before this step runs


def run_training(job: JobConfig, out_dir: str | Path) -> dict[str, Any]:
    """Train `job`, writing metrics.jsonl, summary.json and checkpoints/ under out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "job.json").write_text(job.to_json())
    if job.world_size == 1:
        return train_rank(job.to_json(), str(out_dir))
    results = launch(
        train_rank,
        job.world_size,
        args=(job.to_json(), str(out_dir)),
        timeout_s=job.train.timeout_s,
        log_dir=out_dir / "logs",
    )
    return results[0]


def _dp_coords(groups: ParallelGroups | None) -> tuple[int, int]:
    if groups is None:
        return 0, 1
    return groups.coords.dp, groups.topology.dp


def _distributed_eval(model: VLM, job: JobConfig, groups: ParallelGroups | None) -> dict[str, float]:
    """Exact match per task on the held-out split; eval batches are dealt round-robin over dp ranks."""
    rank, world = _dp_coords(groups)
    dataset = DigitsDataset(job.data, "eval")
    counts = torch.zeros(2, len(TASKS), dtype=torch.float64)  # [correct, total] per task
    for i, batch in enumerate(eval_batches(dataset, job.train.eval_batch)):
        if i % world != rank:
            continue
        scores = evaluate(model, [batch])
        totals = torch.bincount(batch.task_ids, minlength=len(TASKS)).double()
        for t, task in enumerate(TASKS):
            counts[0, t] += scores.get(task, 0.0) * totals[t]
            counts[1, t] += totals[t]
    if groups is not None and world > 1:
        dist.all_reduce(counts, group=groups.dp_group)
    return {task: float(counts[0, t] / counts[1, t]) for t, task in enumerate(TASKS) if counts[1, t] > 0}


def train_rank(job_json: str, out_dir: str) -> dict[str, Any]:
    """One rank's training loop (also the whole run when world size is 1)."""
    job = JobConfig.from_json(job_json)
    groups = build_groups(job.parallel) if dist.is_initialized() else None
    dp_rank, dp_size = _dp_coords(groups)
    is_main = groups is None or groups.rank == 0
    out = Path(out_dir)

    model = VLM(job.model)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    o = job.optim
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=o.betas,
        eps=o.eps,
        fused=True,
    )
    sampler = BatchSampler(DigitsDataset(job.data, "train"), job.train.global_batch)

    start_step = 0
    ckpt_root = out / "checkpoints"
    found = latest_checkpoint(ckpt_root) if job.train.resume else None
    if found is not None:
        state = load_checkpoint(found, ["model", "optimizer", "trainer"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["trainer"]["step"])
        torch.set_rng_state(state["trainer"]["rng"])

    grad_sync = BucketedGradSync(params, groups.dp_group) if groups is not None and dp_size > 1 else None
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
    fail_at_step = int(os.environ.get(FAULT_ENV, -1))
    model.train()
    step_times: list[float] = []
    tokens_per_step = 0
    loss_value = float("nan")
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
        if step == fail_at_step:
            raise RuntimeError(f"injected failure at step {step} ({FAULT_ENV}={fail_at_step})")
        global_batch = sampler.global_batch(step)
        local = global_batch.shard(dp_rank, dp_size)
        normalizer = global_batch.answer_token_count().clamp(min=1.0)
        loss = vlm_loss(model(local), local, normalizer)
        loss.backward()
        loss_sum = loss.detach().clone()
        if grad_sync is not None:  # buckets were reduced during backward; finish and write back
            grad_sync.wait()
            dist.all_reduce(loss_sum, group=groups.dp_group)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip) if o.grad_clip > 0 else torch.nan
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_time_s = time.perf_counter() - t0
        step_times.append(step_time_s)
        tokens_per_step = int((global_batch.tokens != 0).sum())
        loss_value = float(loss_sum)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step}; lower optim.lr (now {o.lr})")
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
                }
            )
        if progress is not None:
            progress.update(1)
            if step % job.train.log_every == 0:
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        every = job.train.checkpoint_every
        if (every and (step + 1) % every == 0) or last:
            _save(model, optimizer, step + 1, ckpt_root, is_main, groups)
    if progress is not None:
        progress.close()

    accuracy = _distributed_eval(model, job, groups)
    # steady-state timing: skip the first steps (allocator and thread-pool warm-up)
    steady = step_times[min(len(step_times) // 10, 10) :] or step_times or [float("nan")]
    median_step_s = sorted(steady)[len(steady) // 2]
    summary = {
        "final_loss": loss_value,
        "eval_accuracy": accuracy,
        "steps": job.train.max_steps,
        "resumed_from_step": start_step,
        "step_time_s": median_step_s,
        "tokens_per_s": tokens_per_step / median_step_s,
        "params": model.param_count(),
        "world_size": job.world_size,
    }
    if is_main:
        write_json_atomic(out / "summary.json", summary)
    return summary


def _save(model, optimizer, step: int, root: Path, is_main: bool, groups: ParallelGroups | None) -> None:
    """Data-parallel replicas are identical, so rank 0 writes; the barrier keeps ranks in step."""
    if is_main:
        save_checkpoint(
            root,
            step,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "trainer": {"step": step, "rng": torch.get_rng_state()},
            },
        )
    if groups is not None:
        dist.barrier()
