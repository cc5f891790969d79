"""sysopt-plan: rank ways to train the VLM (tp, pp, vpp, schedule, microbatches, TP overlap, offload,
precision) on a HardwareProfile by predicted step time and peak memory per device.

sysopt-plan [--profile PATH] [--devices N] [--global-batch N] [model.KEY=V data.KEY=V ...]
            [--where KEY=V ...] [--top N] [--json PATH] [--measure K] [--fit]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any

GIB = 1024**3
NOMINAL_GPU_OP_OVERHEAD_S = 5e-6  # PyTorch dispatch + CUDA kernel launch, per op (assumed)


def _int_at_least(minimum: int, meaning: str, fix: str):
    """An argparse type: an int >= `minimum`, else an error naming the value, the constraint and the fix."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer ({meaning})") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum} ({meaning}); {fix}")
        return value

    return parse


def _finite_at_least_zero(text: str) -> float:
    """An argparse type: a finite float >= 0 (a NaN would make every predicted step time NaN and the ranking
    arbitrary; a negative cost would reward configurations that dispatch more ops)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number of seconds >= 0, e.g. 5e-6")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sysopt-plan", description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("overrides", nargs="*", help="model.KEY=VALUE or data.KEY=VALUE (e.g. model.dim=256)")
    p.add_argument("--profile", type=Path, help="HardwareProfile JSON (default: this machine, calibrated)")
    p.add_argument("--quick", action="store_true", help="calibrate this machine quickly if not cached")
    p.add_argument(
        "--refresh-profile", action="store_true", help="recalibrate this machine (one thread per device)"
    )
    p.add_argument(
        "--devices",
        type=_int_at_least(1, "devices to plan for", "leave --devices out to plan for every GPU or CPU core"),
        help="devices to plan for (default: GPUs, or CPU cores)",
    )
    p.add_argument("--model", default="vlm_small", help="configs/model/<NAME>.yaml or a YAML path")
    p.add_argument(
        "--global-batch",
        type=_int_at_least(1, "sequences per step", "e.g. --global-batch 64"),
        default=64,
        help="sequences per step (default 64)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        help="'auto' (high precision + the hardware's low-precision recipe), 'none', 'all', or names a,b",
    )
    p.add_argument(
        "--min-features",
        type=int,
        default=64,
        help="narrowest linear a recipe converts (default 64, as configs/precision/*.yaml)",
    )
    p.add_argument("--schedules", help="comma-separated pipeline schedules (default: all)")
    p.add_argument(
        "--max-microbatches",
        type=_int_at_least(1, "microbatches per step", "e.g. --max-microbatches 16"),
        default=64,
    )
    p.add_argument(
        "--where",
        action="append",
        default=[],
        help="keep configs with KEY=VALUE[,VALUE...], e.g. pp=1 or offload=device,host",
    )
    p.add_argument(
        "--top",
        type=_int_at_least(0, "rows of the ranking to print", "use e.g. --top 10"),
        default=10,
        help="rows of the ranking to print",
    )
    p.add_argument("--json", type=Path, help="write the ranking (and measured records) here")
    p.add_argument(
        "--measure",
        type=_int_at_least(0, "configs to run here", "use 0 to measure none, or e.g. --measure 3"),
        default=0,
        metavar="K",
        help="run the top K here and compare",
    )
    p.add_argument(
        "--spread",
        action="store_true",
        help="with --measure: K configurations spanning the knobs, not the top K",
    )
    p.add_argument(
        "--steps",
        type=_int_at_least(1, "training steps per measured run", "use e.g. --steps 40"),
        default=40,
        help="training steps per measured run",
    )
    p.add_argument(
        "--repeats",
        type=_int_at_least(1, "rounds of measurement", "use e.g. --repeats 3"),
        default=1,
        help="measure the K configs this many rounds, round-robin (median)",
    )
    p.add_argument(
        "--fit",
        action="store_true",
        help="time the model's blocks here and fit the remaining overheads to measured reference runs",
    )
    p.add_argument(
        "--no-layer-times",
        action="store_true",
        help="with --fit: do not time blocks; fit GEMM scale and per-op overhead instead",
    )
    p.add_argument("--calibration", type=Path, help="planner calibration JSON (default: the cached fit)")
    p.add_argument("--no-calibration", action="store_true", help="ignore any planner calibration")
    p.add_argument(
        "--op-overhead-s",
        type=_finite_at_least_zero,
        help="host cost per dispatched op to assume (default: the fit here; on a GPU profile without one, "
        f"{NOMINAL_GPU_OP_OVERHEAD_S * 1e6:.0f} us, a CUDA launch + dispatch)",
    )
    return p


def _yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def load_workload(args) -> tuple[Any, Any]:
    """(VLMConfig, DigitsTaskConfig) from configs/ plus model.* / data.* overrides."""
    from sysopt.cli.train import config_dir
    from sysopt.data import DigitsTaskConfig
    from sysopt.models import VLMConfig
    from sysopt.planner.measure import apply_overrides

    configs = Path(config_dir())
    model_path = (
        Path(args.model)
        if args.model.endswith((".yaml", ".yml"))
        else configs / "model" / f"{args.model}.yaml"
    )
    if not model_path.is_file():
        known = sorted(p.stem for p in (configs / "model").glob("*.yaml"))
        raise SystemExit(
            f"sysopt-plan: --model {args.model}: no {model_path}; use one of {known} or a YAML path"
        )
    base = {"model": _yaml(model_path), "data": _yaml(configs / "data" / "digits.yaml")}
    bad = [o for o in args.overrides if not o.startswith(("model.", "data.")) or "=" not in o]
    if bad:
        raise SystemExit(f"sysopt-plan: override {bad[0]!r} must be model.KEY=VALUE or data.KEY=VALUE")
    merged = apply_overrides(base, args.overrides)
    data = dict(merged["data"])
    data.pop("name", None)
    data["task_mix"] = tuple(data.get("task_mix", (1.0, 1.0, 1.0)))
    try:
        return VLMConfig(**merged["model"]), DigitsTaskConfig(**data)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"sysopt-plan: bad model/data config: {exc}") from exc


def _override_value(value: Any) -> str:
    """A YAML value as a Hydra command-line value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def workload_overrides(args) -> list[str]:
    """The model and data sysopt-plan planned for, as sysopt-train overrides: the --model config (a config
    group name unless it is train.yaml's default; a YAML file as model.KEY=VALUE lines) and the model.* /
    data.* overrides given here."""
    from sysopt.cli.train import config_dir

    out = []
    if args.model.endswith((".yaml", ".yml")):
        out += [f"model.{k}={_override_value(v)}" for k, v in _yaml(Path(args.model)).items()]
    else:
        from omegaconf import OmegaConf

        defaults = OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "train.yaml"), resolve=False)
        groups = {k: v for d in defaults.get("defaults", []) if isinstance(d, dict) for k, v in d.items()}
        if groups.get("model") != args.model:
            out.append(f"model={args.model}")
    return out + list(args.overrides)


