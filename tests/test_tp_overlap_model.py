"""The chunk-count model against brute force (an event simulation of the pipeline over every chunk
count), the collective model against its all-reduce fit, and the overlap summary against sampling."""

from __future__ import annotations

import random

import pytest
from test_tensor_parallel import fake_profile

from sysopt.tensor_parallel import (
    GemmCollective,
    OverlapPolicy,
    Span,
    choose_chunks,
    choose_chunks_for,
    chunk_bounds,
    collective_time_s,
    pipeline_time_s,
    profile_costs,
    summarize,
)


def simulate(kind: str, chunks: int, compute_s: float, comm_s: float, local_s: float) -> float:
    """Event simulation: one compute resource, one communication resource, chunk dependencies."""
    compute_free = comm_free = 0.0
    if kind == "all_gather":  # transfers back to back from t=0; the local GEMM first
        compute_free = local_s
        for _ in range(chunks):
            comm_free += comm_s
            compute_free = max(compute_free, comm_free) + compute_s
        return compute_free
    for _ in range(chunks):  # each chunk's collective starts once its GEMM is done and the link is free
        compute_free += compute_s
        comm_free = max(comm_free, compute_free) + comm_s
    if kind == "reduce_scatter":  # this rank's own block last, while the transfers finish
        compute_free += local_s
    else:
        assert local_s == 0.0, "an all-reduce has no local block"
    return max(compute_free, comm_free)


@pytest.mark.parametrize("kind", ["reduce_scatter", "all_gather", "all_reduce"])
def test_pipeline_closed_form_equals_event_simulation(kind):
    rng = random.Random(0)
    for _ in range(500):
        chunks = rng.randint(1, 20)
        c, m, local = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0, 2) if kind != "all_reduce" else 0.0
        assert pipeline_time_s(kind, chunks, c, m, local) == pytest.approx(
            simulate(kind, chunks, c, m, local)
        )


@pytest.mark.parametrize("kind", ["reduce_scatter", "all_gather"])
def test_choose_chunks_matches_brute_force(kind):
    rng = random.Random(1)
    for _ in range(200):
        compute_total, per_chunk_overhead = rng.uniform(1e-4, 1e-2), rng.uniform(0, 1e-4)
        comm_total, latency = rng.uniform(1e-4, 1e-2), rng.uniform(0, 5e-4)
        lead = rng.uniform(0, 1e-2)

        def costs(k: int, c=compute_total, o=per_chunk_overhead, m=comm_total, a=latency, lead=lead):
            return c / k + o, a + m / k, lead

        max_chunks = rng.randint(1, 24)
        brute = min(simulate(kind, k, *costs(k)) for k in range(1, max_chunks + 1))
        choice = choose_chunks(kind, costs, max_chunks)
        assert 1 <= choice.chunks <= max_chunks
        assert simulate(kind, choice.chunks, *costs(choice.chunks)) == pytest.approx(brute, rel=1e-12)
        assert choice.predicted_s == pytest.approx(brute, rel=1e-12)
        assert choice.serial_s == pytest.approx(
            lead + compute_total + per_chunk_overhead + latency + comm_total
        )


def test_choice_follows_latency_and_balance():
    op = GemmCollective("reduce_scatter", rows=1024, n=1024, k=1024, tp=2)
    # a slow link: the transfer outlasts the GEMM on this rank's own block, and splitting is free
    free_latency = fake_profile(flops_per_s=5e10, latency_s=0.0, bytes_per_s=5e7)
    assert choose_chunks_for(free_latency, op, max_chunks=16, chunk_overhead_s=0.0).chunks == 16
    # a fast link: the own block's GEMM already hides the whole transfer, so one chunk is best
    fast_link = fake_profile(flops_per_s=5e10, latency_s=0.0, bytes_per_s=2e10)
    assert choose_chunks_for(fast_link, op, max_chunks=16, chunk_overhead_s=0.0).chunks == 1
    costly_latency = fake_profile(flops_per_s=5e10, latency_s=1.0, bytes_per_s=5e7)
    assert choose_chunks_for(costly_latency, op, max_chunks=16).chunks == 1
    tiny = GemmCollective("all_gather", rows=3, n=8, k=8, tp=4)
    assert choose_chunks_for(free_latency, tiny, max_chunks=16).chunks <= 3  # never more chunks than rows


