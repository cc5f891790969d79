"""Launcher behaviour (results, errors, timeouts) and topology agreement with megatron-core."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from sysopt.dist import LaunchError, LaunchTimeout, Topology, build_groups, launch


def _rank_and_sum():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), t.item(), os.environ["OMP_NUM_THREADS"]


def _raise_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom from rank one")
    dist.barrier()  # rank 0 waits here forever unless the launcher ends the group
    return "unreachable"


def _sleep_forever():
    time.sleep(600)


@pytest.mark.timeout(60)
def test_launch_returns_results_in_rank_order():
    out = launch(_rank_and_sum, 3, timeout_s=50)
    assert [r for r, _, _ in out] == [0, 1, 2]
    assert all(total == 6.0 for _, total, _ in out)
    assert all(threads == "1" for _, _, threads in out)


@pytest.mark.timeout(60)
def test_failing_rank_propagates_its_traceback_fast():
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(_raise_on_rank_one, 2, timeout_s=50)
    assert info.value.rank == 1
    assert "boom from rank one" in str(info.value)
    assert "_raise_on_rank_one" in info.value.remote_traceback
    assert not isinstance(info.value, LaunchTimeout)
    assert time.monotonic() - start < 40  # did not wait for the timeout


@pytest.mark.timeout(60)
def test_hang_becomes_timeout():
    start = time.monotonic()
    with pytest.raises(LaunchTimeout, match="timeout_s=3"):
        launch(_sleep_forever, 2, timeout_s=3)
    assert time.monotonic() - start < 30


def _all_reduce_that_rank_one_skips():
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(4))  # rank 1 never joins: a deadlock
    else:
        time.sleep(600)
    return "unreachable"


@pytest.mark.timeout(60)
def test_a_collective_that_never_completes_fails_after_collective_timeout_s_naming_it():
    """The process groups took the launch's timeout, so a deadlocked trainer (train.timeout_s) surfaced only
    as a bare LaunchTimeout when the whole run's limit ran out. The collective's own timeout now fails the
    waiting rank first, with the backend's error, and the launch reports that rank."""
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(_all_reduce_that_rank_one_skips, 2, timeout_s=50, collective_timeout_s=2)
    assert not isinstance(info.value, LaunchTimeout)
    assert info.value.rank == 0
    assert "all_reduce" in info.value.remote_traceback and "Timed out" in info.value.remote_traceback
    assert time.monotonic() - start < 30


def _exit_cleanly_on_rank_one():
    if dist.get_rank() == 1:
        os._exit(0)
    return "rank 0"


@pytest.mark.timeout(60)
def test_a_rank_that_exits_with_status_0_without_a_result_fails_the_launch_fast():
    """Only a non-zero exit counted as a death: a rank gone with status 0 (os._exit inside fn) left the launch
    waiting for its result until timeout_s."""
    start = time.monotonic()
    with pytest.raises(LaunchError, match="rank 1 .* exited with status 0 without returning a result"):
        launch(_exit_cleanly_on_rank_one, 2, timeout_s=40)
    assert time.monotonic() - start < 20


@pytest.mark.timeout(60)
def test_launch_survives_the_port_it_found_free_being_taken(monkeypatch):
    """launch() found a free port, closed it, and the ranks bound it later: another process taking it in
    between failed the launch with "address already in use". Now the ranks meet at a store the parent keeps
    bound; here every port free_port() names is already taken."""
    import importlib
    import socket

    launch_module = importlib.import_module("sysopt.dist.launch")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(launch_module, "free_port", lambda: taken.getsockname()[1])
        out = launch(_rank_and_sum, 2, timeout_s=50)
    assert [total for _, total, _ in out] == [3.0, 3.0]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(timeout_s=0), "timeout_s=0 must be > 0"),
        (dict(timeout_s=-1.0), "timeout_s=-1.0 must be > 0"),
        (dict(timeout_s=10, collective_timeout_s=0), "collective_timeout_s=0 must be > 0"),
    ],
)
def test_launch_refuses_timeouts_that_are_not_positive(kwargs, message):
    with pytest.raises(ValueError, match=message):
        launch(_rank_and_sum, 2, **kwargs)


