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
    with pytest.raises(ValueError, match=r"does not equal the world size 4"):
        Topology(tp=2, pp=2, dp=2).check_world(4)


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
