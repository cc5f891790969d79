"""Benchmark harness: timed records, goals computed from them, a suite registry, and result files
(bench/results/<suite>.json in one shape, with a PNG of the same numbers beside it)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import operator
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---- records and goals ------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One measured figure: `value` is the median over `repeats`; min/max show the spread."""

    name: str
    value: float
    unit: str
    repeats: int
    min: float
    max: float
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "repeats": self.repeats,
            "min": self.min,
            "max": self.max,
            "config": dict(self.config),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        return cls(d["name"], d["value"], d["unit"], d["repeats"], d["min"], d["max"], dict(d["config"]))


_COMPARISONS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}
_TARGET = re.compile(r"^\s*(<=|>=|==|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def parse_target(target: str) -> tuple[str, float]:
    """'<= 1.03' -> ('<=', 1.03). Operators: <=, >=, <, >, ==."""
    match = _TARGET.match(target)
    if match is None:
        raise ValueError(
            f"goal target {target!r} is not '<op> <number>'; write e.g. '<= 1.03' or '>= 1.3' "
            f"(operators {', '.join(_COMPARISONS)})"
        )
    return match.group(1), float(match.group(2))


def target_met(value: float, target: str) -> bool:
    op, threshold = parse_target(target)
    return not math.isnan(value) and _COMPARISONS[op](value, threshold)


@dataclass(frozen=True)
class Goal:
    """A claim checked in the same run: `value` computed from the records named in `from_`."""

    name: str
    value: float
    target: str
    met: bool
    from_: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "from_", tuple(self.from_))
        parse_target(self.target)  # fail early on a malformed target

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "target": self.target,
            "met": self.met,
            "from": list(self.from_),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Goal:
        return cls(d["name"], d["value"], d["target"], d["met"], tuple(d["from"]))


def goal(name: str, value: float, target: str, from_: Iterable[str]) -> Goal:
    """A goal whose `met` is decided by `target` (e.g. '>= 1.3')."""
    return Goal(name, float(value), target, target_met(float(value), target), tuple(from_))


def goal_ratio(name: str, numerator: Record, denominator: Record, target: str) -> Goal:
    """Goal on numerator.value / denominator.value, e.g. a speed-up over a baseline from the same run."""
    if denominator.value == 0:
        raise ValueError(
            f"goal {name!r}: denominator record {denominator.name!r} has value 0; "
            "a ratio needs a non-zero baseline"
        )
    return goal(name, numerator.value / denominator.value, target, (numerator.name, denominator.name))


