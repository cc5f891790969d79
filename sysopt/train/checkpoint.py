"""Atomic, resumable checkpoints: a crash mid-save leaves the last good checkpoint intact.

Each checkpoint is one directory `step_<N>/` written under a temporary name and renamed into place;
`latest` is a small text file replaced atomically after the rename. Saving a step that already exists
renames the old directory aside (`.replaced_step_<N>/`) before the new one goes in and deletes it after,
so at every instant one complete directory is there or set aside; a crash in between is repaired by the
next load or save. Files, `latest` and the directory entries are fsynced. Everything loads with
torch.load(weights_only=True).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or does not match the job."""


REPLACED = ".replaced_"  # prefix of a step directory set aside while a new one with its name goes in


def _fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (renames into or out of it) durable, where the OS allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that a crash (of the process or of the machine) leaves the old file or the
    new one, never a torn or empty one: a temporary file, fsynced, renamed over `path`, the rename fsynced."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _restore_replaced(root: Path, name: str) -> None:
    """Put `name` back from its set-aside copy when a crash came between setting it aside and renaming its
    successor in (several ranks may race here: the first rename wins, the others find nothing to do)."""
    aside = root / f"{REPLACED}{name}"
    if not (root / name).is_dir() and aside.is_dir():
        try:
            os.replace(aside, root / name)
        except OSError:
            pass
        _fsync_dir(root)


def _settle_replaced(root: Path) -> None:
    """Repair what a crashed commit left: a set-aside directory goes back when its step is missing, and is
    deleted when the step is there (the crash came after the new one was renamed in)."""
    for aside in root.glob(f"{REPLACED}step_*"):
        name = aside.name[len(REPLACED) :]
        if (root / name).is_dir():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            _restore_replaced(root, name)


def stage_checkpoint(root: str | os.PathLike, step: int, files: dict[str, Any]) -> Path:
    """Write `files` ({name: state}) into the staging directory of `step` (several ranks may add
    their own files to it); nothing is visible as a checkpoint until `commit_checkpoint`."""
    tmp = Path(root) / f".tmp_step_{step:08d}"
    tmp.mkdir(parents=True, exist_ok=True)
    for name, state in files.items():
        part = tmp / f".{name}.pt.part"
        with open(part, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, tmp / f"{name}.pt")
    return tmp


def commit_checkpoint(root: str | os.PathLike, step: int) -> Path:
    """Rename the staged directory of `step` into place, then point `latest` at it. An existing directory
    of that step is renamed aside first and deleted last, so a crash never leaves `latest` naming nothing."""
    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    aside = root / f"{REPLACED}{final.name}"
    _settle_replaced(root)
    _fsync_dir(tmp)
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST, final.name)
    shutil.rmtree(aside, ignore_errors=True)
    return final


def save_checkpoint(root: str | os.PathLike, step: int, files: dict[str, Any]) -> Path:
    """One writer: stage `files` for `step` and commit them (a crash before the commit leaves the
    previous checkpoint as `latest`)."""
    shutil.rmtree(Path(root) / f".tmp_step_{step:08d}", ignore_errors=True)
    stage_checkpoint(root, step, files)
    return commit_checkpoint(root, step)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The directory `latest` names, or None when there is no checkpoint yet. When a crash came between
    setting that directory aside and renaming its successor in, the set-aside copy is returned as it is:
    reading never renames (a reader racing a writer's commit would break it); the next save repairs."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    aside = Path(root) / f"{REPLACED}{path.name}"
    if not path.is_dir() and aside.is_dir():
        return aside
    if not path.is_dir():
        raise CheckpointError(
            f"{pointer} names {path.name}, which does not exist (the checkpoints were moved or deleted)"
        )
    return path


def load_checkpoint(path: str | os.PathLike, names: list[str]) -> dict[str, Any]:
    """{name: state} for the given files of one checkpoint directory, loaded with weights_only=True."""
    out = {}
    for name in names:
        file = Path(path) / f"{name}.pt"
        if not file.exists():
            raise CheckpointError(
                f"checkpoint {path} has no {name}.pt; it is incomplete or from another job: delete {Path(path)} "
                "to resume from the checkpoint before it, if there is one, or set train.resume=false"
            )
        try:
            out[name] = torch.load(file, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
            raise CheckpointError(
                f"checkpoint file {file} cannot be read ({exc}); it is corrupt: delete {Path(path)} to resume "
                "from the checkpoint before it, if there is one, or set train.resume=false to start over"
            ) from exc
    return out


RUN_LOCK = "run.lock"


class RunDirectoryBusy(CheckpointError):
    """Another live run holds the run directory."""


class run_lock:  # noqa: N801 - used as a context manager: `with run_lock(out_dir):`
    """Hold `out_dir` for one run: a second run started on the same directory (a double submit, a requeue
    while the first still runs) would truncate its metrics and clear its checkpoint staging.

    An exclusive flock on `<out_dir>/run.lock`, held until exit: the kernel drops it when the holding process
    dies, so a crashed run's lock never needs taking over. Across hosts it holds where the shared filesystem
    supports flock (NFSv4, Lustre mounted with flock); elsewhere it guards one host's runs only. The file
    names the holder (host, pid, since) for the message a refused run prints."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.path = Path(out_dir) / RUN_LOCK
        self._fd: int | None = None

    def __enter__(self) -> run_lock:
        import fcntl
        import json
        import socket
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise RunDirectoryBusy(
                f"{self.path.parent} is in use by another run (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, since {holder.get('since', '?')}): two runs in one directory "
                f"overwrite each other's metrics and checkpoints; wait for it to end, stop it, or give this "
                f"run another hydra.run.dir"
            ) from None
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock; the file stays (it names the last holder)
            self._fd = None