def test_profile_driven_choice_is_the_brute_force_optimum():
    profile = fake_profile(flops_per_s=3e10, latency_s=2e-4, bytes_per_s=1e9)
    for op in [
        GemmCollective("reduce_scatter", rows=256, n=512, k=2048, tp=2),
        GemmCollective("all_gather", rows=256, n=1024, k=512, tp=4, gemms_per_block=2),
        GemmCollective("all_reduce", rows=512, n=512, k=512, tp=2),
    ]:
        costs = profile_costs(profile, op, chunk_overhead_s=5e-5)
        brute = min(simulate(op.kind, k, *costs(k)) for k in range(1, 33))
        choice = choose_chunks_for(profile, op, max_chunks=32, chunk_overhead_s=5e-5)
        assert choice.predicted_s == pytest.approx(brute, rel=1e-12)
        assert choice.predicted_s <= choice.serial_s
        plan = OverlapPolicy("auto", max_chunks=32, chunk_overhead_s=5e-5, profile=profile).plan(op)
        assert plan.chunks == choice.chunks and plan.overlap


def test_collective_model_reduces_to_the_all_reduce_fit():
    profile = fake_profile(latency_s=3e-4, bytes_per_s=1.5e9)  # calibrated at world size 2
    for nbytes in (0, 1 << 10, 1 << 24):
        all_reduce = profile.allreduce_time_s(nbytes)
        assert collective_time_s(profile, "all_reduce", nbytes, 2) == pytest.approx(all_reduce)
        assert collective_time_s(profile, "reduce_scatter", nbytes, 2) == pytest.approx(all_reduce / 2)
        assert collective_time_s(profile, "all_gather", nbytes, 2) == pytest.approx(all_reduce / 2)
        # a ring of 4 takes 3 steps of a quarter buffer each: 3x the latency, 1.5x the bytes of tp=2
        assert collective_time_s(profile, "reduce_scatter", nbytes, 4) == pytest.approx(
            3 * 3e-4 / 2 + 1.5 * nbytes / 1.5e9 / 2
        )


def test_calibrated_tp_collective_fits_take_precedence():
    """With per-op fits of the TP collectives (measured as the layers issue them) the model uses those,
    ring-scaled from the calibrated world size; the all-reduce fit is then unused for them."""
    import dataclasses

    from sysopt.hardware.profile import LinkFit

    base = fake_profile(latency_s=3e-4, bytes_per_s=1.5e9)
    fits = {"all_gather": LinkFit(8e-4, 1.8e9), "reduce_scatter": LinkFit(4e-4, 0.8e9)}
    cal = dataclasses.replace(base.calibration, tp_collectives=fits)
    profile = dataclasses.replace(base, calibration=cal)
    for kind, fit in fits.items():
        for nbytes in (0, 1 << 20):
            assert collective_time_s(profile, kind, nbytes, 2) == pytest.approx(fit.time_s(nbytes))
            # tp=4 from a 2-rank fit: 3 ring steps (3x latency), each 1/4 of the tensor (1.5x the bytes)
            want = 3 * fit.latency_s + 1.5 * nbytes / fit.bytes_per_s
            assert collective_time_s(profile, kind, nbytes, 4) == pytest.approx(want)
    assert collective_time_s(profile, "all_reduce", 1 << 20, 2) == pytest.approx(
        base.allreduce_time_s(1 << 20)
    )


def test_auto_reads_the_calibrated_chunk_overhead():
    import dataclasses

    op = GemmCollective("reduce_scatter", rows=1024, n=512, k=2048, tp=2)
    # a slow link, so the transfer outlasts the GEMM on this rank's own block and chunking can pay
    base = fake_profile(flops_per_s=5e10, latency_s=1e-5, bytes_per_s=2e7)

    def chunks_with(overhead_s):
        cal = dataclasses.replace(base.calibration, tp_chunk_overhead_s=overhead_s)
        return OverlapPolicy("auto", profile=dataclasses.replace(base, calibration=cal)).plan(op).chunks

    cheap, costly = chunks_with(1e-6), chunks_with(0.5)
    assert cheap > 2 and costly == 1  # a 0.5 s chunk never pays (the transfer is ~0.1 s); a 1 us one does
    explicit = OverlapPolicy("auto", chunk_overhead_s=1e-6, profile=base).plan(op).chunks
    assert explicit == cheap  # an explicit value wins; without calibration the default constant is used
    assert OverlapPolicy.from_dict(OverlapPolicy("auto").to_dict()) == OverlapPolicy("auto")


