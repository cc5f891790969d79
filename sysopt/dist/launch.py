"""Run a function on N local ranks with torch.distributed initialised, and never hang.

`launch(fn, world_size, args)` spawns one process per rank (gloo on CPU, NCCL when CUDA is
present), waits with a deadline, and turns a failing rank into a `LaunchError` carrying that
rank's traceback. Two limits: `timeout_s` bounds the whole launch (None: no bound), and
`collective_timeout_s` bounds each collective, so a rank left waiting by a peer fails with the operation
named instead of the launch timing out as a whole. Under torchrun, or srun with several tasks, the ranks come from the environment instead.
"""

from __future__ import annotations

import datetime
import math
import os
import pickle
import queue
import re
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class LaunchError(RuntimeError):
    """A rank failed; `rank` names it and `remote_traceback` holds its traceback."""

    def __init__(self, message: str, rank: int | None = None, remote_traceback: str = ""):
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback


DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0  # a collective's limit when neither timeout is given (Megatron-LM's 10 min)


def collective_timeout(timeout_s: float | None, collective_timeout_s: float | None) -> float:
    """The process groups' timeout: `collective_timeout_s`, else the launch's `timeout_s`, else 600 s."""
    for value in (collective_timeout_s, timeout_s):
        if value is not None:
            return float(value)
    return DEFAULT_COLLECTIVE_TIMEOUT_S


class LaunchTimeout(LaunchError):
    """The group did not finish within `timeout_s`; every rank was killed."""


class _Tee:
    """A text stream writing to two others (the terminal and a rank's log file)."""

    def __init__(self, primary: Any, copy: Any) -> None:
        self.primary, self.copy = primary, copy

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.primary.write(text)

    def flush(self) -> None:
        self.primary.flush()
        self.copy.flush()

    def isatty(self) -> bool:
        return self.primary.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.primary, name)


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (another process may take it before it is used;
    launch() does not use this: its ranks meet at a store it keeps bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


_SLURM_SPECIAL_STEPS = (
    0xFFFFFFF0  # step ids at or above: batch, extern, interactive, pending (not srun tasks)
)


def _slurm_step_world() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) of an srun step with more than one task, else None.

    An sbatch/salloc shell also exports SLURM_PROCID/SLURM_NTASKS, but it is one process, not a rank of
    a group: only a real step (SLURM_STEP_ID of an srun step) with several tasks counts."""
    env = os.environ
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    tasks = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
    if step is None or tasks is None or "SLURM_PROCID" not in env:
        return None
    if not step.isdigit() or int(step) >= _SLURM_SPECIAL_STEPS or int(tasks) <= 1:
        return None
    return int(env["SLURM_PROCID"]), int(tasks), int(env.get("SLURM_LOCALID", 0))


def _env_launcher() -> str | None:
    """Who started this process as one rank: "torchrun" (RANK/WORLD_SIZE), "slurm" (an srun step), or None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    return "slurm" if _slurm_step_world() is not None else None


def env_world() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when started by torchrun or by srun with several tasks, else None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))
    return _slurm_step_world()


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "node[1-3,5],gpu7" -> "node1", "a[007-009]" -> "a007"."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first entry: up to the first comma outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end].strip())


def slurm_rendezvous_env() -> None:
    """Under an srun step, set MASTER_ADDR (the step's first host) and MASTER_PORT (from the job and step
    ids, the same on every task) where they are unset."""
    env = os.environ
    if "MASTER_ADDR" not in env:
        nodelist = (
            env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        )
        if nodelist:
            env["MASTER_ADDR"] = first_host(nodelist)
    if "MASTER_PORT" not in env and env.get("SLURM_JOB_ID", "").isdigit():
        step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "0"))
        step_id = int(step) if step.isdigit() else 0
        env["MASTER_PORT"] = str(10000 + (int(env["SLURM_JOB_ID"]) + 101 * step_id) % 20000)


