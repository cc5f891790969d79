"""tp_overlap suite: how much tensor-parallel communication the chunked (software T3) overlap hides.

A sequence-parallel sublayer (column-parallel linear -> GELU -> row-parallel linear, forward and
backward) at tp=2 and tp=4 over gloo, for an MLP, an attention-projection and a communication-heavy
shape (the goals' shape: hidden -> hidden projections at sequence 4096), under overlap
none / chunked:k (a sweep) / auto, in two modes: emulated compute (each GEMM sleeps its measured
time, so the 2 cores stay free for gloo) and real compute. Peer: megatron-core's
ColumnParallelLinear/RowParallelLinear with sequence parallelism on the same shapes, same run.
Writes bench/results/tp_overlap.json (+ .png) and tp_overlap_timeline.png (per-rank spans).
"""

from __future__ import annotations

import os
import socket
import statistics

from sysopt.benchmark import BenchContext, Record, SuiteResult, goal, goal_ratio, register_suite
from sysopt.dist import launch
from sysopt.hardware.profile import HardwareProfile
from sysopt.tensor_parallel import Span, plot_timelines
from sysopt.tensor_parallel.measure import Shape, measure_cases

SHAPES = {  # MLP: hidden -> 4*hidden -> hidden; attention projections: qkv, then out-projection
    "mlp": Shape(seq=512, batch=2, hidden=512, column_out=2048, row_in=2048),
    "attn_proj": Shape(seq=1024, batch=2, hidden=256, column_out=768, row_in=256),
    # one attention projection (hidden -> hidden), then the out-projection, at a long sequence
    "comm_heavy": Shape(seq=4096, batch=2, hidden=256, column_out=256, row_in=256),
}
QUICK_SHAPES = {
    "mlp": Shape(seq=256, batch=2, hidden=256, column_out=1024, row_in=1024),
    "attn_proj": Shape(seq=512, batch=2, hidden=256, column_out=768, row_in=256),
    "comm_heavy": Shape(seq=2048, batch=2, hidden=256, column_out=256, row_in=256),
}
# The goals' shape. Per byte moved it does a third of attn_proj's GEMM work (attn_proj's fused qkv output
# makes it compute-heavy here: with `none` at tp=2 its GEMMs took 3.5x its collectives' time, these ~1.6x).
COMM_HEAVY = "comm_heavy"
SWEEP = {"emulated": (1, 2, 4, 8, 16), "real": (2, 4, 8)}
QUICK_SWEEP = {"emulated": (1, 2, 4, 8), "real": (4,)}


def _rank_profile(tp: int) -> HardwareProfile:
    """A calibration with one GEMM thread and `tp` ranks, as each tp rank runs here (cached beside the
    default): at tp=4 four processes share the 2 cores, so collectives and per-chunk host costs are not
    the tp=2 ones ring-scaled, and `auto` is given the profile of the group it runs on."""
    from sysopt.hardware.cache import cache_dir, load_or_calibrate

    suffix = "" if tp == 2 else f"-world{tp}"
    path = cache_dir() / f"profile-{socket.gethostname()}-1thread-quick{suffix}.json"
    return load_or_calibrate(path, quick=True, threads=1, world_size=tp)


def _field(summary: dict, field: str) -> float:
    """A timeline summary's field, or hidden_fraction_bound = min(1, GEMM time / communication time): the
    most any schedule could hide, since communication beyond the GEMM time has nothing to run under."""
    if field != "hidden_fraction_bound":
        return summary[field]
    return min(1.0, summary["compute_s"] / summary["comm_s"]) if summary["comm_s"] > 0 else 1.0


def _records(
    tp: int,
    per_rank: list[dict],
    shapes: dict[str, Shape],
    load: tuple[float, float],
    profile: HardwareProfile,
) -> list[Record]:
    cal = profile.calibration.to_dict()  # load_or_calibrate: always calibrated
    # what `auto` was given (the suite's JSON profile is the tp=2 one)
    calibrated = {"world_size": cal["collective_world_size"], "tp_collectives": cal["tp_collectives"],
                  "tp_chunk_overhead_s": cal["tp_chunk_overhead_s"]}  # fmt: skip
    records = []
    for case, data in per_rank[0].items():
        shape_name, mode, strategy = case.split("/")
        shape = shapes[shape_name]
        config = {"tp": tp, "backend": "gloo", "sequence_parallel": True, "mode": mode, "strategy": strategy,
                  "shape": vars(shape), "chunks": data["plans"], "loadavg_1min_before_after": load,
                  **({"auto_profile": calibrated} if strategy == "auto" else {})}  # fmt: skip
        secs = data["seconds"]
        prefix = f"tp{tp}/{shape_name}/{mode}/{strategy}"
        records.append(
            Record(f"{prefix}/step_s", statistics.median(secs), "s", len(secs), min(secs), max(secs), config)
        )
        if strategy == "megatron":
            continue
        if data.get("recorded_seconds"):  # the same steps recorded: what recording the spans costs
            rec = data["recorded_seconds"]
            records.append(
                Record(f"{prefix}/recorded_step_s", statistics.median(rec), "s", len(rec), min(rec), max(rec),
                       {**config, "what": "a recorded step right after each timed one (spans come from these)"})
            )  # fmt: skip
        fields = (
            ("hidden_fraction", "fraction"),
            ("exposed_comm_s", "s"),
            ("comm_s", "s"),
            ("compute_s", "s"),
        )
        for field, unit in (*fields, ("hidden_fraction_bound", "fraction")):
            per_rank_medians = [
                statistics.median(_field(s, field) for s in r[case]["summaries"]) for r in per_rank
            ]
            records.append(
                Record(
                    f"{prefix}/{field}", statistics.mean(per_rank_medians), unit, len(per_rank_medians),
                    min(per_rank_medians), max(per_rank_medians), {**config, "over": "ranks (median per rank)"},
                )
            )  # fmt: skip
    return records