def test_burst_fit_recovers_per_op_latency_and_bandwidth():
    from sysopt.hardware.collectives import fit_bursts

    latency, bandwidth = 7e-4, 1.2e9
    bursts = {(n, k): [k * latency + n / bandwidth] * 3 for n in (1 << 12, 1 << 18, 1 << 22) for k in (1, 4)}
    fit = fit_bursts(bursts)
    assert fit.latency_s == pytest.approx(latency, rel=1e-6)
    assert fit.bytes_per_s == pytest.approx(bandwidth, rel=1e-6)


def test_too_many_chunks_is_a_clear_error():
    op = GemmCollective("reduce_scatter", rows=6, n=8, k=8, tp=2)
    with pytest.raises(ValueError, match=r"chunks=7 .* use chunks <= 6"):
        OverlapPolicy("chunked", chunks=7).plan(op)
    with pytest.raises(ValueError, match="1 <= chunks <= 5"):
        chunk_bounds(5, 6)


@pytest.mark.parametrize("rows,chunks", [(10, 3), (9, 9), (7, 1), (100, 7)])
def test_chunk_bounds_tile_the_rows(rows, chunks):
    bounds = chunk_bounds(rows, chunks)
    assert len(bounds) == chunks and bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_summary_matches_sampling():
    rng = random.Random(2)
    for _ in range(20):
        spans = []
        for _ in range(rng.randint(1, 8)):
            kind = rng.choice(["compute", "comm"])
            start = rng.uniform(0, 10)
            spans.append(Span(kind, "x", start, start + rng.uniform(0, 3)))
        summary = summarize(spans)
        step, comm_n, exposed_n, compute_n = 4e-3, 0, 0, 0
        for i in range(int(14 / step)):
            t = (i + 0.5) * step
            in_comm = any(s.kind == "comm" and s.start_s <= t < s.end_s for s in spans)
            in_compute = any(s.kind == "compute" and s.start_s <= t < s.end_s for s in spans)
            comm_n += in_comm
            compute_n += in_compute
            exposed_n += in_comm and not in_compute
        assert summary.comm_s == pytest.approx(comm_n * step, abs=0.05)
        assert summary.compute_s == pytest.approx(compute_n * step, abs=0.05)
        assert summary.exposed_comm_s == pytest.approx(exposed_n * step, abs=0.05)
        if summary.comm_s > 0:
            assert summary.hidden_fraction == pytest.approx(1 - summary.exposed_comm_s / summary.comm_s)


def test_auto_plans_each_shape_once(monkeypatch):
    """A layer asks for its plan on every call: "auto" models each GEMM+collective shape once, and
    another shape (or another policy) gets its own plan."""
    from sysopt.tensor_parallel import overlap

    calls = []
    real = overlap.choose_chunks_for
    monkeypatch.setattr(overlap, "choose_chunks_for", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    profile = fake_profile(latency_s=1e-5, bytes_per_s=2e7)
    policy = OverlapPolicy("auto", profile=profile)
    small = GemmCollective("reduce_scatter", rows=1024, n=512, k=2048, tp=2)
    large = GemmCollective("reduce_scatter", rows=4096, n=512, k=2048, tp=2)
    first = policy.plan(small)
    assert [policy.plan(small) for _ in range(3)] == [first] * 3
    assert calls == [small]
    assert policy.plan(large).chunks >= 1 and calls == [small, large]
    assert OverlapPolicy("auto", profile=profile).plan(small) == first and calls == [small, large, small]
    assert policy == OverlapPolicy("auto", profile=profile)  # the cache is not part of the policy's value