def _local_rank_from_env(rank: int) -> int:
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    found = _slurm_step_world()
    return found[2] if found is not None else rank


def init_process_group(
    rank: int,
    world_size: int,
    *,
    backend: str | None = None,
    timeout_s: float = 120.0,
    local_rank: int | None = None,
    store: dist.Store | None = None,
) -> None:
    """Initialise the default group from `store`, else from MASTER_ADDR/MASTER_PORT (under srun, derived from
    the SLURM variables where unset), binding the GPU of `local_rank` (default: LOCAL_RANK, else SLURM_LOCALID
    of an srun step, else `rank`)."""
    backend = backend or default_backend()
    if _slurm_step_world() is not None and store is None:
        slurm_rendezvous_env()
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and store is None:
        raise ValueError(
            f"{' and '.join(missing)} not set for rank {rank} of {world_size}: set MASTER_ADDR (the host of "
            f"rank 0) and MASTER_PORT (a free port there), or start the ranks with torchrun, srun, or launch()"
        )
    if backend == "nccl":  # one GPU per local rank
        if local_rank is None:
            local_rank = _local_rank_from_env(rank)
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise ValueError(
                f"backend='nccl' but rank {rank} of {world_size} sees no GPU (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use backend='gloo' for CPU tensors"
            )
        # modulo: a launcher that binds one GPU per task (srun --gpus-per-task, per-task CUDA_VISIBLE_DEVICES)
        # leaves each task its device 0 while the local ids run on (launch() itself checks its own spawns)
        torch.cuda.set_device(local_rank % gpus)
    dist.init_process_group(
        backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        store=store,
    )


def _worker(
    rank: int,
    world_size: int,
    fn: Callable[..., Any],
    args: Sequence[Any],
    backend: str,
    port: int,
    group_timeout_s: float,
    threads: int,
    log_dir: str | None,
    console_rank: int | None,
    results: Any,
    parent_env: dict[str, str],
    result_dir: str,
) -> None:
    os.environ.clear()  # a forkserver child has the server's old environment: take the caller's
    os.environ.update(parent_env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS=str(threads),
    )
    torch.set_num_threads(threads)
    if log_dir is not None:  # per-rank logs: stdout and stderr of this rank
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        log = open(Path(log_dir) / f"rank{rank}.log", "a", buffering=1)  # noqa: SIM115
        if rank == console_rank:  # this rank also stays on the terminal (progress bars, prints)
            sys.stdout = _Tee(sys.stdout, log)
            sys.stderr = _Tee(sys.stderr, log)
        else:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
    try:
        # a client of the store launch() holds open: its port was bound all along, so nothing could take it
        # between choosing it and the ranks' rendezvous (as with a port merely found free)
        store = dist.TCPStore(
            "127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=group_timeout_s)
        )
        init_process_group(
            rank, world_size, backend=backend, timeout_s=group_timeout_s, local_rank=rank, store=store
        )
        value = fn(*args)
        try:  # plain pickle: tensors travel by value, not as shared-memory handles that die with us
            payload = pickle.dumps(value)
        except Exception as exc:  # report instead of dying in the queue's feeder thread
            raise TypeError(f"rank {rank}: return value of {fn.__name__} is not picklable: {exc}") from exc
        results.put((rank, "ok", _deposit(result_dir, rank, payload)))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        text = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        results.put((rank, "error", _deposit(result_dir, rank, text.encode())))
        # into the pipe before the group closes below: the peers it leaves waiting fail on the closed
        # connections, and their errors must not reach the parent first (it reports the first error)
        results.close()
        results.join_thread()
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def _deposit(result_dir: str, rank: int, payload: bytes) -> str:
    """Write a rank's result to a file and return its path, which is all the queue carries: a short message
    reaches the pipe in one write, whole or not at all. A large one went through the pipe in pieces, and a
    rank killed midway left the parent blocked reading the rest, past any timeout."""
    path = Path(result_dir) / f"rank{rank}.result"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
    return str(path)


