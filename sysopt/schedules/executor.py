"""One executor for every Schedule: runs this rank's actions in order over torch.distributed.

Activations go forward and gradients backward point to point (isend/irecv, one tag per message),
the loss is taken on the last stage, gradients accumulate across microbatches in ``param.grad``
through autograd (so gradient hooks fire). A full B is one ``torch.autograd.backward``. A split
backward on a stage with deferrable layers (``sysopt.schedules.wgrad``) runs I as that backward
while a WeightGradStore captures the weight-gradient GEMMs, and W runs only those; on other stages
I differentiates w.r.t. the stage input (keeping the graph) and W w.r.t. the parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from sysopt.schedules.ir import Action, Kind, Schedule, validate
from sysopt.schedules.lower import add_comms
from sysopt.schedules.wgrad import WeightGradStore, defers_weight_grads

Shape = tuple[int, ...]
ShapeSpec = Shape | Callable[[int], Shape] | Callable[[int, int], Shape]
_FORWARD_KINDS = frozenset({Kind.FORWARD, Kind.SEND_F, Kind.RECV_F})


class ScheduleExecutor:
    """Runs ``schedule`` on this process's rank of ``group`` with ``modules[stage]`` for its stages.

    ``boundary_shape`` is the shape of the tensor leaving a stage (one microbatch): one shape for
    every boundary, a function of the sending stage, or a function of (sending stage, microbatch)
    (e.g. a vision tower whose image count varies per microbatch). ``loss_fn(output, target)`` gives
    one microbatch's loss; the backward uses ``loss * loss_scale`` (default 1/microbatches, so the
    accumulated gradients are those of the mean loss). ``receive_ahead`` posts each receive that many
    compute actions before its consumer, or all of them at the start of the step with None
    (``receives_ahead``): more receive buffers alive, fewer transfers left to land during compute. None
    is for gloo: NCCL runs a rank pair's messages in order on one stream, where a receive posted before a
    send its peer is waiting for stalls both.
    """

    def __init__(
        self,
        schedule: Schedule,
        modules: Mapping[int, torch.nn.Module],
        loss_fn: Callable[[torch.Tensor, object], torch.Tensor],
        *,
        boundary_shape: ShapeSpec,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        group: dist.ProcessGroup | None = None,
        loss_scale: float | None = None,
        receive_ahead: int | None = 1,
    ) -> None:
        if receive_ahead is not None and (isinstance(receive_ahead, bool) or not isinstance(receive_ahead, int)
                                          or receive_ahead < 1):  # fmt: skip
            raise ValueError(
                f"receive_ahead={receive_ahead!r}: use an integer >= 1 (receives posted that many compute actions "
                "ahead of their consumer), or None to post every receive at the start of the step"
            )
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
        self.boundary_shape = boundary_shape
        self.dtype, self.device = dtype, torch.device(device)
        self.loss_scale = 1.0 / schedule.microbatches if loss_scale is None else loss_scale
        self.last_stage = schedule.num_stages - 1
        self.receive_ahead = receive_ahead
        if dist.get_backend(group) != "gloo" and (problem := p2p_order_problem(self.schedule, receive_ahead)):
            raise ValueError(f"schedule {schedule.name} cannot run on {dist.get_backend(group)}: {problem}")
        self.order = receives_ahead(self.schedule.actions[self.rank], receive_ahead)
        self.wgrad = WeightGradStore()
        self.deferred = {s: defers_weight_grads(m) for s, m in self.modules.items()}
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
    def step(
        self,
        inputs: Sequence[torch.Tensor | None] | None,
        targets: Sequence[object] | None,
        contexts: Sequence[object] | None = None,
        *,
        boundary_shape: ShapeSpec | None = None,
        forward_only: bool = False,
    ) -> list | None:
        """Run all microbatches once. ``inputs`` are needed where stage 0 lives (None when its module
        reads everything from its context), ``targets`` where the last stage lives. With ``contexts``
        (one object per microbatch, e.g. the batch with its images) every stage is called as
        ``module(x, contexts[mb])``. ``boundary_shape`` overrides the constructor's for this step;
        ``forward_only`` runs only the forwards (no graph kept). Returns the per-microbatch losses
        (detached) on the last stage's rank, else None."""
        self.inputs, self.targets, self.contexts = inputs, targets, contexts
        self.shape_of = _shape_function(self.boundary_shape if boundary_shape is None else boundary_shape)
        self.stage_in: dict[tuple[int, int], torch.Tensor | None] = {}  # (stage, mb) -> input tensor
        self.stage_out: dict[tuple[int, int], torch.Tensor] = {}  # output, or scaled loss on the last stage
        self.grad_out: dict[tuple[int, int], torch.Tensor | None] = {}  # gradient for stage_out (for W)
        self.grad_in: dict[tuple[int, int], torch.Tensor] = {}  # gradient of stage_in, to send back
        self.pending: dict[tuple[str, int, int], tuple[dist.Work, torch.Tensor]] = {}
        self.sends: list[tuple[dist.Work, torch.Tensor]] = []  # keep each tensor alive until sent
        self.losses: dict[int, torch.Tensor] = {}
        self.wgrad.clear()  # nothing left over from a step that raised
        with torch.set_grad_enabled(not forward_only):
            for action in self.order:
                if forward_only and action.kind not in _FORWARD_KINDS:
                    continue
                self.handlers[action.kind](action)
        for work, _tensor in self.sends:
            work.wait()
        self.sends.clear()
        if self.wgrad.pending():
            raise RuntimeError(f"{self.schedule.name}: weight gradients were captured but never run by W")
        if forward_only:
            self.stage_in.clear()
            self.stage_out.clear()
        if self.last_stage in self.modules:
            return [self.losses[mb] for mb in range(self.schedule.microbatches)]
        return None

    # ---- compute --------------------------------------------------------------------------------
    def _forward(self, a: Action) -> None:
        key = (a.stage, a.microbatch)
        if a.stage == 0:
            x = None if self.inputs is None else self.inputs[a.microbatch]
            if isinstance(x, torch.Tensor):
                x = x.detach().to(self.device)  # data: the step never differentiates w.r.t. it
        elif self._is_local(a.stage - 1):
            x = self.stage_out[(a.stage - 1, a.microbatch)].detach().requires_grad_(True)
        else:
            x = self._received("F", a.stage, a.microbatch).requires_grad_(True)
        module = self.modules[a.stage]
        y = module(x) if self.contexts is None else module(x, self.contexts[a.microbatch])
        if a.stage == self.last_stage:
            loss = self.loss_fn(y, self.targets[a.microbatch])
            self.losses[a.microbatch] = loss.detach()
            y = loss * self.loss_scale
        self.stage_in[key], self.stage_out[key] = x, y

    def _backward(self, a: Action) -> None:
        """Full backward: input and weight gradients together."""
        key = (a.stage, a.microbatch)
        grad = self._output_grad(a)
        _backward(self.stage_out[key], grad)
        self._keep_input_grad(a, self.stage_in[key])
        self._release(key)

    def _backward_input(self, a: Action) -> None:
        key = (a.stage, a.microbatch)
        grad = self._output_grad(a)
        x, y = self.stage_in[key], self.stage_out[key]
        if self.deferred[a.stage]:
            # one backward: input gradient (and gradients of parameters outside deferrable layers);
            # the deferrable layers stash their weight-gradient GEMMs for W
            with self.wgrad.capture(key):
                _backward(y, grad)
            self._keep_input_grad(a, x)
            self._release(key)
            return
        if _wants_grad(x):
            _backward(y, grad, inputs=[x], retain_graph=True)
        self._keep_input_grad(a, x)
        self.grad_out[key] = grad  # W walks the graph again

    def _backward_weight(self, a: Action) -> None:
        key = (a.stage, a.microbatch)
        if self.deferred[a.stage]:
            self.wgrad.flush(key)
            return
        params = [p for p in self.modules[a.stage].parameters() if p.requires_grad]
        if params:
            _backward(self.stage_out[key], self.grad_out[key], inputs=params)
        self._release(key)

    def _output_grad(self, a: Action) -> torch.Tensor | None:
        if a.stage == self.last_stage:
            return None  # the scaled loss is a scalar
        if self._is_local(a.stage + 1):
            return self.grad_in.pop((a.stage + 1, a.microbatch))
        return self._received("B", a.stage, a.microbatch)

    def _keep_input_grad(self, a: Action, x: torch.Tensor | None) -> None:
        """Store the gradient of the stage input for the stage before (zeros where x was unused)."""
        if a.stage == 0 or not _wants_grad(x):
            return
        self.grad_in[(a.stage, a.microbatch)] = x.grad if x.grad is not None else torch.zeros_like(x)
        x.grad = None

    def _release(self, key: tuple[int, int]) -> None:
        for store in (self.stage_in, self.stage_out, self.grad_out):
            store.pop(key, None)

    # ---- communication --------------------------------------------------------------------------
    def _send_f(self, a: Action) -> None:
        tensor = self.stage_out[(a.stage, a.microbatch)].detach()
        self._check_message(tensor, a, "output", self.shape_of(a.stage, a.microbatch))
        self._isend(tensor, a.stage + 1, self._tag("F", a.stage, a.microbatch))

    def _send_b(self, a: Action) -> None:
        tensor = self.grad_in.pop((a.stage, a.microbatch))
        self._check_message(tensor, a, "input gradient", self.shape_of(a.stage - 1, a.microbatch))
        self._isend(tensor, a.stage - 1, self._tag("B", a.stage, a.microbatch))

    def _check_message(self, tensor: torch.Tensor, a: Action, what: str, shape: Shape) -> None:
        """The receiver posts a buffer of `shape` and the executor's dtype. A larger message fails inside gloo
        (often killing the receiving process), a smaller one leaves the rest of the buffer uninitialised:
        both are caught here, on the sender, where the cause is known."""
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != self.dtype:
            raise ValueError(
                f"stage {a.stage} microbatch {a.microbatch}: its {what} has shape {tuple(tensor.shape)} and dtype "
                f"{tensor.dtype}, but the receiving stage posts a buffer of shape {tuple(shape)} and dtype "
                f"{self.dtype}; pass the executor a boundary_shape (a shape, or a function of (stage, "
                f"microbatch)) and a dtype that match what each stage returns"
            )

    def _recv_f(self, a: Action) -> None:  # input of stage a.stage from stage a.stage - 1
        shape = self.shape_of(a.stage - 1, a.microbatch)
        self._irecv("F", a.stage, a.microbatch, src_stage=a.stage - 1, shape=shape)

    def _recv_b(self, a: Action) -> None:  # gradient of stage a.stage's output from stage a.stage + 1
        shape = self.shape_of(a.stage, a.microbatch)
        self._irecv("B", a.stage, a.microbatch, src_stage=a.stage + 1, shape=shape)

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


