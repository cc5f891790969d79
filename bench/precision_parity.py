"""Precision training parity: the default training job (`sysopt-train`: the VLM, 1,500 steps, dp=2) run in fp32,
with each of the issue's named recipes, and with a null control, for SEEDS seeds; every run is compared with
the fp32 run of the same seed.

Why this job and these comparisons:
- The job is the default one with `data.label_noise=0.1`: a tenth of the training answers are drawn at random,
  so the training loss has a known floor above zero (`DigitsDataset.label_noise_floor()`, ~0.45 nats) and the
  final loss can be compared. On the noiseless job it falls to ~0, where a relative difference is noise.
  Eval answers stay clean.
- A seed sets the initial weights, the data and its order, and the trainer's RNG (`model.seed data.seed
  train.seed`). A run is paired with fp32 of the same seed, so the difference is the recipe's, not the seed's.
- Any perturbation, however small, sends a run down another trajectory within some hundred steps. The null
  control (`null_lr_x1.0001`: fp32 with the learning rate 1.0001x) measures how far that alone moves the
  paired figures; its rows are informative.

Goals per recipe, on the mean over seeds of the paired differences: |final loss / fp32's - 1| <= 0.02
(final loss: the trainer's mean training loss over the last 10% of steps) and |eval exact match - fp32's|
<= 1 point (the mean over the three tasks of the held-out split).

The runs go to ~/.cache/sysopt/precision_parity/<commit>_<host>_torch<version>/<variant>@seed<k>
(SYSOPT_PARITY_DIR overrides the parent). A run finished there for the same job is reused (its figures, step
time included, are those of its first launch), so a suite interrupted at a clean commit starts again at the run
it was in; that run starts over, as the job checkpoints only at its end. A dirty tree runs everything in a
fresh temporary directory, deleted afterwards. Quick mode trains
QUICK_STEPS steps of one seed: too few to learn the tasks, so its figures check the plumbing only.
`bench/_full_job_parity.py` summarises the runs (JSON + loss curves); it also summarises runs started by
hand, with more variants.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from sysopt.benchmark import BenchContext, Record, SuiteResult, git_commit, goal, register_suite
from sysopt.cli.train import compose_job
from sysopt.train import JobConfig, run_training

SEEDS, QUICK_SEEDS = 4, 1
QUICK_STEPS = 20
LABEL_NOISE = 0.1
# the five named recipes (sysopt's int8_rowwise_full, int8 in all three GEMMs, is left out for time)
RECIPES = ("fp8_tensorwise_delayed", "fp8_rowwise", "fp8_blockwise", "int8_rowwise", "int8_tensorwise")
NULL = "null_lr_x1.0001"
LR_FACTOR = 1.0001
LOSS_TARGET, ACC_TARGET = "<= 0.02", "<= 1.0"
# beside precision_parity.json, not in bench/results itself: every JSON there is read as a suite's result
SUMMARY_JSON, LOSS_PNG = "precision_parity/runs.json", "precision_parity_loss.png"


def variants(base: JobConfig) -> dict[str, list[str]]:
    """Each variant's overrides beyond the seed's: fp32 (the reference), the recipes, the null control."""
    return {
        "fp32": [],
        **{name: [f"precision={name}"] for name in RECIPES},
        NULL: [f"optim.lr={base.optim.lr * LR_FACTOR!r}"],
    }


def job_overrides(variant_overrides: list[str], seed: int, quick: bool) -> list[str]:
    """`sysopt-train` overrides of one run: the label-noise job, the seed, the variant (quick: few steps)."""
    out = [f"data.label_noise={LABEL_NOISE}", f"model.seed={seed}", f"data.seed={seed}", f"train.seed={seed}"]
    if quick:
        out += [f"train.max_steps={QUICK_STEPS}", "train.log_every=5", "optim.warmup_steps=2"]
    return out + variant_overrides


def same_job(run_dir: Path, job: JobConfig) -> bool:
    """Whether run_dir's job.json is `job`."""
    try:
        return JobConfig.from_json((run_dir / "job.json").read_text()) == job
    except (OSError, ValueError, KeyError, TypeError):
        return False


