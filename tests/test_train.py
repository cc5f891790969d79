"""Trainer: DP equals single-process training, resume is bit-exact, checkpoints are atomic, LR schedule."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from sysopt.data import DigitsTaskConfig
from sysopt.train import (
    CheckpointError,
    JobConfig,
    OptimConfig,
    TrainConfig,
    evaluate_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_metrics,
    run_training,
    save_checkpoint,
    validate,
    warmup_cosine_lr,
)
from sysopt.train.config import ParallelConfig, ScheduleConfig
from sysopt.train.loop import FAULT_ENV


def small_job(**train) -> JobConfig:
    t = dict(max_steps=8, global_batch=16, log_every=1, eval_batch=500, timeout_s=120)
    t.update(train)
    return JobConfig(optim=OptimConfig(warmup_steps=2), train=TrainConfig(**t))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("microbatches", [1, 2])
def test_data_parallel_losses_equal_single_process(tmp_path, microbatches):
    """dp=2 equals one process; with 2 accumulation microbatches the buckets reduce during the last one's
    backward (the accumulated gradients), which must still give the same losses."""
    job = small_job()
    single = run_training(job, tmp_path / "single")
    dp = dataclasses.replace(
        job, parallel=ParallelConfig(dp=2), schedule=ScheduleConfig("1f1b", microbatches)
    )
    dp2 = run_training(dp, tmp_path / "dp2")
    a = [r["loss"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(tmp_path / "dp2" / "metrics.jsonl")]
    assert len(a) == len(b) == job.train.max_steps
    assert a[0] > a[-1]  # it learned something, so later steps compare diverged states
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)
    assert dp2["world_size"] == 2 and single["world_size"] == 1
    # both ranks evaluated a share of the held-out set and the shares were combined
    assert dp2["eval_accuracy"].keys() == single["eval_accuracy"].keys()
    for task, value in single["eval_accuracy"].items():
        assert dp2["eval_accuracy"][task] == pytest.approx(value, abs=0.01)
    assert dp2["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-4)
    # the final checkpoint, evaluated again in one process, scores what the dp=2 run reported
    again = evaluate_checkpoint(tmp_path / "dp2")
    assert again["step"] == job.train.max_steps
    assert again["eval_loss"] == pytest.approx(dp2["eval_loss"], rel=1e-5)
    assert again["eval_accuracy"] == pytest.approx(dp2["eval_accuracy"], abs=1e-9)


def tiny_job(**train) -> JobConfig:
    """A few-step job on a small data set (a small eval split too): a run takes a fraction of a second."""
    t = dict(max_steps=3, global_batch=16, log_every=1, eval_batch=100, timeout_s=120)
    t.update(train)
    data = DigitsTaskConfig(n_train=400, n_eval_per_task=10)
    return JobConfig(data=data, optim=OptimConfig(warmup_steps=1), train=TrainConfig(**t))


def test_gradient_clipping_off_still_measures_the_norm_and_steps(tmp_path):
    """optim.grad_clip=0 turns clipping off: the steps must still be taken (the norm used to be NaN, so the
    finiteness check skipped every step) and the unclipped norm logged."""
    job = dataclasses.replace(tiny_job(), optim=OptimConfig(warmup_steps=1, grad_clip=0.0))
    summary = run_training(job, tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert summary["skipped_steps"] == 0 and [r["skipped_steps"] for r in records] == [0, 0, 0]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in records)
    # the same gradients as a run whose clip threshold is never reached: nothing was scaled
    never = dataclasses.replace(job, optim=OptimConfig(warmup_steps=1, grad_clip=1e9))
    run_training(never, tmp_path / "never")
    assert [r["loss"] for r in read_metrics(tmp_path / "never" / "metrics.jsonl")] == [
        r["loss"] for r in records
    ]


def _run_then_crash(job: JobConfig, tmp_path, monkeypatch, at_step: int) -> dict:
    """Train `job` into tmp_path/straight, then again into tmp_path/crashed with a failure injected at
    `at_step`; returns the straight run's summary (resume the crashed one with run_training)."""
    straight = run_training(job, tmp_path / "straight")
    monkeypatch.setenv(FAULT_ENV, str(at_step))
    with pytest.raises(RuntimeError, match=f"injected failure at step {at_step}"):
        run_training(job, tmp_path / "crashed")
    monkeypatch.delenv(FAULT_ENV)
    return straight


@pytest.mark.timeout(180)
def test_crashed_run_resumes_bit_exactly(tmp_path, monkeypatch):
    # 20 steps: the summary's final_loss_mean covers the last 2 (steps 18 and 19); the checkpoint after
    # step 18 is the one resumed, so one of the two losses has to come through it
    job = small_job(max_steps=20, checkpoint_every=19)
    done = _run_then_crash(job, tmp_path, monkeypatch, 19)
    assert latest_checkpoint(tmp_path / "crashed" / "checkpoints").name == "step_00000019"
    stale = (
        tmp_path / "crashed" / "checkpoints" / ".tmp_step_00000077"
    )  # a save that crashed before its commit
    stale.mkdir()
    (stale / "model_tp0_pp0.pt").write_bytes(b"torn")
    resumed = run_training(job, tmp_path / "crashed")
    assert resumed["resumed_from_step"] == 19 and not stale.exists()
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    again = read_metrics(tmp_path / "crashed" / "metrics.jsonl")
    assert [r["step"] for r in again] == list(range(20))  # no duplicated or missing steps
    assert [r["loss"] for r in again] == [r["loss"] for r in straight]  # bit-exact
    # the last-steps mean spans the resume: step 18's loss came through the checkpoint
    assert done["final_loss_mean_steps"] == resumed["final_loss_mean_steps"] == 2
    assert (
        done["final_loss_mean"]
        == resumed["final_loss_mean"]
        == (straight[-2]["loss"] + straight[-1]["loss"]) / 2
    )
    a = load_checkpoint(latest_checkpoint(tmp_path / "straight" / "checkpoints"), ["model_tp0_pp0"])[
        "model_tp0_pp0"
    ]
    b = load_checkpoint(latest_checkpoint(tmp_path / "crashed" / "checkpoints"), ["model_tp0_pp0"])[
        "model_tp0_pp0"
    ]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("dp", [1, 2])