def load_profile(args):
    from sysopt.hardware import HardwareProfile, load_or_calibrate
    from sysopt.hardware.profile import LOAD_ERRORS

    if args.profile is not None:
        try:
            profile = HardwareProfile.load(args.profile)
        except FileNotFoundError:
            raise SystemExit(f"sysopt-plan: --profile {args.profile}: no such file") from None
        except LOAD_ERRORS as exc:  # unreadable, not JSON, or JSON of another shape
            raise SystemExit(
                f"sysopt-plan: --profile {args.profile} is not a HardwareProfile JSON ({type(exc).__name__}: "
                f"{exc}); write one with sysopt-probe --calibrate --json > PATH"
            ) from None
        if profile.calibration is None:
            raise SystemExit(f"sysopt-plan: {args.profile} has no calibration; the planner needs one")
        return profile
    return load_or_calibrate(quick=args.quick, refresh=args.refresh_profile, threads=1)


def precisions(spec: str, profile) -> tuple[str | None, ...]:
    from sysopt.precision.auto import candidate_recipe
    from sysopt.precision.recipe import RECIPES

    if spec == "none":
        return (None,)
    if spec == "all":
        return (None, *sorted(RECIPES))
    if spec == "auto":
        found = candidate_recipe(profile)
        return (None,) if found is None else (None, found)
    names = tuple(s.strip() for s in spec.split(","))
    unknown = [n for n in names if n not in RECIPES and n != "none"]
    if unknown:
        raise SystemExit(f"sysopt-plan: --precision {unknown[0]!r} is not a recipe ({sorted(RECIPES)})")
    return tuple(None if n == "none" else n for n in names)


