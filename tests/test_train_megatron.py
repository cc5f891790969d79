"""schedule=megatron_interleaved: megatron-core 0.16.1's own interleaved 1F1B schedule, run inside the
trainer on the same StageChunks, trains exactly like single-process training (pp=2, vpp=2, gloo)."""

import dataclasses

import pytest
import torch

from sysopt.dist import launch
from sysopt.train import JobConfig, OptimConfig, TrainConfig, read_metrics, run_training
from sysopt.train.config import ParallelConfig, ScheduleConfig

pytest.importorskip("megatron.core")

MEGATRON = ScheduleConfig("megatron_interleaved", 4)
# blocks: embed, vit, vit, merge, dec, dec, head
VISION_CUTS = (0, 1, 3, 5, 7)  # two cuts in the vision tower: [patches, images, vision_dim] tensors
DECODER_CUTS = (0, 4, 5, 6, 7)  # every boundary sends [tokens, sequences, dim]


def base_job(**train) -> JobConfig:
    t = dict(max_steps=4, global_batch=16, log_every=1, timeout_s=240)
    t.update(train)
    return JobConfig(optim=OptimConfig(warmup_steps=2), train=TrainConfig(**t))


def losses(path):
    return [r["loss"] for r in read_metrics(path / "metrics.jsonl")]


@pytest.mark.timeout(300)
def test_megatron_interleaved_training_equals_single_process(tmp_path):
    torch.set_num_threads(1)
    job = base_job()
    single = run_training(job, tmp_path / "single")
    piped = dataclasses.replace(job, parallel=ParallelConfig(pp=2, vpp=2), schedule=MEGATRON)
    summary = run_training(piped, tmp_path / "megatron")
    ref, got = losses(tmp_path / "single"), losses(tmp_path / "megatron")
    assert len(got) == len(ref) == job.train.max_steps
    assert ref[0] > ref[-1]  # it learned, so later steps compare diverged states
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)
    assert len(summary["pipeline_boundaries"]) == 5
    for task, value in single["eval_accuracy"].items():
        assert summary["eval_accuracy"][task] == pytest.approx(value, abs=1e-6)


def _megatron_step(job_json: str, cuts: list[tuple[int, ...]]):
    """One forward_backward per pipeline split: (global loss, {global param name: grad}, whether megatron
    exchanged p2p shapes first) on this rank."""
    from sysopt.data import BatchSampler, DigitsDataset
    from sysopt.dist import build_groups
    from sysopt.train.parallel import ParallelVLM

    job = JobConfig.from_json(job_json)
    groups = build_groups(job.parallel.topology)
    batch = BatchSampler(DigitsDataset(job.data, "train"), job.train.global_batch).global_batch(0)
    out = []
    for boundaries in cuts:
        runtime = ParallelVLM(job, groups, batch, boundaries)
        loss = runtime.forward_backward(batch, batch.answer_token_count().clamp(min=1.0))
        grads = {}
        for chunk in runtime.stages.values():
            for name, param in chunk.named_parameters():  # blocks.<i>.rest -> blocks.<first + i>.rest
                _, index, rest = name.split(".", 2)
                grads[f"blocks.{chunk.first_index + int(index)}.{rest}"] = param.grad.clone()
        out.append((float(loss), grads, runtime.executor.config.variable_seq_lengths))
    return out


@pytest.mark.slow  # ~25 s on a busy 2-core machine (each rank imports megatron-core)
@pytest.mark.timeout(300)
def test_megatron_pipeline_gradients_with_fixed_and_variable_p2p_shapes():
    """Cuts inside the vision tower send [patches, images, vision_dim] with a per-microbatch image count
    (megatron's variable_seq_lengths); cuts in the decoder send one fixed shape. Both give the gradients
    of the unsplit model."""
    from sysopt.data import BatchSampler, DigitsDataset
    from sysopt.models import VLM, vlm_loss

    torch.set_num_threads(1)
    job = dataclasses.replace(base_job(), parallel=ParallelConfig(pp=2, vpp=2), schedule=MEGATRON)
    batch = BatchSampler(DigitsDataset(job.data, "train"), job.train.global_batch).global_batch(0)
    assert len({mb.images.shape[0] for mb in (batch.shard(i, 4) for i in range(4))}) > 1  # shapes vary
    model = VLM(job.model)
    normalizer = batch.answer_token_count().clamp(min=1.0)
    ref_loss = vlm_loss(model(batch), batch, normalizer)
    ref_loss.backward()
    ref_grads = dict(model.named_parameters())

    per_rank = launch(_megatron_step, 2, args=(job.to_json(), [VISION_CUTS, DECODER_CUTS]), timeout_s=240)
    for cut_index, variable in ((0, True), (1, False)):
        seen = set()
        for rank_results in per_rank:
            loss, grads, exchanged_shapes = rank_results[cut_index]
            assert exchanged_shapes is variable
            assert loss == pytest.approx(ref_loss.item(), rel=1e-6)
            for name, grad in grads.items():
                torch.testing.assert_close(grad, ref_grads[name].grad, msg=name)
            seen |= set(grads)
        assert seen == set(ref_grads)  # the two ranks together hold every parameter


def test_megatron_groups_give_up_when_the_trainers_do(monkeypatch):
    """megatron-core's process groups default to a 30-minute timeout: they get train.collective_timeout_s instead."""
    from types import SimpleNamespace

    from megatron.core import parallel_state as ps

    from sysopt.dist.topology import Topology
    from sysopt.train.megatron_baseline import init_megatron_parallel_state

    seen = {}

    def record(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("recorded")

    monkeypatch.setattr(ps, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(ps, "initialize_model_parallel", record)
    with pytest.raises(RuntimeError, match="recorded"):
        init_megatron_parallel_state(SimpleNamespace(topology=Topology(pp=2)), timeout_s=290.0)
    assert seen["distributed_timeout_minutes"] == 5