def test_delayed_scaling_run_resumes_bit_exactly(tmp_path, monkeypatch, dp):
    """A delayed-scaling recipe scales each step from amax histories kept in the model: the resumed run
    must load them and go on exactly as the uninterrupted one (losses, eval and the histories). At dp=2
    only dp rank 0 checkpoints them, so the replicas' histories must agree (the trainer MAX-reduces them)."""
    from sysopt.train.config import PrecisionConfig

    job = dataclasses.replace(
        small_job(max_steps=6, checkpoint_every=3),
        precision=PrecisionConfig("fp8_tensorwise_delayed", min_features=64),
        parallel=ParallelConfig(dp=dp),
    )
    straight = _run_then_crash(job, tmp_path, monkeypatch, 4)
    assert straight["low_precision_layers"]
    resumed = run_training(job, tmp_path / "crashed")
    assert resumed["resumed_from_step"] == 3
    a = [r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(tmp_path / "crashed" / "metrics.jsonl")]
    assert b == a
    assert (resumed["eval_loss"], resumed["eval_accuracy"]) == (
        straight["eval_loss"],
        straight["eval_accuracy"],
    )
    got = [load_checkpoint(latest_checkpoint(tmp_path / r / "checkpoints"), ["model_tp0_pp0"])["model_tp0_pp0"]
           for r in ("straight", "crashed")]  # fmt: skip
    histories = [k for k in got[0] if "amax_history" in k]
    assert histories and all(torch.equal(got[0][k], got[1][k]) for k in got[0])


@pytest.mark.timeout(180)
def test_resume_may_change_the_recipe_to_and_from_delayed_scaling(tmp_path):
    """The checkpoint of a delayed-scaling run holds amax histories; a current-scaling model has none. A
    resumed run that changes the recipe, either way, goes on with a warning (the README promises it)."""
    from sysopt.train.config import PrecisionConfig

    def job(recipe: str, steps: int):
        return dataclasses.replace(
            small_job(max_steps=steps, checkpoint_every=2), precision=PrecisionConfig(recipe, min_features=64)
        )

    run_training(job("fp8_tensorwise_delayed", 2), tmp_path)
    for recipe, steps in (("fp8_rowwise", 4), ("fp8_tensorwise_delayed", 6)):
        with pytest.warns(UserWarning, match=f"as precision.recipe={recipe}"):
            summary = run_training(job(recipe, steps), tmp_path)
        assert summary["resumed_from_step"] == steps - 2 and summary["low_precision_layers"]
        assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl"))


def _cpu_profile(int8_flops: float):
    """A VNNI CPU's profile whose fp32 and bf16 GEMMs run at 1 GFLOP/s and int8 ones at `int8_flops`."""
    from sysopt.hardware.profile import Calibration, CPUInfo, HardwareProfile, MatmulPoint

    rates = {"fp32": 1e9, "bf16": 1e9, "int8": int8_flops}
    calibration = Calibration(
        device="cpu", matmul=tuple(MatmulPoint(d, 64, 64, 64, 2 * 64**3 / r, r) for d, r in rates.items()),
        matmul_flops_per_s=rates, copy={}, p2p=None, allreduce=None, collective_world_size=1,
        collective_backend="gloo", optimizer_params_per_s={"host": 1e9, "device": 1e9}, created="now",
    )  # fmt: skip
    cpu = CPUInfo("test cpu", 2, 2, ("avx512f", "avx512_vnni"), 24 << 30)
    return HardwareProfile(cpu=cpu, gpus=(), calibration=calibration, created="now")