def test_collective_timeout_defaults_to_the_launch_timeout_then_600_s():
    from sysopt.dist.launch import DEFAULT_COLLECTIVE_TIMEOUT_S, collective_timeout

    assert collective_timeout(30.0, None) == 30.0
    assert collective_timeout(30.0, 7.0) == 7.0
    assert collective_timeout(None, 7.0) == 7.0
    assert collective_timeout(None, None) == DEFAULT_COLLECTIVE_TIMEOUT_S == 600.0


@pytest.mark.timeout(60)
def test_a_launch_without_a_time_limit_still_returns():
    out = launch(_rank_and_sum, 2, timeout_s=None, collective_timeout_s=30)
    assert [total for _, total, _ in out] == [3.0, 3.0]


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 1), (2, 1, 1), (1, 2, 3), (2, 2, 2), (4, 2, 1), (2, 3, 2)])
def test_coords_are_a_bijection(tp, pp, dp):
    topo = Topology(tp=tp, pp=pp, dp=dp)
    seen = set()
    for rank in range(topo.world_size):
        c = topo.coords(rank)
        assert topo.rank_of(tp=c.tp, pp=c.pp, dp=c.dp) == rank
        seen.add((c.tp, c.pp, c.dp))
    assert len(seen) == topo.world_size
    # every rank is in exactly one group of each kind, of the right size
    for groups, size in ((topo.tp_groups(), tp), (topo.pp_groups(), pp), (topo.dp_groups(), dp)):
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(topo.world_size))
        assert all(len(g) == size for g in groups)


def test_bad_topology_messages():
    with pytest.raises(ValueError, match=r"parallel.tp=0"):
        Topology(tp=0)
    with pytest.raises(ValueError, match=r"parallel.vpp=2.*pp=1"):
        Topology(pp=1, vpp=2)
    with pytest.raises(ValueError, match=r"does not equal the world size 4; change parallel.dp to 1 "):
        Topology(tp=2, pp=2, dp=2).check_world(4)
    # no dp makes 2*2*dp = 6: the message must not suggest one
    with pytest.raises(ValueError, match=r"no parallel.dp fits, since 6 is not a multiple of tp\*pp = 4"):
        Topology(tp=2, pp=2, dp=1).check_world(6)


MEGATRON_SHAPES = [(2, 2), (2, 1), (1, 2), (4, 2), (1, 4), (8, 1)]  # (tp, pp) on 8 ranks


def _megatron_groups():
    from megatron.core import parallel_state as ps

    world = dist.get_world_size()
    results = []
    for tp, pp in MEGATRON_SHAPES:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, create_gloo_process_groups=False
        )
        ours = build_groups(Topology(tp=tp, pp=pp, dp=world // (tp * pp)))
        theirs = {
            "tp": sorted(dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())),
            "pp": sorted(dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())),
            "dp": sorted(dist.get_process_group_ranks(ps.get_data_parallel_group())),
            "coords": (
                ps.get_tensor_model_parallel_rank(),
                ps.get_pipeline_model_parallel_rank(),
                ps.get_data_parallel_rank(),
            ),
        }
        mine = {
            "tp": sorted(ours.tp_ranks),
            "pp": sorted(ours.pp_ranks),
            "dp": sorted(ours.dp_ranks),
            "coords": (ours.coords.tp, ours.coords.pp, ours.coords.dp),
        }
        results.append((theirs, mine))
        ps.destroy_model_parallel()
    return results


@pytest.mark.timeout(240)
def test_topology_matches_megatron_core():
    """Several shapes on 8 ranks, tp=2 pp=2 dp=2 among them: same groups and coordinates."""
    for per_rank in launch(_megatron_groups, 8, timeout_s=200):
        assert len(per_rank) == len(MEGATRON_SHAPES)
        for theirs, mine in per_rank:
            assert mine == theirs


def _bucketed_vs_flat():
    from sysopt.dist import BucketedGradSync

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
    torch.manual_seed(100 + dist.get_rank())  # different data per rank
    x = torch.randn(8, 64)
    sync = BucketedGradSync(model.parameters(), None, bucket_bytes=64 * 64 * 4 * 2, average=True)
    model(x).square().sum().backward()
    started = sync.reductions_started_in_backward
    sync.wait()
    bucketed = [p.grad.clone() for p in model.parameters()]
    # reference: the plain average of every rank's local gradients
    model.zero_grad()
    sync.enabled = False
    model(x).square().sum().backward()
    local = torch.cat([p.grad.flatten() for p in model.parameters()])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    expected = torch.stack(gathered).mean(0)
    return started, len(sync.buckets), torch.cat([g.flatten() for g in bucketed]), expected