def _where_value(item: str, key: str, kind: Any, text: str) -> Any:
    """One --where value as PlanConfig's field `key` holds it: None ('none' / 'null') only for a field that can
    be None (precision), the text itself for a string field (tp_overlap's 'none' is a string), else an int."""
    nullable = type(None) in typing.get_args(kind)
    if nullable and text in ("none", "null"):
        return None
    if kind is str or str in typing.get_args(kind):
        return text
    try:
        return int(text)
    except ValueError:
        raise SystemExit(
            f"sysopt-plan: --where {item!r}: {key} takes integers, not {text!r}; e.g. --where {key}=1,2"
        ) from None


def _allowed(key: str) -> tuple | None:
    """The values a string knob may take (SpaceOptions' defaults: every one that exists), or None."""
    from sysopt.planner import SpaceOptions

    field = {"schedule": "schedules", "offload": "offloads", "tp_overlap": "tp_overlaps"}.get(key)
    return None if field is None else getattr(SpaceOptions(), field)


def where_filter(items: list[str]):
    from sysopt.planner.space import PlanConfig

    kinds = typing.get_type_hints(PlanConfig)
    known = {f.name for f in dataclasses.fields(PlanConfig)}
    wanted = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in known or not value:
            raise SystemExit(
                f"sysopt-plan: --where {item!r} must be KEY=VALUE with KEY one of {sorted(known)}"
            )
        wanted[key] = {_where_value(item, key, kinds[key], v.strip()) for v in value.split(",")}
        allowed = _allowed(key)
        if allowed is not None and (unknown := sorted(str(v) for v in wanted[key] - set(allowed))):
            raise SystemExit(f"sysopt-plan: --where {item!r}: {unknown} not among {key}'s {sorted(allowed)}")

    def keep(config) -> bool:
        return all(getattr(config, k) in values for k, values in wanted.items())

    return keep


def print_ranking(ranking, top: int) -> None:
    print(f"{'#':>3} {'step ms':>9} {'peak MiB':>9}  config")
    for i, p in enumerate(ranking.ranked[:top], 1):
        print(f"{i:>3} {p.step_s * 1e3:9.4g} {p.peak_memory_bytes / 2**20:9.1f}  {p.config.label()}")
    print(f"({len(ranking.ranked)} fit, {len(ranking.rejected)} rejected)")