@pytest.mark.timeout(180)
def test_auto_precision_plan_is_made_once_and_kept_through_resume_and_eval(tmp_path, monkeypatch):
    """precision=auto converts the layers sysopt.precision.auto_plan picks from this machine's profile for a
    microbatch's GEMM rows. The plan goes into the checkpoint: resuming, or scoring the checkpoint again, on
    a machine that would choose otherwise keeps the run's model."""
    import sysopt.train.parallel as parallel
    from sysopt.data import BatchSampler, DigitsDataset
    from sysopt.models import VLM
    from sysopt.precision import auto_plan
    from sysopt.train.config import PrecisionConfig

    fast, slow = _cpu_profile(1e15), _cpu_profile(1e9)  # int8 far faster than fp32 / no faster
    job = dataclasses.replace(
        small_job(max_steps=6, checkpoint_every=3), precision=PrecisionConfig("auto", min_features=64)
    )
    batch = BatchSampler(DigitsDataset(job.data, "train"), job.train.global_batch).global_batch(0)
    expected = auto_plan(VLM(job.model), profile=fast, tokens=batch.tokens.numel(), min_features=64)
    assert len(expected) >= 10 and set(expected.values()) == {"int8_rowwise"}
    assert auto_plan(VLM(job.model), profile=slow, tokens=batch.tokens.numel(), min_features=64) == {}

    monkeypatch.setattr(parallel, "auto_profile", lambda: fast)
    straight = _run_then_crash(job, tmp_path, monkeypatch, 4)
    assert straight["precision_plan"] == expected and straight["low_precision_layers"] == list(expected)

    monkeypatch.setattr(parallel, "auto_profile", lambda: slow)  # "another machine"
    assert parallel.ParallelVLM(job, None, batch).precision_plan == {}  # where a new run converts nothing
    resumed = run_training(job, tmp_path / "crashed")
    assert resumed["resumed_from_step"] == 3 and resumed["precision_plan"] == expected
    a = [r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")]
    assert [r["loss"] for r in read_metrics(tmp_path / "crashed" / "metrics.jsonl")] == a
    again = evaluate_checkpoint(tmp_path / "straight")
    assert (again["eval_loss"], again["eval_accuracy"]) == (straight["eval_loss"], straight["eval_accuracy"])


def test_precision_auto_plans_for_the_cpu_the_trainer_runs_on_even_on_a_gpu_host(monkeypatch):
    """The trainer's model is on the CPU: precision=auto reads a CPU calibration, or the probed host without
    its GPUs, so an H100 in the box does not make it choose fp8 for CPU GEMMs (and save that plan)."""
    import sysopt.hardware as hardware
    import sysopt.train.parallel as parallel
    from sysopt.hardware.profile import GPUInfo
    from sysopt.precision.auto import candidate_recipe

    asked = []
    h100 = GPUInfo(0, "NVIDIA H100 80GB HBM3", 80 << 30, 79 << 30, 5, 16, 18, 1980, 2619, (9, 0))
    gpu_host = dataclasses.replace(_cpu_profile(1e15), gpus=(h100,), calibration=None)
    assert candidate_recipe(gpu_host) == "fp8_rowwise"  # what the GPU host's own profile would choose
    monkeypatch.setattr(hardware, "load_cached", lambda **kw: asked.append(kw) or None)
    monkeypatch.setattr(hardware, "probe", lambda: gpu_host)
    profile = parallel.auto_profile()
    assert asked == [{"device": "cpu"}] and profile.gpus == ()
    assert candidate_recipe(profile) == "int8_rowwise"  # the VNNI CPU's choice


def test_tp_overlap_auto_plans_from_a_cpu_calibration_of_the_tp_group(monkeypatch, tmp_path):
    """The trainer's TP layers run on the CPU, one thread per rank: overlap='auto' plans from a calibration
    measured so, with tp-rank collectives (on a GPU host the cache's default is the GPU's). run_training
    measures one before launching when none is cached; a rank without one says how to get it."""
    import sysopt.hardware.cache as cache
    import sysopt.train.loop as loop
    import sysopt.train.parallel as parallel
    from sysopt.train.config import ParallelConfig

    asked, calibrated = [], []
    monkeypatch.setattr(cache, "load_cached", lambda **kw: asked.append(kw) or None)
    monkeypatch.setattr(cache, "load_or_calibrate", lambda **kw: calibrated.append(kw) or "profile")
    with pytest.raises(ValueError, match=r"tp_overlap=auto needs a CPU calibration with 4-rank collectives"):
        parallel._overlap_policy(ParallelConfig(tp=4, tp_overlap="auto"))
    assert asked == [{"device": "cpu", "world_size": 4, "threads": 1}]
    assert parallel._overlap_policy(ParallelConfig(tp=2, tp_overlap="chunked", tp_chunks=3)) == "chunked:3"

    monkeypatch.setattr(loop, "launch", lambda fn, n, **kw: [{}])
    monkeypatch.setattr(loop, "validate", lambda job: None)
    job = JobConfig.from_dict({"parallel": {"tp": 2, "tp_overlap": "auto"}})
    loop.run_training(job, tmp_path)
    assert calibrated == [{"quick": True, "device": "cpu", "world_size": 2, "threads": 1}]
    loop.run_training(
        dataclasses.replace(job, parallel=ParallelConfig(tp=2, tp_overlap="none")), tmp_path / "b"
    )
    assert len(calibrated) == 1  # only auto needs it


def test_resuming_into_another_model_or_layout_fails_before_launch_with_both_ways_out(tmp_path):
    """A run directory's checkpoint fixes the model and the tp/pp/vpp layout (its job.json says which): another
    job there is refused before any rank starts, naming the old and new values, resuming with the old ones
    or train.resume=false. A missing `latest` target says the same."""
    from sysopt.train import ConfigError

    job = small_job(max_steps=2, checkpoint_every=2)
    run_training(job, tmp_path)
    wider = dataclasses.replace(job, model=dataclasses.replace(job.model, dim=job.model.dim * 2))
    with pytest.raises(
        ConfigError,
        match=rf"of a run with model.dim={job.model.dim}, but this job has "
        rf"model.dim={2 * job.model.dim}; resume with the earlier values, or set train.resume=false",
    ):
        run_training(wider, tmp_path)
    reseeded = dataclasses.replace(
        job, model=dataclasses.replace(job.model, seed=7), train=dataclasses.replace(job.train, max_steps=3)
    )
    assert run_training(reseeded, tmp_path)["resumed_from_step"] == 2  # how weights start: not a layout
    (tmp_path / "checkpoints" / "latest").write_text("step_00000099")
    with pytest.raises(
        ConfigError, match=r"names step_00000099, which does not exist .*; or set train.resume=false"
    ):
        run_training(job, tmp_path)
    fresh = dataclasses.replace(wider, train=dataclasses.replace(wider.train, resume=False))
    with pytest.warns(UserWarning, match="train.resume=false: moved the earlier run's checkpoints"):
        assert run_training(fresh, tmp_path)["resumed_from_step"] == 0  # the way out works: from step 0


def _bare_checkpoint(run_dir: Path, step: int, tp: int = 2, pp: int = 2) -> Path:
    """A checkpoint holding every file a resume of up to tp x pp shards looks for (the states left empty)."""
    shards = {
        f"{kind}_tp{t}_pp{s}": {} for kind in ("model", "optimizer") for t in range(tp) for s in range(pp)
    }
    return save_checkpoint(run_dir / "checkpoints", step, {"trainer": {"step": step}, **shards})


def test_a_checkpoint_missing_a_shard_is_refused_before_launch(tmp_path):
    # one rank would fail to load it while the others wait for it in a collective
    from sysopt.train import ConfigError
    from sysopt.train.loop import _check_resumable

    job = dataclasses.replace(small_job(), parallel=ParallelConfig(pp=2), schedule=ScheduleConfig("1f1b", 4))
    (tmp_path / "job.json").write_text(job.to_json())
    found = _bare_checkpoint(tmp_path, 2, tp=1, pp=2)
    _check_resumable(job, tmp_path)
    (found / "optimizer_tp0_pp1.pt").unlink()
    with pytest.raises(
        ConfigError, match=r"step_00000002 lacks optimizer_tp0_pp1.pt; delete .* or set train.resume"
    ):
        _check_resumable(job, tmp_path)


def test_resume_check_covers_stage_placement_and_sequence_parallel(tmp_path):
    """A V schedule (zbv) places stages on ranks otherwise than a loop one (interleaved_1f1b), and at tp > 1
    sequence parallelism adds blocks: either change between save and resume is refused before launch."""
    from sysopt.train import ConfigError
    from sysopt.train.loop import _check_resumable

    _bare_checkpoint(tmp_path, 2)
    looped = dataclasses.replace(small_job(), parallel=ParallelConfig(pp=2, vpp=2),
                                 schedule=ScheduleConfig("interleaved_1f1b", 4))  # fmt: skip
    (tmp_path / "job.json").write_text(looped.to_json())
    _check_resumable(dataclasses.replace(looped, schedule=ScheduleConfig("zb_h1", 4)), tmp_path)  # loop too
    with pytest.raises(ConfigError, match=r"stage placement\)=loop, but this job has .*placement\)=V"):
        _check_resumable(dataclasses.replace(looped, schedule=ScheduleConfig("zbv", 4)), tmp_path)
    sharded = dataclasses.replace(small_job(), parallel=ParallelConfig(tp=2))
    (tmp_path / "job.json").write_text(sharded.to_json())
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel=True, but this job has .*=False"):
        _check_resumable(dataclasses.replace(sharded, parallel=ParallelConfig(tp=2, sequence_parallel=False)),
                         tmp_path)  # fmt: skip
    (tmp_path / "job.json").write_text(small_job().to_json())  # at tp=1 the flag changes nothing
    _check_resumable(
        dataclasses.replace(small_job(), parallel=ParallelConfig(sequence_parallel=False)), tmp_path
    )


def test_crash_during_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    save_checkpoint(root, 3, {"model": {"w": torch.ones(2)}, "trainer": {"step": 3}})
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(root, 6, {"model": {"w": torch.zeros(2)}, "trainer": {"step": 6}})
    monkeypatch.setattr(torch, "save", real_save)
    latest = latest_checkpoint(root)
    assert latest.name == "step_00000003"
    state = load_checkpoint(latest, ["model", "trainer"])
    assert torch.equal(state["model"]["w"], torch.ones(2)) and state["trainer"]["step"] == 3


def test_resaving_a_step_never_leaves_latest_naming_nothing(tmp_path, monkeypatch):
    """Saving a step that exists (a rerun into the same run directory) used to delete the directory `latest`
    names and then rename the new one in: a crash in between lost the last good checkpoint. The old one is
    now set aside and only deleted once the new one is in place; a crash at either point is repaired."""
    import sysopt.train.checkpoint as ck

    root = tmp_path / "ckpt"
    save_checkpoint(root, 3, {"model": {"w": torch.ones(2)}})
    real_replace, real_rmtree = ck.os.replace, ck.shutil.rmtree

    def crash_renaming_the_new_one_in(src, dst):
        if Path(src).name.startswith(".tmp_step_"):
            raise KeyboardInterrupt("killed between the two renames")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", crash_renaming_the_new_one_in)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, 3, {"model": {"w": torch.zeros(2)}})
    monkeypatch.setattr(ck.os, "replace", real_replace)
    latest = latest_checkpoint(root)  # the old step 3, still set aside: reading renames nothing
    assert latest.name == f"{ck.REPLACED}step_00000003"
    assert torch.equal(load_checkpoint(latest, ["model"])["model"]["w"], torch.ones(2))

    def crash_deleting_the_old_one(path, *args, **kwargs):
        if Path(path).name.startswith(ck.REPLACED):
            raise KeyboardInterrupt("killed before the old copy was deleted")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ck.shutil, "rmtree", crash_deleting_the_old_one)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, 3, {"model": {"w": torch.full((2,), 2.0)}})
    monkeypatch.setattr(ck.shutil, "rmtree", real_rmtree)
    assert torch.equal(
        load_checkpoint(latest_checkpoint(root), ["model"])["model"]["w"], torch.full((2,), 2.0)
    )
    save_checkpoint(root, 4, {"model": {"w": torch.full((2,), 4.0)}})  # the next save clears the leftover
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]


