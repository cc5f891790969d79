"""Cross-checks against the reference implementations: torch.distributed.pipelining's schedules and
validator, and megatron-core 0.16.1's interleaved microbatch table and group-size rule."""

import ast
import importlib.util
import itertools
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest

pytest.importorskip("torch")
from torch.distributed.pipelining import schedules as ts  # noqa: E402

from sysopt.schedules import Costs, Schedule, ScheduleError, add_comms, build, simulate, validate  # noqa: E402
from sysopt.schedules.torch_compat import from_torch, to_torch, torch_pipeline_order  # noqa: E402

SHARED = [
    ("gpipe", 1, [(2, 4), (4, 6)]),
    ("1f1b", 1, [(2, 4), (4, 6)]),
    ("interleaved_1f1b", 2, [(2, 4), (4, 8), (4, 10), (4, 6)]),
    ("zb_h1", 1, [(2, 4), (4, 6), (4, 8)]),
    ("zb_h1", 2, [(2, 4), (4, 8), (4, 12)]),
    ("zbv", 2, [(2, 3), (2, 4), (4, 7), (4, 8)]),
    ("dualpipev", 2, [(2, 4), (4, 8), (4, 11)]),
]
CASES = [(name, pp, vpp, m) for name, vpp, sizes in SHARED for pp, m in sizes]


def _torch_flex_options(name, pp, vpp, m):
    """torch picks its interleaved group size itself (m // max(1, m // pp)); pass ours the same."""
    if vpp > 1 and name in ("interleaved_1f1b", "zb_h1"):
        return {"microbatch_group_size": m // max(1, m // pp)}
    return {}


def _torch_accepts(order, pp, num_stages, m) -> bool:
    try:
        ts._validate_schedule(order, pp, num_stages, m)
    except AssertionError:
        return False
    return True


def _cost_models(num_stages):
    rng = random.Random(num_stages)
    fwd = [rng.uniform(0.5, 1.5) for _ in range(num_stages)]
    bwd = [rng.uniform(1.5, 3.0) for _ in range(num_stages)]
    return [
        Costs(1.0, 2.0),
        Costs(1.0, 2.0, 1.0, p2p=0.2),
        Costs(fwd, bwd, [b / 3 for b in bwd], p2p=[rng.uniform(0, 0.3) for _ in range(num_stages)]),
    ]


@pytest.mark.parametrize("name,pp,vpp,m", CASES)
def test_ours_pass_torch_and_theirs_pass_ours_with_equal_step_times(name, pp, vpp, m):
    ours = build(name, pp, vpp, m, **_torch_flex_options(name, pp, vpp, m))
    # our compute order passes torch's validator (it returns the stage -> rank map it infers)
    placement = ts._validate_schedule(to_torch(ours), pp, ours.num_stages, m)
    assert tuple(placement[s] for s in range(ours.num_stages)) == ours.stage_to_rank

    order = torch_pipeline_order(name, pp, vpp, m)
    theirs = from_torch(order, microbatches=m, name=f"torch-{name}")
    if not _torch_accepts(order, pp, pp * vpp, m):
        # torch's own validator rejects its IR (Schedule1F1B._get_pipeline_order in torch 2.13 starts
        # the last rank at microbatch 1): ours must reject it too, and say where.
        with pytest.raises(ScheduleError, match=r"here"):
            validate(theirs)
        return
    validate(theirs)
    assert theirs.stage_to_rank == ours.stage_to_rank
    for costs in _cost_models(ours.num_stages):
        assert simulate(theirs, costs).step_time == pytest.approx(simulate(ours, costs).step_time)
    assert theirs.actions == ours.actions  # same compute order, action for action


@pytest.mark.parametrize("name,pp,vpp,m", CASES)
def test_our_lowered_schedules_run_in_torchs_comms_simulator(name, pp, vpp, m):
    ours = add_comms(build(name, pp, vpp, m, **_torch_flex_options(name, pp, vpp, m)))
    rank_of = ours.stage_to_rank
    trace = ts._simulate_comms_compute(
        to_torch(ours, include_comms=True), lambda s: rank_of[s], ours.num_stages
    )
    assert sum(a is not None for acts in trace.values() for a in acts) == sum(
        len(a) for a in ours.actions.values()
    )


@pytest.mark.parametrize("name,pp,vpp,m", [c for c in CASES if c[0] not in ("gpipe", "1f1b")])
def test_torchs_lowered_schedules_pass_our_comms_checks(name, pp, vpp, m):
    cls = getattr(ts, {"interleaved_1f1b": "ScheduleInterleaved1F1B", "zb_h1": "ScheduleInterleavedZeroBubble",
                       "zbv": "ScheduleZBVZeroBubble", "dualpipev": "ScheduleDualPipeV"}[name])  # fmt: skip
    stages = [
        SimpleNamespace(stage_index=i, num_stages=pp * vpp, group_size=pp, group_rank=0, submod=None)
        for i in range(vpp)
    ]
    lowered = from_torch(cls(stages, m).pipeline_order_with_comms, microbatches=m)
    assert lowered.has_comms
    validate(lowered)


def test_flexible_counts_torch_rejects_still_build():
    # torch's interleaved zero-bubble needs m % (m // pp) == 0 even for one chunk; we do not.
    with pytest.raises(ValueError, match="multiple of the number of rounds"):
        torch_pipeline_order("zb_h1", 4, 1, 9)
    validate(build("zb_h1", 4, 1, 9))


def test_from_torch_expands_overlapped_actions():
    order = torch_pipeline_order("dualpipev", 2, 2, 4)
    assert any(a is not None and a.sub_actions for acts in order.values() for a in acts)
    assert isinstance(from_torch(order, microbatches=4), Schedule)


# ---- megatron-core 0.16.1: interleaved order and the flexible-microbatch rule ------------------


def _megatron_source() -> tuple[Path, ast.Module]:
    spec = importlib.util.find_spec("megatron.core")
    if spec is None or spec.origin is None:
        pytest.skip("megatron-core is not installed")
    path = Path(spec.origin).parent / "pipeline_parallel" / "schedules.py"
    return path, ast.parse(path.read_text())


def _megatron_functions():
    """megatron-core's own get_schedule_table / get_pp_rank_microbatches, compiled from its source
    (importing megatron.core.pipeline_parallel pulls in the whole framework and takes ~10 s)."""
    path, tree = _megatron_source()
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("get_schedule_table", "get_pp_rank_microbatches")]  # fmt: skip
    namespace = {"Optional": Optional, "P2PCommunicator": object, "parallel_state": None}
    exec(compile(ast.Module(wanted, []), str(path), "exec"), namespace)
    return namespace["get_schedule_table"], namespace["get_pp_rank_microbatches"]


