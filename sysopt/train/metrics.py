"""Run outputs: metrics.jsonl (one JSON object per logged step) and summary.json (written atomically)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from sysopt.train.checkpoint import atomic_write_text


def _parse_lines(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
    """(line, record) for each line of metrics file `path`, and the torn last line, if any: a last line
    without its newline that is not JSON is what a writer killed mid-line leaves, and is left out. A line
    that is not JSON anywhere else is corruption, reported with its line number."""
    text = path.read_text()
    lines = text.splitlines()
    out: list[tuple[str, dict[str, Any]]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                return out, line
            raise ValueError(
                f"{path} line {number} is not a JSON record ({exc}); only a torn last line is dropped on "
                f"resume: repair or delete line {number}, or delete {path.name} to start the log afresh"
            ) from exc
    return out, None


class MetricsLog:
    """Appends one JSON line per call; on resume, lines from steps at or after the resume point are
    dropped first so the file reads as one uninterrupted run (and so is a torn last line, what a rank
    killed while writing it leaves)."""

    def __init__(self, path: str | os.PathLike, resume_step: int = 0) -> None:
        self.path = Path(path)
        kept: list[str] = []
        if self.path.exists() and resume_step > 0:
            records, torn = _parse_lines(self.path)
            kept = [line for line, record in records if record.get("step", -1) < resume_step]
            if torn is not None:
                warnings.warn(
                    f"{self.path}: dropped a torn last line ({torn[:60]!r}), left by a writer killed mid-line",
                    stacklevel=2,
                )
        atomic_write_text(
            self.path, "".join(line + "\n" for line in kept)
        )  # a crash must not lose the history

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (a run writing it, or killed mid-line) is left out."""
    return [record for _, record in _parse_lines(Path(path))[0]]


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    atomic_write_text(Path(path), json.dumps(payload, indent=2, sort_keys=True) + "\n")