def test_resume_refuses_another_data_stream_and_warns_of_another_lr_schedule(tmp_path):
    """The batches a step draws are a function of the data config, the global batch and the step: another
    one would skip or repeat samples, so it is refused before launch. Another LR schedule resumes, warned. The
    job that wrote the checkpoint is kept beside the new job.json; an unreadable job.json is an error."""
    from sysopt.train import ConfigError
    from sysopt.train.loop import _check_resumable

    _bare_checkpoint(tmp_path, 2)
    job = small_job()
    (tmp_path / "job.json").write_text(job.to_json())
    _check_resumable(job, tmp_path)
    assert not list(tmp_path.glob("job.step_*.json"))  # the same job: nothing to keep
    doubled = dataclasses.replace(
        job, train=dataclasses.replace(job.train, global_batch=2 * job.train.global_batch)
    )
    with pytest.raises(
        ConfigError,
        match=rf"train.global_batch={job.train.global_batch}, but this job has "
        rf"train.global_batch={2 * job.train.global_batch}: .*skip or repeat",
    ):
        _check_resumable(doubled, tmp_path)
    with pytest.raises(ConfigError, match=r"data.seed=0, but this job has data.seed=1"):
        _check_resumable(dataclasses.replace(job, data=dataclasses.replace(job.data, seed=1)), tmp_path)
    _check_resumable(
        dataclasses.replace(job, data=dataclasses.replace(job.data, n_eval_per_task=7)), tmp_path
    )
    longer = dataclasses.replace(job, train=dataclasses.replace(job.train, max_steps=job.train.max_steps + 5))
    with pytest.warns(
        UserWarning, match=rf"train.max_steps {job.train.max_steps} -> {job.train.max_steps + 5}"
    ):
        _check_resumable(longer, tmp_path)
    assert (tmp_path / "job.step_00000002.json").read_text() == job.to_json()
    (tmp_path / "job.json").write_text(longer.to_json())  # that resume crashed before saving; another comes
    with pytest.warns(UserWarning, match="learning-rate schedule"):
        _check_resumable(job, tmp_path)
    assert (tmp_path / "job.step_00000002.json").read_text() == job.to_json()  # still the job that wrote it
    (tmp_path / "job.json").write_text(job.to_json())
    warped = dataclasses.replace(job, data=dataclasses.replace(job.data, rotate_deg=0.0))  # same samples
    with pytest.warns(UserWarning, match=r"data.rotate_deg=10.0 as data.rotate_deg=0.0: the same samples"):
        _check_resumable(warped, tmp_path)
    (tmp_path / "job.json").write_text("")  # a machine crash before its data reached the disk
    with pytest.raises(
        ConfigError, match=r"job.json is unreadable .* delete it to resume without that check"
    ):
        _check_resumable(job, tmp_path)


