"""The training job as frozen dataclasses, built from a Hydra config and checked before any rank starts.

Every check names the offending key, its value, the constraint and a fix, so a bad command line fails in
the launching process within a second rather than inside N ranks.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sysopt.data import DigitsTaskConfig
from sysopt.data.digits import IMAGE_SIZE
from sysopt.dist import Topology
from sysopt.models import VLMConfig
from sysopt.models.parallel import block_count

if TYPE_CHECKING:
    from sysopt.precision.recipe import Recipe

DATASETS = ("digits",)  # embedded datasets the trainer can build by name
TP_OVERLAPS = ("none", "chunked", "auto")
OFFLOAD_STRATEGIES = ("none", "device", "host", "fraction", "interleaved")
EXTRA_SCHEDULES = ("megatron_interleaved",)  # run by megatron-core itself, not a sysopt builder


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
    grad_clip: float = (
        1.0  # the largest global gradient norm; 0 turns clipping off (the norm is still logged)
    )


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 600
    global_batch: int = 64
    log_every: int = 10
    eval_batch: int = 500
    # the trainer's own randomness: torch's global RNG on every rank and the stochastic rounding of
    # offload.state_dtype=bf16 (model.seed draws the initial weights, data.seed the data and its order)
    seed: int = 0
    checkpoint_every: int = 0  # 0: only the final checkpoint
    # continue from <run dir>/checkpoints/latest when it exists; false starts over, first moving an earlier
    # run's outputs in the run dir to <run dir>/replaced_runs/<n>/
    resume: bool = True
    # a wall-clock limit on a multi-rank run (None: none); hangs are caught per collective, below
    timeout_s: float | None = None
    # the longest any collective waits (the process groups' timeout, megatron-core's included): a rank left
    # waiting by a peer that died, hung or skipped the collective fails the run after this, naming the op
    collective_timeout_s: float = 600.0
    nproc: int | None = None  # ranks to launch; None means parallel.tp * pp * dp


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel sizes plus the tensor-parallel knobs; `topology` is the rank grid they define."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int = 1
    sequence_parallel: bool = True  # with tp > 1: norms and residuals on sequence shards
    tp_overlap: str = "none"  # none | chunked | auto (sysopt.tensor_parallel overlap policy)
    tp_chunks: int | None = None  # chunk count for tp_overlap=chunked (None: the policy's default)
    # the pipeline split: pp*vpp+1 block indices from 0 to the block count (chunk c holds blocks
    # boundaries[c]..boundaries[c+1]-1), e.g. what sysopt-plan chose; None: the cost-based partitioner
    boundaries: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        Topology(tp=self.tp, pp=self.pp, dp=self.dp, vpp=self.vpp)  # validates the sizes
        if self.tp_overlap not in TP_OVERLAPS:
            raise ValueError(
                f"parallel.tp_overlap={self.tp_overlap!r} must be one of {', '.join(TP_OVERLAPS)}"
            )
        if self.tp_chunks is not None and self.tp_chunks < 1:
            raise ValueError(f"parallel.tp_chunks={self.tp_chunks} must be >= 1 (or null for the default)")

    @property
    def topology(self) -> Topology:
        return Topology(tp=self.tp, pp=self.pp, dp=self.dp, vpp=self.vpp)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class ScheduleConfig:
    """Pipeline schedule (sysopt.schedules.build name, or megatron_interleaved) and microbatches per
    data-parallel rank and step; with pp = 1 the microbatches are gradient-accumulation steps."""

    name: str = "1f1b"
    microbatches: int | None = None  # None: 1 when pp == 1, else 2 * pp
    # sysopt schedules post each receive this many compute actions before its consumer; None posts every
    # receive of the step at its start (all receive buffers alive from the start: one boundary activation
    # or gradient per receive). gloo stalls the poster of a receive while a transfer with the same peer is
    # in flight, so on CPU the whole-step window is 15-22% faster per step than one ahead (pp=2, issue #3).
    receive_ahead: int | None = None

    def __post_init__(self) -> None:
        if self.receive_ahead is not None and (
            isinstance(self.receive_ahead, bool) or self.receive_ahead < 1
        ):
            raise ValueError(
                f"schedule.receive_ahead={self.receive_ahead!r} must be an integer >= 1 (compute actions "
                f"ahead) or null (every receive at the start of the step)"
            )

    def resolved_microbatches(self, pp: int) -> int:
        return self.microbatches if self.microbatches is not None else (1 if pp == 1 else 2 * pp)


@dataclass(frozen=True)
class PrecisionConfig:
    recipe: str | None = None  # a sysopt.precision recipe name, "auto", or None for fp32
    min_features: int | None = None  # linears narrower than this stay high precision (None: library default)
    # Recipe fields replacing the named recipe's, e.g. {grad_weight: bf16} for fp8_rowwise with a 16-bit
    # grad-weight GEMM (Hydra: `+precision.recipe_overrides.grad_weight=bf16`)
    recipe_overrides: dict[str, Any] | None = None

    def resolved_recipe(self) -> Recipe | str | None:
        """What convert() gets: None (fp32), 'auto', or the named Recipe with recipe_overrides applied
        (renamed e.g. 'fp8_rowwise[grad_weight=bf16]'). Raises ValueError naming a bad override."""
        if not self.recipe_overrides:
            return self.recipe
        if self.recipe is None or self.recipe == "auto":
            raise ValueError(
                f"precision.recipe_overrides={self.recipe_overrides!r} changes a named recipe, but "
                f"precision.recipe={self.recipe!r}; set precision.recipe to the recipe to start from "
                f"(e.g. precision=fp8_rowwise) or drop the overrides"
            )
        from sysopt.precision.recipe import Recipe, recipe

        known = {f.name for f in dataclasses.fields(Recipe)} - {"name"}
        unknown = sorted(set(self.recipe_overrides) - known)
        if unknown:
            raise ValueError(
                f"precision.recipe_overrides.{unknown[0]} is not a Recipe field (known: {', '.join(sorted(known))})"
            )
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in self.recipe_overrides.items()}
        label = ",".join(f"{k}={_short(v)}" for k, v in sorted(values.items()))
        return dataclasses.replace(recipe(self.recipe), name=f"{self.recipe}[{label}]", **values)


def _short(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "/".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class OffloadConfig:
    strategy: str = "none"  # none (torch AdamW) | device | host | fraction | interleaved (OffloadAdamW)
    device_budget_bytes: int | None = None
    fraction: float = 0.5  # share of subgroups kept on the device for strategy=fraction
    state_dtype: str = "fp32"  # fp32 | bf16: host moments in bf16 with stochastic rounding (fp32 masters)
    master_dtype: str = (
        "fp32"  # fp32 | bf16: host masters in bf16 with stochastic rounding (state_dtype=bf16)
    )


@dataclass(frozen=True)
class JobConfig:
    model: VLMConfig = field(default_factory=VLMConfig)
    data: DigitsTaskConfig = field(default_factory=DigitsTaskConfig)
    data_name: str = "digits"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)

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
    known = {"model", "data", "parallel", "optim", "train", "schedule", "precision", "offload"}
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
        parallel=_section(ParallelConfig, "parallel", d.get("parallel")),
        optim=_section(OptimConfig, "optim", d.get("optim")),
        train=_section(TrainConfig, "train", d.get("train")),
        schedule=_section(ScheduleConfig, "schedule", d.get("schedule")),
        precision=_section(PrecisionConfig, "precision", d.get("precision")),
        offload=_section(OffloadConfig, "offload", d.get("offload")),
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
    widths = (
        ("model.heads", m.heads, "model.dim", m.dim),
        ("model.vision_heads", m.vision_heads, "model.vision_dim", m.vision_dim),
    )
    for heads_key, heads, dim_key, width in widths:
        if heads < 1 or width % heads:
            raise ConfigError(
                f"{heads_key}={heads} must divide {dim_key}={width} (each head gets an equal share of the "
                f"features); use a divisor of {width}, e.g. {heads_key}=4"
            )
    for key, value, least in (("model.layers", m.layers, 1), ("model.vision_layers", m.vision_layers, 0),
                              ("model.mlp_ratio", m.mlp_ratio, 1), ("model.dim", m.dim, 1)):  # fmt: skip
        if value < least:
            raise ConfigError(
                f"{key}={value} must be >= {least} (a VLM with {key}={value} has nothing to train)"
            )
    if m.image_size % m.patch_size:
        raise ConfigError(
            f"model.patch_size={m.patch_size} does not divide model.image_size={m.image_size}; use 2 or 4"
        )
    for key, heads in (("model.heads", m.heads), ("model.vision_heads", m.vision_heads)):
        if heads % p.tp:
            raise ConfigError(
                f"{key}={heads} is not divisible by parallel.tp={p.tp}; attention heads are split "
                f"across tensor-parallel ranks: use a tp that divides {heads}"
            )
    _validate_ranges(job)
    if t.global_batch > job.data.n_train:
        raise ConfigError(
            f"train.global_batch={t.global_batch} exceeds data.n_train={job.data.n_train}: a step draws that "
            f"many training sequences without repeats; lower train.global_batch or raise data.n_train"
        )
    microbatches = job.schedule.resolved_microbatches(p.pp)
    per_step = p.dp * microbatches
    if t.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by parallel.dp * schedule.microbatches "
            f"= {p.dp}*{microbatches}; use a multiple of {per_step}, e.g. "
            f"{per_step * max(1, round(t.global_batch / per_step))}"
        )
    _validate_parallel_training(job, microbatches)
    if m.image_size != IMAGE_SIZE:
        raise ConfigError(
            f"model.image_size={m.image_size} but the digit images are {IMAGE_SIZE}x{IMAGE_SIZE}; set "
            f"model.image_size={IMAGE_SIZE} (and a model.patch_size that divides it, e.g. 4)"
        )
    if job.data.tokens_per_image != m.tokens_per_image:
        raise ConfigError(
            f"data.tokens_per_image={job.data.tokens_per_image} differs from "
            f"model.tokens_per_image={m.tokens_per_image}; set both to the same value"
        )
    if job.data.row_len > m.max_seq:
        raise ConfigError(
            f"training rows are {job.data.row_len} tokens (data.pack_len={job.data.pack_len}, longest sample "
            f"{job.data.seq_len}) but model.max_seq={m.max_seq}; raise model.max_seq to {job.data.row_len}, "
            "lower data.pack_len or shorten data.max_relation_images"
        )
    if t.max_steps < 1:
        raise ConfigError(f"train.max_steps={t.max_steps} must be >= 1")
    if not 0 <= o.warmup_steps <= t.max_steps:
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} must lie in [0, train.max_steps={t.max_steps}]; for a short "
            f"run set e.g. optim.warmup_steps={max(0, t.max_steps // 10)}"
        )
    if o.lr <= 0 or not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.lr={o.lr} must be > 0 and optim.min_lr_ratio={o.min_lr_ratio} in [0, 1]")


def _validate_ranges(job: JobConfig) -> None:
    """Single values outside their range: each would otherwise divide by zero, loop forever or train on
    nothing inside the ranks."""
    t, o, mb, off = job.train, job.optim, job.schedule.microbatches, job.offload
    checks = (
        (
            "schedule.microbatches",
            mb,
            mb is None or (isinstance(mb, int) and mb >= 1),
            "must be an integer >= 1 (microbatches per data-parallel rank and step) or null for the "
            "default (1 when pp=1, else 2*pp); use e.g. schedule.microbatches=1",
        ),
        (
            "train.global_batch",
            t.global_batch,
            t.global_batch >= 1,
            "must be >= 1 rows per step; use e.g. 64",
        ),
        (
            "train.log_every",
            t.log_every,
            t.log_every >= 1,
            "must be >= 1 (a metrics line every N steps); use 1",
        ),
        ("train.eval_batch", t.eval_batch, t.eval_batch >= 1, "must be >= 1 held-out samples; use e.g. 500"),
        (
            "train.checkpoint_every",
            t.checkpoint_every,
            t.checkpoint_every >= 0,
            "must be >= 0 (a checkpoint every N steps); use 0 for only the final checkpoint",
        ),
        (
            "train.timeout_s",
            t.timeout_s,
            t.timeout_s is None or t.timeout_s > 0,
            "must be > 0 seconds, or null for no limit on the run's wall time",
        ),
        (
            "train.collective_timeout_s",
            t.collective_timeout_s,
            isinstance(t.collective_timeout_s, (int, float)) and t.collective_timeout_s > 0,
            "must be > 0 seconds (the longest any collective waits; it cannot be null: a hang would then "
            "never end); use e.g. 600",
        ),
        (
            "optim.grad_clip",
            o.grad_clip,
            o.grad_clip >= 0,
            "must be >= 0 (the largest global gradient norm); use 0 to turn clipping off",
        ),
        ("optim.eps", o.eps, o.eps >= 0, "must be >= 0; use e.g. 1e-8"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, "must be >= 0; use 0 for no decay"),
        (
            "optim.betas",
            list(o.betas),
            len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
            "must be two numbers in [0, 1); use e.g. [0.9, 0.95]",
        ),
        (
            "offload.fraction",
            off.fraction,
            0 <= off.fraction <= 1,
            "must lie in [0, 1] (the share of optimizer subgroups kept on the device); use e.g. 0.5",
        ),
    )
    for key, value, ok, constraint in checks:
        if not ok:
            raise ConfigError(f"{key}={value} {constraint}")


def _validate_parallel_training(job: JobConfig, microbatches: int) -> None:
    """Schedule, tensor-parallel, precision and offload settings."""
    p, sched = job.parallel, job.schedule
    rows = job.data.row_len
    padded = rows + (-rows % p.tp if p.tp > 1 and p.sequence_parallel else 0)
    if rows <= job.model.max_seq < padded:  # sequence parallelism pads sequences to a multiple of tp
        raise ConfigError(
            f"sequences padded for sequence parallelism are {padded} tokens but model.max_seq="
            f"{job.model.max_seq}; raise model.max_seq to {padded} or set parallel.sequence_parallel=false"
        )
    # embed, merge and head are blocks too, and so are the sequence scatter/gather of tp > 1 with SP
    n_blocks = block_count(job.model, tp=p.tp, sequence_parallel=p.sequence_parallel)
    sp_blocks = n_blocks - block_count(job.model)
    counted = f"{n_blocks} blocks" + (
        f" ({sp_blocks} of them sequence-parallel scatter/gather)" if sp_blocks else ""
    )
    if p.pp * p.vpp > n_blocks:
        raise ConfigError(
            f"parallel.pp*vpp = {p.pp}*{p.vpp} = {p.pp * p.vpp} pipeline chunks but the model has only "
            f"{counted}; lower parallel.pp or parallel.vpp, or add model.layers"
        )
    if p.boundaries is not None:
        b, chunks = list(p.boundaries), p.pp * p.vpp
        even = [round(i * n_blocks / chunks) for i in range(chunks + 1)]
        if (
            len(b) != chunks + 1
            or b[0] != 0
            or b[-1] != n_blocks
            or any(not isinstance(x, int) or y <= x for x, y in zip(b, b[1:]))
        ):
            raise ConfigError(
                f"parallel.boundaries={b} must cut the model's {counted} into pp*vpp={chunks} chunks: "
                f"{chunks + 1} increasing integers from 0 to {n_blocks}, e.g. {even}, or null to partition by cost"
            )
    if p.pp > 1:
        if sched.name in EXTRA_SCHEDULES:
            if sched.name == "megatron_interleaved" and microbatches % p.pp:
                raise ConfigError(
                    f"schedule.microbatches={microbatches} must be a multiple of parallel.pp={p.pp} for "
                    f"megatron-core's interleaved schedule; use {p.pp * max(1, microbatches // p.pp)}"
                )
        else:
            from sysopt.schedules import BUILDERS, build

            if sched.name not in BUILDERS:
                raise ConfigError(
                    f"schedule.name={sched.name!r} is not a schedule (available: "
                    f"{', '.join(sorted(BUILDERS) + list(EXTRA_SCHEDULES))})"
                )
            try:
                build(sched.name, p.pp, p.vpp, microbatches)
            except ValueError as exc:
                raise ConfigError(
                    f"schedule={sched.name} with parallel.pp={p.pp} vpp={p.vpp} "
                    f"microbatches={microbatches}: {exc}"
                ) from exc
    if job.offload.strategy not in OFFLOAD_STRATEGIES:
        raise ConfigError(
            f"offload.strategy={job.offload.strategy!r} must be one of {', '.join(OFFLOAD_STRATEGIES)}"
        )
    if job.offload.state_dtype not in ("fp32", "bf16"):
        raise ConfigError(f"offload.state_dtype={job.offload.state_dtype!r} must be fp32 or bf16")
    if job.offload.master_dtype not in ("fp32", "bf16"):
        raise ConfigError(f"offload.master_dtype={job.offload.master_dtype!r} must be fp32 or bf16")
    if job.offload.master_dtype == "bf16" and job.offload.state_dtype != "bf16":
        raise ConfigError(
            "offload.master_dtype=bf16 needs bf16 moments: add offload.state_dtype=bf16 (the host kernel rounds "
            "a bf16 master and its moments together)"
        )
    if job.offload.state_dtype == "bf16" and job.offload.strategy == "none":
        raise ConfigError(
            "offload.state_dtype=bf16 needs sysopt's OffloadAdamW: set offload=host (or fraction, interleaved)"
        )
    recipe = job.precision.recipe
    if recipe is not None and recipe != "auto":
        from sysopt.precision import recipe as lookup

        try:
            lookup(recipe)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"precision.recipe={recipe!r}: {exc}") from exc
    try:
        job.precision.resolved_recipe()
    except (TypeError, ValueError) as exc:
        message = str(exc)  # messages about the config name their key; the Recipe's own get it prefixed
        prefix = "" if message.startswith("precision.") else "precision.recipe_overrides: "
        raise ConfigError(prefix + message) from exc
