"""The configuration space: one PlanConfig per way of running a training step (tp, pp, vpp, dp, schedule,
microbatches, TP overlap, offload, precision), the rules a valid one obeys, and their enumeration."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any

from sysopt.models import VLMConfig
from sysopt.offload.placement import STRATEGIES as OFFLOAD_STRATEGIES
from sysopt.planner.workload import sequence_parallel_row_len
from sysopt.precision.recipe import RECIPES
from sysopt.schedules import BUILDERS, build

TP_OVERLAPS = ("none", "chunked")


@dataclass(frozen=True)
class PlanConfig:
    """One way to run a step on tp*pp*dp devices: the global batch is dp x microbatches x micro_batch_size
    sequences; `tp_chunks` is the chunk count of 'chunked' TP overlap (1 with 'none')."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    dp: int = 1
    schedule: str = "1f1b"
    microbatches: int = 1
    micro_batch_size: int = 1
    tp_overlap: str = "none"
    tp_chunks: int = 1
    offload: str = "device"
    precision: str | None = None

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def global_batch(self) -> int:
        return self.dp * self.microbatches * self.micro_batch_size

    def to_overrides(
        self,
        min_features: int | None = None,
        boundaries: tuple[int, ...] | None = None,
        device_budget_bytes: int | None = None,
    ) -> list[str]:
        """Hydra overrides for sysopt-train that run this configuration; `min_features` (with a
        precision recipe) is the narrowest linear converted, as the planner modelled it; `boundaries`
        (with pp > 1) the pipeline split to run, e.g. the one the planner predicted; `device_budget_bytes`
        (with offload=interleaved) the optimizer-state budget its plan assumed. Without it OffloadAdamW
        plans against all free device memory, measured before any activation exists."""
        out = [
            f"parallel.tp={self.tp}",
            f"parallel.pp={self.pp}",
            f"parallel.vpp={self.vpp}",
            f"parallel.dp={self.dp}",
            f"parallel.tp_overlap={self.tp_overlap}",
            f"parallel.tp_chunks={self.tp_chunks}",
            f"schedule.name={self.schedule}",
            f"schedule.microbatches={self.microbatches}",
            # the planner's "device" (no offload) is the trainer's "none": torch's fused AdamW, the update the
            # profile's device optimizer rate was measured with (not OffloadAdamW(strategy="device"))
            f"offload.strategy={'none' if self.offload == 'device' else self.offload}",
            f"precision.recipe={'null' if self.precision is None else self.precision}",
            f"train.global_batch={self.global_batch}",
        ]
        if self.precision is not None and min_features is not None:
            out.append(f"precision.min_features={min_features}")
        if boundaries is not None and self.pp > 1:
            out.append(f"parallel.boundaries=[{','.join(str(int(x)) for x in boundaries)}]")
        if device_budget_bytes is not None and self.offload == "interleaved":
            out.append(f"offload.device_budget_bytes={int(device_budget_bytes)}")
        return out

    def label(self) -> str:
        """Short one-line name, e.g. 'tp2 pp2 vpp1 dp2 1f1b m8x4 ovl:none off:device prec:fp32'."""
        overlap = f"chunked{self.tp_chunks}" if self.tp_overlap == "chunked" else "none"
        return (
            f"tp{self.tp} pp{self.pp} vpp{self.vpp} dp{self.dp} {self.schedule} "
            f"m{self.microbatches}x{self.micro_batch_size} ovl:{overlap} off:{self.offload} "
            f"prec:{self.precision or 'high'}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"PlanConfig has no field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


@lru_cache(maxsize=4096)
def schedule_error(name: str, pp: int, vpp: int, microbatches: int) -> str | None:
    """The schedule builder's own complaint about (pp, vpp, microbatches), or None when it builds."""
    try:
        build(name, pp, vpp, microbatches)
    except ValueError as exc:
        return str(exc)
    return None


def num_blocks(model: VLMConfig, tp: int = 1) -> int:
    """Blocks the trainer's pipeline cuts at `tp`: embed, ViT blocks, merge, decoder blocks, head, plus the
    sequence-parallel scatter and gather blocks at tp > 1 (sysopt.models.parallel.block_count's rule)."""
    return model.vision_layers + model.layers + 3 + (2 if tp > 1 else 0)


def row_length_error(model: VLMConfig, row_len: int, tp: int) -> str | None:
    """The trainer's complaint when rows of `row_len` tokens, padded to a multiple of tp for sequence
    parallelism at tp > 1 (sysopt.train.parallel.pad_sequence), do not fit model.max_seq; else None."""
    padded = sequence_parallel_row_len(row_len, tp)
    if padded <= model.max_seq:
        return None
    if padded == row_len:
        return f"training rows of {row_len} tokens exceed model.max_seq={model.max_seq}; raise model.max_seq to {row_len}"
    return (
        f"training rows of {row_len} tokens are padded to {padded} (a multiple of tp={tp}) for sequence "
        f"parallelism, more than model.max_seq={model.max_seq}; raise model.max_seq to {padded} or use a tp "
        f"dividing {row_len}"
    )


def violations(
    config: PlanConfig, model: VLMConfig, devices: int, global_batch: int, row_len: int | None = None
) -> list[str]:
    """Every rule `config` breaks, each naming the value, the constraint and a fix ([] when valid).
    `row_len`: tokens per training row (data.row_len); with it, rows padded for sequence parallelism must
    fit model.max_seq."""
    c, out = config, []
    for name in ("tp", "pp", "vpp", "dp", "microbatches", "micro_batch_size", "tp_chunks"):
        if getattr(c, name) < 1:
            out.append(f"{name}={getattr(c, name)} must be >= 1")
    if out:
        return out
    if c.world_size != devices:
        model_parallel = c.tp * c.pp
        fix = (
            f"change dp to {devices // model_parallel} or the parallel sizes"
            if devices % model_parallel == 0
            else f"no dp fits, since {devices} is not a multiple of tp*pp = {model_parallel}; change tp or pp"
        )
        out.append(
            f"tp*pp*dp = {c.tp}*{c.pp}*{c.dp} = {c.world_size} must equal the {devices} devices; {fix}"
        )
    if c.global_batch != global_batch:
        per_rank, rest = divmod(global_batch, c.dp * c.microbatches)
        fix = (
            f"use micro_batch_size={per_rank}"
            if rest == 0 and per_rank >= 1
            else f"choose dp*microbatches dividing {global_batch}"
        )
        out.append(
            f"dp*microbatches*micro_batch_size = {c.dp}*{c.microbatches}*{c.micro_batch_size} = "
            f"{c.global_batch} must equal the global batch {global_batch}; {fix}"
        )
    for key, heads in (("heads", model.heads), ("vision_heads", model.vision_heads)):
        if heads % c.tp:
            out.append(f"model.{key}={heads} is not divisible by tp={c.tp}; use a tp dividing {heads}")
    if row_len is not None and (problem := row_length_error(model, row_len, c.tp)):
        out.append(problem)
    blocks = num_blocks(model, c.tp)
    if c.pp * c.vpp > blocks:
        sp = " (2 of them sequence-parallel scatter/gather)" if c.tp > 1 else ""
        out.append(
            f"pp*vpp = {c.pp}*{c.vpp} = {c.pp * c.vpp} chunks exceed the model's {blocks} blocks{sp} at "
            f"tp={c.tp}; lower pp or vpp"
        )
    if c.vpp > 1 and c.pp == 1:
        out.append(f"vpp={c.vpp} needs pp >= 2 (model chunks are spread over pipeline ranks); use vpp=1")
    if c.schedule not in BUILDERS:
        out.append(f"schedule={c.schedule!r} is not one of {sorted(BUILDERS)}")
    elif c.pp == 1 and c.schedule != "1f1b":
        out.append(f"schedule={c.schedule!r} with pp=1 is plain gradient accumulation; use schedule=1f1b")
    else:
        error = schedule_error(c.schedule, c.pp, c.vpp, c.microbatches)
        if error:
            out.append(error)
    if c.tp_overlap not in TP_OVERLAPS:
        out.append(f"tp_overlap={c.tp_overlap!r} is not one of {TP_OVERLAPS}")
    elif c.tp_overlap == "chunked" and c.tp == 1:
        out.append("tp_overlap='chunked' needs tp >= 2 (there is no TP collective to overlap); use 'none'")
    elif c.tp_overlap == "none" and c.tp_chunks != 1:
        out.append(f"tp_chunks={c.tp_chunks} needs tp_overlap='chunked'; use tp_chunks=1")
    if c.offload not in OFFLOAD_STRATEGIES:
        out.append(f"offload={c.offload!r} is not one of {OFFLOAD_STRATEGIES}")
    if c.precision is not None and c.precision not in RECIPES:
        out.append(f"precision={c.precision!r} is not a recipe ({sorted(RECIPES)}) or None")
    return out


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class SpaceOptions:
    """Which values each knob may take (None: all that apply)."""

    schedules: tuple[str, ...] = tuple(sorted(BUILDERS))
    max_vpp: int = 4
    max_microbatches: int = 64
    offloads: tuple[str, ...] = OFFLOAD_STRATEGIES
    precisions: tuple[str | None, ...] = (None,)
    tp_overlaps: tuple[str, ...] = TP_OVERLAPS


def enumerate_configs(
    model: VLMConfig,
    devices: int,
    global_batch: int,
    options: SpaceOptions | None = None,
    tp_chunks_for: Callable[[int, int], int] | None = None,
    row_len: int | None = None,
) -> Iterator[PlanConfig]:
    """Every valid PlanConfig. `tp_chunks_for(tp, micro_batch_size)` picks the chunk count of 'chunked'
    overlap (the TP overlap model's choice); default 4. `row_len`: tokens per training row (see
    violations)."""
    options = options or SpaceOptions()
    for tp in divisors(devices):
        for pp in divisors(devices // tp):
            dp = devices // (tp * pp)
            if global_batch % dp:
                continue
            per_replica = global_batch // dp
            for vpp in range(1, (options.max_vpp if pp > 1 else 1) + 1):
                for schedule in _schedules(pp, options.schedules):
                    for m in divisors(per_replica):
                        if m > options.max_microbatches:
                            break
                        layout = (tp, pp, vpp, dp, schedule, m)
                        yield from _leaves(
                            model, devices, global_batch, options, tp_chunks_for, row_len, layout
                        )


def _schedules(pp: int, allowed: Sequence[str]) -> Sequence[str]:
    return ("1f1b",) if pp == 1 else allowed


def _leaves(model, devices, global_batch, options, tp_chunks_for, row_len, layout):
    tp, pp, vpp, dp, schedule, m = layout
    mbs = global_batch // (dp * m)
    base = PlanConfig(tp, pp, vpp, dp, schedule, m, mbs)
    if violations(base, model, devices, global_batch, row_len):
        return
    for overlap in options.tp_overlaps:
        if overlap == "chunked" and tp == 1:
            continue
        chunks = (tp_chunks_for(tp, mbs) if tp_chunks_for else 4) if overlap == "chunked" else 1
        for offload in options.offloads:
            for precision in options.precisions:
                config = PlanConfig(tp, pp, vpp, dp, schedule, m, mbs, overlap, chunks, offload, precision)
                if not violations(config, model, devices, global_batch, row_len):
                    yield config