def test_a_global_batch_larger_than_the_dataset_is_a_config_error():
    from sysopt.train import ConfigError

    job = small_job()
    big = dataclasses.replace(job, train=dataclasses.replace(job.train, global_batch=job.data.n_train + 1))
    with pytest.raises(ConfigError, match=rf"train.global_batch={job.data.n_train + 1} exceeds data.n_train"):
        validate(big)


def test_a_fresh_run_sets_the_earlier_run_aside_and_never_resumes_it(tmp_path, monkeypatch):
    """train.resume=false into a directory an earlier run wrote: its checkpoints used to stay as `latest`,
    so when the new run crashed before its first save, the usual relaunch resumed the earlier run's weights
    under the new job. The earlier run's outputs now move to replaced_runs/1/, whole."""
    run_training(tiny_job(max_steps=2), tmp_path)
    earlier = {name: (tmp_path / name).read_text() for name in ("metrics.jsonl", "summary.json", "job.json")}
    fresh = dataclasses.replace(
        tiny_job(max_steps=3, resume=False), optim=OptimConfig(lr=1e-4, warmup_steps=1)
    )
    monkeypatch.setenv(FAULT_ENV, "1")
    with pytest.warns(UserWarning, match=r"train.resume=false: moved the earlier run's checkpoints"):
        with pytest.raises(RuntimeError, match="injected failure at step 1"):
            run_training(fresh, tmp_path)
    monkeypatch.delenv(FAULT_ENV)
    relaunched = run_training(
        dataclasses.replace(fresh, train=dataclasses.replace(fresh.train, resume=True)), tmp_path
    )
    assert relaunched["resumed_from_step"] == 0
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2]
    kept = tmp_path / "replaced_runs" / "1"
    assert {name: (kept / name).read_text() for name in earlier} == earlier
    assert latest_checkpoint(kept / "checkpoints").name == "step_00000002"


def test_setting_a_run_aside_takes_the_jobs_it_resumed_along():
    # job.<step>.json describes the earlier run: left beside the new run's step directories, it would not
    import tempfile

    from sysopt.train.loop import _set_aside_previous_run

    with tempfile.TemporaryDirectory() as tmp, pytest.warns(UserWarning, match="moved the earlier run's"):
        run = Path(tmp)
        _bare_checkpoint(run, 2)
        for name in ("job.json", "job.step_00000002.json", "job.step_00000004.json"):
            (run / name).write_text("{}")
        dest = _set_aside_previous_run(run)
        assert not list(run.glob("job*.json"))
        assert sorted(p.name for p in dest.glob("job*.json")) == [
            "job.json",
            "job.step_00000002.json",
            "job.step_00000004.json",
        ]