def resolve_calibration(args, profile, machine, workload=None):
    """The planner calibration: --calibration, else this host's cached fit when it was made against this
    profile and for this model and data (`workload`: its block times are this model's); a GPU profile
    without one assumes a nominal per-op overhead; --op-overhead-s overrides."""
    from sysopt.hardware.profile import LOAD_ERRORS
    from sysopt.planner import PlannerCalibration, default_calibration_path

    calibration = PlannerCalibration()
    if args.calibration is not None and not args.no_calibration and not args.calibration.is_file():
        raise SystemExit(
            f"sysopt-plan: --calibration {args.calibration} does not exist; give the JSON a --fit run wrote "
            "(by default under ~/.cache/sysopt), or leave --calibration out"
        )
    path = args.calibration or (default_calibration_path() if args.profile is None else None)
    found = None
    if not args.no_calibration and path is not None and path.is_file():
        try:
            found = PlannerCalibration.load(path)
        except LOAD_ERRORS as exc:  # torn, or not a fit's JSON
            why = f"{path} is not a planner calibration ({type(exc).__name__}: {exc})"
            if args.calibration is not None:
                raise SystemExit(f"sysopt-plan: --calibration {why}; give a JSON that --fit wrote") from None
            print(f"sysopt-plan: ignoring {why}; run --fit to write it again", file=sys.stderr)
    if found is not None:
        same_workload = workload is not None and found.workload_key == workload.key()
        # low-precision block times depend on which linears were converted
        other_min_features = found.min_features not in (None, args.min_features)
        if args.calibration is not None:
            calibration = found
            if not same_workload:
                print(
                    f"sysopt-plan: note: {path} was fitted to another model/data config than this one; its "
                    "block times are that model's (run --fit to fit this one)",
                    file=sys.stderr,
                )
            if other_min_features:
                print(
                    f"sysopt-plan: note: {path} was fitted with --min-features {found.min_features}, this plan "
                    f"uses {args.min_features}; its low-precision block times convert other linears",
                    file=sys.stderr,
                )
        elif other_min_features:
            print(
                f"sysopt-plan: ignoring {path}: fitted with --min-features {found.min_features}, this plan uses "
                f"{args.min_features}; run --fit",
                file=sys.stderr,
            )
        elif found.profile_created != profile.created:
            print(f"sysopt-plan: ignoring {path}: fitted to another profile; run --fit", file=sys.stderr)
        elif not same_workload:
            print(
                f"sysopt-plan: ignoring {path}: fitted to another model/data config (workload "
                f"{found.workload_key or 'unknown'}, this one {workload.key() if workload else 'unknown'}); "
                "run --fit",
                file=sys.stderr,
            )
        else:
            calibration = found
    if args.op_overhead_s is not None:
        source = f"op_overhead_s={args.op_overhead_s} (given)"
        return dataclasses.replace(calibration, op_overhead_s=args.op_overhead_s, source=source)
    if calibration.source == "uncalibrated" and machine.on_gpu:
        source = f"op_overhead_s={NOMINAL_GPU_OP_OVERHEAD_S} assumed (CUDA launch + dispatch per op)"
        return dataclasses.replace(calibration, op_overhead_s=NOMINAL_GPU_OP_OVERHEAD_S, source=source)
    return calibration


