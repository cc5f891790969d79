"""Measured forward and backward seconds of every VLM block on this machine, per (precision, tp, TP overlap,
micro-batch size): the planner's compute costs where they were measured, in place of GEMM rates and op
counts (which on a CPU miss most of what a small block costs: dispatch, allocation, quantisation).

Blocks are timed as the trainer builds them (sysopt.train.ParallelVLM: tensor-parallel blocks under tp > 1,
converted linears under a recipe), one intra-op thread per rank as launched ranks run; backward both in one
pass and split as the schedule executor splits it (input gradient, then weight gradient). Under tp > 1 the
ranks are launched over gloo, so a block's time includes its tensor-parallel collectives; the series then
hold the sequence-parallel scatter and gather blocks too: one figure per block of the trainer's list, as
sysopt.planner.workload.layers models it at that tp."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from sysopt.planner.space import PlanConfig

TIMED_BATCHES = 2  # different sample batches (image counts vary): their per-block medians are averaged


@dataclass(frozen=True)
class BlockTimes:
    """Forward and whole-backward seconds of each block (VLM.blocks order) for one microbatch of
    `micro_batch_size` sequences on one rank."""

    precision: str | None
    tp: int
    tp_overlap: str
    tp_chunks: int
    micro_batch_size: int
    forward_s: tuple[float, ...]
    backward_s: tuple[float, ...]
    input_s: tuple[float, ...]  # a split backward's input-gradient pass (I)
    weight_s: tuple[float, ...]  # and its weight-gradient pass (W)

    @property
    def key(self) -> tuple:
        return (self.precision, self.tp, self.tp_overlap, self.tp_chunks)

    def times(self) -> tuple[tuple[float, ...], ...]:
        return self.forward_s, self.backward_s, self.input_s, self.weight_s

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), **{k: list(getattr(self, k)) for k in _SERIES}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockTimes:
        return cls(**{**d, **{k: tuple(d[k]) for k in _SERIES}})


_SERIES = ("forward_s", "backward_s", "input_s", "weight_s")


@dataclass(frozen=True)
class LayerTimes:
    """A table of BlockTimes. `lookup` interpolates linearly in the micro-batch size between measured
    sizes of the same (precision, tp, overlap, chunks) and answers None outside them."""

    entries: tuple[BlockTimes, ...] = ()
    source: str = ""

    def lookup(
        self, precision: str | None, tp: int, tp_overlap: str, tp_chunks: int, micro_batch_size: int
    ) -> tuple[tuple[float, ...], ...] | None:
        """(forward, backward, input, weight) seconds per block, or None where nothing brackets the size."""
        key = (precision, tp, *_neutral(tp, tp_overlap, tp_chunks))
        rows = sorted((e for e in self.entries if e.key == key), key=lambda e: e.micro_batch_size)
        for e in rows:
            if e.micro_batch_size == micro_batch_size:
                return e.times()
        below = [e for e in rows if e.micro_batch_size < micro_batch_size]
        above = [e for e in rows if e.micro_batch_size > micro_batch_size]
        if not below or not above:
            return None
        lo, hi = below[-1], above[0]
        t = (micro_batch_size - lo.micro_batch_size) / (hi.micro_batch_size - lo.micro_batch_size)
        return tuple(tuple(x + t * (y - x) for x, y in zip(a, b)) for a, b in zip(lo.times(), hi.times()))

    def to_dict(self) -> dict[str, Any]:
        return {"entries": [e.to_dict() for e in self.entries], "source": self.source}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerTimes:
        return cls(tuple(BlockTimes.from_dict(e) for e in d.get("entries", ())), d.get("source", ""))


def _neutral(tp: int, tp_overlap: str, tp_chunks: int) -> tuple[str, int]:
    return ("none", 1) if tp == 1 or tp_overlap == "none" else (tp_overlap, tp_chunks)


def _time_blocks(job_json: str, micro_batch_size: int, repeats: int, groups) -> tuple[list[float], ...]:
    """Build the trainer's model for the job (on `groups`, or this process alone when None), time each block
    on TIMED_BATCHES sample batches (sysopt.train.parallel.time_blocks, split backward included) and average
    the medians. The per-block figures after the first block are scaled so that they add up to those blocks
    timed as one chunk (time_chunk), as a pipeline stage runs them: timed alone, each block pays a pass of its
    own and starts with caches its own backward cooled. The two are timed in turn, and the scale per kind is
    the median of their paired ratios (a shared host's speed drifts by 20-40% between separate timings): here
    the summed blocks ran 10-20% slower than the chunk at 1-4 sequences a microbatch, 0-5% at 16, and the
    planner overpredicted pipelines of many tiny microbatches (zb_greedy m64x1 +36%)."""
    from sysopt.data import BatchSampler, DigitsDataset
    from sysopt.train import JobConfig
    from sysopt.train.parallel import ParallelVLM, time_blocks, time_chunk

    job = JobConfig.from_json(job_json)
    sampler = BatchSampler(DigitsDataset(job.data, "train"), micro_batch_size)
    runtime = ParallelVLM(job, groups, sampler.global_batch(0))
    time_blocks(runtime.model, runtime._prepare(sampler.global_batch(0)), 1, split=True)  # warm-up
    runs = []
    for i in range(TIMED_BATCHES):
        batch = runtime._prepare(sampler.global_batch(i))
        pairs = [
            (time_blocks(runtime.model, batch, 1, split=True), time_chunk(runtime.model, batch, 1))
            for _ in range(repeats)
        ]
        runs.append(as_one_chunk([per_block for per_block, _ in pairs], [chunk for _, chunk in pairs]))
    return tuple([statistics.fmean(col) for col in zip(*(run[k] for run in runs))] for k in range(4))


def as_one_chunk(
    per_block: list[tuple[list[float], ...]], chunk: list[tuple[float, ...]]
) -> tuple[list[float], ...]:
    """Paired timings, one pair per repeat: per-block (forward, backward, input grad, weight grad) seconds and
    those of the blocks after the first run as one chunk. Returns the per-block medians with the blocks after
    the first scaled, per kind, by the median of the pairs' chunk / summed-blocks ratios (the first block
    stays as timed)."""
    out = []
    for k in range(4):
        medians = [statistics.median(cell) for cell in zip(*(run[k] for run in per_block))]
        ratios = [c[k] / sum(run[k][1:]) for run, c in zip(per_block, chunk) if sum(run[k][1:]) > 0]
        scale = statistics.median(ratios) if ratios else 1.0
        out.append([medians[0], *(t * scale for t in medians[1:])])
    return tuple(out)


def cases_of(configs: Iterable[PlanConfig]) -> list[tuple[str | None, int, str, int, int]]:
    """The distinct (precision, tp, tp_overlap, tp_chunks, micro_batch_size) cases that `configs` need."""
    found = {
        (c.precision, c.tp, *_neutral(c.tp, c.tp_overlap, c.tp_chunks), c.micro_batch_size) for c in configs
    }
    return sorted(found, key=lambda case: (case[1], str(case[0]), case[2], case[3], case[4]))


def _time_cases(cases: list[tuple[str, int]], repeats: int) -> list[tuple[list[float], ...]]:
    """_time_blocks for each (job JSON, micro-batch size), in order, on every rank of one launch (the cases
    share the launch's tp groups, built once), or in this process when torch.distributed is not up."""
    import torch.distributed as dist

    from sysopt.dist import build_groups
    from sysopt.train import JobConfig

    groups = None
    if dist.is_initialized() and cases:
        job = JobConfig.from_json(cases[0][0])
        groups = build_groups(job.parallel.topology, timeout_s=job.train.collective_timeout_s)
    return [_time_blocks(job_json, size, repeats, groups) for job_json, size in cases]


def measure_layer_times(
    base_job,
    cases: Iterable[tuple[str | None, int, str, int, int]],
    *,
    min_features: int | None = None,
    repeats: int = 2,
    rounds: int = 3,
    timeout_s: float = 600.0,
    progress: bool = True,
) -> LayerTimes:
    """Time every block for each case (precision, tp, tp_overlap, tp_chunks, micro_batch_size).

    Every case is timed in each of `rounds` rounds (each round walks all cases, tensor-parallel ones in one
    launch per tp size), and each block's figure is the median over rounds: a machine whose speed drifts
    (a shared VM does, by 10-20% over minutes) then skews all cases alike instead of some.
    `base_job` is the sysopt.train.JobConfig whose model and data are timed (planner.measure.base_job_for).
    A case the trainer refuses (sysopt.train.ConfigError) is skipped: the model falls back to its estimate."""
    from sysopt.dist import launch
    from sysopt.hardware.calibration import intraop_threads
    from sysopt.planner.measure import job_for
    from sysopt.train import ConfigError

    work = sorted({(p, tp, *_neutral(tp, o, k), s) for p, tp, o, k, s in cases}, key=str)
    jobs = {}
    for case in work:
        precision, tp, overlap, chunks, size = case
        config = PlanConfig(
            tp=tp, precision=precision, tp_overlap=overlap, tp_chunks=chunks, micro_batch_size=size
        )
        try:
            jobs[case] = job_for(config, base_job, min_features).to_json()
        except ConfigError:
            continue
    by_tp: dict[int, list[tuple]] = {}
    for case in jobs:
        by_tp.setdefault(case[1], []).append(case)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=rounds * len(jobs), desc="timing blocks", unit="case", dynamic_ncols=True)
    samples: dict[tuple, list[tuple[list[float], ...]]] = {case: [] for case in jobs}
    for _ in range(rounds):
        for tp, tp_cases in sorted(by_tp.items()):
            args = ([(jobs[c], c[4]) for c in tp_cases], repeats)
            if tp == 1:
                with intraop_threads(1):
                    results = _time_cases(*args)
            else:  # rank 0's times: every rank of the tp group runs the same blocks in step
                # the trainer's blocks, on the CPU as it runs them: gloo even where CUDA is present
                results = launch(_time_cases, tp, args, backend="gloo", timeout_s=timeout_s)[0]
            for case, times in zip(tp_cases, results):
                samples[case].append(times)
            if bar is not None:
                bar.update(len(tp_cases))
    if bar is not None:
        bar.close()
    entries = []
    for case, runs in samples.items():
        series = [[statistics.median(col) for col in zip(*(run[k] for run in runs))] for k in range(4)]
        entries.append(BlockTimes(*case, *(tuple(t) for t in series)))
    source = f"{len(entries)} cases timed, median of {rounds} rounds of {repeats} repeats x {TIMED_BATCHES} batches"
    return LayerTimes(tuple(entries), source)