@pytest.mark.timeout(60)
def test_bucketed_grad_sync_overlaps_backward_and_averages():
    for started, n_buckets, got, expected in launch(_bucketed_vs_flat, 2, timeout_s=50):
        assert n_buckets >= 3
        assert started == n_buckets  # every bucket launched from a hook, during backward
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def _sum_over_ranks(tensors):
    out = []
    for t in tensors:
        t = torch.zeros(()) if t is None else t.clone()
        dist.all_reduce(t)
        out.append(t)
    return out


def _unused_param_on_one_rank():
    from sysopt.dist import BucketedGradSync

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    sync = BucketedGradSync([a, b], None, bucket_bytes=64)  # one bucket each: [b], [a]
    x = torch.ones(2, 4)

    def loss():  # rank 0 fills a's bucket (index 1) first; rank 1 never uses a
        return ((x @ b) @ a).sum() if dist.get_rank() == 0 else (x @ b).sum() * 10.0

    local = [
        torch.zeros(4, 4) if g is None else g for g in torch.autograd.grad(loss(), [a, b], allow_unused=True)
    ]
    expected = _sum_over_ranks(local)
    loss().backward()
    sync.wait()
    return [a.grad, b.grad], expected


@pytest.mark.timeout(60)
def test_bucketed_grad_sync_launches_buckets_in_the_same_order_on_every_rank():
    # a parameter unused on one rank used to make the ranks launch buckets in different orders, so gloo
    # summed rank 0's bucket of `a` with rank 1's bucket of `b`
    for got, expected in launch(_unused_param_on_one_rank, 2, timeout_s=50):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)


def _rounds():
    from sysopt.dist import BucketedGradSync

    rank = dist.get_rank()
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    sync = BucketedGradSync(lin.parameters(), None)  # one bucket
    x = torch.ones(2, 4) * (rank + 1)
    out = {}

    def expect(*losses):
        local = [sum(gs) for gs in zip(*(torch.autograd.grad(f(), list(lin.parameters())) for f in losses))]
        return _sum_over_ranks(local)

    def first():
        return lin(x).sum()

    def second():
        return lin(2 * x).square().sum()

    # (a) two backward passes in one round with sync enabled: a clear error, not a dropped gradient
    first().backward()
    try:
        second().backward()
        out["double_backward_error"] = ""
    except RuntimeError as exc:
        out["double_backward_error"] = str(exc)
    sync.reset()  # the round is discarded; accumulation as the error says: enabled for the last pass only
    lin.zero_grad()
    sync.enabled = False
    first().backward()
    sync.enabled = True
    second().backward()
    sync.wait()
    out["accumulated"] = ([p.grad.clone() for p in lin.parameters()], expect(first, second))

    # (b) a backward that raises after the bucket launched: the next step must not apply that reduction
    lin.zero_grad(set_to_none=True)
    handle = lin.weight.register_post_accumulate_grad_hook(
        lambda _p: (_ for _ in ()).throw(RuntimeError("abort"))
    )
    try:
        (first() * 100).backward()
    except RuntimeError:
        pass
    handle.remove()
    lin.zero_grad(set_to_none=True)
    second().backward()
    sync.wait()
    out["after_abort"] = ([p.grad.clone() for p in lin.parameters()], expect(second))

    # (c) an explicit reset() discards a finished backward's round
    lin.zero_grad(set_to_none=True)
    (first() * 100).backward()
    sync.reset()
    lin.zero_grad(set_to_none=True)
    first().backward()
    sync.wait()
    out["after_reset"] = ([p.grad.clone() for p in lin.parameters()], expect(first))
    return out


@pytest.mark.timeout(60)
def test_bucketed_grad_sync_rounds_never_apply_a_stale_reduction():
    for out in launch(_rounds, 2, timeout_s=50):
        message = out["double_backward_error"]
        assert "second gradient before wait()" in message and "sync.enabled=False" in message
        for name in ("accumulated", "after_abort", "after_reset"):
            got, expected = out[name]
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables from the machine running the tests; os.environ restored afterwards."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        ):
            del os.environ[key]
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