def _megatron_group_rule():
    """The statements in forward_backward_pipelining_with_interleaving that accept or reject
    (num_microbatches, microbatch_group_size_per_vp_stage), compiled from megatron's source."""
    path, tree = _megatron_source()
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "forward_backward_pipelining_with_interleaving")  # fmt: skip
    start = next(i for i, s in enumerate(fn.body) if isinstance(s, ast.If) and "microbatch_group_size_per_vp_stage" in ast.unparse(s.test))  # fmt: skip
    stop = next(i for i, s in enumerate(fn.body) if isinstance(s, ast.If) and "final_microbatch_group_size" in ast.unparse(s.test))  # fmt: skip
    code = compile(ast.Module(fn.body[start : stop + 1], []), str(path), "exec")

    def accepts(pp, m, group) -> bool:
        scope = {"config": SimpleNamespace(microbatch_group_size_per_vp_stage=group), "num_microbatches": m,
                 "pipeline_parallel_size": pp}  # fmt: skip
        try:
            exec(code, scope)
        except (ValueError, RuntimeError):
            return False
        return True

    return accepts


def test_flexible_microbatch_rule_matches_megatron():
    accepts = _megatron_group_rule()
    for pp, m in itertools.product((2, 3, 4), range(1, 14)):
        for group in range(1, m + 2):
            try:
                build("interleaved_1f1b", pp, 2, m, microbatch_group_size=group)
                ours = True
            except ScheduleError:
                raise
            except ValueError:
                ours = False
            assert ours == accepts(pp, m, group), (pp, m, group)


@pytest.mark.parametrize(
    "pp,vpp,m,group", [(4, 2, 8, 4), (4, 2, 10, 5), (4, 2, 9, 5), (2, 3, 5, 5), (4, 3, 13, 9), (3, 2, 7, 4)]
)
def test_interleaved_order_follows_megatrons_table_and_warmup(pp, vpp, m, group):
    table_fn, warmup_fn = _megatron_functions()
    table = table_fn(m, vpp, group)
    ours = build("interleaved_1f1b", pp, vpp, m, microbatch_group_size=group)
    for rank in range(pp):
        comm = SimpleNamespace(
            pp_group=SimpleNamespace(size=lambda: pp, rank=lambda r=rank: r),
            virtual_pipeline_model_parallel_size=vpp,
        )
        total, _, warmup, _ = warmup_fn(m, vpp, group, p2p_communicator=comm)
        forwards = [f"{chunk * pp + rank}F{mb}" for mb, chunk in table]
        backwards = [f"{(vpp - 1 - chunk) * pp + rank}B{mb}" for mb, chunk in table]
        # Megatron's loop: warmup forwards, then forward k+warmup / backward k, then the remaining backwards.
        expected = forwards[:warmup]
        for k in range(total - warmup):
            expected += [forwards[warmup + k], backwards[k]]
        expected += backwards[total - warmup :]
        assert [str(a) for a in ours.actions[rank]] == expected


def test_from_torch_errors_name_the_fix():
    with pytest.raises(ValueError, match="no forward or backward actions"):
        from_torch({0: [], 1: []}, microbatches=1)
    order = {
        0: [ts._Action(0, ts._ComputationType.FORWARD, 0)],
        1: [ts._Action(2, ts._ComputationType.FORWARD, 0)],
    }
    with pytest.raises(ValueError, match=r"stages \[1\] have no actions .* pass stage_to_rank="):
        from_torch(order, microbatches=1)