def p2p_order_problem(schedule: Schedule, receive_ahead: int | None = 1) -> str | None:
    """Why `schedule` would mismatch messages on a backend that ignores tags, or None. NCCL pairs a rank pair's
    sends and receives in the order they are posted, so for every (sender, receiver) the sender's SENDs must
    come in the order the receiver posts its RECVs (as receives_ahead posts them): otherwise tensors of the
    same shape land in the wrong buffers without an error. gloo matches by tag. Every built-in schedule
    passes (pp 2 and 4, vpp 1 and 2); a hand-edited or imported one may not."""
    schedule = schedule if schedule.has_comms else add_comms(schedule)
    owner = schedule.stage_to_rank
    sent: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
    posted: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
    for rank in range(schedule.pp):
        for a in receives_ahead(schedule.actions[rank], receive_ahead):
            if a.kind is Kind.SEND_F:
                sent.setdefault((rank, owner[a.stage + 1]), []).append(("F", a.stage, a.microbatch))
            elif a.kind is Kind.SEND_B:
                sent.setdefault((rank, owner[a.stage - 1]), []).append(("B", a.stage, a.microbatch))
            elif a.kind is Kind.RECV_F:
                posted.setdefault((owner[a.stage - 1], rank), []).append(("F", a.stage - 1, a.microbatch))
            elif a.kind is Kind.RECV_B:
                posted.setdefault((owner[a.stage + 1], rank), []).append(("B", a.stage + 1, a.microbatch))
    for pair in sorted(set(sent) | set(posted)):
        sends, recvs = sent.get(pair, []), posted.get(pair, [])
        for i, (s, r) in enumerate(zip(sends, recvs)):
            if s != r:
                name = lambda m: (  # noqa: E731
                    f"the output of {m[1]}F{m[2]}" if m[0] == "F" else f"the input gradient of {m[1]}B{m[2]}"
                )
                return (
                    f"rank {pair[0]}'s message {i} to rank {pair[1]} is {name(s)} but rank {pair[1]} posts "
                    f"its receive for {name(r)} there; order rank {pair[0]}'s SENDs as rank {pair[1]} posts "
                    "its RECVs (or run on gloo, which matches by tag)"
                )
    return None