def measure(
    fn: Callable[[], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    name: str,
    unit: str = "s",
    config: dict | None = None,
    sync: Callable[[], None] | None = None,
) -> Record:
    """Time `fn()` `repeats` times after `warmup` untimed calls: median, min and max wall seconds.
    `sync` (e.g. torch.cuda.synchronize) runs before each clock read when work is asynchronous."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"measure({name!r}): repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync is not None:
            sync()
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return Record(name, statistics.median(times), unit, repeats, min(times), max(times), dict(config or {}))


# ---- suite results ----------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class SuiteResult:
    suite: str
    created: str
    profile: dict
    versions: dict
    records: tuple[Record, ...]
    goals: tuple[Goal, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "records", tuple(self.records))
        object.__setattr__(self, "goals", tuple(self.goals))
        names = [r.name for r in self.records]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"suite {self.suite!r}: record names must be unique, repeated: {dup}")
        for g in self.goals:
            missing = [n for n in g.from_ if n not in names]
            if missing:
                raise ValueError(
                    f"goal {g.name!r} names records {missing} that suite {self.suite!r} did not record"
                )

    def record(self, name: str) -> Record:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(f"no record {name!r} in suite {self.suite!r}; have {[r.name for r in self.records]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "created": self.created,
            "profile": self.profile,
            "versions": self.versions,
            "records": [r.to_dict() for r in self.records],
            "goals": [g.to_dict() for g in self.goals],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SuiteResult:
        return cls(
            d["suite"],
            d["created"],
            dict(d["profile"]),
            dict(d["versions"]),
            tuple(Record.from_dict(r) for r in d["records"]),
            tuple(Goal.from_dict(g) for g in d["goals"]),
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> SuiteResult:
        return cls.from_dict(json.loads(text))


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


_OUTPUTS = (":!bench/results", ":!bench/README.md")  # pathspecs of what the benchmarks write


def git_commit(repo: Path | None = None) -> str | None:
    """HEAD of the checkout holding sysopt (with '-dirty' when it has local changes, untracked files
    included: a new module not yet added runs too), or None. The benchmarks' own outputs (bench/results/,
    bench/README.md's table) do not count: a suite writing its plots before it is stamped would otherwise
    mark every run dirty."""
    import sysopt

    repo = repo or Path(sysopt.__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "--no-optional-locks",
                "status",
                "--porcelain",
                "--",
                ".",
                *_OUTPUTS,
            ],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,  # a failed status is no stamp, not a clean one
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


def versions() -> dict[str, str | None]:
    """Versions that a benchmark number depends on (None where a package is absent)."""
    import sysopt

    return {
        "python": platform.python_version(),
        "sysopt": sysopt.__version__,
        "torch": _version("torch"),
        "triton": _version("triton"),
        "megatron-core": _version("megatron-core"),
        "deepspeed": _version("deepspeed"),
        "torchao": _version("torchao"),
        "numpy": _version("numpy"),
        "git_commit": git_commit(),
    }


# ---- suites -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchContext:
    """What a suite gets: how many repeats, quick mode, where to put artefacts, the machine profile
    (a HardwareProfile or None), and whether to draw progress bars."""

    repeats: int = 5
    quick: bool = False
    out_dir: Path = Path("bench/results")
    profile: Any = None
    show_progress: bool = False
    started_commit: str | None = None  # git_commit() when the suite started (sysopt-bench sets it)

    def track(self, items: Iterable, description: str) -> Iterable:
        """Iterate `items`, with a progress bar when enabled and there are several steps."""
        items = list(items)
        if not self.show_progress or len(items) < 2:
            return items
        from rich.progress import track

        return track(items, description=description, transient=True)

    def result(
        self, suite: str, records: Iterable[Record], goals: Iterable[Goal], profile: Any = None
    ) -> SuiteResult:
        """A SuiteResult stamped with now, versions() and the profile (`profile` overrides ctx's)."""
        profile = profile if profile is not None else self.profile
        profile_dict = profile.to_dict() if hasattr(profile, "to_dict") else dict(profile or {})
        stamp = versions()
        end = stamp["git_commit"]
        if self.started_commit is not None and end is not None and end != self.started_commit:
            # the code changed while the suite ran (an edit, a commit): the figures are of the code it started
            # with, which no commit holds for certain: that one, marked dirty, and the one at the end beside it
            stamp["git_commit_at_end"] = stamp["git_commit"]
            stamp["git_commit"] = self.started_commit.removesuffix("-dirty") + "-dirty"
        return SuiteResult(suite, now_iso(), profile_dict, stamp, tuple(records), tuple(goals))


SuiteFn = Callable[[BenchContext], SuiteResult]
SUITES: dict[str, SuiteFn] = {}


def register_suite(name: str) -> Callable[[SuiteFn], SuiteFn]:
    """Decorator: `@register_suite("schedules")` on `def run(ctx: BenchContext) -> SuiteResult`.
    Registering a name again replaces the earlier function (a re-imported suite file)."""
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"suite name {name!r} must be letters, digits, '_' or '-' (it names files)")

    def decorate(fn: SuiteFn) -> SuiteFn:
        SUITES[name] = fn
        return fn

    return decorate


# ---- result files -----------------------------------------------------------------------------


def _tmp_beside(path: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def write_result(result: SuiteResult, json_path: str | os.PathLike) -> tuple[Path, Path]:
    """Write the JSON and a PNG beside it (same stem, .png) atomically: both are rendered to
    temporary files first and renamed into place only when both succeeded. Returns both paths."""
    json_path = Path(json_path)
    png_path = json_path.with_suffix(".png")
    text = result.to_json()  # serialise first: a bad config fails before any file is touched
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_tmp, png_tmp = _tmp_beside(json_path), _tmp_beside(png_path)
    try:
        json_tmp.write_text(text + "\n")
        plot_result(result, png_tmp)
        os.replace(json_tmp, json_path)
        os.replace(png_tmp, png_path)
    finally:
        json_tmp.unlink(missing_ok=True)
        png_tmp.unlink(missing_ok=True)
    return json_path, png_path


def load_result(path: str | os.PathLike) -> SuiteResult:
    return SuiteResult.from_json(Path(path).read_text())


def _short(value: float) -> str:
    return f"{value:.3g}"


def plot_result(result: SuiteResult, png_path: str | os.PathLike) -> None:
    """Horizontal bars: one panel per record unit (median, with min-max whiskers), one for goals
    (value against target, green met / red not met)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    units: dict[str, list[Record]] = {}
    for r in result.records:
        units.setdefault(r.unit, []).append(r)
    panels: list[tuple[str, list]] = list(units.items())
    if result.goals:
        panels.append(("goals", list(result.goals)))
    if not panels:
        panels = [("(no records)", [])]
    heights = [0.3 * len(items) + 1.0 for _, items in panels]
    fig = Figure(figsize=(12, sum(heights) + 0.5), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (title, items) in zip(axes, panels):
        if title == "goals":
            _plot_goals(ax, items)
        else:
            _plot_records(ax, title, items)
    fig.suptitle(f"{result.suite}  ({result.created})", fontsize=11)
    fig.savefig(png_path, format="png", dpi=90)


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _plot_records(ax, unit: str, records: list[Record]) -> None:
    ys = list(range(len(records)))
    values = [r.value for r in records]
    lo = [max(r.value - r.min, 0.0) for r in records]
    hi = [max(r.max - r.value, 0.0) for r in records]
    ax.barh(ys, values, xerr=[lo, hi], color="tab:blue", alpha=0.8, capsize=2, error_kw={"linewidth": 0.8})
    ax.set_yticks(ys, [r.name for r in records], fontsize=7)
    ax.invert_yaxis()
    positive = [v for v in _finite(values) if v > 0]
    log = bool(positive) and max(positive) / min(positive) > 100
    if log:
        ax.set_xscale("log")
    right = max(_finite([r.max for r in records] + values) or [1.0])
    ax.set_xlim(right=right * (8 if log else 1.3))  # room for the value labels
    for y, r in zip(ys, records):  # label past the whisker, so bars and labels never overlap
        ax.annotate(f"  {_short(r.value)}", (max(r.max, r.value), y), va="center", fontsize=7)
    ax.set_xlabel(unit)
    ax.set_title(f"records [{unit}]: median, whiskers min..max", fontsize=9, loc="left")


def _plot_goals(ax, goals: list[Goal]) -> None:
    ys = list(range(len(goals)))
    values = [g.value if math.isfinite(g.value) else 0.0 for g in goals]
    thresholds = [parse_target(g.target)[1] for g in goals]
    ax.barh(ys, values, color=["tab:green" if g.met else "tab:red" for g in goals], alpha=0.8)
    for y, g, v, t in zip(ys, goals, values, thresholds):
        ax.plot([t, t], [y - 0.4, y + 0.4], color="black", linewidth=1.5)
        status = "met" if g.met else "NOT met"
        ax.annotate(
            f"  {_short(g.value)}  (target {g.target}: {status})", (max(v, t), y), va="center", fontsize=7
        )
    ax.set_xlim(min(0.0, *values, *thresholds), max([*values, *thresholds, 1e-12]) * 1.8)
    ax.set_yticks(ys, [g.name for g in goals], fontsize=7)
    ax.invert_yaxis()
    ax.set_title("goals: value (bar) against target (black tick)", fontsize=9, loc="left")
