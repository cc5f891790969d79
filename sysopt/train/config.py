"""The training job as frozen dataclasses, built from a Hydra config and checked before any rank starts.

Every check names the offending key, its value, the constraint and a fix, so a bad command line fails in
the launching process within a second rather than inside N ranks.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from sysopt.data import DigitsTaskConfig
from sysopt.dist import Topology
from sysopt.models import VLMConfig

DATASETS = ("digits",)  # embedded datasets the trainer can build by name


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key to change and how."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_lr_ratio * lr."""

    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 600
    global_batch: int = 64
    log_every: int = 10
    eval_batch: int = 500
    seed: int = 0
    checkpoint_every: int = 0  # 0: only the final checkpoint
    resume: bool = True  # continue from <run dir>/checkpoints/latest when it exists
    timeout_s: float = 1800.0  # the whole launch; a hung rank fails the run after this
    nproc: int | None = None  # ranks to launch; None means parallel.tp * pp * dp


@dataclass(frozen=True)
class JobConfig:
    model: VLMConfig = field(default_factory=VLMConfig)
    data: DigitsTaskConfig = field(default_factory=DigitsTaskConfig)
    data_name: str = "digits"
    parallel: Topology = field(default_factory=Topology)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    def to_dict(self) -> dict[str, Any]:
        """The nested dict `build_job` reads back (the dataset name lives at data.name, as in YAML)."""
        d = dataclasses.asdict(self)
        d["data"]["name"] = d.pop("data_name")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobConfig:
        return build_job(d)

    @classmethod
    def from_json(cls, text: str) -> JobConfig:
        return build_job(json.loads(text))


def _section(cls: type, name: str, values: dict[str, Any] | None) -> Any:
    """cls(**values) with unknown keys and bad values reported as `name.key`."""
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"{name}.{unknown[0]} is not an option of {name} (known: {', '.join(sorted(known))}); "
            f"remove it or fix its spelling"
        )
    for key, value in list(values.items()):
        if isinstance(value, list):  # JSON/YAML lists -> the tuples the frozen dataclasses hold
            values[key] = tuple(value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from exc


def build_job(d: dict[str, Any]) -> JobConfig:
    """A validated JobConfig from a plain nested dict (a resolved Hydra config or JSON)."""
    known = {"model", "data", "parallel", "optim", "train"}
    unknown = sorted(set(d) - known - {"hydra"})
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a config section (known: {', '.join(sorted(known))})")
    data = dict(d.get("data") or {})
    data_name = data.pop("name", "digits")
    if data_name not in DATASETS:
        raise ConfigError(
            f"data.name={data_name!r} is not an embedded dataset (available: {', '.join(DATASETS)}); "
            f"use data=digits"
        )
    job = JobConfig(
        model=_section(VLMConfig, "model", d.get("model")),
        data=_section(DigitsTaskConfig, "data", data),
        data_name=data_name,
        parallel=_section(Topology, "parallel", d.get("parallel")),
        optim=_section(OptimConfig, "optim", d.get("optim")),
        train=_section(TrainConfig, "train", d.get("train")),
    )
    validate(job)
    return job


def validate(job: JobConfig) -> None:
    """Cross-section checks: everything that would otherwise fail inside the ranks."""
    m, p, t, o = job.model, job.parallel, job.train, job.optim
    if t.nproc is not None and t.nproc != p.world_size:
        raise ConfigError(
            f"train.nproc={t.nproc} but parallel.tp*pp*dp = {p.tp}*{p.pp}*{p.dp} = {p.world_size}; "
            f"set parallel.dp={max(1, t.nproc // (p.tp * p.pp))} or train.nproc={p.world_size}"
        )
    for key, heads in (("model.heads", m.heads), ("model.vision_heads", m.vision_heads)):
        if heads % p.tp:
            raise ConfigError(
                f"{key}={heads} is not divisible by parallel.tp={p.tp}; attention heads are split "
                f"across tensor-parallel ranks: use a tp that divides {heads}"
            )
    if p.tp > 1 or p.pp > 1:
        raise ConfigError(
            f"parallel.tp={p.tp} parallel.pp={p.pp}: the trainer runs data parallelism only so far "
            f"(tensor and pipeline parallel training land with issue 7); use parallel.tp=1 parallel.pp=1"
        )
    if t.global_batch % p.dp:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by parallel.dp={p.dp}; "
            f"use a multiple of {p.dp}, e.g. {p.dp * max(1, round(t.global_batch / p.dp))}"
        )
    if job.data.tokens_per_image != m.tokens_per_image:
        raise ConfigError(
            f"data.tokens_per_image={job.data.tokens_per_image} differs from "
            f"model.tokens_per_image={m.tokens_per_image}; set both to the same value"
        )
    if job.data.seq_len > m.max_seq:
        raise ConfigError(
            f"sequences are {job.data.seq_len} tokens but model.max_seq={m.max_seq}; "
            f"raise model.max_seq to {job.data.seq_len} or shorten data.max_relation_images"
        )
    if t.max_steps < 1:
        raise ConfigError(f"train.max_steps={t.max_steps} must be >= 1")
    if not 0 <= o.warmup_steps <= t.max_steps:
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} must lie in [0, train.max_steps={t.max_steps}]"
        )
    if o.lr <= 0 or not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.lr={o.lr} must be > 0 and optim.min_lr_ratio={o.min_lr_ratio} in [0, 1]")
