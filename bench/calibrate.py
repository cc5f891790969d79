"""Calibration suite: run sysopt.hardware.calibrate and report its figures as records (matmul FLOP/s
per dtype and shape, copy and collective latency/bandwidth, optimizer params/s), with low-precision
matmul throughput against fp32 from the same run as (informative) goals."""

from __future__ import annotations

from sysopt.benchmark import BenchContext, Record, SuiteResult, goal_ratio, register_suite
from sysopt.hardware import LinkFit, TimingSamples, calibrate, probe
from sysopt.hardware.timing import median

FIT_NOTE = "alpha-beta least squares (relative error) over the message sizes"


def _time_record(s: TimingSamples) -> Record:
    return Record(
        f"{s.name}/time_s", median(s.seconds), "s", len(s.seconds), min(s.seconds), max(s.seconds), s.config
    )


def _rate_record(s: TimingSamples, work: float, what: str, unit: str) -> Record:
    """work / time: the median time gives the value; the slowest and fastest runs give min and max."""
    secs = s.seconds
    return Record(
        f"{s.name}/{what}", work / median(secs), unit, len(secs), work / max(secs), work / min(secs), s.config
    )


def _fit_records(prefix: str, fit: LinkFit, sizes: list[int], config: dict) -> list[Record]:
    config = {**config, "fit": FIT_NOTE, "sizes_bytes": sizes}
    return [
        Record(f"{prefix}/latency_s", fit.latency_s, "s", len(sizes), fit.latency_s, fit.latency_s, config),
        Record(
            f"{prefix}/bytes_per_s",
            fit.bytes_per_s,
            "B/s",
            len(sizes),
            fit.bytes_per_s,
            fit.bytes_per_s,
            config,
        ),
    ]


def records_from(samples: list[TimingSamples], fits: dict[str, LinkFit]) -> list[Record]:
    """Records for every timed figure; fits[prefix] adds that prefix's latency and bandwidth."""
    records: list[Record] = []
    sizes: dict[str, list[int]] = {}
    configs: dict[str, dict] = {}
    for s in samples:
        kind = s.name.split("/")[0]
        if kind == "matmul":
            records.append(_rate_record(s, s.config["flops"], "flops_per_s", "FLOP/s"))
        elif kind == "optimizer":
            records.append(_rate_record(s, s.config["n_params"], "params_per_s", "params/s"))
        else:  # copy/<kind>/<n>B, p2p/<n>B, allreduce/<n>B: one time per message size
            records.append(_time_record(s))
            prefix = s.name.rsplit("/", 1)[0]
            sizes.setdefault(prefix, []).append(s.config["n_bytes"])
            configs.setdefault(prefix, {k: v for k, v in s.config.items() if k != "n_bytes"})
    for prefix, fit in fits.items():
        if prefix in sizes:
            records += _fit_records(prefix, fit, sorted(sizes[prefix]), configs[prefix])
    return records


def matmul_goals(records: list[Record]) -> list:
    """bf16/int8/fp8 FLOP/s over fp32 at the largest shape both ran (target >= 1.0: informative)."""
    by_name = {r.name: r for r in records}
    goals = []
    for dtype in ("bf16", "int8", "fp8"):
        shapes = [r.name.split("/")[2] for r in records if r.name.startswith(f"matmul/{dtype}/")]
        shapes = [shp for shp in shapes if f"matmul/fp32/{shp}/flops_per_s" in by_name]
        if not shapes:
            continue
        shape = max(shapes, key=lambda shp: by_name[f"matmul/fp32/{shp}/flops_per_s"].config["flops"])
        num, den = by_name[f"matmul/{dtype}/{shape}/flops_per_s"], by_name[f"matmul/fp32/{shape}/flops_per_s"]
        goals.append(goal_ratio(f"{dtype} matmul throughput vs fp32 ({shape})", num, den, ">= 1.0"))
    return goals


@register_suite("calibrate")
def run(ctx: BenchContext) -> SuiteResult:
    samples: list[TimingSamples] = []
    base = ctx.profile if ctx.profile is not None else probe()
    profile = calibrate(base, quick=ctx.quick, repeats=ctx.repeats, progress=ctx.track, samples=samples)
    cal = profile.calibration
    fits = {f"copy/{kind}": fit for kind, fit in cal.copy.items()}
    fits.update(
        {name: fit for name, fit in (("p2p", cal.p2p), ("allreduce", cal.allreduce)) if fit is not None}
    )
    records = records_from(samples, fits)
    return ctx.result("calibrate", records, matmul_goals(records), profile=profile)