def test_resume_applies_the_jobs_weight_decay_betas_and_eps(tmp_path):
    """The optimizer's load_state_dict restores the saved param groups: changed optim.weight_decay, betas and
    eps used to be silently ignored after a resume (job.json claiming the new values)."""
    run_training(tiny_job(max_steps=2), tmp_path)
    changed = dataclasses.replace(
        tiny_job(max_steps=3), optim=OptimConfig(warmup_steps=1, weight_decay=0.5, betas=(0.5, 0.6), eps=1e-6)
    )
    with pytest.warns(UserWarning, match=r"optim.weight_decay 0.01 -> 0.5, optim.betas \[0.9, 0.95\] -> "):
        assert run_training(changed, tmp_path)["resumed_from_step"] == 2
    saved = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"), ["optimizer_tp0_pp0"])
    groups = saved["optimizer_tp0_pp0"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in groups] == [
        (0.5, (0.5, 0.6), 1e-6),
        (0.0, (0.5, 0.6), 1e-6),  # the group without decay keeps none
    ]


def test_skipped_steps_count_on_through_a_resume(tmp_path, monkeypatch):
    """skipped_steps was not in the checkpoint: a resumed run restarted the count and reported fewer skipped
    steps than the same run uninterrupted."""
    import sysopt.train.loop as loop

    monkeypatch.setattr(loop, "_all_finite", lambda runtime, grad_norm, groups: False)  # skip every step
    job = tiny_job(max_steps=4, checkpoint_every=2)
    straight = _run_then_crash(job, tmp_path, monkeypatch, 3)
    resumed = run_training(job, tmp_path / "crashed")
    assert resumed["resumed_from_step"] == 2
    assert straight["skipped_steps"] == resumed["skipped_steps"] == 4
    counts = [
        [r["skipped_steps"] for r in read_metrics(tmp_path / run / "metrics.jsonl")]
        for run in ("straight", "crashed")
    ]
    assert counts == [[1, 2, 3, 4], [1, 2, 3, 4]]


def test_relaunching_a_finished_run_keeps_its_figures(tmp_path):
    """A relaunch of a finished run (or of one that died after its final save, during eval) runs no step; it
    used to overwrite summary.json with NaN final_loss, step_time_s and tokens_per_s."""
    keys = ("final_loss", "final_loss_mean", "step_time_s", "tokens_per_s", "skipped_steps", "eval_loss")
    done = run_training(tiny_job(), tmp_path)
    (tmp_path / "summary.json").unlink()  # as if it died in eval: the figures must come from the checkpoint
    again = run_training(tiny_job(), tmp_path)
    assert again["resumed_from_step"] == 3
    assert {k: again[k] for k in keys} == {k: done[k] for k in keys}
    written = json.loads((tmp_path / "summary.json").read_text())
    assert {k: written[k] for k in keys} == {k: done[k] for k in keys}
    assert all(math.isfinite(written[k]) for k in keys)
    # a checkpoint from before the timing was saved: the complete summary.json keeps its timing
    trainer_file = latest_checkpoint(tmp_path / "checkpoints") / "trainer.pt"
    state = torch.load(trainer_file, weights_only=True)
    del state["timing"]
    torch.save(state, trainer_file)
    assert {k: run_training(tiny_job(), tmp_path)[k] for k in keys} == {k: done[k] for k in keys}


def test_resume_drops_a_torn_last_metrics_line_but_not_a_corrupt_one(tmp_path):
    """A rank killed while appending to metrics.jsonl leaves half a line: the relaunch used to die on it
    (JSONDecodeError). A torn last line is dropped; a bad line elsewhere is an error naming file and line."""
    from sysopt.train.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0}) for s in range(3)]
    path.write_text("".join(line + "\n" for line in good) + '{"step": 3, "loss": 2.9')
    assert read_metrics(path) == [json.loads(line) for line in good]
    with pytest.warns(UserWarning, match="dropped a torn last line"):
        MetricsLog(path, resume_step=2)
    assert path.read_text() == good[0] + "\n" + good[1] + "\n"
    path.write_text(good[0] + "\n" + '{"step": 1, "lo\n' + good[2] + "\n")
    with pytest.raises(
        ValueError, match=r"metrics.jsonl line 2 is not a JSON record .* repair or delete line 2"
    ):
        MetricsLog(path, resume_step=2)
    path.write_text(good[0] + "\n" + '{"step": 1, "lo\n')  # a last line with its newline was not torn
    with pytest.raises(ValueError, match="line 2 is not a JSON record"):
        read_metrics(path)


def test_train_seed_seeds_the_trainers_own_randomness(tmp_path):
    """train.seed was parsed and never used. It seeds torch's global RNG on every rank (the checkpoint holds
    its state) and the stochastic rounding of bf16 optimizer state, so two seeds give two runs there."""
    from sysopt.train.config import OffloadConfig

    offload = OffloadConfig(strategy="host", state_dtype="bf16")
    runs = {}
    for seed in (0, 1):
        job = dataclasses.replace(tiny_job(seed=seed), offload=offload)
        run_training(job, tmp_path / str(seed))
        runs[seed] = [r["loss"] for r in read_metrics(tmp_path / str(seed) / "metrics.jsonl")]
        trainer = load_checkpoint(latest_checkpoint(tmp_path / str(seed) / "checkpoints"), ["trainer"])[
            "trainer"
        ]
        with torch.random.fork_rng(devices=[]):
            assert torch.equal(trainer["rng"], torch.manual_seed(seed).get_state())
    assert runs[0][0] == runs[1][0]  # the same initial weights and data: model.seed and data.seed
    assert runs[0][1:] != runs[1][1:]  # then the rounding differs