def reference_configs(devices: int, global_batch: int) -> list:
    """The runs --fit measures: pure data parallel with one and with four microbatches (same GEMM work,
    4x the ops), the same in int8 (the low-precision linear's extra ops), and pipelines with few and with
    many microbatches, split backward (ZB-H1) and two chunks per rank (bubble, per-action cost, per-message
    cost and latency), and host offloading (its per-tensor cost). Together they separate GEMM speed, per-op,
    per-action, per-message, per-host-tensor and per-step overheads."""
    from sysopt.planner import PlanConfig

    per_rank = global_batch // devices
    out = [
        PlanConfig(dp=devices, micro_batch_size=per_rank),
        PlanConfig(dp=devices, microbatches=4, micro_batch_size=per_rank // 4),
        PlanConfig(dp=devices, micro_batch_size=per_rank, precision="int8_rowwise"),
        PlanConfig(dp=devices, micro_batch_size=per_rank, offload="host"),
    ]
    if devices > 1:
        pipelines = (
            ("1f1b", 1, 2 * devices),
            ("1f1b", 1, 8 * devices),
            ("zb_h1", 1, 8 * devices),  # a split backward: W actions fill the waits for messages
            (
                "interleaved_1f1b",
                2,
                2 * devices,
            ),  # two chunks per rank: twice the messages on the critical path
        )
        for schedule, vpp, m in pipelines:
            if global_batch % m == 0:
                out.append(
                    PlanConfig(
                        pp=devices,
                        vpp=vpp,
                        schedule=schedule,
                        microbatches=m,
                        micro_batch_size=global_batch // m,
                    )
                )
    return out


def fit_here(args, workload, machine, base_job, space: list, rounds: int | None = None) -> tuple[Any, Any]:
    """Time every block here for the cases `space` and the reference runs need (unless --no-layer-times),
    measure the reference configs (`rounds`, default --repeats), fit the remaining planner terms to them and
    save the calibration. Returns (calibration, FitInputs) so that a later measurement can refit."""
    from sysopt.planner import measure as measuring
    from sysopt.planner import violations
    from sysopt.planner.layer_times import cases_of, measure_layer_times

    references = []
    for reference in reference_configs(machine.devices, args.global_batch):
        problems = violations(reference, workload.model, machine.devices, args.global_batch, workload.seq_len)
        if problems:
            print(f"sysopt-plan: --fit skips {reference.label()}: {problems[0]}", file=sys.stderr)
            continue
        references.append(reference)
    if not references:
        raise SystemExit("sysopt-plan: --fit found no valid reference configuration for this machine")
    layer_times = None
    if not args.no_layer_times and not machine.on_gpu:
        cases = cases_of([*space, *references])
        print(f"fitting: timing the model's blocks for {len(cases)} cases ...", flush=True)
        layer_times = measure_layer_times(base_job, cases, min_features=args.min_features)
    rounds = args.repeats if rounds is None else rounds
    print(f"fitting: measuring {len(references)} reference runs ({rounds} rounds) ...", flush=True)
    candidates = [(reference, float("nan")) for reference in references]
    records = measuring.measure_many(candidates, base_job, rounds, min_features=args.min_features)
    inputs = FitInputs(tuple(references), layer_times)
    return _fit_and_save(args, workload, machine, records, inputs), inputs


@dataclasses.dataclass(frozen=True)
class FitInputs:
    references: tuple  # the reference PlanConfigs
    layer_times: Any  # LayerTimes or None


def _fit_and_save(args, workload, machine, records: list, inputs: FitInputs):
    from sysopt.planner import default_calibration_path, fit_calibration

    runs = []
    for record in records:
        if record.measured_step_s is None:
            raise SystemExit(
                f"sysopt-plan: fitting run {record.config.label()} failed: {record.status}: {record.detail}"
            )
        runs.append((record.config, record.measured_step_s, record.boundaries))
    try:
        calibration = fit_calibration(workload, machine, runs, layer_times=inputs.layer_times)
    except ValueError as exc:  # e.g. a step faster than the model's non-GEMM costs alone
        raise SystemExit(f"sysopt-plan: the fit failed: {exc}") from None
    calibration = dataclasses.replace(calibration, min_features=args.min_features)
    target = calibration.save(args.calibration or default_calibration_path())
    print(f"calibration: {calibration.source}\n  saved to {target}")
    return calibration


def spread(ranked: list, count: int) -> list:
    """`count` configurations that span the knobs (tp, pp, vpp, dp, schedule, microbatches, TP overlap,
    offload, precision): greedy coverage, each pick the configuration bringing the most knob values not
    yet taken (the better ranked on ties), starting from the top choice; then the best remaining."""
    knobs = ("tp", "pp", "vpp", "dp", "schedule", "microbatches", "tp_overlap", "offload", "precision")
    values = [{(k, getattr(p.config, k)) for k in knobs} for p in ranked]
    chosen = [0] if ranked else []
    seen = set(values[0]) if ranked else set()
    while len(chosen) < min(count, len(ranked)):
        gain, index = max((len(v - seen), -i) for i, v in enumerate(values) if i not in chosen)
        if gain == 0:
            break
        chosen.append(-index)
        seen |= values[-index]
    chosen += [i for i in range(len(ranked)) if i not in chosen][: count - len(chosen)]
    return [ranked[i] for i in chosen]


def _picked(args, ranking) -> list:
    return spread(ranking.ranked, args.measure) if args.spread else ranking.ranked[: args.measure]


def measure_top(args, ranking, base_job) -> list:
    """Run the top --measure configs here (or, with --spread, configs spanning the knobs)."""
    from sysopt.planner import measure as measuring

    picked = _picked(args, ranking)
    which = "configurations spanning the knobs" if args.spread else "top"
    print(f"\nmeasuring {len(picked)} {which} here ({args.repeats} x {args.steps} steps each):")
    candidates = [(p.config, p.step_s, p.boundaries) for p in picked]  # run on the planned split
    return measuring.measure_many(candidates, base_job, args.repeats, min_features=args.min_features)


def measure_with_fit(args, workload, machine, base_job, ranking, inputs: FitInputs):
    """--fit with --measure: the picked configs and the fit's reference runs are measured in the same rounds
    (round-robin), the calibration is refitted to the references' medians from those rounds, and the picked
    configs are predicted with it. A machine whose speed drifts over minutes (a shared VM does, by 10-20%)
    then gives the fit and the evaluation the same conditions. Returns (records, calibration)."""
    from sysopt.planner import CostModel
    from sysopt.planner import measure as measuring

    picked = _picked(args, ranking)
    which = "configurations spanning the knobs" if args.spread else "top"
    print(
        f"\nmeasuring {len(picked)} {which} and the {len(inputs.references)} reference runs in the same "
        f"{args.repeats} rounds ({args.steps} steps each):"
    )
    # the picked configs run on the planned split; the references on the trainer's (the fit predicts them
    # on the split they ran), as the split the planner would choose depends on the calibration being fitted
    candidates = [(p.config, p.step_s, p.boundaries) for p in picked]
    candidates += [(c, float("nan")) for c in inputs.references]
    records = measuring.measure_many(candidates, base_job, args.repeats, min_features=args.min_features)
    calibration = _fit_and_save(args, workload, machine, records[len(picked) :], inputs)
    model = CostModel(workload, machine, calibration, min_features=args.min_features)
    out = [
        dataclasses.replace(r, predicted_step_s=model.predict(r.config, r.boundaries).step_s)
        for r in records[: len(picked)]
    ]
    return out, calibration


def print_measured(records: list) -> None:
    """Predicted against measured per config, the largest error and how the top choice (the first) did."""
    for r in records:
        head = f"  {r.config.label()}: predicted {r.predicted_step_s * 1e3:.4g} ms"
        if r.measured_step_s is None:
            print(f"{head}, {r.status}: {r.detail}")
        else:
            print(f"{head}, measured {r.measured_step_s * 1e3:.4g} ms ({r.error:+.1%}) {r.detail}")
    done = [r for r in records if r.measured_step_s is not None]
    if done:
        fastest = min(done, key=lambda r: r.measured_step_s)
        worst = max(done, key=lambda r: abs(r.error))
        top = records[0]
        print(
            f"largest error {worst.error:+.1%} ({worst.config.label()}); fastest measured: {fastest.config.label()}"
        )
        if top.measured_step_s is not None:
            print(
                f"top choice measured {top.measured_step_s / fastest.measured_step_s - 1:+.1%} against the fastest"
            )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from sysopt.planner import CostModel, Machine, SpaceOptions, Workload, enumerate_configs, explain, rank
    from sysopt.planner import measure as measuring

    model_cfg, data_cfg = load_workload(args)
    profile = load_profile(args)
    machine = Machine.from_profile(profile, args.devices)
    if machine.on_gpu and (args.measure or args.fit):
        print(
            f"sysopt-plan: --measure/--fit train here with sysopt-train, whose model runs on the CPU, but this "
            f"plan is for {machine.devices} GPU(s) (profile {args.profile or 'of this machine'}); plan for the CPU "
            "with --profile PATH of a profile calibrated there (sysopt.hardware.load_or_calibrate(device='cpu')"
            ".to_json()), or drop --measure/--fit",
            file=sys.stderr,
        )
        return 2
    if not machine.on_gpu:  # a CPU plan runs its low-precision linears on this machine's CPU kernels
        from sysopt.kernels.dispatch import backend_for

        machine = dataclasses.replace(machine, kernel_backend=backend_for("cpu"))
    workload = Workload.from_data(model_cfg, data_cfg, args.global_batch)
    base_job = measuring.base_job_for(model_cfg, data_cfg, args.global_batch, args.steps)
    from sysopt.train import ConfigError, validate

    try:  # the model and data settings themselves, as sysopt-train checks them (every config shares them)
        validate(base_job)
    except ConfigError as exc:
        raise SystemExit(f"sysopt-plan: sysopt-train would refuse these model/data settings: {exc}") from None
    schedules = tuple(s.strip() for s in args.schedules.split(",")) if args.schedules else None
    if schedules and (unknown := sorted(set(schedules) - set(_allowed("schedule")))):
        raise SystemExit(f"sysopt-plan: --schedules: {unknown} not among {sorted(_allowed('schedule'))}")
    options = SpaceOptions(
        schedules=schedules or SpaceOptions().schedules,
        max_microbatches=args.max_microbatches,
        precisions=precisions(args.precision, profile),
    )
    try:  # the TP chunk choice reads the profile only, so the space does not depend on the calibration
        chunk_model = CostModel(workload, machine, min_features=args.min_features)
    except ValueError as exc:  # a figure the optimizer-offload model needs is missing from the profile
        raise SystemExit(
            f"sysopt-plan: the hardware profile cannot be planned with: {exc}; calibrate it on the machine "
            "(sysopt.hardware.load_or_calibrate) or pass --profile with a complete one"
        ) from None

    def chooser(tp: int, micro_batch_size: int) -> int:
        try:
            return chunk_model.choose_tp_chunks(tp, micro_batch_size)
        except ValueError:  # no collective fit (a one-device calibration): ranking rejects chunked configs,
            return 4  # saying why, as it does every config the profile cannot model

    keep = where_filter(args.where)
    every = list(
        enumerate_configs(
            model_cfg, machine.devices, args.global_batch, options, chooser, row_len=data_cfg.row_len
        )
    )
    space = [c for c in every if keep(c)]
    if every and not space:
        raise SystemExit(
            f"sysopt-plan: no configuration matches --where {' '.join(args.where)} (of {len(every)} enumerated for "
            f"{machine.devices} devices and global batch {args.global_batch}, e.g. {every[0].label()}); "
            "loosen or correct the --where filters"
        )
    fit_inputs = None
    if args.fit:  # with --measure, one round now: the references are measured again beside the picked configs
        rounds = 1 if args.measure else None
        calibration, fit_inputs = fit_here(args, workload, machine, base_job, space, rounds)
    else:
        calibration = resolve_calibration(args, profile, machine, workload)
    cost_model = CostModel(workload, machine, calibration, min_features=args.min_features)
    ranking = rank(cost_model, space)
    kind = "GPU" if machine.on_gpu else "CPU core"
    print(
        f"sysopt-plan: {machine.devices} devices ({kind}s, {machine.memory_bytes / GIB:.1f} GiB each), "
        f"global batch {args.global_batch}, calibration: {calibration.source}"
    )
    print_ranking(ranking, args.top)
    text = (
        explain(ranking, args.min_features, workload_overrides(args))
        if ranking.ranked
        else "no configuration fits"
    )
    print(text)
    records = []
    if args.measure and fit_inputs is not None:
        records, calibration = measure_with_fit(args, workload, machine, base_job, ranking, fit_inputs)
        first = ranking.ranked[0].config if ranking.ranked else None
        ranking = rank(CostModel(workload, machine, calibration, min_features=args.min_features), space)
        if ranking.ranked and ranking.ranked[0].config != first:
            print(f"with the refitted calibration the top choice is {ranking.ranked[0].config.label()}")
    elif args.measure:
        records = measure_top(args, ranking, base_job)
    if records:
        print_measured(records)
    if args.json is not None:
        out = {
            "profile_created": profile.created,
            "workload": workload.to_dict(),
            "calibration": calibration.to_dict(),
            **ranking.to_dict(),
            "explain": text,
        }
        if args.measure:
            out["records"] = [r.to_dict() for r in records]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0 if ranking.ranked else 1  # nothing fits: a result, but not a plan to act on


if __name__ == "__main__":
    sys.exit(main())
