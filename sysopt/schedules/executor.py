"""One executor for every Schedule: runs this rank's actions in order over torch.distributed.

Activations go forward and gradients backward point to point (isend/irecv, one tag per message),
the loss is taken on the last stage, gradients accumulate across microbatches in ``param.grad``.
A split backward runs I as ``autograd.grad`` w.r.t. the stage input (keeping the graph) and W as
``autograd.grad`` w.r.t. the parameters; a full B does both at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from sysopt.schedules.ir import Action, Kind, Schedule, validate
from sysopt.schedules.lower import add_comms

Shape = tuple[int, ...]


class ScheduleExecutor:
    """Runs ``schedule`` on this process's rank of ``group`` with ``modules[stage]`` for its stages.

    ``boundary_shape`` is the shape of the tensor leaving a stage (one microbatch), either one shape
    for every boundary or a function of the sending stage. ``loss_fn(output, target)`` gives one
    microbatch's loss; the backward uses ``loss * loss_scale`` (default 1/microbatches, so the
    accumulated gradients are those of the mean loss).
    """

    def __init__(
        self,
        schedule: Schedule,
        modules: Mapping[int, torch.nn.Module],
        loss_fn: Callable[[torch.Tensor, object], torch.Tensor],
        *,
        boundary_shape: Shape | Callable[[int], Shape],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        group: dist.ProcessGroup | None = None,
        loss_scale: float | None = None,
    ) -> None:
        self.schedule = validate(schedule if schedule.has_comms else add_comms(schedule))
        self.group = group
        self.rank = dist.get_rank(group)
        if dist.get_world_size(group) != schedule.pp:
            raise ValueError(
                f"schedule {schedule.name} has pp={schedule.pp} ranks but the process group has "
                f"{dist.get_world_size(group)}; build the schedule with pp={dist.get_world_size(group)}"
            )
        mine = set(self.schedule.stages_of(self.rank))
        if set(modules) != mine:
            raise ValueError(
                f"rank {self.rank} holds stages {sorted(mine)} in {schedule.name} but got modules for "
                f"stages {sorted(modules)}; pass exactly the stages placed on this rank"
            )
        self.modules = dict(modules)
        self.loss_fn = loss_fn
        self.shape_of = boundary_shape if callable(boundary_shape) else (lambda _stage: tuple(boundary_shape))
        self.dtype, self.device = dtype, torch.device(device)
        self.loss_scale = 1.0 / schedule.microbatches if loss_scale is None else loss_scale
        self.last_stage = schedule.num_stages - 1
        self.handlers = {
            Kind.FORWARD: self._forward,
            Kind.BACKWARD: self._backward,
            Kind.BACKWARD_INPUT: self._backward_input,
            Kind.BACKWARD_WEIGHT: self._backward_weight,
            Kind.SEND_F: self._send_f,
            Kind.RECV_F: self._recv_f,
            Kind.SEND_B: self._send_b,
            Kind.RECV_B: self._recv_b,
        }

    # ---- one training step ----------------------------------------------------------------------
    def step(self, inputs: Sequence[torch.Tensor] | None, targets: Sequence[object] | None) -> list | None:
        """Run all microbatches once. ``inputs`` are needed where stage 0 lives, ``targets`` where the
        last stage lives. Returns the per-microbatch losses (detached) on the last stage's rank."""
        self.inputs, self.targets = inputs, targets
        self.stage_in: dict[tuple[int, int], torch.Tensor] = {}  # (stage, mb) -> input tensor
        self.stage_out: dict[tuple[int, int], torch.Tensor] = {}  # output, or scaled loss on the last stage
        self.grad_out: dict[tuple[int, int], torch.Tensor] = {}  # gradient for stage_out
        self.grad_in: dict[tuple[int, int], torch.Tensor] = {}  # gradient of stage_in, to send back
        self.pending: dict[tuple[str, int, int], tuple[dist.Work, torch.Tensor]] = {}
        self.sends: list[tuple[dist.Work, torch.Tensor]] = []  # keep each tensor alive until sent
        self.losses: dict[int, torch.Tensor] = {}
        for action in self.schedule.actions[self.rank]:
            self.handlers[action.kind](action)
        for work, _tensor in self.sends:
            work.wait()
        if self.last_stage in self.modules:
            return [self.losses[mb] for mb in range(self.schedule.microbatches)]
        return None

    # ---- compute --------------------------------------------------------------------------------
    def _forward(self, a: Action) -> None:
        key = (a.stage, a.microbatch)
        if a.stage == 0:
            x = self.inputs[a.microbatch].to(self.device)
        elif self._is_local(a.stage - 1):
            x = self.stage_out[(a.stage - 1, a.microbatch)].detach().requires_grad_(True)
        else:
            x = self._received("F", a.stage, a.microbatch).requires_grad_(True)
        with torch.enable_grad():
            y = self.modules[a.stage](x)
            if a.stage == self.last_stage:
                loss = self.loss_fn(y, self.targets[a.microbatch])
                self.losses[a.microbatch] = loss.detach()
                y = loss * self.loss_scale
        self.stage_in[key], self.stage_out[key] = x, y

    def _backward(self, a: Action) -> None:  # full backward: input and weight gradients together
        self._backward_input(a, keep_graph=False, with_weights=True)

    def _backward_input(self, a: Action, keep_graph: bool = True, with_weights: bool = False) -> None:
        key = (a.stage, a.microbatch)
        grad = self._output_grad(a)
        x, y = self.stage_in[key], self.stage_out[key]
        wants_input = x.requires_grad
        params = self._params(a.stage) if with_weights else []
        wrt = ([x] if wants_input else []) + params
        if wrt:
            grads = torch.autograd.grad(y, wrt, grad, retain_graph=keep_graph, allow_unused=True)
            if wants_input:
                self.grad_in[key] = grads[0] if grads[0] is not None else torch.zeros_like(x)
            self._accumulate(params, grads[1:] if wants_input else grads)
        if with_weights:
            self._release(key)
        else:
            self.grad_out[key] = grad  # W needs it again

    def _backward_weight(self, a: Action) -> None:
        key = (a.stage, a.microbatch)
        params = self._params(a.stage)
        grads = torch.autograd.grad(self.stage_out[key], params, self.grad_out[key], allow_unused=True)
        self._accumulate(params, grads)
        self._release(key)

    def _output_grad(self, a: Action) -> torch.Tensor | None:
        if a.stage == self.last_stage:
            return None  # the scaled loss is a scalar
        if self._is_local(a.stage + 1):
            return self.grad_in.pop((a.stage + 1, a.microbatch))
        return self._received("B", a.stage, a.microbatch)

    def _params(self, stage: int) -> list[torch.nn.Parameter]:
        return [p for p in self.modules[stage].parameters() if p.requires_grad]

    @staticmethod
    def _accumulate(params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor | None]) -> None:
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)

    def _release(self, key: tuple[int, int]) -> None:
        for store in (self.stage_in, self.stage_out, self.grad_out):
            store.pop(key, None)

    # ---- communication --------------------------------------------------------------------------
    def _send_f(self, a: Action) -> None:
        tensor = self.stage_out[(a.stage, a.microbatch)].detach()
        self._isend(tensor, a.stage + 1, self._tag("F", a.stage, a.microbatch))

    def _send_b(self, a: Action) -> None:
        tensor = self.grad_in.pop((a.stage, a.microbatch))
        self._isend(tensor, a.stage - 1, self._tag("B", a.stage, a.microbatch))

    def _recv_f(self, a: Action) -> None:  # input of stage a.stage from stage a.stage - 1
        self._irecv("F", a.stage, a.microbatch, src_stage=a.stage - 1, shape=self.shape_of(a.stage - 1))

    def _recv_b(self, a: Action) -> None:  # gradient of stage a.stage's output from stage a.stage + 1
        self._irecv("B", a.stage, a.microbatch, src_stage=a.stage + 1, shape=self.shape_of(a.stage))

    def _isend(self, tensor: torch.Tensor, dst_stage: int, tag: int) -> None:
        peer = self._global_rank(self.schedule.stage_to_rank[dst_stage])
        tensor = tensor.contiguous()
        self.sends.append((dist.isend(tensor, peer, group=self.group, tag=tag), tensor))

    def _irecv(self, direction: str, stage: int, mb: int, *, src_stage: int, shape: Shape) -> None:
        buffer = torch.empty(shape, dtype=self.dtype, device=self.device)
        peer = self._global_rank(self.schedule.stage_to_rank[src_stage])
        work = dist.irecv(buffer, peer, group=self.group, tag=self._tag(direction, src_stage, mb))
        self.pending[(direction, stage, mb)] = (work, buffer)

    def _received(self, direction: str, stage: int, mb: int) -> torch.Tensor:
        work, buffer = self.pending.pop((direction, stage, mb))
        work.wait()
        return buffer

    def _tag(self, direction: str, sender_stage: int, mb: int) -> int:
        """Unique per message: direction, sending stage, microbatch."""
        index = (0 if direction == "F" else 1) * self.schedule.num_stages + sender_stage
        return index * self.schedule.microbatches + mb

    def _is_local(self, stage: int) -> bool:
        return stage in self.modules

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None or self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)