def test_process_groups_get_the_configured_timeout(tmp_path, monkeypatch):
    """build_groups used its fixed 120 s default, so the config never reached the tp/pp/dp groups: a
    collective waiting on a rank in a long eval or save failed after 2 minutes whatever the config said. They
    get train.collective_timeout_s, not the run's wall-time limit train.timeout_s."""
    import sysopt.train.loop as loop

    seen = {}

    def record(topology, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt("recorded")

    monkeypatch.setattr(loop.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(loop, "build_groups", record)
    with pytest.raises(KeyboardInterrupt, match="recorded"):
        loop.train_rank(tiny_job(timeout_s=987.0, collective_timeout_s=43.0).to_json(), str(tmp_path))
    assert seen == {"timeout_s": 43.0}


def test_a_multi_rank_run_passes_both_timeouts_to_launch(tmp_path, monkeypatch):
    """The launch's default group (the one the data-parallel all-reduce of dp-only jobs uses) gets
    train.collective_timeout_s; train.timeout_s bounds the launch as a whole (None: no bound)."""
    import sysopt.train.loop as loop

    seen = {}

    def record(fn, world_size, **kwargs):
        seen.update(kwargs, world_size=world_size)
        raise KeyboardInterrupt("recorded")

    monkeypatch.setattr(loop, "launch", record)
    job = dataclasses.replace(
        tiny_job(timeout_s=None, collective_timeout_s=43.0), parallel=ParallelConfig(dp=2)
    )
    with pytest.raises(KeyboardInterrupt, match="recorded"):
        run_training(job, tmp_path)
    assert (seen["world_size"], seen["timeout_s"], seen["collective_timeout_s"]) == (2, None, 43.0)


def test_evaluate_checkpoint_refuses_sharded_or_untrained_runs(tmp_path):
    job = dataclasses.replace(small_job(), parallel=ParallelConfig(tp=2))
    (tmp_path / "job.json").write_text(job.to_json())
    with pytest.raises(ValueError, match=r"tp=2 pp=1.*summary\.json"):
        evaluate_checkpoint(tmp_path)
    (tmp_path / "job.json").write_text(small_job().to_json())
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        evaluate_checkpoint(tmp_path)


def test_corrupt_or_incomplete_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(2)}})
    (path / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path, ["model"])
    with pytest.raises(CheckpointError, match="has no optimizer.pt"):
        load_checkpoint(path, ["optimizer"])
    (tmp_path / "latest").write_text("step_99999999")
    with pytest.raises(CheckpointError, match="does not exist"):
        latest_checkpoint(tmp_path)


def test_warmup_cosine_lr_closed_form():
    kw = dict(lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [warmup_cosine_lr(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine_lr(4, **kw) == pytest.approx(1.0)
    assert warmup_cosine_lr(13, **kw) == pytest.approx(0.1)
    mid = 4 + (13 - 4) / 2
    assert warmup_cosine_lr(int(mid), **kw) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 9))
    )
    lrs = [warmup_cosine_lr(s, **kw) for s in range(4, 14)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))


def test_job_json_round_trip():
    job = small_job()
    assert JobConfig.from_json(job.to_json()) == job
    assert json.loads(job.to_json())["data"]["name"] == "digits"


@pytest.mark.timeout(180)
def test_trainer_converts_with_recipe_overrides():
    from sysopt.data import BatchSampler, DigitsDataset
    from sysopt.train.config import PrecisionConfig
    from sysopt.train.parallel import ParallelVLM

    precision = PrecisionConfig("fp8_rowwise", min_features=64, recipe_overrides={"grad_weight": "bf16"})
    job = dataclasses.replace(small_job(), precision=precision)
    sampler = BatchSampler(DigitsDataset(job.data, "train"), 8)
    runtime = ParallelVLM(job, None, sampler.global_batch(0))
    recipes = {m.recipe for _, m in runtime.model.named_modules() if hasattr(m, "scaling_state")}
    assert len(runtime.low_precision_layers) > 0
    assert [r.name for r in recipes] == ["fp8_rowwise[grad_weight=bf16]"]
    (got,) = recipes
    assert got.grad_weight == ("bf16", "bf16") and got.forward == ("e4m3", "e4m3")


@pytest.mark.timeout(120)
def test_eval_loss_is_the_token_weighted_answer_loss_over_the_held_out_split():
    """The summary's eval_loss weights every answer token of the eval split equally, whatever the batch
    size: uneven batches (here 500 and a short remainder) must not be averaged as equals."""
    from sysopt.data import TASKS, BatchSampler, DigitsDataset, eval_batches
    from sysopt.models import vlm_loss
    from sysopt.train.loop import _distributed_eval
    from sysopt.train.parallel import ParallelVLM

    job = small_job(eval_batch=300)
    runtime = ParallelVLM(job, None, BatchSampler(DigitsDataset(job.data, "train"), 8).global_batch(0))
    batches = eval_batches(DigitsDataset(job.data, "eval"), 300)
    assert len(batches) > 1 and len({b.loss_mask.sum().item() for b in batches}) > 1
    accuracy, loss = _distributed_eval(runtime, job, None)
    runtime.model.eval()
    with torch.no_grad():
        total = sum(float(vlm_loss(runtime.model(b), b, normalizer=1.0)) for b in batches)
    runtime.model.train()
    tokens = sum(float(b.loss_mask.sum()) for b in batches)
    assert loss == pytest.approx(total / tokens, rel=1e-5)
    assert set(accuracy) == set(TASKS)


