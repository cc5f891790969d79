"""3D training: tp x pp (x dp) runs equal single-process training; offload and precision from config;
a pipelined run resumes bit-exactly after a crash."""

import dataclasses

import pytest
import torch

from sysopt.data import DigitsTaskConfig
from sysopt.train import JobConfig, OptimConfig, TrainConfig, read_metrics, run_training
from sysopt.train.checkpoint import latest_checkpoint, load_checkpoint
from sysopt.train.config import OffloadConfig, ParallelConfig, PrecisionConfig, ScheduleConfig
from sysopt.train.loop import FAULT_ENV


def base_job(**train) -> JobConfig:
    t = dict(max_steps=5, global_batch=16, log_every=1, timeout_s=240)
    t.update(train)
    return JobConfig(optim=OptimConfig(warmup_steps=2), train=TrainConfig(**t))


def losses(path):
    return [r["loss"] for r in read_metrics(path / "metrics.jsonl")]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("single")
    summary = run_training(base_job(), out)
    return losses(out), summary


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "parallel, schedule",
    [
        (ParallelConfig(tp=2, pp=2, vpp=2, tp_overlap="chunked", tp_chunks=3), ScheduleConfig("zbv", 4)),
        (ParallelConfig(dp=2, pp=2), ScheduleConfig("1f1b", 4, receive_ahead=1)),
        (ParallelConfig(pp=2, vpp=2, boundaries=(0, 2, 4, 5, 7)), ScheduleConfig("zb_greedy", 4)),
    ],
    ids=["tp2-pp2-vpp2-zbv-chunked3", "dp2-pp2-1f1b-ahead1", "pp2-vpp2-zb_greedy-given-split"],
)
def test_parallel_training_equals_single_process(tmp_path, single, parallel, schedule):
    ref_losses, ref_summary = single
    job = dataclasses.replace(base_job(), parallel=parallel, schedule=schedule)
    summary = run_training(job, tmp_path)
    got = losses(tmp_path)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert len(summary["pipeline_boundaries"]) == parallel.pp * parallel.vpp + 1
    if parallel.tp > 1:  # parallel.tp_chunks is the chunk count every TP linear ran
        plans = summary["tp_overlap_plans"]
        assert plans and all(p == {"forward": "chunked:3", "backward": "chunked:3"} for p in plans.values())
    if parallel.boundaries is not None:  # a given split is the one that runs
        assert tuple(summary["pipeline_boundaries"]) == parallel.boundaries
    for task, value in ref_summary["eval_accuracy"].items():
        assert summary["eval_accuracy"][task] == pytest.approx(value, abs=1e-6)
    # the pipelined eval's loss comes from the last stage's logits, summed over the pp group
    assert summary["eval_loss"] == pytest.approx(ref_summary["eval_loss"], rel=1e-4)


@pytest.mark.timeout(300)
def test_packed_rows_train_the_same_under_tp_sp_and_pp(tmp_path):
    """Packed rows of 31 tokens: sequence parallelism pads them to 32 (the padding is a segment of its
    own), the block-diagonal mask runs in the TP blocks, and tp2 x pp2 equals single-process training."""
    torch.set_num_threads(1)
    data = DigitsTaskConfig(pack_len=31)
    job = dataclasses.replace(base_job(global_batch=8), data=data)
    run_training(job, tmp_path / "single")
    parallel = dataclasses.replace(
        job, parallel=ParallelConfig(tp=2, pp=2), schedule=ScheduleConfig("1f1b", 2)
    )
    run_training(parallel, tmp_path / "tp2pp2")
    ref, got = losses(tmp_path / "single"), losses(tmp_path / "tp2pp2")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)
    unpacked = dataclasses.replace(
        job, data=DigitsTaskConfig(), train=dataclasses.replace(job.train, max_steps=2)
    )
    run_training(unpacked, tmp_path / "unpacked")
    assert ref[:2] != losses(tmp_path / "unpacked")  # the packed job really trained on packed rows


