"""Trainer loop, checkpoints and metrics for the VLM."""

from sysopt.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from sysopt.train.config import ConfigError, JobConfig, OptimConfig, TrainConfig, build_job, validate
from sysopt.train.loop import evaluate_checkpoint, run_training, train_rank
from sysopt.train.lr import warmup_cosine_lr
from sysopt.train.metrics import read_metrics

__all__ = [
    "CheckpointError",
    "ConfigError",
    "JobConfig",
    "OptimConfig",
    "TrainConfig",
    "build_job",
    "evaluate_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "read_metrics",
    "run_training",
    "save_checkpoint",
    "train_rank",
    "validate",
    "warmup_cosine_lr",
]