def test_pipeline_boundaries_count_the_sequence_parallel_blocks():
    """tp > 1 with sequence parallelism adds a scatter and a gather block: validation must count them (it
    rejected the split that runs and accepted one that failed in the ranks), and a bad split of a fresh run
    must not be blamed on a checkpoint."""
    from sysopt.data import BatchSampler, DigitsDataset
    from sysopt.models import VLM
    from sysopt.models.parallel import block_count, tensor_parallelize
    from sysopt.train import ConfigError, validate
    from sysopt.train.parallel import ParallelVLM

    def job(boundaries, tp=2, sequence_parallel=True):
        parallel = ParallelConfig(tp=tp, pp=2, boundaries=boundaries, sequence_parallel=sequence_parallel)
        return dataclasses.replace(small_job(), parallel=parallel, schedule=ScheduleConfig("1f1b", 4))

    config = small_job().model
    for sp in (True, False):
        model = tensor_parallelize(VLM(config), None, sequence_parallel=sp)
        assert len(model.blocks) == block_count(config, tp=2, sequence_parallel=sp)
    n = block_count(config, tp=2)
    assert n == len(VLM(config).blocks) + 2
    validate(job((0, 4, n)))
    with pytest.raises(ConfigError, match=rf"must cut the model's {n} blocks \(2 of them sequence-parallel"):
        validate(job((0, 4, n - 2)))
    validate(job((0, 4, n - 2), sequence_parallel=False))

    plain = job((0, 4, 99), tp=1)  # not validated: what the ranks see
    sample = BatchSampler(DigitsDataset(plain.data, "train"), 16).global_batch(0)
    with pytest.raises(
        ValueError, match=r"^parallel.boundaries=\[0, 4, 99\] do not cut the \d+ blocks"
    ) as err:
        ParallelVLM(plain, None, sample)
    assert "checkpoint" not in str(err.value)
    resumed = job(None, tp=1)
    with pytest.raises(ValueError, match=r"the checkpoint's pipeline boundaries \[0, 4, 99\] do not cut"):
        ParallelVLM(resumed, None, sample, boundaries=(0, 4, 99))


def test_resuming_a_checkpoint_past_max_steps_says_there_is_nothing_to_train(tmp_path):
    job = small_job(max_steps=3, checkpoint_every=3)
    run_training(job, tmp_path)
    shorter = dataclasses.replace(job, train=dataclasses.replace(job.train, max_steps=2))
    with pytest.warns(UserWarning, match=r"at step 3 > train.max_steps=2: nothing left to train"):
        assert run_training(shorter, tmp_path)["resumed_from_step"] == 3


def test_tp_overlap_auto_under_torchrun_needs_a_cached_calibration(tmp_path, monkeypatch):
    """Under torchrun the run dir is prepared inside the job's process group, where the calibration's own
    launch cannot run: without a cached one the job is refused at once with the command that makes it."""
    import sysopt.train.loop as loop
    from sysopt.train import ConfigError

    monkeypatch.setattr(loop, "tp_overlap_profile", lambda tp, calibrate=False: None)
    job = dataclasses.replace(small_job(), parallel=ParallelConfig(tp=2, tp_overlap="auto"))
    with pytest.raises(
        ConfigError, match=r"sysopt-probe --calibrate --quick --device cpu --threads 1 --world-size 2"
    ):
        loop._prepare_run_dir(job, tmp_path, calibrate=False)
    assert not (tmp_path / "job.json").exists()


def test_metrics_rewrite_on_resume_never_loses_the_history(tmp_path, monkeypatch):
    """Resuming rewrites metrics.jsonl without the steps after the checkpoint: a failure mid-rewrite (a kill,
    a full disk) must leave the old file whole."""
    import os

    from sysopt.train.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(4)))
    before = path.read_text()
    real_fsync = os.fsync

    def failing_fsync(fd):  # the rewrite's data does not reach the disk
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        MetricsLog(path, resume_step=2)
    assert path.read_text() == before
    monkeypatch.setattr(os, "fsync", real_fsync)
    MetricsLog(path, resume_step=2)
    assert [r["step"] for r in read_metrics(path)] == [0, 1]


def test_a_second_run_in_a_live_runs_directory_is_refused(tmp_path):
    """run.lock: a run started in a directory another live run holds (its flock) is refused, naming it; once
    that process is gone (the kernel drops its lock) the directory is free, and a leftover lock file (a
    crash, a half-written one) holds nothing."""
    import subprocess
    import sys

    from sysopt.train.checkpoint import RUN_LOCK, RunDirectoryBusy, run_lock

    job = small_job(max_steps=2)
    holder = (
        "import fcntl, json, os, socket, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.pwrite(fd, json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'since': 'then'}).encode(), 0)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path / RUN_LOCK)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(
            RunDirectoryBusy, match=rf"in use by another run \(pid {other.pid} on .*hydra.run.dir"
        ):
            run_training(job, tmp_path)
        assert not (tmp_path / "metrics.jsonl").exists()  # nothing of the live run's was touched
    finally:
        other.kill()
        other.wait()
    assert run_training(job, tmp_path)["resumed_from_step"] == 0  # its holder is gone: free
    (tmp_path / RUN_LOCK).write_text("")  # a lock file nobody holds: no obstacle
    with run_lock(tmp_path):
        with pytest.raises(RunDirectoryBusy):  # held, also against this process's own second attempt
            run_lock(tmp_path).__enter__()
