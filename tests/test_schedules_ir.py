"""Schedule IR: string forms, JSON, the grid, builder parameters, lowering, and every validator rule."""

import itertools
import subprocess
import sys

import pytest

from sysopt.schedules import Action, Kind, Schedule, ScheduleError, add_comms, build, validate
from sysopt.schedules.ir import B, F, I, W

CASES = [
    ("gpipe", 4, 1, 6),
    ("1f1b", 4, 1, 6),
    ("interleaved_1f1b", 4, 2, 8),
    ("zb_h1", 4, 1, 6),
    ("zb_h1", 2, 2, 4),
    ("zbv", 4, 2, 8),
    ("dualpipev", 4, 2, 8),
]


def _edit(schedule: Schedule, rank: int, edit) -> Schedule:
    acts = list(schedule.actions[rank])
    edit(acts)
    return schedule.replace_actions({**schedule.actions, rank: tuple(acts)})


def _raises(schedule: Schedule, *fragments: str) -> str:
    with pytest.raises(ScheduleError) as info:
        validate(schedule)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---- string form, JSON, grid ------------------------------------------------------------------


@pytest.mark.parametrize("text", ["2F0", "1W3", "0I11", "3B2", "0SEND_F1", "5RECV_B7"])
def test_action_string_round_trip(text):
    assert str(Action.parse(text)) == text


def test_action_parse_rejects_garbage_with_the_expected_form():
    with pytest.raises(ValueError, match="<stage><kind><microbatch>"):
        Action.parse("F0")


@pytest.mark.parametrize("name,pp,vpp,m", CASES)
def test_json_round_trip(name, pp, vpp, m):
    for schedule in (build(name, pp, vpp, m), add_comms(build(name, pp, vpp, m))):
        again = Schedule.from_json(schedule.to_json())
        assert again == schedule
        assert again.to_dict() == schedule.to_dict()


def test_grid_lists_every_action_in_rank_order():
    schedule = build("1f1b", 2, 1, 3)
    lines = schedule.grid().splitlines()
    assert lines[0].split() == ["rank", "0", "rank", "1"]
    for rank in range(2):
        column = [line.split(":", 1)[1].split()[rank] for line in lines[1:]]
        assert column == [str(a) for a in schedule.actions[rank]]


# ---- builders: placement and parameter errors -------------------------------------------------


def test_interleaved_places_stage_on_rank_modulo_pp():
    s = build("interleaved_1f1b", 4, 3, 8)
    assert s.stage_to_rank == tuple(stage % 4 for stage in range(12))
    assert all(a.stage % 4 == r for r, acts in s.actions.items() for a in acts)


@pytest.mark.parametrize("name", ["zbv", "dualpipev"])
def test_v_schedules_fold_chunk_one_back_down_the_ranks(name):
    s = build(name, 4, 2, 8)
    assert s.stage_to_rank == (0, 1, 2, 3, 3, 2, 1, 0)
    assert s.stages_of(0) == (0, 7) and s.stages_of(3) == (3, 4)


@pytest.mark.parametrize(
    "args,options,fragments",
    [
        (
            ("interleaved_1f1b", 4, 2, 6),
            {},
            ["microbatches=6", "use microbatches=8", "microbatch_group_size in [6]"],
        ),
        (("interleaved_1f1b", 4, 2, 3), {}, ["microbatches=3 must be >= pp=4"]),
        (
            ("interleaved_1f1b", 4, 2, 8),
            {"microbatch_group_size": 3},
            ["microbatch_group_size=3 must lie in"],
        ),
        (("interleaved_1f1b", 4, 1, 8), {}, ["vpp=1", "1f1b"]),
        (("1f1b", 4, 2, 8), {}, ["vpp=2", "interleaved_1f1b"]),
        (("zbv", 4, 3, 8), {}, ["vpp=3", "needs vpp=2"]),
        (("dualpipev", 4, 2, 7), {}, ["microbatches=7 must be >= 2*pp=8"]),
        (("zb_h1", 0, 1, 4), {}, ["pp=0"]),
        (("nope", 2, 1, 4), {}, ["unknown schedule 'nope'", "interleaved_1f1b"]),
    ],
)
def test_bad_parameters_say_which_value_to_change(args, options, fragments):
    with pytest.raises(ValueError) as info:
        build(*args, **options)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("pp,m,group", [(4, 10, 5), (4, 9, 5), (4, 6, 6), (2, 5, 3), (4, 12, 4)])
@pytest.mark.parametrize("name", ["interleaved_1f1b", "zb_h1"])
def test_flexible_microbatch_counts_where_megatron_allows(name, pp, m, group):
    s = build(name, pp, 2, m, microbatch_group_size=group)
    assert s.microbatches == m  # validated inside build: every microbatch runs F and its backward once


