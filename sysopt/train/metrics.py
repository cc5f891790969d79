"""Run outputs: metrics.jsonl (one JSON object per logged step) and summary.json (written atomically)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON line per call; on resume, lines from steps at or after the resume point are
    dropped first so the file reads as one uninterrupted run."""

    def __init__(self, path: str | os.PathLike, resume_step: int = 0) -> None:
        self.path = Path(path)
        kept: list[str] = []
        if self.path.exists() and resume_step > 0:
            for line in self.path.read_text().splitlines():
                if line.strip() and json.loads(line).get("step", -1) < resume_step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
