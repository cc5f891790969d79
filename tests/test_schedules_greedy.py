"""zb_greedy: the cost-aware zero-bubble list scheduler. Its schedules validate, respect the activation cap,
keep each stage's microbatch order, and on unequal stages reach the pipeline's start-up lower bound."""

import itertools
import random

import pytest

from sysopt.schedules import Costs, build, simulate, startup_lower_bound
from sysopt.schedules.greedy import default_max_activations
from sysopt.schedules.ir import F, I, W
from sysopt.schedules.simulate import peak_activations


def _random_costs(stages: int, seed: int) -> Costs:
    rng = random.Random(seed)
    forward = [rng.uniform(0.5, 3.0) for _ in range(stages)]
    weight = [f * rng.uniform(0.5, 1.2) for f in forward]
    backward = [w + f * rng.uniform(0.8, 1.5) for f, w in zip(forward, weight)]
    return Costs(forward, backward, weight, p2p=rng.uniform(0.0, 0.2))


CASES = [(2, 1, 3), (2, 2, 5), (4, 1, 6), (4, 2, 8), (4, 2, 7), (4, 3, 12), (8, 2, 16)]


@pytest.mark.parametrize("pp,vpp,m", CASES)
@pytest.mark.parametrize("seed", [None, 1, 2])
def test_valid_capped_and_in_microbatch_order(pp, vpp, m, seed):
    costs = None if seed is None else _random_costs(pp * vpp, seed)
    schedule = build("zb_greedy", pp, vpp, m, costs=costs)  # build() validates
    cap = default_max_activations(pp, vpp, m)
    assert max(peak_activations(schedule, r) for r in range(pp)) <= cap
    for rank, actions in schedule.actions.items():
        for stage, kind in itertools.product(schedule.stages_of(rank), (F, I, W)):
            order = [a.microbatch for a in actions if a.stage == stage and a.kind is kind]
            assert order == list(range(m)), f"rank {rank} stage {stage} {kind}: {order}"


@pytest.mark.parametrize("m", [4, 7, 8])
def test_v_placement(m):
    schedule = build("zb_greedy", 4, 2, m, placement="v")
    assert schedule.stage_to_rank == (0, 1, 2, 3, 3, 2, 1, 0)


def test_explicit_cap_is_respected_and_tighter_cap_is_no_faster():
    costs = Costs(1.0, 2.0, 1.0)
    times = {}
    for cap in (8, 10, 14):
        schedule = build("zb_greedy", 4, 2, 8, costs=costs, max_activations=cap)
        assert max(peak_activations(schedule, r) for r in range(4)) <= cap
        times[cap] = simulate(schedule, costs).step_time
    assert times[14] <= times[10] <= times[8]


def test_uniform_stages_no_slower_than_interleaved_at_equal_memory():
    costs = Costs(1.0, 2.0, 1.0, p2p=0.05)
    interleaved = build("interleaved_1f1b", 4, 2, 8)
    greedy = build("zb_greedy", 4, 2, 8, costs=costs)
    assert max(peak_activations(greedy, r) for r in range(4)) <= max(
        peak_activations(interleaved, r) for r in range(4)
    )
    assert simulate(greedy, costs).step_time < simulate(interleaved, costs).step_time


def test_reaches_startup_lower_bound_on_a_vision_heavy_pipeline():
    """Stages 0-1 carry a vision encoder (twice a decoder chunk's cost per layer); every rank's total work is
    equal. No schedule can beat max over ranks of (earliest possible first start + total work): zb_greedy
    allowed twice interleaved 1F1B's activation peak (ZB-H2's trade) meets that bound exactly."""
    layers_per_stage = [2, 2, 3, 3, 3, 3, 2, 2]  # in decoder-layer units: [vision, vision, decoder...]
    unit = 0.02
    forward = [n * unit for n in layers_per_stage]
    costs = Costs(forward, [2 * f for f in forward], forward, p2p=0.002)
    pp, vpp, m = 4, 2, 8
    cap = 2 * default_max_activations(pp, vpp, m)
    sim = simulate(build("zb_greedy", pp, vpp, m, costs=costs, max_activations=cap), costs)
    bound = max(sum(forward[:rank]) + rank * 0.002 + sim.busy_time[rank] for rank in range(pp))
    assert sim.step_time == pytest.approx(bound, rel=1e-9)
    assert startup_lower_bound(build("interleaved_1f1b", pp, vpp, m), costs) == pytest.approx(
        bound, rel=1e-12
    )
    for other in ("interleaved_1f1b", "zb_h1"):
        assert sim.step_time < simulate(build(other, pp, vpp, m), costs).step_time


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="placement='v' needs vpp=2"):
        build("zb_greedy", 4, 3, 8, placement="v")
    with pytest.raises(ValueError, match="placement='diagonal'"):
        build("zb_greedy", 4, 2, 8, placement="diagonal")
    with pytest.raises(ValueError, match="max_activations=1 cannot fill the pipeline"):
        build("zb_greedy", 4, 2, 8, max_activations=1)


@pytest.mark.parametrize("name,vpp", [("1f1b", 1), ("interleaved_1f1b", 2), ("zb_h1", 1), ("zbv", 2), ("dualpipev", 2),
                                      ("zb_greedy", 2)])  # fmt: skip
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_schedule_beats_the_startup_lower_bound(name, vpp, seed):
    """Random unequal stage costs: every builder's simulated step time is at least the placement's bound, and
    the bound is tight for one rank alone (no pipeline: all work, no start-up)."""
    pp, m = 4, 8
    costs = _random_costs(pp * vpp, seed)
    sched = build(name, pp, vpp, m)
    assert simulate(sched, costs).step_time >= startup_lower_bound(sched, costs) * (1 - 1e-12)
    single = build("1f1b", 1, 1, m)
    one = Costs(2.0, 3.0, 1.0)
    assert startup_lower_bound(single, one) == pytest.approx(simulate(single, one).step_time) == m * 5.0