def test_every_builder_is_valid_over_a_grid_of_sizes():
    for name, vpp in [("gpipe", 1), ("1f1b", 1), ("zb_h1", 1), ("zbv", 2), ("interleaved_1f1b", 2)]:
        for pp, m in itertools.product((1, 2, 3, 5), (1, 2, 3, 5, 7, 10)):
            if name == "interleaved_1f1b" and m % pp:
                continue
            if name == "interleaved_1f1b" and m < pp:
                continue
            _assert_complete(validate(build(name, pp, vpp, m)), m)
    for pp, m in itertools.product((1, 2, 3), (6, 7, 9)):
        _assert_complete(validate(build("dualpipev", pp, 2, m)), m)


def _assert_complete(schedule, m):
    """Every (stage, microbatch) has exactly one forward in the validated schedule."""
    forwards = [a for acts in schedule.actions.values() for a in acts if a.kind == F]
    assert sorted((a.stage, a.microbatch) for a in forwards) == [
        (stage, mb) for stage in range(schedule.num_stages) for mb in range(m)
    ]


# ---- validator: each invariant ------------------------------------------------------------------


def test_valid_schedules_pass():
    for name, pp, vpp, m in CASES:
        _assert_complete(validate(build(name, pp, vpp, m)), m)


def test_duplicate_action_is_reported_with_both_places():
    s = build("1f1b", 2, 1, 3)
    _raises(_edit(s, 0, lambda a: a.insert(1, Action(0, F, 0))), "0F0 appears twice", "[0F0]", "<-- here")


def test_missing_backward_is_reported():
    s = build("1f1b", 2, 1, 3)
    _raises(_edit(s, 0, lambda a: a.remove(Action(0, B, 2))), "stage 0 microbatch 2 is missing a backward")


def test_backward_before_forward():
    s = build("gpipe", 2, 1, 2)
    msg = _raises(
        _edit(s, 1, lambda a: a.insert(0, a.pop(a.index(Action(1, B, 0))))), "1B0 comes with nothing"
    )
    assert "[1B0]" in msg


def test_weight_before_input_gradient():
    s = build("zb_h1", 2, 1, 3)

    def swap(acts):
        i, w = acts.index(Action(0, I, 1)), acts.index(Action(0, W, 1))
        acts[i], acts[w] = acts[w], acts[i]

    _raises(_edit(s, 0, swap), "0W1 comes after 'F'", "expected 0I1 first")


def test_weight_after_full_backward():
    s = build("1f1b", 2, 1, 2)
    _raises(_edit(s, 0, lambda a: a.append(Action(0, W, 1))), "0W1 comes after a full backward")


def test_action_on_the_wrong_rank():
    s = build("1f1b", 2, 1, 2)
    _raises(_edit(s, 0, lambda a: a.append(Action(1, F, 1))), "placed on rank 1")
    s = build("zbv", 2, 2, 4)
    _raises(
        _edit(s, 0, lambda a: a.append(Action(2, F, 0))), "2F0 runs on rank 0 but stage 2 is placed on rank 1"
    )


def test_microbatch_out_of_range():
    s = build("1f1b", 2, 1, 2)
    _raises(_edit(s, 1, lambda a: a.append(Action(1, F, 2))), "names microbatch 2, outside 0..1")


def test_cross_rank_deadlock_marks_the_stuck_cell():
    # rank 1 runs microbatch 1 first, but rank 0 only sends it after waiting for 1B0: a cycle.
    s = build("1f1b", 2, 1, 2)
    bad = s.replace_actions(
        {0: (Action(0, F, 0), Action(0, B, 0), Action(0, F, 1), Action(0, B, 1)),
         1: (Action(1, F, 1), Action(1, B, 1), Action(1, F, 0), Action(1, B, 0))}
    )  # fmt: skip
    msg = _raises(bad, "deadlock", "rank 0 at step 1 runs 0B0, waiting for 1B0", "rank 1 at step 0 runs 1F1")
    assert "[1F1]" in msg


def test_forward_of_stage_s_must_follow_stage_s_minus_1_on_the_same_rank():
    # On the V's bottom rank stages p-1 and p share a rank; running p's F first can never finish.
    s = build("zbv", 2, 2, 3)
    first_chunk1 = s.actions[1].index(Action(2, F, 0))
    _raises(_edit(s, 1, lambda a: a.insert(0, a.pop(first_chunk1))), "deadlock", "2F0, waiting for 1F0")


def test_a_send_posted_after_a_compute_that_awaits_its_reply_is_a_deadlock():
    # rank 0: 0F0 0RECV_B0 0B0 0SEND_F0 -- 0B0 needs 1B0, which needs the F0 data rank 0 has not sent yet
    lowered = add_comms(build("1f1b", 2, 1, 1))
    send = Action(0, Kind.SEND_F, 0)
    late = _edit(lowered, 0, lambda a: a.append(a.pop(a.index(send))))
    _raises(late, "deadlock", "1F0, waiting for the SEND and RECV of 0F0's output")