def _srun_step(env, *, procid, ntasks, localid, job_id="4242", nodelist="gpu[03-04,07]"):
    env.update(
        SLURM_JOB_ID=job_id,
        SLURM_STEP_ID="0",
        SLURM_PROCID=str(procid),
        SLURM_NTASKS=str(ntasks),
        SLURM_STEP_NUM_TASKS=str(ntasks),
        SLURM_LOCALID=str(localid),
        SLURM_STEP_NODELIST=nodelist,
    )


@pytest.mark.timeout(60)
def test_slurm_shell_with_one_task_or_batch_step_is_not_a_rank(clean_env):
    from sysopt.dist import env_world

    clean_env.update(SLURM_JOB_ID="77", SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0")
    assert env_world() is None  # an salloc/sbatch shell with --ntasks=1
    clean_env.update(SLURM_NTASKS="4", SLURM_STEP_ID=str(0xFFFFFFFE))
    assert env_world() is None  # the batch script of an --ntasks=4 job: one process, not rank 0 of 4
    assert [r for r, _, _ in launch(_rank_and_sum, 2, timeout_s=50)] == [0, 1]  # spawns its own ranks


def test_first_host_of_slurm_nodelists():
    from sysopt.dist.launch import first_host

    assert first_host("node[1-3,5]") == "node1"
    assert first_host("a[007-009],b1") == "a007"
    assert first_host("gpu7,node[1-2]") == "gpu7"
    assert first_host("rack[2-3]-n[04,06]") == "rack2-n04"
    assert first_host("host") == "host"


def _no_collectives(tag):
    return tag


def test_srun_step_rendezvous_from_slurm_variables(clean_env, monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((dict(os.environ), k)))
    _srun_step(clean_env, procid=1, ntasks=2, localid=1)
    assert launch(_no_collectives, 2, ("x",), backend="gloo") == ["x"]  # this process is rank 1 of 2
    env, kwargs = calls[0]
    assert (kwargs["rank"], kwargs["world_size"]) == (1, 2)
    assert env["MASTER_ADDR"] == "gpu03"  # the step's first host
    port = int(env["MASTER_PORT"])
    assert 1024 < port < 65536
    _srun_step(clean_env, procid=0, ntasks=2, localid=0)  # rank 0 derives the same port from the job id
    del clean_env["MASTER_ADDR"], clean_env["MASTER_PORT"]
    launch(_no_collectives, 2, ("x",), backend="gloo")
    assert calls[1][0]["MASTER_PORT"] == str(port)
    with pytest.raises(ValueError, match=r"srun step has 2 tasks.*srun --ntasks=4"):
        launch(_no_collectives, 4, ("x",), backend="gloo")


def test_nccl_device_comes_from_slurm_localid(clean_env, monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: None)
    # 2 nodes x 2 GPUs, srun -n 4 --distribution=cyclic: global rank 2 is the second task on node 0
    _srun_step(clean_env, procid=2, ntasks=4, localid=1)
    launch(_no_collectives, 4, ("x",), backend="nccl")
    from sysopt.dist.launch import init_process_group

    init_process_group(2, 4, backend="nccl")  # called directly, without the local rank
    assert chosen == [1, 1]


def test_nccl_refuses_more_spawned_ranks_than_gpus_and_keeps_per_task_binding(clean_env, monkeypatch):
    """launch() refuses to spawn more NCCL ranks than this node has GPUs (two ranks on one GPU fail much later
    in NCCL with "Duplicate GPU detected"); a rank that sees no GPU is refused; a launcher that binds one GPU
    per task (srun --gpus-per-task=1: every task sees device 0) still works at any local id."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: None)
    with pytest.raises(ValueError, match=r"world_size=3 NCCL ranks on this node, which has 2 GPU"):
        launch(_no_collectives, 3, ("x",), backend="nccl")
    from sysopt.dist.launch import init_process_group

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    clean_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    with pytest.raises(ValueError, match=r"backend='nccl' but rank 0 of 2 sees no GPU"):
        init_process_group(0, 2, backend="nccl", local_rank=0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _srun_step(clean_env, procid=3, ntasks=4, localid=3)  # 4 tasks, one GPU bound to each
    launch(_no_collectives, 4, ("x",), backend="nccl")
    assert chosen == [0]


def test_forced_megatron_shims_make_cuda_synchronize_a_no_op():
    """megatron's p2p shape exchange calls torch.cuda.synchronize unconditionally; under the forced CPU shims
    (current_device is "cpu") the real call fails on a GPU host, and without CUDA it always fails."""
    from sysopt.dist.megatron_shims import megatron_cpu_shims

    real = torch.cuda.synchronize
    with megatron_cpu_shims(force=True):
        assert torch.cuda.synchronize() is None and torch.cuda.current_device() == "cpu"
    assert torch.cuda.synchronize is real


def test_trainer_and_block_timing_launch_over_gloo_even_with_cuda_visible(monkeypatch, tmp_path):
    """The trainer's model and collectives are on the CPU: a GPU host (where launch's default is NCCL) must
    still run its ranks over gloo, or the first gradient all-reduce fails on CPU tensors."""
    import sysopt.train.loop as loop
    from sysopt.train import JobConfig

    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loop, "launch", lambda fn, n, **kw: seen.append(kw.get("backend")) or [{}])
    monkeypatch.setattr(loop, "validate", lambda job: None)
    job = JobConfig.from_dict({"parallel": {"dp": 2}})
    assert job.world_size == 2
    loop.run_training(job, tmp_path)
    assert seen == ["gloo"]

    import sysopt.dist
    from sysopt.planner.layer_times import measure_layer_times
    from sysopt.planner.measure import base_job_for

    blocks = 9  # the default VLM's blocks at tp=2, the scatter and gather included
    fake = lambda fn, n, args, **kw: seen.append(kw.get("backend")) or [[([1e-3] * blocks,) * 4]]  # noqa: E731
    monkeypatch.setattr(sysopt.dist, "launch", fake)
    base = base_job_for(job.model, job.data, global_batch=16, steps=2)
    measure_layer_times(base, [(None, 2, "none", 1, 8)], rounds=1, progress=False)
    assert seen == ["gloo", "gloo"]  # the tp=2 block timing too


def test_a_rank_that_exits_with_status_1_is_not_called_a_native_crash():
    from sysopt.dist.launch import _death_error

    message = str(_death_error(_no_collectives, 1, 1))
    assert "exit code 1" in message and "define fn in an importable module" in message
    assert "native code" not in message
    assert "signal 9: killed, out of memory, or preempted" in str(_death_error(_no_collectives, 0, -9))


class _KilledWhileSent:
    """A result that SIGKILLs its own rank 0.6 s after it starts being pickled: past the pickling of its
    256 MiB (~0.1 s), while it is on its way to the parent (or just after it arrived)."""

    def __init__(self) -> None:
        self.data = bytes(256 << 20)

    def __reduce__(self):
        import signal
        import threading

        threading.Timer(0.6, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
        return (bytes, (self.data,))


def _big_result_then_killed():
    return _KilledWhileSent()


@pytest.mark.timeout(60)
def test_a_rank_killed_while_sending_a_large_result_never_hangs_the_launch():
    """The result crosses as a file and the queue carries only its path. A rank killed part-way fails the
    launch at once (or, where its result had arrived, the launch returns it). It used to leave the parent
    blocked reading the rest of a message, past timeout_s (the old code hung here)."""
    start = time.monotonic()
    try:
        out = launch(_big_result_then_killed, 2, backend="gloo", timeout_s=30)
        assert [len(b) for b in out] == [256 << 20] * 2
    except LaunchError as exc:
        assert "died with exit code -9" in str(exc)
    assert time.monotonic() - start < 30


@pytest.mark.timeout(60)
def test_launch_refuses_a_function_the_ranks_cannot_unpickle_before_spawning(monkeypatch):
    """A lambda used to fail inside the spawn with a bare pickling error."""
    import importlib

    launch_module = importlib.import_module("sysopt.dist.launch")
    monkeypatch.setattr(launch_module, "_context", lambda: pytest.fail("spawned before checking fn"))
    with pytest.raises(TypeError, match="pass a module-level function"):
        launch(lambda: 1, 2, timeout_s=30)


@pytest.mark.timeout(60)
def test_a_rank_that_cannot_start_leaves_no_directory_behind(monkeypatch, tmp_path):
    import importlib
    import tempfile

    launch_module = importlib.import_module("sysopt.dist.launch")
    made = []
    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(
        launch_module.tempfile,
        "mkdtemp",
        lambda **kw: made.append(real_mkdtemp(dir=tmp_path, **kw)) or made[-1],
    )
    with pytest.raises(Exception, match="pickle"):
        launch(_rank_and_sum, 2, args=(lambda: 0,), timeout_s=30)  # args the ranks cannot receive
    assert len(made) == 1 and not os.path.exists(made[0])
