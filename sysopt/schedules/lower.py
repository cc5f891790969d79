"""Lowering pass: a compute-only Schedule -> the same order with SEND_F/RECV_F/SEND_B/RECV_B added.

A SEND follows the compute that produces its tensor; the matching RECV is placed on the consumer's rank
at the point the data becomes available in a round-robin dry run (one action per rank per round), so
receives are posted early and, per pair of ranks, in the same order as the sends.
"""

from __future__ import annotations

from sysopt.schedules.ir import Action, Schedule, ScheduleError, comm_pair, producer, validate


def add_comms(schedule: Schedule) -> Schedule:
    """Return ``schedule`` with explicit point-to-point actions (validated)."""
    compute = schedule.compute_only()
    validate(compute)
    out: dict[int, list[Action]] = {r: [] for r in compute.actions}
    pos = {r: 0 for r in compute.actions}
    done: set[Action] = set()
    remaining = sum(len(a) for a in compute.actions.values())
    while remaining:
        progressed = False
        for rank in sorted(compute.actions):
            acts = compute.actions[rank]
            if pos[rank] == len(acts):
                continue
            action = acts[pos[rank]]
            dep = producer(compute, action)
            if dep is not None and dep not in done:
                continue
            out[rank].append(action)
            done.add(action)
            pos[rank] += 1
            remaining -= 1
            progressed = True
            pair = comm_pair(compute, action)
            if pair is not None:
                send, recv = pair
                out[rank].append(send)
                out[compute.stage_to_rank[recv.stage]].append(recv)
        if not progressed:  # validate() above makes this unreachable; kept as a guard
            raise ScheduleError(f"{schedule.name}: lowering made no progress\n\n{compute.grid()}")
    return validate(compute.replace_actions(out))
