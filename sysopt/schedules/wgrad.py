"""Deferred weight gradients for zero-bubble schedules (W without recomputing the backward).

While a ``WeightGradStore`` captures a key, deferrable autograd functions compute only their input
gradient and stash the weight-gradient work as a closure; ``store.flush(key)`` runs it later (the W
action) and accumulates into ``param.grad`` through autograd, so gradient hooks still fire.
Outside a capture the same functions compute every gradient at once, like ``nn.Linear``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence

import torch
from torch import nn

# (store, key) while a store captures. Process-wide, not thread-local: the autograd engine runs a CUDA
# backward on its own per-device worker thread, which would not see the caller's thread-locals (deferral
# would then silently do nothing on GPU). One executor captures at a time; the lock keeps two from mixing.
# The price: a backward of deferrable layers that another thread runs during a capture is deferred into
# that store too, so do not run other models' backward passes concurrently with a zero-bubble step.
_capture: tuple[WeightGradStore, Hashable] | None = None
_capture_lock = threading.RLock()


class WeightGradStore:
    """Weight-gradient closures grouped by key (the executor uses (stage, microbatch))."""

    def __init__(self) -> None:
        self._pending: dict[Hashable, list[Callable[[], None]]] = {}

    @contextlib.contextmanager
    def capture(self, key: Hashable) -> Iterator[None]:
        """Backward passes run inside this block (on any thread, the autograd engine's included) defer
        their weight gradients under ``key``."""
        global _capture
        with _capture_lock:
            previous, _capture = _capture, (self, key)
            try:
                yield
            finally:
                _capture = previous

    def put(self, key: Hashable, work: Callable[[], None]) -> None:
        self._pending.setdefault(key, []).append(work)

    def flush(self, key: Hashable) -> int:
        """Run (in the order they were stashed) and forget ``key``'s closures; returns how many ran."""
        works = self._pending.pop(key, [])
        for work in works:
            work()
        return len(works)

    def pending(self, key: Hashable | None = None) -> int:
        """Closures waiting under ``key`` (all keys when None)."""
        if key is not None:
            return len(self._pending.get(key, ()))
        return sum(len(w) for w in self._pending.values())

    def clear(self) -> None:
        self._pending.clear()


def defer(work: Callable[[], None]) -> bool:
    """Stash ``work`` in the capturing store and return True; return False when nothing captures
    (the caller then computes its weight gradient now)."""
    capture = _capture
    if capture is None:
        return False
    store, key = capture
    store.put(key, work)
    return True


def needs_grad(ctx, index: int) -> bool:
    """Whether the running backward pass uses the gradient of forward input ``index``.

    Asks the autograd engine (so ``autograd.grad`` w.r.t. the stage input skips weight GEMMs, and
    w.r.t. the weights skips input GEMMs); inputs must reach the function through a non-leaf node
    (see ``_through_view``), else the static ``ctx.needs_input_grad`` answers. ``next_functions`` has
    one edge per *tensor* argument of forward: set ``ctx.tensor_args`` (their argument positions)
    when some arguments are not tensors."""
    if not ctx.needs_input_grad[index]:
        return False
    slots = getattr(ctx, "tensor_args", None)
    node = ctx.next_functions[index if slots is None else slots.index(index)][0]
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return bool(ctx.needs_input_grad[index])


def _through_view(t: torch.Tensor | None) -> torch.Tensor | None:
    """A view, so the autograd edge to ``t`` is a non-leaf node the engine can be asked about."""
    return t if t is None or not t.requires_grad else t.view_as(t)


def accumulate(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """Add ``grads`` into ``params[i].grad`` through autograd (AccumulateGrad), so hooks fire."""
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
    if pairs:
        torch.autograd.backward([p for p, _ in pairs], [g for _, g in pairs])


class _DeferrableLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, owner):
        ctx.tensor_args = [i for i, t in enumerate((x, weight, bias)) if isinstance(t, torch.Tensor)]
        ctx.save_for_backward(x, weight)
        ctx.owner = owner  # the module: its weight and bias are the leaves W accumulates into
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight if needs_grad(ctx, 0) else None
        want_w, want_b = needs_grad(ctx, 1), needs_grad(ctx, 2)
        if not (want_w or want_b):
            return grad_x, None, None, None

        def weight_grads() -> tuple[torch.Tensor | None, torch.Tensor | None]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            gw = g2.t() @ x.reshape(-1, x.shape[-1]) if want_w else None
            gb = g2.sum(0) if want_b else None
            return gw, gb

        owner = ctx.owner
        if defer(lambda: accumulate((owner.weight, owner.bias), weight_grads())):
            return grad_x, None, None, None
        return (grad_x, *weight_grads(), None)


class DeferrableLinear(nn.Linear):
    """``nn.Linear`` whose weight and bias gradients wait for ``WeightGradStore.flush`` when its
    backward runs inside ``store.capture(key)`` (same parameters, state dict and results)."""

    defers_weight_grad = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DeferrableLinearFn.apply(
            _through_view(x), _through_view(self.weight), _through_view(self.bias), self
        )


def make_deferrable(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Linear`` inside ``module`` (or ``module`` itself) into a DeferrableLinear
    in place, keeping its parameters; returns ``module``."""
    for child in module.modules():
        if type(child) is nn.Linear:
            child.__class__ = DeferrableLinear
    return module


def defers_weight_grads(module: nn.Module) -> bool:
    """True when some submodule defers its weight gradients (``defers_weight_grad = True``)."""
    return any(getattr(m, "defers_weight_grad", False) for m in module.modules())
