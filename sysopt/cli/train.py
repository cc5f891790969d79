"""`sysopt-train`: the Hydra app over configs/ that validates the job, then launches its ranks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


def config_dir() -> str:
    """configs/ beside the sysopt package (editable install / source tree); SYSOPT_CONFIG_DIR overrides."""
    env = os.environ.get("SYSOPT_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "configs"
    if not (path / "train.yaml").exists():
        raise SystemExit(
            f"sysopt-train: no train.yaml in {path}; set SYSOPT_CONFIG_DIR to the configs/ folder"
        )
    return str(path)


def compose_job(overrides: list[str]):
    """The JobConfig that `sysopt-train OVERRIDES` would run: configs/train.yaml composed by Hydra with the
    overrides, then validated (a ConfigError names what is wrong)."""
    from hydra import compose, initialize_config_dir

    from sysopt.train import build_job

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return build_job(OmegaConf.to_container(cfg, resolve=True))


def _run(cfg: DictConfig) -> None:
    from sysopt.train import ConfigError, build_job, run_training

    try:  # every check happens here, before any rank starts
        job = build_job(OmegaConf.to_container(cfg, resolve=True))
    except ConfigError as exc:
        print(f"sysopt-train: invalid configuration: {exc}", file=sys.stderr)
        sys.exit(2)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    print(
        f"sysopt-train: {job.model.__class__.__name__} on tp={job.parallel.tp} pp={job.parallel.pp} "
        f"dp={job.parallel.dp} ({job.world_size} ranks), {job.train.max_steps} steps -> {out_dir}"
    )
    from sysopt.dist import LaunchError, LaunchTimeout
    from sysopt.train.checkpoint import CheckpointError

    try:
        summary = run_training(job, out_dir)
    except (ConfigError, CheckpointError) as exc:
        print(f"sysopt-train: {exc}", file=sys.stderr)
        sys.exit(2)
    except LaunchTimeout as exc:  # the message names timeout_s: the job's key is train.timeout_s
        print(
            f"sysopt-train: {exc} (train.timeout_s={job.train.timeout_s} bounds the whole run; null: no bound)",
            file=sys.stderr,
        )
        sys.exit(1)
    except LaunchError as exc:  # it carries the failing rank's traceback; this process's adds nothing
        print(f"sysopt-train: {exc}", file=sys.stderr)
        sys.exit(1)
    acc = " ".join(f"{task}={value:.1%}" for task, value in summary["eval_accuracy"].items())
    print(
        f"final loss {summary['final_loss']:.4f} (last {summary['final_loss_mean_steps']} steps' mean "
        f"{summary['final_loss_mean']:.4f}"
        + (f", floor {summary['train_loss_floor']:.4f}" if summary["train_loss_floor"] > 0 else "")
        + f") | eval loss {summary['eval_loss']:.4f} | eval exact match: {acc} | "
        f"{summary['tokens_per_s']:.0f} tokens/s, {summary['step_time_s'] * 1e3:.1f} ms/step"
    )
    print(json.dumps({"summary": str(out_dir / "summary.json")}))


def main() -> None:
    hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")(_run)()


if __name__ == "__main__":
    main()