def _died_silently(procs: list, values: dict, reported: int | None = None) -> list[int]:
    """Ranks that exited non-zero (a signal, or a crash in native code) without reporting a result."""
    return [
        r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in values and r != reported
    ]


def _death_error(fn: Callable[..., Any], rank: int, exitcode: int | None, extra: str = "") -> LaunchError:
    if exitcode == 1:  # Python's status for an exception outside the worker's own reporting
        why = (
            "Python failed in the rank before it could run or report: most often fn cannot be imported there "
            "(defined in __main__ of `python -c`, a notebook or a script without an `if __name__ == "
            "'__main__':` guard); define fn in an importable module. The traceback went to this process's "
            "stderr (the rank fails before it sends its output to log_dir)"
        )
    else:
        how = f"signal {-exitcode}" if exitcode is not None and exitcode < 0 else "a crash in native code"
        why = f"{how}: killed, out of memory, or preempted"
    return LaunchError(
        f"rank {rank} of {fn.__name__} died with exit code {exitcode} before reporting ({why}){extra}",
        rank=rank,
    )


def _context():
    """forkserver with torch preloaded: each rank starts in ~0.1 s instead of re-importing torch
    (seconds per rank on 2 cores); spawn where forkserver does not exist."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "sysopt.dist.launch"])
    return ctx


def launch(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    backend: str | None = None,
    timeout_s: float | None = 120.0,
    collective_timeout_s: float | None = None,
    threads: int = 1,
    log_dir: str | os.PathLike | None = None,
    console_rank: int | None = 0,
) -> list[Any]:
    """Call `fn(*args)` on `world_size` ranks and return their results in rank order.

    `fn` must be a module-level function. With `log_dir`, each rank's output goes to
    log_dir/rank<N>.log, and `console_rank`'s is also kept on this terminal. Raises `LaunchError` with the first failing rank's
    traceback, or `LaunchTimeout` when the group runs past `timeout_s` (all ranks are killed; None: no
    limit). Each collective waits at most `collective_timeout_s` (default: `timeout_s`, else 600 s); a rank
    that waits longer fails with its backend's timeout error, which the LaunchError carries.
    """
    if not callable(fn):
        raise TypeError(f"fn={fn!r} is not callable; pass a module-level function")
    if int(world_size) < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    for name, value in (("timeout_s", timeout_s), ("collective_timeout_s", collective_timeout_s)):
        if value is not None and not value > 0:
            raise ValueError(f"{name}={value} must be > 0 seconds, or None (see launch's docstring)")
    group_timeout_s = collective_timeout(timeout_s, collective_timeout_s)
    backend = backend or default_backend()
    found = env_world()
    if found is not None:  # torchrun / SLURM: this process is one rank already
        rank, env_size, local_rank = found
        if env_size != world_size:
            if _env_launcher() == "slurm":
                raise ValueError(
                    f"world_size={world_size} but this srun step has {env_size} tasks (SLURM_STEP_NUM_TASKS/"
                    f"SLURM_NTASKS={env_size}); run it with srun --ntasks={world_size} or set parallel sizes "
                    f"to match"
                )
            raise ValueError(
                f"world_size={world_size} but the environment says WORLD_SIZE={env_size} (torchrun); "
                f"launch with torchrun --nproc-per-node={world_size} (times the node count) or set "
                f"parallel sizes to match"
            )
        if not dist.is_initialized():
            init_process_group(rank, world_size, backend=backend, timeout_s=group_timeout_s, local_rank=local_rank)
        return [fn(*args)]

    if (
        backend == "nccl" and world_size > torch.cuda.device_count()
    ):  # spawned here: all share this node's GPUs
        raise ValueError(
            f"world_size={world_size} NCCL ranks on this node, which has {torch.cuda.device_count()} GPU(s): two "
            'ranks on one GPU fail in NCCL ("Duplicate GPU detected"); use at most one rank per GPU, or '
            "backend='gloo' for CPU tensors"
        )
    try:  # each rank unpickles fn: fail here, clearly, not in a spawn with earlier ranks already waiting
        pickle.dumps(fn)
    except Exception as exc:  # noqa: BLE001 - pickling raises several types
        raise TypeError(
            f"fn={fn!r} cannot be sent to the ranks ({type(exc).__name__}: {exc}); pass a module-level function "
            "(not a lambda, a closure or a method of a local object) and give it its data through args"
        ) from exc
    ctx = _context()
    results = ctx.Queue()
    # the ranks' rendezvous, served from here on a port the OS picks and this store keeps bound
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=group_timeout_s),
    )
    port = store.port
    result_dir = tempfile.mkdtemp(prefix="sysopt-launch-")
    procs = []
    values: dict[int, Any] = {}
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_worker,
                args=(
                    rank,
                    world_size,
                    fn,
                    tuple(args),
                    backend,
                    port,
                    group_timeout_s,
                    threads,
                    None if log_dir is None else str(log_dir),
                    console_rank,
                    results,
                    dict(os.environ),
                    result_dir,
                ),
                daemon=True,
            )
            p.start()
            procs.append(p)
        _collect(fn, procs, values, world_size, timeout_s, results)
    finally:
        for p in procs:
            p.join(timeout=5.0 if len(values) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        results.close()
        shutil.rmtree(result_dir, ignore_errors=True)
        del store  # after the ranks are gone: they used it to the end (destroying their groups)
    return [values[r] for r in range(world_size)]


EXITED_CLEAN_GRACE_S = 2.0  # how long a rank that exited with status 0 may take to have its result read


def _collect(fn, procs, values, world_size, timeout_s, results) -> None:
    """Wait for every rank's result into values; raise on the first failure, a silent death, a rank that
    exited cleanly without a result, or the timeout (None: none)."""
    deadline = math.inf if timeout_s is None else time.monotonic() + timeout_s
    exited_clean: dict[int, float] = {}  # rank -> when it was first seen gone with status 0 and no result
    while len(values) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(values))
            raise LaunchTimeout(
                f"launch of {fn.__name__} on {world_size} ranks exceeded timeout_s={timeout_s}; "
                f"ranks {missing} had not finished (a hang or a deadlock); raise timeout_s if the "
                f"work is genuinely longer"
            )
        try:
            rank, status, path = results.get(timeout=min(remaining, 0.5))
        except queue.Empty:
            dead = _died_silently(procs, values)
            if dead:
                raise _death_error(fn, dead[0], procs[dead[0]].exitcode) from None
            now = time.monotonic()
            for r, p in enumerate(procs):
                if p.exitcode == 0 and r not in values:
                    # its result left with it (the pipe is flushed before a clean exit): after a grace for
                    # this loop to read it, nothing will come, and waiting for the timeout would only hang
                    if now - exited_clean.setdefault(r, now) > EXITED_CLEAN_GRACE_S:
                        raise LaunchError(
                            f"rank {r} of {fn.__name__} exited with status 0 without returning a result "
                            "(os._exit or a library calling it inside fn?); fn must return (or raise) on "
                            "every rank",
                            rank=r,
                        )
            continue
        payload = Path(path).read_bytes()
        if status == "error":
            payload = payload.decode(errors="replace")
            # a peer's death shows up on the survivors as a connection error: give the dead rank a
            # moment to be noticed and report it as the cause, with the survivor's error beside it
            grace_end = time.monotonic() + 2.0
            while time.monotonic() < grace_end and not _died_silently(procs, values, reported=rank):
                time.sleep(0.05)
            dead = _died_silently(procs, values, reported=rank)
            if dead:
                raise _death_error(
                    fn, dead[0], procs[dead[0]].exitcode, f"\nrank {rank} then failed with:\n{payload}"
                ) from None
            raise LaunchError(
                f"rank {rank} of {fn.__name__} failed:\n{payload}", rank=rank, remote_traceback=payload
            )
        values[rank] = pickle.loads(payload)
