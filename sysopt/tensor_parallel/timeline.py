"""Per-rank timeline of compute and communication spans, and how much communication it hid.

Exposed communication is the time some collective was in flight while no GEMM ran; the hidden
fraction is 1 - exposed / communication (both measured as unions of intervals, not sums).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

COMPUTE = "compute"
COMM = "comm"


@dataclass(frozen=True)
class Span:
    kind: str  # COMPUTE or COMM
    name: str
    start_s: float
    end_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Span:
        return cls(d["kind"], d["name"], float(d["start_s"]), float(d["end_s"]))


@dataclass(frozen=True)
class OverlapSummary:
    wall_s: float
    compute_s: float
    comm_s: float
    exposed_comm_s: float
    hidden_fraction: float  # 1 - exposed / comm; 1.0 when there was no communication

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OverlapSummary:
        return cls(**{k: float(v) for k, v in d.items()})


def merge_intervals(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint intervals covering the same points as `intervals`."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def covered_s(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in merge_intervals(intervals))


def uncovered_s(intervals: list[tuple[float, float]], cover: list[tuple[float, float]]) -> float:
    """Length of the union of `intervals` that lies outside the union of `cover`."""
    cover = merge_intervals(cover)
    total = 0.0
    for start, end in merge_intervals(intervals):
        left = end - start
        for c_start, c_end in cover:
            left -= max(0.0, min(end, c_end) - max(start, c_start))
        total += left
    return total


def summarize(spans: list[Span]) -> OverlapSummary:
    compute = [(s.start_s, s.end_s) for s in spans if s.kind == COMPUTE]
    comm = [(s.start_s, s.end_s) for s in spans if s.kind == COMM]
    comm_s = covered_s(comm)
    exposed_s = uncovered_s(comm, compute)
    wall_s = (max(s.end_s for s in spans) - min(s.start_s for s in spans)) if spans else 0.0
    return OverlapSummary(
        wall_s=wall_s,
        compute_s=covered_s(compute),
        comm_s=comm_s,
        exposed_comm_s=exposed_s,
        hidden_fraction=1.0 - exposed_s / comm_s if comm_s > 0 else 1.0,
    )


class Timeline:
    """Spans of one rank; thread-safe because collectives report completion from backend threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[Span] = []

    def add(self, kind: str, name: str, start_s: float, end_s: float) -> None:
        with self._lock:
            self._spans.append(Span(kind, name, start_s, end_s))

    @property
    def spans(self) -> list[Span]:
        with self._lock:
            return sorted(self._spans, key=lambda s: s.start_s)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def summary(self) -> OverlapSummary:
        return summarize(self.spans)


def plot_timelines(rows: dict[str, list[Span]], path: str | Path, title: str = "") -> Path:
    """One horizontal lane pair (compute above, communication below) per labelled row; times are
    shown relative to each row's first span, in milliseconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.75 * len(rows)))
    colours = {COMPUTE: "tab:blue", COMM: "tab:orange"}
    labels = []
    for i, (label, spans) in enumerate(rows.items()):
        t0 = min((s.start_s for s in spans), default=0.0)
        for s in spans:
            y = i + (0.0 if s.kind == COMPUTE else 0.38)
            ax.broken_barh(
                [((s.start_s - t0) * 1e3, (s.end_s - s.start_s) * 1e3)], (y, 0.34), color=colours[s.kind]
            )
        labels.append(label)
    ax.set_yticks([i + 0.36 for i in range(len(rows))], labels)
    ax.invert_yaxis()
    ax.set_xlabel("time since first span (ms); blue = GEMM, orange = collective in flight")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
