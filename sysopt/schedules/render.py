"""Pictures of a Simulation: a Gantt chart PNG (matplotlib, imported lazily) and a compact text form."""

from __future__ import annotations

from pathlib import Path

from sysopt.schedules.ir import Kind
from sysopt.schedules.simulate import Simulation

COLORS = {  # RGB hex per compute kind
    Kind.FORWARD: "#4c72b0",
    Kind.BACKWARD: "#8c564b",
    Kind.BACKWARD_INPUT: "#55a868",
    Kind.BACKWARD_WEIGHT: "#dd8452",
}
IDLE = "."


def render(simulation: Simulation, path: str | Path | None = None, **kwargs) -> str:
    """Write a Gantt PNG to ``path`` and return the path, or return the text form when no path is given."""
    if path is None:
        return text(simulation, **kwargs)
    return gantt_png(simulation, path, **kwargs)


def text(simulation: Simulation, time_per_char: float | None = None, width: int = 120) -> str:
    """One row per rank; each action spans its duration in characters and starts with its label
    (``F3``, ``I3``, ``W3``, ``B3``; with the stage in front, ``2F3``, when a rank holds several stages);
    ``.`` is idle time. ``time_per_char`` defaults to step_time / width."""
    step = simulation.step_time
    quantum = time_per_char if time_per_char else (step / width if step > 0 else 1.0)
    columns = round(step / quantum)
    rows = [f"{simulation.schedule_name}: step_time={step:g} bubble={simulation.bubble_fraction:.3f}"]
    for rank, spans in sorted(simulation.timeline.items()):
        cells = [IDLE] * columns
        several = len({s.action.stage for s in spans}) > 1
        for span in spans:
            lo, hi = round(span.start / quantum), round(span.end / quantum)
            a = span.action
            label = str(a) if several else f"{a.kind.value}{a.microbatch}"
            segment = (label + " " * (hi - lo))[: hi - lo]
            cells[lo:hi] = list(segment)
        rows.append(f"rank {rank:>2} |{''.join(cells)}|")
    return "\n".join(rows)


def gantt_png(simulation: Simulation, path: str | Path, dpi: int = 100) -> str:
    """Ranks as rows, actions as bars coloured by kind (lighter for later chunks), microbatch numbers inside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ranks = sorted(simulation.timeline)
    stages = {r: sorted({s.action.stage for s in simulation.timeline[r]}) for r in ranks}
    fig, ax = plt.subplots(figsize=(max(8.0, simulation.step_time * 0.12), 0.6 * len(ranks) + 1.2))
    for rank in ranks:
        for span in simulation.timeline[rank]:
            chunk = stages[rank].index(span.action.stage)
            width = span.end - span.start
            ax.barh(
                rank,
                width,
                left=span.start,
                height=0.8,
                color=COLORS[span.action.kind],
                alpha=1.0 if chunk == 0 else 0.55,
                edgecolor="black",
                linewidth=0.3,
            )
            if width > 0:
                ax.text(
                    span.start + width / 2,
                    rank,
                    str(span.action.microbatch),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white",
                )
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlim(0, simulation.step_time)
    ax.set_xlabel("time")
    ax.set_title(
        f"{simulation.schedule_name}: step {simulation.step_time:g}, bubble {simulation.bubble_fraction:.1%}"
    )
    used = {s.action.kind for spans in simulation.timeline.values() for s in spans}
    names = {
        Kind.FORWARD: "F",
        Kind.BACKWARD: "B (full)",
        Kind.BACKWARD_INPUT: "I",
        Kind.BACKWARD_WEIGHT: "W",
    }
    ax.legend(
        handles=[Patch(color=COLORS[k], label=names[k]) for k in COLORS if k in used],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)
