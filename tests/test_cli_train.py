"""sysopt-train rejects bad configurations before any rank starts, with messages that name the fix."""

import dataclasses
import os
import subprocess
import sys
import time

import pytest
from hydra.errors import ConfigCompositionException

from sysopt.cli.train import compose_job
from sysopt.train import ConfigError, build_job


def job_from(overrides):
    return compose_job(overrides)


def test_default_config_is_valid_and_data_parallel():
    job = job_from([])
    assert (job.parallel.dp, job.parallel.tp, job.parallel.pp) == (2, 1, 1)
    assert job.world_size == 2
    # a multi-rank run has no wall-time limit by default; a hang is caught per collective
    assert job.train.timeout_s is None and job.train.collective_timeout_s == 600


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.nproc=3"], r"train.nproc=3 but parallel.tp\*pp\*dp = 1\*1\*2 = 2"),
        (["parallel.tp=3", "parallel.dp=1"], r"model.heads=4 is not divisible by parallel.tp=3"),
        (["data.name=imagenet"], r"data.name='imagenet' is not an embedded dataset"),
        (
            ["train.global_batch=63"],
            r"train.global_batch=63 is not divisible by parallel.dp \* schedule.microbatches = 2\*1",
        ),
        (["parallel.dp=0"], r"parallel.dp=0 must be a positive integer"),
        (["model.max_seq=8"], r"raise model.max_seq to"),
        (["offload.state_dtype=fp16"], r"offload.state_dtype='fp16' must be fp32 or bf16"),
        (["offload.state_dtype=bf16"], r"offload.state_dtype=bf16 needs sysopt's OffloadAdamW"),
        (["offload=host", "offload.master_dtype=fp16"], r"offload.master_dtype='fp16' must be fp32 or bf16"),
        (["offload=host", "offload.master_dtype=bf16"], r"offload.master_dtype=bf16 needs bf16 moments"),
        (["data.pack_len=40"], r"training rows are 40 tokens .* raise model.max_seq to 40"),
        (["data.pack_len=5"], r"pack_len=5 is shorter than the longest sample"),
        (
            ["parallel.boundaries=[0,7,3]"],
            r"parallel.boundaries=\[0, 7, 3\] must cut the model's \d+ blocks into pp\*vpp=1",
        ),
        (["schedule.receive_ahead=0"], r"schedule.receive_ahead=0 must be an integer >= 1 .* or null"),
        # each of these used to pass validation, then divide by zero, hang or train on nothing in the ranks
        (["schedule.microbatches=0"], r"schedule.microbatches=0 must be an integer >= 1 .* or null"),
        (["schedule.microbatches=-2"], r"schedule.microbatches=-2 must be an integer >= 1 .* or null"),
        (["train.log_every=0"], r"train.log_every=0 must be >= 1 .*; use 1"),
        (["train.global_batch=0"], r"train.global_batch=0 must be >= 1 rows per step; use e.g. 64"),
        (["train.eval_batch=0"], r"train.eval_batch=0 must be >= 1 held-out samples"),
        (["train.timeout_s=0"], r"train.timeout_s=0 must be > 0 seconds, or null for no limit"),
        (
            ["train.collective_timeout_s=0"],
            r"train.collective_timeout_s=0 must be > 0 seconds .*; use e.g. 600",
        ),
        (
            ["train.collective_timeout_s=null"],
            r"train.collective_timeout_s=None must be > 0 seconds .*cannot be null",
        ),
        (
            ["train.checkpoint_every=-1"],
            r"train.checkpoint_every=-1 must be >= 0 .*; use 0 for only the final",
        ),
        (["optim.grad_clip=-1"], r"optim.grad_clip=-1 must be >= 0 .*; use 0 to turn clipping off"),
        (["offload=fraction", "offload.fraction=5"], r"offload.fraction=5 must lie in \[0, 1\]"),
        (["optim.betas=[0.9,1.0]"], r"optim.betas=\[0.9, 1.0\] must be two numbers in \[0, 1\)"),
        (["model.heads=3"], r"model.heads=3 must divide model.dim=128 .*; use a divisor of 128"),
        (["model.vision_heads=3"], r"model.vision_heads=3 must divide model.vision_dim=64"),
        (["model.layers=0"], r"model.layers=0 must be >= 1"),
        (["model.mlp_ratio=0"], r"model.mlp_ratio=0 must be >= 1"),
        (["model.patch_size=3"], r"model.patch_size=3 does not divide model.image_size=8; use 2 or 4"),
        (
            ["train.max_steps=10"],
            r"optim.warmup_steps=100 must lie in \[0, train.max_steps=10\]; .* optim.warmup_steps=1",
        ),
        (
            ["model.image_size=16", "model.patch_size=8"],
            r"model.image_size=16 but the digit images are 8x8; set model.image_size=8",
        ),
        (
            ["precision=fp8_rowwise", "+precision.recipe_overrides.grad_wieght=bf16"],
            r"^precision.recipe_overrides.grad_wieght is not a Recipe field \(known: .*grad_weight",
        ),
        (
            ["precision=fp8_rowwise", "+precision.recipe_overrides.grad_weight=fp4"],
            r"^precision.recipe_overrides: recipe 'fp8_rowwise\[grad_weight=fp4\]': grad_weight format 'fp4' is not one of",
        ),
        (
            ["+precision.recipe_overrides.grad_weight=bf16"],
            r"changes a named recipe, but precision.recipe=None; set precision.recipe",
        ),
    ],
)
def test_bad_values_name_the_key_and_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        job_from(overrides)


@pytest.mark.parametrize("overrides", [["parallel.nonsense=1"], ["model=does_not_exist"]])
def test_unknown_options_are_rejected_by_composition(overrides):
    with pytest.raises(ConfigCompositionException):
        job_from(overrides)


def test_cli_fails_fast_without_starting_ranks(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sysopt.cli.train", "data.name=imagenet", f"hydra.run.dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        "data.name='imagenet' is not an embedded dataset (available: digits); use data=digits" in proc.stderr
    )
    assert not (tmp_path / "run" / "logs").exists()  # no rank was launched
    assert time.monotonic() - start < 60


def test_recipe_overrides_change_only_the_named_fields():
    job = job_from(["precision=fp8_rowwise", "+precision.recipe_overrides.grad_weight=bf16"])
    from sysopt.precision import recipe

    base, got = recipe("fp8_rowwise"), job.precision.resolved_recipe()
    assert got.grad_weight == ("bf16", "bf16") and base.grad_weight == ("e4m3", "e4m3")
    assert got.name == "fp8_rowwise[grad_weight=bf16]"
    assert dataclasses.replace(got, name=base.name, grad_weight=base.grad_weight) == base
    assert build_job(job.to_dict()).precision.resolved_recipe() == got  # survives the JSON the ranks get
    assert job_from(["precision=fp8_rowwise"]).precision.resolved_recipe() == "fp8_rowwise"