@pytest.mark.timeout(300)
def test_pipelined_offloaded_run_resumes_bit_exactly(tmp_path, monkeypatch):
    job = dataclasses.replace(
        base_job(max_steps=6, checkpoint_every=2),
        parallel=ParallelConfig(pp=2),
        schedule=ScheduleConfig("1f1b", 4),
        offload=OffloadConfig(strategy="interleaved"),
    )
    run_training(job, tmp_path / "straight")
    monkeypatch.setenv(FAULT_ENV, "5")
    with pytest.raises(Exception, match="injected failure at step 5"):
        run_training(job, tmp_path / "crashed")
    monkeypatch.delenv(FAULT_ENV)
    resumed = run_training(job, tmp_path / "crashed")
    assert resumed["resumed_from_step"] == 4
    assert losses(tmp_path / "crashed") == losses(tmp_path / "straight")


def test_offload_strategy_matches_plain_adamw(tmp_path, single):
    torch.set_num_threads(1)
    job = dataclasses.replace(base_job(), offload=OffloadConfig(strategy="host"))
    run_training(job, tmp_path)
    assert losses(tmp_path) == single[0]  # OffloadAdamW is bitwise torch's fused AdamW


def test_bf16_master_offload_trains_on_bf16_weights(tmp_path, single):
    """offload.master_dtype=bf16: the parameters the model trains on are the host's bf16 masters (upcast), the
    run follows fp32 training closely, and it differs (the masters really are bf16)."""
    torch.set_num_threads(1)
    offload = OffloadConfig(strategy="host", state_dtype="bf16", master_dtype="bf16")
    run_training(dataclasses.replace(base_job(), offload=offload), tmp_path)
    got, ref = losses(tmp_path), single[0]
    assert got[0] == ref[0]  # the first step runs on the initial fp32 weights
    assert got[1:] != ref[1:]
    assert all(abs(a - b) / b < 0.05 for a, b in zip(got, ref))
    model = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"), ["model_tp0_pp0"])["model_tp0_pp0"]
    weights = [t for t in model.values() if t.is_floating_point() and t.numel() > 1]
    assert weights and all(torch.equal(t, t.bfloat16().float()) for t in weights)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp", [1, 2])
def test_precision_recipe_converts_and_trains(tmp_path, single, tp):
    torch.set_num_threads(1)
    job = dataclasses.replace(
        base_job(),
        precision=PrecisionConfig("int8_rowwise", min_features=64),
        parallel=ParallelConfig(tp=tp),
    )
    summary = run_training(job, tmp_path)
    got, ref = losses(tmp_path), single[0]
    assert got != ref  # the linears really ran in int8
    assert all(abs(a - b) / b < 0.05 for a, b in zip(got, ref))  # and stayed close to fp32
    # every linear but the first (patch embedding) and the last (LM head): 4 per transformer block
    # (vision and decoder) and 3 in the projector; under tp=2 the decoder's are the TP layers
    names = summary["low_precision_layers"]
    assert len(names) == 4 * (job.model.vision_layers + job.model.layers) + 3
    tp_layers = [n for n in names if n.endswith(".fc2")]  # only TensorParallelBlock names its MLP "fc2"
    assert len(tp_layers) == (job.model.layers if tp == 2 else 0)


@pytest.mark.timeout(300)
def test_killed_rank_fails_fast_and_relaunch_resumes(tmp_path, monkeypatch):
    import time

    from sysopt.dist import LaunchError

    job = dataclasses.replace(base_job(max_steps=6, checkpoint_every=2), parallel=ParallelConfig(dp=2))
    monkeypatch.setenv(FAULT_ENV, "3:1:kill")  # SIGKILL rank 1 before step 3
    start = time.monotonic()
    with pytest.raises(LaunchError, match="rank 1 .*died with exit code -9") as info:
        run_training(job, tmp_path)
    assert info.value.rank == 1
    assert time.monotonic() - start < job.train.timeout_s / 2  # noticed the death, not the timeout
    monkeypatch.delenv(FAULT_ENV)
    resumed = run_training(job, tmp_path)
    assert resumed["resumed_from_step"] == 2
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(6))