def _goals(records: list[Record], sweep: dict[str, tuple[int, ...]]) -> list:
    by_name = {r.name: r for r in records}
    goals = []
    for tp in (2, 4):
        base = f"tp{tp}/{COMM_HEAVY}/emulated"
        auto, none = by_name[f"{base}/auto/step_s"], by_name[f"{base}/none/step_s"]
        best = min((by_name[f"{base}/chunked:{k}/step_s"] for k in sweep["emulated"]), key=lambda r: r.value)
        hidden = by_name[f"{base}/auto/hidden_fraction"]
        goals.append(
            goal(
                f"tp{tp} {COMM_HEAVY} emulated: hidden fraction (auto)",
                hidden.value,
                ">= 0.85",
                [hidden.name],
            )
        )
        bound = by_name[f"{base}/auto/hidden_fraction_bound"]
        goals.append(
            goal(
                f"tp{tp} {COMM_HEAVY} emulated: hidden fraction (auto) / its bound min(1, GEMM / comm) "
                "(informative: at tp=4 the bound itself is below 0.85)",
                hidden.value / bound.value,
                ">= 0.85",
                [hidden.name, bound.name],
            )
        )
        goals.append(
            goal_ratio(f"tp{tp} {COMM_HEAVY} emulated: speedup of auto over none", none, auto, ">= 1.3")
        )
        goals.append(
            goal_ratio(
                f"tp{tp} {COMM_HEAVY} emulated: speedup of best swept chunks over none", none, best, ">= 1.3"
            )
        )
        goals.append(
            goal_ratio(f"tp{tp} {COMM_HEAVY} emulated: auto vs best swept chunk count", auto, best, "<= 1.05")
        )
        for shape in SHAPES:
            real = f"tp{tp}/{shape}/real"
            goals.append(
                goal_ratio(
                    f"tp{tp} {shape} real compute: auto step time vs megatron-core (informative, 2 cores)",
                    by_name[f"{real}/auto/step_s"], by_name[f"{real}/megatron/step_s"], "<= 1.0",
                )
            )  # fmt: skip
    return goals


def _plot(per_tp: dict[int, list[dict]], path) -> None:
    rows = {}
    for case in (
        f"{COMM_HEAVY}/emulated/none",
        f"{COMM_HEAVY}/emulated/auto",
        f"{COMM_HEAVY}/real/none",
        f"{COMM_HEAVY}/real/auto",
    ):
        for rank, data in enumerate(per_tp[2]):
            rows[f"tp2 {case} rank{rank}"] = [Span.from_dict(s) for s in data[case]["spans"]]
    plot_timelines(rows, path, title="one forward+backward of the sequence-parallel sublayer (median step)")


@register_suite("tp_overlap")
def run(ctx: BenchContext) -> SuiteResult:
    shapes = QUICK_SHAPES if ctx.quick else SHAPES
    sweep = QUICK_SWEEP if ctx.quick else SWEEP
    profiles = {tp: _rank_profile(tp) for tp in (2, 4)}
    repeats = 2 * ctx.repeats + 1  # steps are short and this machine is shared: more samples per median
    records, per_tp = [], {}
    for tp in ctx.track((2, 4), "tp_overlap: tp sizes"):
        before = os.getloadavg()[0]
        args = (shapes, sweep, repeats, profiles[tp].to_json())
        per_tp[tp] = launch(measure_cases, tp, args=args, backend="gloo", timeout_s=1800)
        records += _records(tp, per_tp[tp], shapes, (before, os.getloadavg()[0]), profiles[tp])
    _plot(per_tp, ctx.out_dir / "tp_overlap_timeline.png")
    return ctx.result("tp_overlap", records, _goals(records, sweep), profile=profiles[2])