def finished(run_dir: Path, job: JobConfig) -> bool:
    """Whether run_dir holds this job, trained to its last step (summary.json is written after the final eval)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        same_job(run_dir, job) and summary.get("steps") == job.train.max_steps and "eval_accuracy" in summary
    )


def _runs_root(quick: bool) -> tuple[Path, bool]:
    """Where the runs go, and whether that directory is a temporary one to delete afterwards."""
    commit = git_commit()
    if quick or commit is None or commit.endswith("-dirty"):
        return Path(tempfile.mkdtemp(prefix="sysopt_parity_")), True
    parent = Path(os.environ.get("SYSOPT_PARITY_DIR", Path.home() / ".cache" / "sysopt" / "precision_parity"))
    return parent / f"{commit}_{socket.gethostname()}_torch{torch.__version__}", False


def _summariser():
    """bench/_full_job_parity.py, loaded from its file (bench/ is not a package)."""
    name = "sysopt_bench_suites._full_job_parity"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_full_job_parity.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def records_and_goals(summary: dict, config: dict) -> tuple[list[Record], list]:
    """Records of every run and of each variant's paired differences over seeds; the goals on the latter.

    `summary` is what bench/_full_job_parity.py writes: per run its figures and its differences from fp32 of
    the same seed (`vs_fp32`), per variant those differences for every seed."""
    records = []
    for key, run in summary["runs"].items():
        variant, _, seed = key.partition("@seed")
        prefix = f"parity/{variant}/seed{seed or 0}"
        cfg = {**config, "steps": run["steps"], "label_noise": run["label_noise"]}
        acc = run["mean_eval_accuracy"]
        records += [
            Record(f"{prefix}/final_loss", run["final_loss_mean"], "loss", 1, run["final_loss_mean"],
                   run["final_loss_mean"], {**cfg, "train_loss_floor": run["train_loss_floor"]}),
            Record(f"{prefix}/eval_exact_match", acc, "accuracy", 1, acc, acc, cfg),
            Record(f"{prefix}/step_time_s", run["step_time_s"], "s", 1, run["step_time_s"], run["step_time_s"], cfg),
        ]  # fmt: skip
    goals = []
    for variant, v in summary["variants"].items():
        if variant == "fp32":
            continue
        unpaired = [
            s
            for s in v["per_seed"]
            if summary["runs"][f"{variant}@seed{s}"]["paired_with"] != f"fp32 seed {s}"
        ]
        if unpaired:
            raise ValueError(f"{variant}: seeds {unpaired} have no fp32 run of the same seed to pair with")
        seeds = sorted(v["per_seed"], key=int)
        label = variant if variant != NULL else f"control {NULL} (noise floor, informative)"
        for field, name, unit, target in (
            ("final_loss_mean_rel", "final_loss_vs_fp32", "rel", LOSS_TARGET),
            ("eval_accuracy_points", "eval_exact_match_vs_fp32", "points", ACC_TARGET),
        ):
            values = [v["per_seed"][s][field] for s in seeds]
            mean = statistics.fmean(values)
            rec = Record(f"parity/{variant}/{name}", mean, unit, len(values), min(values), max(values),
                         {**config, "seeds": [int(s) for s in seeds], "per_seed": values})  # fmt: skip
            records.append(rec)
            what = "final loss / fp32 - 1" if unit == "rel" else "eval exact match - fp32, points"
            goals.append(goal(f"{label}: |{what}|, mean of {len(values)} paired seeds", abs(mean), target,
                              [rec.name]))  # fmt: skip
    return records, goals


@register_suite("precision_parity")
def run(ctx: BenchContext) -> SuiteResult:
    seeds = range(QUICK_SEEDS if ctx.quick else SEEDS)
    base = compose_job([])
    root, temporary = _runs_root(ctx.quick)
    plan = [(name, seed, over) for seed in seeds for name, over in variants(base).items()]
    load = []
    try:
        for name, seed, over in ctx.track(plan, "precision parity: training runs"):
            job = compose_job(job_overrides(over, seed, ctx.quick))
            run_dir = root / f"{name}@seed{seed}"
            if finished(run_dir, job):
                continue
            if run_dir.exists() and not same_job(run_dir, job):
                shutil.rmtree(run_dir)  # another job's run (this suite's cache): start over
            load.append(os.getloadavg()[0])
            run_training(
                job, run_dir
            )  # an interrupted run of this job starts over (no checkpoint before its end)
        summariser = _summariser()
        summary = summariser.summarise(root)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        summariser.plot(summary, ctx.out_dir / LOSS_PNG)
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    summary.pop("curves")
    (ctx.out_dir / SUMMARY_JSON).parent.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    config = {"loadavg_1min_before_runs": load, "runs_dir": str(root) if not temporary else None}
    records, goals = records_and_goals(summary, config)
    return ctx.result("precision_parity", records, goals)