def test_sends_must_match_receives():
    lowered = add_comms(build("1f1b", 2, 1, 2))
    recv = Action(1, Kind.RECV_F, 1)
    _raises(_edit(lowered, 1, lambda a: a.remove(recv)), "0SEND_F1 has no matching 1RECV_F1")
    late = _edit(lowered, 1, lambda a: (a.remove(recv), a.append(recv)))
    _raises(late, "1RECV_F1 comes after 1F1")
    _raises(
        _edit(lowered, 0, lambda a: a.append(Action(0, Kind.SEND_B, 0))), "0SEND_B0 has no matching compute"
    )


def test_placement_table_must_cover_every_stage():
    s = build("1f1b", 2, 1, 2)
    bad = Schedule(s.name, 2, 2, 2, (0,), dict(s.actions))
    with pytest.raises(ScheduleError, match="stage_to_rank has 1 entries but num_stages=2"):
        validate(bad)


# ---- lowering -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,pp,vpp,m", CASES)
def test_lowering_adds_one_send_and_recv_per_cross_rank_edge(name, pp, vpp, m):
    compute = build(name, pp, vpp, m)
    lowered = add_comms(compute)
    assert lowered.compute_only() == compute  # compute order untouched
    cross = sum(
        compute.stage_to_rank[s] != compute.stage_to_rank[s + 1] for s in range(compute.num_stages - 1)
    )
    for kind in (Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B):
        count = sum(a.kind is kind for acts in lowered.actions.values() for a in acts)
        assert count == cross * m, kind
    # Per ordered pair of ranks, receives are posted in the order the sends were issued.
    for src, dst in itertools.permutations(range(pp), 2):
        sends = [
            (a.stage, a.kind.value[-1], a.microbatch)
            for a in lowered.actions[src]
            if a.kind in (Kind.SEND_F, Kind.SEND_B)
            and lowered.stage_to_rank[a.stage + (1 if a.kind is Kind.SEND_F else -1)] == dst
        ]
        recvs = [
            (a.stage - (1 if a.kind is Kind.RECV_F else -1), a.kind.value[-1], a.microbatch)
            for a in lowered.actions[dst]
            if a.kind in (Kind.RECV_F, Kind.RECV_B)
            and lowered.stage_to_rank[a.stage - (1 if a.kind is Kind.RECV_F else -1)] == src
        ]
        assert sends == recvs


def test_schedules_core_is_pure_python():
    code = (
        "import sys; from sysopt.schedules import build, simulate, partition, render, Costs;"
        "render(simulate(build('zbv', 2, 2, 4), Costs(1, 2, 1)));"
        "partition([1.0] * 6, [2.0] * 6, pp=2, microbatches=4);"
        "print(sorted(m for m in ('torch', 'matplotlib', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_p2p_order_problem_flags_sends_out_of_the_receivers_order():
    """NCCL ignores tags: a rank pair's messages match in posting order. Every built-in schedule keeps the
    sender's SENDs in the receiver's RECV order; swapping two SENDs (still a valid, deadlock-free schedule
    on gloo) is named, with the pair and the messages."""
    from sysopt.schedules.builders import BUILDERS
    from sysopt.schedules.executor import p2p_order_problem

    for name in sorted(BUILDERS):
        for pp, vpp in ((2, 1), (2, 2), (4, 1), (4, 2)):
            try:
                schedule = build(name, pp, vpp, 8)
            except ValueError as exc:  # this builder takes another vpp; an invalid schedule must fail here
                if isinstance(exc, ScheduleError) or "vpp" not in str(exc):
                    raise
                continue
            for ahead in (1, None):
                assert p2p_order_problem(schedule, ahead) is None, (name, pp, vpp, ahead)
    lowered = add_comms(build("gpipe", 2, 1, 2))
    rank0 = [Action.parse(t) for t in "0F0 0F1 0SEND_F1 0SEND_F0 0RECV_B0 0B0 0RECV_B1 0B1".split()]
    swapped = validate(lowered.replace_actions({**lowered.actions, 0: tuple(rank0)}))  # fine on gloo
    assert p2p_order_problem(swapped) == (
        "rank 0's message 0 to rank 1 is the output of 0F1 but rank 1 posts its receive for the output of 0F0 "
        "there; order rank 0's SENDs as rank 1 posts its RECVs (or run on gloo, which matches by tag)"
    )


@pytest.mark.parametrize("ahead", [0, True, 1.5])
def test_executor_refuses_a_bad_receive_window_by_its_name(ahead):
    from sysopt.schedules.executor import ScheduleExecutor

    with pytest.raises(ValueError, match=rf"receive_ahead={ahead!r}: use an integer >= 1"):
        ScheduleExecutor(build("1f1b", 2, 1, 2), {}, lambda y, t: y, boundary_shape=(1,), receive_ahead=ahead)
