"""Run a PlanConfig here through the trainer (sysopt.train.run_training, a few steps) and read the
median step time from summary.json; configs the trainer rejects are 'not runnable yet', not a crash."""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sysopt.hardware.calibration import intraop_threads
from sysopt.planner.space import PlanConfig

# values that mean "this knob is off": left out of the trainer config, so a trainer that does not know
# the key yet still runs the config when the knob is off
NEUTRAL = {
    "parallel.vpp": 1,
    "parallel.tp_overlap": "none",
    "parallel.tp_chunks": 1,
    "offload.strategy": "none",
    "precision.recipe": None,
}


@dataclass(frozen=True)
class MeasureRecord:
    """Predicted against measured step time of one config; `status` is 'measured', 'not runnable yet'
    (the trainer refused its configuration) or 'failed' (it started and crashed); `detail` says why."""

    config: PlanConfig
    predicted_step_s: float
    measured_step_s: float | None
    status: str
    detail: str = ""
    times_s: tuple[float, ...] = ()  # each run's step time (measure_many's rounds)
    boundaries: tuple[int, ...] | None = None  # the pipeline split the trainer ran (pp > 1)

    @property
    def error(self) -> float | None:
        """(predicted - measured) / measured."""
        if self.measured_step_s is None:
            return None
        return (self.predicted_step_s - self.measured_step_s) / self.measured_step_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "label": self.config.label(),
            "predicted_step_s": self.predicted_step_s,
            "measured_step_s": self.measured_step_s,
            "error": self.error,
            "status": self.status,
            "detail": self.detail,
            "times_s": list(self.times_s),
            "boundaries": None if self.boundaries is None else list(self.boundaries),
        }


def parse_value(text: str) -> Any:
    """An override's value as YAML would read it: int, float, null, true/false, a [list] of those, else
    the string."""
    if text.startswith("[") and text.endswith("]"):
        return [parse_value(item.strip()) for item in text[1:-1].split(",") if item.strip()]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"null": None, "true": True, "false": False}.get(text, text)