def receives_ahead(actions: Sequence[Action], computes: int | None = 1) -> list[Action]:
    """The rank's actions with each RECV moved up to just before the compute action ``computes`` compute
    actions ahead of its consumer (never later than the schedule placed it); ``computes=None`` posts every
    receive at the start of the step. gloo moves a message only once its receive is posted, and posting a
    receive while a transfer with the same peer is in flight can block for milliseconds; a receive posted
    ahead lets the transfer land during earlier compute (megatron-core's overlap_p2p_comm posts one ahead).
    Receives are non-blocking with unique tags, so posting them earlier changes nothing else; each buffer
    is allocated as its receive is posted, so ``computes`` bounds how many extra buffers are alive."""
    if computes is not None and computes < 1:
        raise ValueError(
            f"receives_ahead computes={computes}: use an integer >= 1, or None for the whole step"
        )
    position = {(a.stage, a.kind, a.microbatch): i for i, a in enumerate(actions)}
    compute_at = [i for i, a in enumerate(actions) if a.kind.is_compute]  # indices of compute actions
    computes_before = []  # how many compute actions precede each index
    count = 0
    for a in actions:
        computes_before.append(count)
        count += a.kind.is_compute
    keys = []
    for i, a in enumerate(actions):
        key = (i, 1, i)
        if a.kind in (Kind.RECV_F, Kind.RECV_B):
            kinds = (Kind.FORWARD,) if a.kind is Kind.RECV_F else (Kind.BACKWARD, Kind.BACKWARD_INPUT)
            consumer = min(
                position[(a.stage, k, a.microbatch)] for k in kinds if (a.stage, k, a.microbatch) in position
            )
            if computes is None:
                key = (-1, 0, i)  # before everything, in the schedule's order
            else:
                target = computes_before[consumer] - computes  # the compute action to post before
                if target >= 0 and compute_at[target] < i:
                    key = (compute_at[target], 0, i)
                elif target < 0 and computes_before[i] > 0:
                    key = (-1, 0, i)  # fewer than `computes` computes before the consumer: at the start
        keys.append(key)
    return [a for _, a in sorted(zip(keys, actions), key=lambda pair: pair[0])]


def _wants_grad(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def _backward(y: torch.Tensor, grad: torch.Tensor | None, **kwargs) -> None:
    """Accumulate d(y)/d(leaves) * grad into .grad (a stage output that needs no gradient is skipped)."""
    if y.requires_grad:
        torch.autograd.backward(y, grad, **kwargs)


def _shape_function(spec: ShapeSpec) -> Callable[[int, int], Shape]:
    """``boundary_shape`` as a function of (sending stage, microbatch)."""
    if not callable(spec):
        fixed = tuple(spec)
        return lambda _stage, _mb: fixed
    if _positional_arity(spec) >= 2:
        return lambda stage, mb: tuple(spec(stage, mb))
    return lambda stage, _mb: tuple(spec(stage))


def _positional_arity(fn: Callable) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    kinds = [p.kind for p in params]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return 2
    return sum(
        k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds
    )
