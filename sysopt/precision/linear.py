"""The low-precision linear: an autograd function running each GEMM in the recipe's formats, and its module.

Quantised operands are reused across GEMMs where the quantisation is the same (tensorwise scales, or square
weight blocks, transpose exactly), so e.g. a tensorwise weight is quantised once per step and saved in 8 bits.
"""

from __future__ import annotations

import torch
from torch import nn

from sysopt import kernels

from .recipe import HIGH_FORMATS, Recipe
from .scaling import Quantized, ScalingState


def _high_mm(a: torch.Tensor, b: torch.Tensor, fmt: str, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b.T in high precision: bf16 GEMM or the operands' own dtype.

    For bf16, `a` is made row-major: oneDNN's bf16 GEMM with a transposed left operand (dy.T in grad-weight)
    runs ~1.8x slower on CPU than a transposing copy costs. kernels.contiguous_bf16 casts and transposes in
    one pass with the C++ CPU kernels; without them it casts in a's own layout (one sequential pass), then
    copies 2-byte values transposed (~1.4x faster than a torch fp32->bf16 cast that writes transposed)."""
    if fmt == "bf16":
        a = kernels.contiguous_bf16(a)
        b = b.to(torch.bfloat16)
    return (a @ b.t()).to(out_dtype)


def _low_mm(
    a: Quantized, b: Quantized, out_dtype: torch.dtype, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return kernels.scaled_mm(
        a.q, a.scale, b.q, b.scale, a_block=a.block, b_block=b.block, out_dtype=out_dtype, bias=bias
    )


class LowPrecisionLinearFunction(torch.autograd.Function):
    """y = x @ W.T + b with the forward, grad-input and grad-weight GEMMs in the formats of state.recipe."""

    @staticmethod
    def forward(ctx, x, weight, bias, state: ScalingState):  # noqa: D102
        recipe = state.recipe
        x2 = x.reshape(-1, x.shape[-1])
        fx, fw = recipe.forward
        gi_w, gw_x = recipe.grad_input[1], recipe.grad_weight[1]
        qx = qw = None
        if fx in HIGH_FORMATS:
            y = _high_mm(x2, weight, fx, x.dtype)
            if bias is not None:
                y = y + bias
        else:
            # a bf16 grad-weight GEMM keeps x in bf16: written in the quantising pass where the kernels can
            keep_bf16 = gw_x == "bf16" and ctx.needs_input_grad[1]
            qx = state.quantize(x2, fx, "input", "forward", keep_bf16=keep_bf16)
            qw = state.quantize(weight, fw, "weight", "forward")
            y = _low_mm(qx, qw, x.dtype, bias)
        # keep for backward only what it needs: reusable quantised operands, else the tensor itself
        ctx.qw_t = qw.t() if qw is not None and gi_w == fw and qw.transposable() else None
        ctx.qx_t = qx.t() if qx is not None and gw_x == fx and qx.transposable() else None
        x_saved = None
        if ctx.qx_t is None and ctx.needs_input_grad[1]:
            if gw_x == "bf16":
                x_saved = qx.bf16 if qx is not None and qx.bf16 is not None else x2.to(torch.bfloat16)
            else:
                x_saved = x2
        ctx.save_for_backward(x_saved, weight if ctx.qw_t is None else None)
        ctx.state, ctx.has_bias, ctx.x_shape = state, bias is not None, x.shape
        ctx.weight_dtype = weight.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        state: ScalingState = ctx.state
        recipe = state.recipe
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        qdy = None  # dy quantised for grad_input, reused for grad_weight when transposable
        if ctx.needs_input_grad[0]:
            fdy, fw = recipe.grad_input
            if fdy in HIGH_FORMATS:
                dx = _high_mm(dy2, weight.t(), fdy, dy.dtype)
            else:
                qdy = state.quantize(dy2, fdy, "grad_output", "grad_input")
                qw_t = ctx.qw_t or state.quantize(weight.t(), fw, "weight", "grad_input", record=False)
                dx = _low_mm(qdy, qw_t, dy.dtype)
            dx = dx.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            fdy, fx = recipe.grad_weight
            if fdy in HIGH_FORMATS:
                dw = _high_mm(dy2.t(), x2.t(), fdy, ctx.weight_dtype)
            else:
                reuse = qdy is not None and fdy == recipe.grad_input[0] and qdy.transposable()
                qdy_t = qdy.t() if reuse else state.quantize(dy2.t(), fdy, "grad_output", "grad_weight",
                                                              record=qdy is None)  # fmt: skip
                qx_t = ctx.qx_t or state.quantize(x2.t(), fx, "input", "grad_weight", record=False)
                dw = _low_mm(qdy_t, qx_t, ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None


class ScalingBuffers:
    """Mixin for modules whose GEMMs follow a Recipe: registers amax_history (3, H) for delayed scaling
    (saved in checkpoints) and nonfinite (3,) flags per GEMM (read and reset by overflow.check_finite),
    and keeps the ScalingState's references to them valid across .to()."""

    recipe: Recipe

    def _init_state(self, device: torch.device) -> None:
        history = torch.zeros(3, self.recipe.amax_history_len, dtype=torch.float32, device=device)
        self.register_buffer("amax_history", history, persistent=self.recipe.scaling == "delayed")
        self.register_buffer("nonfinite", torch.zeros(3, dtype=torch.bool, device=device), persistent=False)
        self.scaling_state = ScalingState(self.recipe, self.amax_history, self.nonfinite)
        self.scaling_state.recording = getattr(self, "training", True)

    def _bind_state(self) -> None:
        """Point the ScalingState at the module's current buffers (after they were replaced)."""
        self.scaling_state.amax_history, self.scaling_state.nonfinite = self.amax_history, self.nonfinite

    def _apply(
        self, fn, recurse=True
    ):  # keep the state's buffer references valid across .to()/.cuda()  # cuda-ok
        out = super()._apply(fn, recurse)
        self._bind_state()
        return out

    def train(self, mode: bool = True):
        """Eval mode freezes the amax histories: an evaluation must not change the scales training uses
        next, nor depend on the order its batches ran in."""
        self.scaling_state.recording = mode
        return super().train(mode)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Also across a change of recipe (a resumed run may change it): a history saved by a delayed-scaling
        layer is dropped by a current-scaling one; a delayed layer loading a checkpoint without one starts
        with an empty history, as a new layer does (each role's first quantisation uses current scaling and
        records its amax; delayed scaling then works from what the history holds), and does not report
        amax_history as missing, also under strict=False; a history of another length keeps its most recent
        amaxes. (load_state_dict passes a copy of the dict: popping is local.)"""
        key = prefix + "amax_history"
        delayed = self.recipe.scaling == "delayed"
        saved = state_dict.get(key)
        if saved is not None and not delayed:
            state_dict.pop(key)
        elif saved is not None and saved.dim() == 2 and saved.shape != self.amax_history.shape:
            resized = torch.zeros_like(self.amax_history)
            n = min(saved.shape[1], resized.shape[1])
            resized[: saved.shape[0], :n] = saved[: resized.shape[0], :n]  # column 0 is the latest amax
            state_dict[key] = resized
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._bind_state()  # load_state_dict(assign=True) replaces the buffer objects
        if delayed and saved is None and key in missing_keys:
            missing_keys.remove(key)
            with torch.no_grad():
                self.amax_history.zero_()
        if delayed:
            self.scaling_state.history_loaded()


class LowPrecisionLinear(ScalingBuffers, nn.Linear):
    """nn.Linear whose GEMMs follow a Recipe (buffers: see ScalingBuffers)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 recipe: Recipe) -> None:  # fmt: skip
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe
        self._init_state(self.weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe) -> LowPrecisionLinear:
        """A LowPrecisionLinear sharing `linear`'s parameters (optimizers holding them stay valid)."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, recipe=recipe)
        new.weight = linear.weight
        new.bias = linear.bias
        new._init_state(linear.weight.device)
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if autocast_dtype(x) is None and x.dtype != self.weight.dtype:
            raise TypeError(
                f"LowPrecisionLinear got input dtype {x.dtype} and weight dtype {self.weight.dtype}; cast the "
                "input or run under torch.autocast"
            )
        return low_precision_linear(x, self.weight, self.bias, self.scaling_state)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}"


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype torch.autocast computes linears in on x's device, or None when autocast is off there."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def low_precision_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: ScalingState
) -> torch.Tensor:
    """Functional form (for layers that hold their own ScalingState, e.g. tensor-parallel linears).

    Under torch.autocast the operands are cast to the autocast dtype (differentiably: fp32 parameters get
    fp32 grads) and the function runs with autocast off, so the output has the dtype nn.Linear gives there
    and the reference kernels' fp32 accumulations are not themselves autocast to 16 bits.

    An input with no rows (nn.Linear takes those, e.g. an expert that received no tokens) runs nn.Linear's
    math: there is nothing to quantise, and the scaling state is left alone."""
    if x.numel() == 0:
        return torch.nn.functional.linear(x, weight, bias)
    dtype = autocast_dtype(x)
    if dtype is None:
        return LowPrecisionLinearFunction.apply(x, weight, bias, state)
    x, weight = x.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        return LowPrecisionLinearFunction.apply(x, weight, bias, state)


__all__ = [
    "LowPrecisionLinear",
    "LowPrecisionLinearFunction",
    "ScalingBuffers",
    "autocast_dtype",
    "low_precision_linear",
]