def apply_overrides(base: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`base` (nested dict) with each 'a.b=value' set."""
    out = json.loads(json.dumps(base))
    for item in overrides:
        key, _, value = item.partition("=")
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = parse_value(value)
    return out


def trainer_overrides(
    config: PlanConfig, min_features: int | None = None, boundaries: tuple[int, ...] | None = None
) -> list[str]:
    """config.to_overrides() without knobs at their neutral value (nor the schedule at pp=1, m=1), and
    with `boundaries` (pp > 1) the pipeline split to run, so that the run is the planned one.

    offload=device (printed as the trainer's offload.strategy=none) is left out too: the trainer then runs torch's
    fused AdamW on the device, the update the profile's optimizer rate was measured with."""
    keep = []
    for item in config.to_overrides(min_features, boundaries):
        key, _, value = item.partition("=")
        if key in NEUTRAL and parse_value(value) == NEUTRAL[key]:
            # one chunk is "off" only without overlap: chunked with tp_chunks=1 (the GEMM on this rank's
            # rows under the other ranks' transfer) must reach the trainer, whose default count is 4
            if not (key == "parallel.tp_chunks" and config.tp_overlap != "none"):
                continue
        if key.startswith("schedule.") and config.pp == 1 and config.microbatches == 1:
            continue
        keep.append(item)
    return keep


def job_for(
    config: PlanConfig, base_job, min_features: int | None = None, boundaries: tuple[int, ...] | None = None
):
    """The JobConfig that runs `config` (on `boundaries`, when given): `base_job` (a sysopt.train.JobConfig)
    with its overrides.

    Raises sysopt.train.ConfigError when the trainer cannot run it."""
    from sysopt.train import build_job

    overrides = trainer_overrides(config, min_features, boundaries)
    return build_job(apply_overrides(base_job.to_dict(), overrides))


def measure_config(
    config: PlanConfig,
    predicted_step_s: float,
    base_job,
    out_dir: str | Path | None = None,
    min_features: int | None = None,
    boundaries: tuple[int, ...] | None = None,
) -> MeasureRecord:
    """Train `config` for base_job.train.max_steps steps and compare its median step time. With
    `boundaries` the trainer cuts the pipeline there (the planner's split), else where its own
    partitioner does; the record says which split ran.

    A device is one core on a CPU: a single-rank run is timed at one intra-op thread, as launched
    ranks are (sysopt.dist.launch gives each rank one thread)."""

    from sysopt.train import ConfigError, run_training

    try:
        job = job_for(config, base_job, min_features, boundaries)
    except ConfigError as exc:
        return MeasureRecord(config, predicted_step_s, None, "not runnable yet", str(exc))
    with tempfile.TemporaryDirectory(prefix="sysopt-plan-") as tmp:
        run_dir = Path(out_dir) if out_dir is not None else Path(tmp)
        try:  # (the trainer's model is on the CPU, also on a GPU host: one core is one device there too)
            with intraop_threads(1 if job.world_size == 1 else None):
                summary = run_training(job, run_dir)
        except Exception as exc:  # noqa: BLE001 - a crashed run is a result to report, not a planner crash
            return MeasureRecord(config, predicted_step_s, None, "failed", f"{type(exc).__name__}: {exc}")
    ran = tuple(summary["pipeline_boundaries"]) if config.pp > 1 else None
    return MeasureRecord(config, predicted_step_s, float(summary["step_time_s"]), "measured", boundaries=ran)


def measure_many(
    candidates: list[tuple], base_job, repeats: int = 1, min_features: int | None = None
) -> list[MeasureRecord]:
    """Measure (config, predicted step) or (config, predicted step, boundaries) candidates `repeats`
    rounds, round-robin so that a machine whose load drifts slows every config alike; each record holds
    the median of its rounds. Without boundaries the trainer partitions (the first round's split is kept
    for the later rounds, so that every round runs the same pipeline)."""
    candidates = [(c[0], c[1], c[2] if len(c) > 2 else None) for c in candidates]
    runs: list[list[MeasureRecord]] = [[] for _ in candidates]
    for _ in range(max(1, repeats)):
        for i, (config, predicted_s, boundaries) in enumerate(candidates):
            if runs[i] and runs[i][-1].status != "measured":
                continue  # refused or crashed once: it will again
            if boundaries is None and runs[i]:
                boundaries = runs[i][0].boundaries
            runs[i].append(
                measure_config(
                    config, predicted_s, base_job, min_features=min_features, boundaries=boundaries
                )
            )
    records = []
    for (config, predicted_s, _), done in zip(candidates, runs):
        times = sorted(r.measured_step_s for r in done if r.measured_step_s is not None)
        if not times:
            records.append(done[-1])
            continue
        detail = (
            f"median of {len(times)} runs: {', '.join(f'{t * 1e3:.4g}' for t in times)} ms"
            if len(times) > 1
            else ""
        )
        ran = next((r.boundaries for r in done if r.boundaries is not None), None)
        records.append(
            MeasureRecord(
                config, predicted_s, statistics.median(times), "measured", detail, tuple(times), ran
            )
        )
    return records


def base_job_for(model, data, global_batch: int, steps: int):
    """A short training job for timing: `steps` steps, warmup within them, a small eval at the end."""
    from sysopt.train import JobConfig, OptimConfig, TrainConfig

    small_data = dataclasses.replace(data, n_train=max(4 * global_batch * steps, 2000), n_eval_per_task=20)
    return JobConfig(
        model=model,
        data=small_data,
        optim=OptimConfig(warmup_steps=min(OptimConfig().warmup_steps, steps)),
        train=TrainConfig(
            max_steps=steps, global_batch=global_batch, log_every=max(steps, 1), eval_batch=60, resume=False
        ),
    )


def records_to_json(records: list[MeasureRecord]) -> list[dict[str, Any]]:
    return [r.to_dict() for r in records]