def _dp_offload_steps(job_json: str, defer: bool) -> dict:
    """Three data-parallel steps with OffloadAdamW(host), wired as the trainer wires it (or, with defer=False,
    copying gradients from the backward hooks as before): copy counts and the resulting parameters."""
    import torch.distributed as dist

    from sysopt.data import BatchSampler, DigitsDataset
    from sysopt.dist import build_groups
    from sysopt.train.loop import connect_grad_copies, make_optimizer
    from sysopt.train.parallel import ParallelVLM

    job = JobConfig.from_json(job_json)
    groups = build_groups(job.parallel.topology, timeout_s=60)
    sampler = BatchSampler(DigitsDataset(job.data, "train"), job.train.global_batch)
    runtime = ParallelVLM(job, groups, sampler.global_batch(0))
    optimizer = make_optimizer(job, runtime.params)
    if defer:
        connect_grad_copies(runtime, optimizer)
    for step in range(3):
        batch = sampler.global_batch(step)
        runtime.forward_backward(batch.shard(dist.get_rank(), 2), batch.answer_token_count().clamp(min=1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    stats = optimizer.stats
    return {
        "started": stats.grad_copies_started,
        "redone": stats.grad_copies_redone,
        "params": [p.detach().clone() for p in runtime.params],
    }


@pytest.mark.timeout(300)
def test_data_parallel_offload_copies_each_gradient_once_after_its_reduction():
    """The DP reduction rewrites every gradient after backward, so copies started from the backward hooks
    were all stale and made again in step(); the trainer now starts them as each bucket is reduced: none is
    redone, and the parameters are bitwise those of the old path."""
    from sysopt.dist import launch

    job = dataclasses.replace(
        base_job(), parallel=ParallelConfig(dp=2), offload=OffloadConfig(strategy="host")
    )
    old = launch(_dp_offload_steps, 2, args=(job.to_json(), False), timeout_s=240)
    new = launch(_dp_offload_steps, 2, args=(job.to_json(), True), timeout_s=240)
    assert old[0]["redone"] == old[0]["started"] > 0  # the problem: every early copy redone
    for rank in range(2):
        assert new[rank]["started"] == old[rank]["started"] and new[rank]["redone"] == 0
        assert all(torch.equal(a, b) for a, b in zip(new[rank]["params"], old[rank]["params"]))


def _torchrun_rank(rank: int, port: int, job_json: str, out_dir: str, results) -> None:
    """One rank as torchrun starts it (RANK, WORLD_SIZE, MASTER_* in the environment) calling run_training,
    each with its own out_dir as Hydra's per-process ${now:...} run dirs can differ."""
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    try:
        run_training(JobConfig.from_json(job_json), out_dir)
        results.put((rank, "ok"))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        results.put((rank, f"{type(exc).__name__}: {exc}"))


@pytest.mark.timeout(180)
def test_torchrun_ranks_prepare_once_and_train_in_rank0s_run_dir(tmp_path):
    """Under torchrun every rank calls run_training: only rank 0 may set the earlier run aside, and both
    ranks must write the run (pp=2: one model shard each) into rank 0's directory, or the checkpoint rank 0
    commits lacks rank 1's shard."""
    import multiprocessing as mp

    from sysopt.dist import free_port

    job = base_job(max_steps=2, checkpoint_every=2, resume=False)
    job = dataclasses.replace(job, parallel=ParallelConfig(pp=2), schedule=ScheduleConfig("1f1b", 2))
    dirs = [tmp_path / "run_rank0", tmp_path / "run_rank1"]
    for d in dirs:  # an earlier run in each, which train.resume=false sets aside
        d.mkdir()
        (d / "metrics.jsonl").write_text("{}\n")
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [
        ctx.Process(target=_torchrun_rank, args=(r, port, job.to_json(), str(dirs[r]), results))
        for r in (0, 1)
    ]
    for p in procs:
        p.start()
    outcome = dict(results.get(timeout=150) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert outcome == {0: "ok", 1: "ok"}
    assert [p.name for p in (dirs[0] / "replaced_runs").iterdir()] == ["1"]
    assert (dirs[1] / "metrics.jsonl").exists() and not (dirs[1] / "replaced_runs").exists()  # untouched
    found = latest_checkpoint(dirs[0] / "checkpoints")
    shards = load_checkpoint(found, ["model_tp0_pp0", "model_tp0_pp1"])
    assert set(shards) == {"model_tp0_pp0", "model_tp0_pp1"}
