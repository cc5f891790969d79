"""OffloadAdamW: torch's AdamW with each subgroup's optimizer state (fp32 master, moments) on the host or
the device as a PlacementPlan says. Host subgroups copy gradients out during backward (post-accumulate-grad
hooks), update on the host with the fused CPU kernel, and copy parameters back behind an explicit wait."""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from sysopt.offload.costs import (
    CostInputs,
    cached_device_bytes,
    cost_inputs_from_profile,
    default_cost_inputs,
    free_device_bytes,
    measure_cost_inputs,
)
from sysopt.offload.measure import Measurements, drifted
from sysopt.offload.placement import (
    DEVICE,
    HOST,
    STRATEGIES,
    PhaseTimes,
    PlacementPlan,
    check_plan,
    make_plan,
    predict_iteration,
)
from sysopt.offload.subgroups import DEFAULT_SUBGROUP_BYTES, Subgroup, partition
from sysopt.offload.transfers import make_transfers
from sysopt.offload.update import bf16_state_adamw_, fused_adamw_

if TYPE_CHECKING:  # pragma: no cover
    from sysopt.hardware.profile import HardwareProfile


@dataclass
class OffloadStats:
    """Counters of what the optimizer did (read by tests and benchmarks)."""

    steps: int = 0
    grad_copies_started: int = 0  # from post-accumulate-grad hooks, during backward
    grad_copies_redone: int = 0  # at step(): the gradient changed after its copy (e.g. clipping)
    # ...of which the version counter did not show it (GradScaler's unscale, a c10d collective on p.grad,
    # a write through .data): found by comparing sampled elements with the copy
    grad_copies_stale_unversioned: int = 0
    grad_copies_skipped: int = 0  # hooks of accumulation microbatches before the last: no copy started
    param_copies_started: int = 0
    param_waits: int = 0
    replans: int = 0
    host_update_s: float = 0.0
    device_update_s: float = 0.0
    replan_reasons: list[list[str]] = field(default_factory=list)


@dataclass
class _GradCopy:
    grad: torch.Tensor
    version: int
    handle: Any  # None when the copy was synchronous
    norm: torch.Tensor | None = None  # ||grad||_2 on the device when the copy started (early copies only)


def _norm(g: torch.Tensor) -> torch.Tensor:
    """||g||_2 in fp32 on g's device (no host sync): a fingerprint that a rescaling changes (GradScaler's
    unscale, a .data.mul_, an all-reduce over ranks) unless g is all zeros, which the rescaling leaves alone,
    or so small that its squares underflow fp32 (|g| < ~1e-19 everywhere). The 2-norm: torch's 1-norm with a
    dtype runs ~7x slower on CPU."""
    return torch.linalg.vector_norm(g, 2, dtype=torch.float32)


SAMPLE_ELEMENTS = 64  # elements of each early-copied gradient compared with its copy at step()


@functools.cache
def _sample_index(numel: int, device: torch.device) -> torch.Tensor:
    """Up to SAMPLE_ELEMENTS evenly spaced flat indices of a tensor of `numel` elements (first and last
    included), on `device`."""
    return torch.linspace(0, numel - 1, min(numel, SAMPLE_ELEMENTS)).round().long().unique().to(device)


def pinned_allocation_bytes(nbytes: int) -> int:
    """Bytes torch's caching host allocator takes for a pinned request of `nbytes`: the next power of two."""
    return 1 << max(0, nbytes - 1).bit_length()


def _check_group_flags(group: dict[str, Any], where: str) -> None:
    """AdamW variants OffloadAdamW does not run: amsgrad, maximize, L2 (coupled) weight decay (torch.optim.Adam's
    decoupled_weight_decay=False), differentiable. Refused, never silently run as plain AdamW."""
    unsupported = {"amsgrad": True, "maximize": True, "decoupled_weight_decay": False, "differentiable": True}
    found = {k: group[k] for k, bad in unsupported.items() if k in group and bool(group[k]) == bad}
    if "decoupled_weight_decay" in found and not group.get("weight_decay"):
        del found["decoupled_weight_decay"]  # without weight decay Adam and AdamW are the same computation
    if found:
        raise ValueError(
            f"{where} has {', '.join(f'{k}={v}' for k, v in found.items())}: OffloadAdamW runs AdamW with "
            "amsgrad=False, maximize=False, decoupled weight decay and differentiable=False only; use "
            "torch.optim.AdamW (or Adam) for this group"
        )


def _on_grad_ready(ref: weakref.ref, p: torch.Tensor) -> None:
    opt = ref()
    if opt is not None:
        opt._grad_ready(p)


def _before_forward(ref: weakref.ref, params: list[torch.Tensor]) -> None:
    opt = ref()
    if opt is not None:
        opt._wait_params_of(params)


class OffloadAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch's fused kernel) with per-subgroup host/device placement.

    strategy: 'device' (no offload), 'host' (ZeRO-Offload: all state on the host), 'fraction' (a fixed
    `fraction` of the state bytes stays on the device, as megatron-core's HybridDeviceOptimizer and
    DeepSpeed Twin-Flow), 'interleaved' (Deep Optimizer States: placement chosen by the performance model
    from `profile` or a quick self-measurement, re-planned when measured timings drift).
    device_budget_bytes: most bytes of optimizer state kept on the device (None: the free device memory).
    plan: an explicit PlacementPlan (overrides the strategy's planner; checked against the budget).
    state_dtype: torch.bfloat16 keeps host moments in bf16 with stochastic rounding (fp32 master kept), updated
    by the C++ kernel of sysopt.offload.cpu_kernel (built on first use; the torch reference where it cannot be).
    master_dtype: torch.bfloat16 (with state_dtype=torch.bfloat16) keeps the host masters in bf16 too, rounded
    stochastically as torchao's bf16_stochastic_round AdamW does: 6 bytes of host optimizer state a parameter
    (master and moments) instead of 8, 16 bytes of update traffic instead of 20 (fp32 gradients), and bf16
    parameter copies back to the device. The device
    then trains on bf16-representable weights. Device-placed subgroups keep fp32 state; moving a subgroup to
    the host rounds its master to bf16 (nearest), as it rounds its moments.
    Until forward/backward times are measured (or given through observe()), the interleaved planner takes
    them as 0, i.e. assumes no gradient copy hides under backward: a conservative first plan. They are measured
    from the gradient hooks' host clock on a CPU device only; on CUDA (kernel launches, not GPU time) they
    come from observe().
    plan_group: a process group of data-parallel replicas (each with its own OffloadAdamW over the same
    parameters) that must place alike: every interleaved plan, the first and each re-plan, is made on the
    group's first rank from its measurements and broadcast. Without it each replica plans from its own timings,
    and where placements differ so can the numbers (bf16 host state against fp32 device state; a CPU and a
    CUDA fused kernel), so the replicas' weights drift apart. All ranks of the group must step alike.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        strategy: str = "interleaved",
        device_budget_bytes: int | None = None,
        profile: HardwareProfile | None = None,
        fraction: float = 0.5,
        plan: PlacementPlan | None = None,
        costs: CostInputs | None = None,
        subgroup_bytes: int = DEFAULT_SUBGROUP_BYTES,
        state_dtype: torch.dtype = torch.float32,
        master_dtype: torch.dtype = torch.float32,
        replan_interval_steps: int | None = 10,
        replan_tolerance: float = 0.25,
        measure: bool = True,
        seed: int = 0,
        plan_group: Any = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr={lr} must be >= 0")
        if not eps >= 0.0:
            raise ValueError(f"eps={eps} must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas={betas} must each be in [0, 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay={weight_decay} must be >= 0")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype={state_dtype} must be torch.float32 or torch.bfloat16")
        if master_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"master_dtype={master_dtype} must be torch.float32 or torch.bfloat16")
        if master_dtype == torch.bfloat16 and state_dtype != torch.bfloat16:
            raise ValueError(
                f"master_dtype=torch.bfloat16 needs state_dtype=torch.bfloat16 (got {state_dtype}): the host "
                "kernel rounds a bf16 master and its bf16 moments together; pass both"
            )
        if device_budget_bytes is not None and device_budget_bytes < 0:
            raise ValueError(f"device_budget_bytes={device_budget_bytes} must be >= 0 (or None for no limit)")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=False,
            maximize=False,
            foreach=None,
            capturable=False,
            differentiable=False,
            fused=True,
        )
        self._built = False
        super().__init__(params, defaults)
        all_params = [p for g in self.param_groups for p in g["params"]]
        devices = {p.device for p in all_params}
        if len(devices) != 1:
            raise ValueError(
                f"all parameters must be on one device, got {sorted(map(str, devices))}; move the model to one "
                "device, or give each device's parameters their own OffloadAdamW"
            )
        self.device = devices.pop()
        self.strategy = strategy
        self.fraction = fraction
        self.subgroup_bytes = subgroup_bytes
        self.state_dtype = state_dtype
        self.master_dtype = master_dtype
        self.replan_interval_steps = replan_interval_steps
        self.replan_tolerance = replan_tolerance
        self.stats = OffloadStats()
        self.measured = Measurements()
        self._measure = measure
        self._given_plan = plan
        self.plan_group = plan_group
        self._transfers = make_transfers(self.device)
        self._generator = torch.Generator().manual_seed(seed)
        self.costs = self._resolve_costs(costs, profile)
        self._device_state_high = 0  # the most device state any placement has held (see _free_now)
        self._free_device_bytes = (
            self.costs.free_device_bytes
            if self.costs and self.costs.free_device_bytes is not None
            else free_device_bytes(self.device)
        )
        self.device_budget_bytes = device_budget_bytes
        self._budget_limit = sys.maxsize if device_budget_bytes is None else device_budget_bytes
        self.phases = PhaseTimes()
        self._where: dict[torch.Tensor, str] = {}
        self._loaded_frozen: set[torch.Tensor] = set()  # frozen, but a loaded checkpoint holds their state
        self._host_master: dict[torch.Tensor, torch.Tensor] = {}  # fp32 params: host master_dtype copy
        self._host_grad: dict[torch.Tensor, torch.Tensor] = {}
        self._grad_copies: dict[torch.Tensor, _GradCopy] = {}
        # gradient-ready hooks per parameter in this step and the last one: with gradient accumulation
        # only the hook that completes the gradient (the last step's count) starts a copy to the host
        self._grad_hooks_now: dict[torch.Tensor, int] = {}
        self._grad_hooks_last: dict[torch.Tensor, int] = {}
        # True when something rewrites the gradients after backward (a data-parallel reduction): the hooks
        # then only time backward, and that code calls grads_ready() once the final gradients are written
        self.defer_grad_copies = False
        self._copies_fenced_task: int | None = None  # the backward pass whose end waits for its copies
        self._param_version: dict[torch.Tensor, int] = {}
        # not yet safe to read: (copy handle, params, each param's version once our copy has written it)
        self._pending_params: dict[int, tuple[Any, list[torch.Tensor], list[int]]] = {}
        self._inflight_params: dict[int, Any] = {}  # may still read the host master
        self._hooks: dict[torch.Tensor, Any] = {}
        self._attached = False
        self._attached_to: tuple[nn.Module, ...] = ()
        self._module_hooks: list[Any] = []
        self._first_grad_s: float | None = None
        self._last_grad_s: float | None = None
        self._last_step_end_s: float | None = None
        self._seen_order: list[int] = []
        self._build()

    # ----------------------------------------------------------------- setup and placement

    def _resolve_costs(self, costs: CostInputs | None, profile: HardwareProfile | None) -> CostInputs | None:
        if costs is not None:
            return costs
        if profile is not None and profile.calibration is not None:
            # the profile's rates, but the memory free now: its figure is from when it was probed (an idle
            # device, or on CPU the host's total), not after the model, gradients and other state arrived
            costs = cost_inputs_from_profile(profile, self.device)
            return dataclasses.replace(costs, free_device_bytes=free_device_bytes(self.device))
        if self.strategy == "interleaved" or profile is not None:
            return measure_cost_inputs(self.device)
        return None

    def _build(self) -> None:
        """Partition the parameters, plan, place the state, hook the gradients."""
        self._wait_all_params()
        for k, g in enumerate(self.param_groups):
            _check_group_flags(g, f"param group {k}")
            for j, p in enumerate(g["params"]):
                if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                    raise ValueError(
                        f"param group {k}, parameter {j} has dtype {p.dtype}: OffloadAdamW keeps fp32 (or bf16) "
                        "masters and moments, which would train it at lower precision; use torch.optim.AdamW for "
                        f"{p.dtype} parameters, or cast the model to float32"
                    )
        groups = [g["params"] for g in self.param_groups]
        # as torch allocates AdamW state lazily: none for a parameter frozen now (it gets its state once it
        # has a gradient, step() rebuilding then); one that has state keeps it (torch's does too)
        self.subgroups: tuple[Subgroup, ...] = partition(
            groups, self.subgroup_bytes, self.state_dtype, self.master_dtype,
            include=lambda p: p.requires_grad or p in self._where or p in self._loaded_frozen,
        )  # fmt: skip
        self._members = [[groups[s.group_index][j] for j in s.param_indices] for s in self.subgroups]
        self._subgroup_of = {p: s.index for s, ps in zip(self.subgroups, self._members) for p in ps}
        self._ready_order = list(range(len(self.subgroups)))
        if self._given_plan is not None:
            plan = self._given_plan
        else:
            budget = self._budget_limit
            if self.strategy == "interleaved":  # plans within what is free; fixed strategies fail loudly
                budget = min(budget, self._agreed_min(self._free_device_bytes))  # what every replica has
                if self.device_budget_bytes is None and self.device.type == "cuda":
                    warnings.warn(
                        f"OffloadAdamW(strategy='interleaved') without device_budget_bytes plans against all "
                        f"{self._free_device_bytes / 2**30:.1f} GiB free on {self.device} now, before any "
                        "activation exists, and may keep all state there; pass device_budget_bytes (free memory "
                        "minus the step's activation and gradient peak) to leave room for them",
                        stacklevel=2,
                    )
            plan = make_plan(
                self.strategy,
                self.subgroups,
                device_budget_bytes=budget,
                costs=self.costs,
                phases=self.phases,
                device_fraction=self.fraction,
            )
            plan = self._from_first_rank(plan)
        self._check(plan, self._free_device_bytes)
        self._apply_plan(plan)
        ref = weakref.ref(self)
        for p in self._subgroup_of:
            if p.requires_grad and p not in self._hooks:
                self._hooks[p] = p.register_post_accumulate_grad_hook(lambda t: _on_grad_ready(ref, t))
        self._built = True

    @property
    def subgroup_params(self) -> list[list[torch.Tensor]]:
        """The parameters of each subgroup, in grad-ready order."""
        return [list(ps) for ps in self._members]

    def _check(self, plan: PlacementPlan, free_bytes: int | None) -> None:
        # Host memory is checked once, before any state exists (later, our own buffers would count).
        free_host = None if self._built else free_device_bytes(torch.device("cpu"))
        pinned = self._pinned_bytes if self.device.type == "cuda" else None
        check_plan(plan, self.subgroups, self._budget_limit, free_bytes, free_host, host_bytes_of=pinned)

    def _pinned_bytes(self, subgroup: Subgroup) -> int:
        """Host memory subgroup's buffers take as pinned allocations: torch's caching host allocator rounds
        each one up to a power of two (CachingHostAllocator.h, unless pinned_max_round_threshold is set), so
        a 180 MB moment takes 256 MB. Moments, master, gradient buffer and step, per parameter."""
        total = 0
        for p in self._members[subgroup.index]:
            n = p.numel()
            sizes = (2 * [n * self.state_dtype.itemsize]) + [
                n * self.master_dtype.itemsize,
                n * p.element_size(),
                4,
            ]
            total += sum(pinned_allocation_bytes(b) for b in sizes)
        return total

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._built and self._given_plan is not None:
            raise ValueError(
                "add_param_group changes the subgroups, so the explicit plan no longer fits; "
                "create the optimizer with all param groups, or use a strategy instead of plan="
            )
        super().add_param_group(param_group)
        if self._built:
            try:
                self._build()
            except Exception:  # no half-registered group whose parameters would silently never update
                self._forget(self.param_groups.pop()["params"])
                self._build()
                raise
            if self._attached:  # the new parameters' modules need their forward waits too
                self.attach()

    def _forget(self, params: list[torch.Tensor]) -> None:
        """Drop whatever a failed add_param_group set up for `params`."""
        for p in params:
            for table in (self.state, self._where, self._host_master, self._host_grad, self._param_version):
                table.pop(p, None)
            hook = self._hooks.pop(p, None)
            if hook is not None:
                hook.remove()

    def _apply_plan(self, plan: PlacementPlan) -> None:
        self._wait_all_params()
        for s, members in zip(self.subgroups, self._members):
            for p in members:
                self._place(p, plan.placements[s.index])
        self.plan = plan
        self._device_state_high = max(self._device_state_high, plan.device_state_bytes)

    def _free_now(self) -> int:
        """Device memory a new placement may take: (with live measurement) what is free now, plus the state this
        optimizer holds there, plus the state it has moved off the device that the caching allocator still
        keeps (at most what it keeps unused). CUDA's allocator holds freed blocks without returning them, so
        without that last term every move to the host would shrink each later budget by what it freed.
        Other cached blocks are left out: after a step they are mostly the activations' working set, which
        the next forward takes again."""
        if not self._measure:
            return self._free_device_bytes
        in_use = self.plan.device_state_bytes
        moved_off = self._device_state_high - in_use
        return free_device_bytes(self.device) + in_use + min(moved_off, cached_device_bytes(self.device))

    def _alloc(self, where: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        if where == DEVICE:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return self._transfers.host_empty(shape, dtype)

    def _place(self, p: torch.Tensor, where: str) -> None:
        """Move (or create) p's state to `where`, keeping values exactly (fp32 -> bf16 host moments and
        masters round)."""
        if self._where.get(p) == where:
            return
        st = self.state[p]
        moment_dtype = torch.float32 if where == DEVICE else self.state_dtype
        master_dtype = torch.float32 if where == DEVICE else self.master_dtype

        def put(old: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
            buf = self._alloc(where, shape, dtype)
            return buf.zero_() if old is None else buf.copy_(old)

        with torch.no_grad():
            st["step"] = put(st.get("step"), torch.Size(()), torch.float32)
            st["exp_avg"] = put(st.get("exp_avg"), p.shape, moment_dtype)
            st["exp_avg_sq"] = put(st.get("exp_avg_sq"), p.shape, moment_dtype)
            master = st.pop("master_param", None)
            master = self._host_master.pop(p, master)
            if p.dtype != torch.float32:
                st["master_param"] = put(master if master is not None else p, p.shape, master_dtype)
            elif where == HOST:
                self._host_master[p] = put(p, p.shape, master_dtype)
        rec = self._grad_copies.pop(p, None)
        if rec is not None and rec.handle is not None:  # never let an old copy land in a reused buffer
            self._transfers.wait_host(rec.handle)
        if where == HOST:
            if p not in self._host_grad:
                self._host_grad[p] = self._transfers.host_empty(p.shape, p.dtype)
        else:
            self._host_grad.pop(p, None)
        self._param_version[p] = p._version
        self._where[p] = where

    def _master(self, p: torch.Tensor) -> torch.Tensor:
        st = self.state[p]
        if "master_param" in st:
            return st["master_param"]
        return self._host_master[p] if self._where[p] == HOST else p

    def sync_master_from_params(self) -> None:
        """Re-read fp32 masters from the parameters. Needed only after writing parameters through `.data`
        (writes through the tensor itself, e.g. module.load_state_dict, are noticed automatically)."""
        self._wait_all_params()
        with torch.no_grad():
            for p in self._subgroup_of:
                if self._master(p) is not p:
                    self._master(p).copy_(p)
                self._param_version[p] = p._version

    # ----------------------------------------------------------------- backward side

    def _grad_ready(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: start the gradient's copy to the host while backward continues.

        Under gradient accumulation the hook runs once per microbatch; the copy starts only from the
        hook that completes the gradient, taken to be the n-th where the last step saw n hooks (the
        first step copies every time). Guessing wrong costs time, never correctness: step() re-copies
        any gradient that changed after its copy (_host_grad_current)."""
        now = time.perf_counter()
        if self._first_grad_s is None:
            self._first_grad_s = now
        self._last_grad_s = now
        i = self._subgroup_of[p]
        if i not in self._seen_order:
            self._seen_order.append(i)
        hooks = self._grad_hooks_now[p] = self._grad_hooks_now.get(p, 0) + 1
        if self.defer_grad_copies:
            return
        if hooks < self._grad_hooks_last.get(p, 1):  # more accumulation to come: copy later
            if self._where[p] == HOST and p.grad is not None and not p.grad.is_sparse:
                self.stats.grad_copies_skipped += 1
            return
        if self._start_grad_copy(p):
            self._fence_copies_at_backward_end()

    def _fence_copies_at_backward_end(self) -> None:
        """Make the end of this backward pass wait for the gradient copies it started (on CUDA the current
        stream waits; on CPU the thread): an in-place write after backward that bumps no version (GradScaler's
        unscale, a c10d all_reduce on p.grad) could otherwise meet a copy still reading that gradient and
        leave it half old, half new, which _verify_early_copies's samples could miss."""
        task = torch._C._current_graph_task_id()
        if task < 0 or task == self._copies_fenced_task:
            return
        self._copies_fenced_task = task
        ref = weakref.ref(self)

        def fence() -> None:
            opt = ref()
            if opt is None:
                return
            opt._copies_fenced_task = None
            for rec in opt._grad_copies.values():
                if rec.handle is not None:
                    opt._transfers.wait_device(rec.handle)

        torch.autograd.Variable._execution_engine.queue_callback(fence)

    def grads_ready(self, params: Iterable[torch.Tensor]) -> None:
        """Start the host copies of these parameters' gradients now: their final values are written (e.g.
        just reduced over data-parallel ranks). With `defer_grad_copies` set this replaces the copies the
        gradient hooks start during backward, which a reduction after backward would make stale (each then
        copied twice: early, and again in step()). Parameters of other optimizers are ignored."""
        for p in params:
            if p in self._subgroup_of:
                self._start_grad_copy(p)

    def _start_grad_copy(self, p: torch.Tensor) -> bool:
        """Start p.grad's copy to its host buffer; False when p has none to make (not on the host, no
        gradient, sparse)."""
        g = p.grad
        if self._where[p] != HOST or g is None or g.is_sparse:
            return False
        i = self._subgroup_of[p]
        if p.dtype != torch.float32 and (inflight := self._inflight_params.get(i)) is not None:
            # a 16-bit parameter's copy back reads this very buffer: it must finish first (it has, unless the
            # parameter was used outside the forward of its attached module, e.g. a tied weight)
            self._transfers.wait_host(inflight)
        norm = _norm(g)  # before the copy is queued: both see the same gradient
        handle = self._transfers.d2h([self._host_grad[p]], [g])
        self._grad_copies[p] = _GradCopy(g, g._version, handle, norm)
        self.stats.grad_copies_started += 1
        return True

    def _host_grad_current(self, p: torch.Tensor) -> torch.Tensor:
        """The host copy of p.grad, re-copied if the gradient changed after its early copy."""
        rec, g = self._grad_copies.get(p), p.grad
        if rec is not None and rec.handle is not None:
            self._transfers.wait_host(rec.handle)
            rec.handle = None
        if rec is None or rec.grad is not g or rec.version != g._version:
            self._host_grad[p].copy_(g)
            self._grad_copies[p] = _GradCopy(g, g._version, None)
            self.stats.grad_copies_redone += 1
        return self._host_grad[p]

    def _verify_early_copies(self) -> None:
        """Mark as stale the early gradient copies whose gradient changed in place without a version bump.

        The version counter misses some in-place writes: GradScaler's unscale, c10d collectives on
        p.grad (a hand-written data-parallel all-reduce), writes through .data. Each still-current copy is
        compared with its gradient on SAMPLE_ELEMENTS evenly spaced elements, and the gradient's 2-norm now
        with the one taken when its copy started (one batched read from the device); a mismatch makes
        _host_grad_current copy again. The samples alone miss a sparse gradient (an embedding whose few
        touched rows fall between them); the norm catches every rescaling of a nonzero gradient. A write that
        keeps both (e.g. a permutation of the values between the samples) goes unnoticed."""
        checks = []
        for p, rec in self._grad_copies.items():
            g = p.grad
            if g is None or rec.grad is not g or rec.version != g._version:
                continue  # re-copied at step anyway
            if rec.handle is not None:
                self._transfers.wait_host(rec.handle)
                rec.handle = None
            checks.append((rec, g.reshape(-1), self._host_grad[p].reshape(-1)))
        if not checks:
            return
        cpu = torch.device("cpu")
        # compared as bits (a NaN equals its own copy); float32 holds every 16-bit value exactly; the last
        # len(checks) entries are the sums of |grad| now, beside those taken when the copies started
        n = len(checks)
        samples = [g[_sample_index(g.numel(), g.device)].float() for _, g, _ in checks]
        norm_now = torch.stack([_norm(g) for _, g, _ in checks])
        norm_then = torch.stack([rec.norm if rec.norm is not None else _norm(g) for rec, g, _ in checks])
        device = (
            torch.cat([*samples, norm_now, norm_then]).cpu().view(torch.int32)
        )  # one read from the device
        host = torch.cat([h[_sample_index(h.numel(), cpu)].float() for _, _, h in checks]).view(torch.int32)
        same_sum = device[-2 * n : -n] == device[-n:]
        start = 0
        for k, (rec, g, _) in enumerate(checks):
            idx = _sample_index(g.numel(), cpu)
            stop = start + idx.numel()
            if not (bool(same_sum[k]) and torch.equal(device[start:stop], host[start:stop])):
                rec.version = -1  # never equal to a real version: _host_grad_current copies again
                self.stats.grad_copies_stale_unversioned += 1
            start = stop

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False):
        """torch.nn.utils.clip_grad_norm_ over this optimizer's parameters, bit for bit, that also scales
        the host gradient copies already made, so they need not be copied again."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        total_norm = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
        if not grads:
            return total_norm
        coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        current = {}
        for p in params:
            rec = self._grad_copies.get(p)
            if rec is not None and rec.grad is p.grad and rec.version == p.grad._version:
                if rec.handle is not None:  # the copy must read the gradient before it is scaled
                    self._transfers.wait_host(rec.handle)
                    rec.handle = None
                current[p] = rec
        unchanged = {  # compared on the device, before the scaling below makes every norm new
            p: _norm(p.grad) == rec.norm
            if rec.norm is not None
            else torch.ones((), dtype=torch.bool, device=p.device)
            for p, rec in current.items()
        }
        torch._foreach_mul_(grads, coef.to(grads[0].device))
        host = []
        for p, rec in current.items():
            rec.version = p.grad._version
            # the scaled gradient's norm (its copy is scaled alike below), or -1 (never a norm) where the
            # gradient had already changed without a version bump before the clip: that copy is stale
            rec.norm = torch.where(unchanged[p], _norm(p.grad), -1.0)
            host.append(self._host_grad[p])
        if host:
            torch._foreach_mul_(host, coef.to(host[0].device))
        return total_norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for rec in self._grad_copies.values():
            if rec.handle is not None:
                self._transfers.wait_host(rec.handle)
        self._grad_copies.clear()

    # ----------------------------------------------------------------- forward side

    def attach(self, *modules: nn.Module) -> None:
        """Wait for each module's updated parameters right before its forward (and its state_dict and
        load_state_dict), instead of for all of them at the end of step(), so parameter copies overlap the
        next forward.

        Assumes a module's forward reads only its own parameters (recurse=False) plus those of modules that
        ran before it. Anything else that reads or writes parameters between step() and the next forward (an
        EMA, weight logging, functional_call, p.copy_) must call wait_for_params() first. Calls add up
        (attach(a) then attach(b) covers both); add_param_group while attached hooks the new parameters'
        modules too."""
        for h in self._module_hooks:
            h.remove()
        self._module_hooks.clear()
        attached = list(self._attached_to)
        attached += [m for m in modules if all(m is not a for a in attached)]
        ref = weakref.ref(self)
        seen: set[int] = set()
        for module in attached:
            for m in module.modules():
                if id(m) in seen:  # a module reachable from two attached roots gets one pair of hooks
                    continue
                seen.add(id(m))
                own = [p for p in m.parameters(recurse=False) if p in self._subgroup_of]
                if own:
                    wait = lambda *_, own=own: _before_forward(ref, own)  # noqa: E731
                    self._module_hooks.append(m.register_forward_pre_hook(wait))
                    self._module_hooks.append(m.register_state_dict_pre_hook(wait))
                    # a load must not race our copy into the same parameter (nor be overwritten by it)
                    self._module_hooks.append(m.register_load_state_dict_pre_hook(wait))
        self._attached_to = tuple(attached)
        self._attached = True

    def detach(self) -> None:
        for h in self._module_hooks:
            h.remove()
        self._module_hooks.clear()
        self._attached, self._attached_to = False, ()
        self.wait_for_params()

    def _wait_params(self, i: int) -> None:
        pending = self._pending_params.pop(i, None)
        if pending is None:
            return
        handle, params, versions = pending
        self._transfers.wait_device(handle)
        # The version our copy left, not the current one: a write between step() and this wait (e.g.
        # module.load_state_dict in attached mode) then still counts as an outside write at the next step.
        for p, version in zip(params, versions):
            self._param_version[p] = version
        self.stats.param_waits += 1

    def _wait_params_of(self, params: list[torch.Tensor]) -> None:
        for i in {self._subgroup_of[p] for p in params}:
            self._wait_params(i)

    def wait_for_params(self) -> None:
        """The explicit wait: every updated parameter is back on the device for work queued after this."""
        for i in list(self._pending_params):
            self._wait_params(i)

    def _wait_all_params(self) -> None:
        self.wait_for_params()
        for handle in self._inflight_params.values():
            self._transfers.wait_host(handle)
        self._inflight_params.clear()

    # ----------------------------------------------------------------- step

    def _group_args(self, group_index: int) -> dict[str, Any]:
        g = self.param_groups[group_index]
        lr = g["lr"]
        return dict(
            lr=float(lr) if isinstance(lr, torch.Tensor) else lr,
            betas=tuple(g["betas"]),
            weight_decay=g["weight_decay"],
            eps=g["eps"],
        )

    def _refresh_master(self, p: torch.Tensor, master: torch.Tensor) -> None:
        """A parameter written from outside since our last update (e.g. a model checkpoint) wins, unless
        the write left the value the master already rounds to (the model's checkpoint loaded after the
        optimizer's): then the higher-precision master stays, and resume is bit-exact in either order."""
        if master is p or p._version == self._param_version[p]:
            return
        if not torch.equal(master.to(p.device, p.dtype), p):
            master.copy_(p)
        self._param_version[p] = p._version

    def _update_device(self, i: int) -> int:
        ps, gs, ms, vs, steps, cast_back = [], [], [], [], [], []
        for p in self._members[i]:
            if p.grad is None:
                continue
            st, master = self.state[p], self._master(p)
            self._refresh_master(p, master)
            ps.append(master)
            gs.append(p.grad if master is p else p.grad.float())
            ms.append(st["exp_avg"])
            vs.append(st["exp_avg_sq"])
            steps.append(st["step"])
            if master is not p:
                cast_back.append((p, master))
        fused_adamw_(ps, gs, ms, vs, steps, **self._group_args(self.subgroups[i].group_index))
        for p, master in cast_back:
            p.copy_(master)
            self._param_version[p] = p._version
        return sum(p.numel() for p in ps)

    def _update_host(self, i: int) -> int:
        inflight = self._inflight_params.pop(i, None)
        if inflight is not None:  # last step's copy back may still be reading the masters
            self._transfers.wait_host(inflight)
        params, masters, gs, ms, vs, steps = [], [], [], [], [], []
        for p in self._members[i]:
            if p.grad is None:
                continue
            st, master = self.state[p], self._master(p)
            self._refresh_master(p, master)
            g = self._host_grad_current(p)
            params.append(p)
            masters.append(master)
            keep = g.dtype == torch.float32 or (
                g.dtype == torch.bfloat16 and self.state_dtype == torch.bfloat16
            )
            gs.append(g if keep else g.float())  # the bf16-state kernel reads bf16 gradients directly
            ms.append(st["exp_avg"])
            vs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        if not params:
            return 0
        args = self._group_args(self.subgroups[i].group_index)
        if self.state_dtype == torch.float32:
            fused_adamw_(masters, gs, ms, vs, steps, **args)
        else:
            bf16_state_adamw_(masters, gs, ms, vs, steps, **args, generator=self._generator)
        # Low-precision parameters are rounded on the host (as p.copy_(master) would round on the device)
        # into their now-consumed gradient buffer, so only their own bytes cross the link.
        srcs = []
        for p, master in zip(params, masters):
            srcs.append(master if p.dtype == torch.float32 else self._host_grad[p].copy_(master))
            # the gradient is consumed (and a 16-bit one's buffer reused): its record goes, so it does not keep
            # the old gradient alive on the device through the next forward once the caller drops it
            # (model.zero_grad(), p.grad = None); a second step() without a backward copies it again
            self._grad_copies.pop(p, None)
        versions = [p._version + 1 for p in params]  # copy_ bumps each once (on CUDA at issue, on CPU later)
        handle = self._transfers.h2d(params, srcs)
        self._pending_params[i] = (handle, params, versions)
        self._inflight_params[i] = handle
        self.stats.param_copies_started += 1
        return sum(p.numel() for p in params)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        start_s = time.perf_counter()
        stateless = False  # a parameter frozen when the subgroups were made that has a gradient now
        # checked before any subgroup updates: a failed step changes nothing
        for k, g in enumerate(self.param_groups):
            for j, p in enumerate(g["params"]):
                stateless |= p.grad is not None and p not in self._subgroup_of
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        f"param group {k}, parameter {j} (shape {tuple(p.shape)}) has a sparse gradient, which "
                        "OffloadAdamW does not support: use nn.Embedding(sparse=False), or torch.optim.SparseAdam "
                        "for that parameter"
                    )
        if stateless:  # unfrozen since: give it state and a subgroup (existing state keeps its values)
            self._build()
            if self._attached:
                self.attach()
        self.wait_for_params()
        self._transfers.poll()
        with torch.no_grad():
            self._verify_early_copies()
            device_numel = sum(self._update_device(i) for i in self.plan.device_subgroups)
            device_s = time.perf_counter() - start_s
            host_start_s = time.perf_counter()
            host_numel = sum(self._update_host(i) for i in self.plan.transfer_order)
            host_s = time.perf_counter() - host_start_s
        if not self._attached:
            self.wait_for_params()
        self.stats.steps += 1
        self.stats.host_update_s += host_s
        self.stats.device_update_s += device_s
        self._after_step(start_s, host_numel, host_s, device_numel, device_s)
        return loss

    # ----------------------------------------------------------------- measurement and re-planning

    def observe(self, **values: float) -> None:
        """Report measured model inputs (forward_s, backward_s, host_params_per_s, device_params_per_s,
        d2h_bytes_per_s, h2d_bytes_per_s), e.g. from a trainer that times its phases on the device."""
        for k, v in values.items():
            self.measured.set(k, v)

    def _after_step(self, start_s: float, host_numel: int, host_s: float, device_numel: int, device_s: float):
        if self._measure and self.stats.steps > 1:  # the first step allocates and warms up: not measured
            m = self.measured
            # hook times are host times: on CUDA they mark kernel launches, not the GPU's work, so there the
            # phases come from observe() (a trainer timing them with events) or the profile's estimate
            host_clock = self.device.type == "cpu"
            if host_clock and self._first_grad_s is not None and self._last_step_end_s is not None:
                m.add("forward_s", max(self._first_grad_s - self._last_step_end_s, 0.0))
                m.add("backward_s", self._last_grad_s - self._first_grad_s)
            if host_numel and host_s > 0:
                m.add("host_params_per_s", host_numel / host_s)
            if device_numel and device_s > 0 and self.device.type == "cpu":  # CUDA updates are asynchronous
                m.add("device_params_per_s", device_numel / device_s)
            d2h, h2d = self._transfers.stats.take()
            if d2h:
                m.add("d2h_bytes_per_s", d2h)
            if h2d:
                m.add("h2d_bytes_per_s", h2d)
        if len(self._seen_order) == len(self.subgroups):
            self._ready_order = list(self._seen_order)
        self._seen_order = []
        self._grad_hooks_last, self._grad_hooks_now = self._grad_hooks_now, {}
        self._first_grad_s = self._last_grad_s = None
        interval = self.replan_interval_steps
        replanning = self.strategy == "interleaved" and self._given_plan is None and interval
        if replanning and self.stats.steps % interval == 0:
            self.replan()
        self._last_step_end_s = time.perf_counter()

    def replan(self, force: bool = False) -> bool:
        """Re-plan from the measured inputs if they drifted beyond `replan_tolerance` (or `force`); move the
        subgroups whose placement changed. Returns whether the placement changed."""
        if self.strategy != "interleaved" or self._given_plan is not None:
            what = "an explicit plan=" if self._given_plan is not None else f"strategy={self.strategy!r}"
            raise ValueError(
                f"replan() re-plans strategy='interleaved' only; this optimizer has {what}, whose placement is "
                "fixed; build it with strategy='interleaved' to have the performance model place the subgroups"
            )
        costs = self.measured.costs(self.costs)
        phases = self.measured.phases(self.phases)
        reasons = drifted(self.costs, self.phases, costs, phases, self.replan_tolerance)
        host_order = tuple(i for i in self._ready_order if self.plan.placements[i] == HOST)
        if host_order != self.plan.transfer_order:
            reasons.append("ready_order")
        free = self._agreed_min(self._free_now())  # every replica gets here: no collective behind a condition
        plan = None
        if reasons or force:
            plan = make_plan(
                self.strategy,
                self.subgroups,
                device_budget_bytes=min(self._budget_limit, free),
                costs=costs,
                phases=phases,
                device_fraction=self.fraction,
                ready_order=self._ready_order,
            )
        # data-parallel replicas take the first rank's decision (whether, and where), inputs included
        plan, costs, phases, reasons = self._from_first_rank((plan, costs, phases, reasons))
        if plan is None:
            return False
        self.costs, self.phases = costs, phases
        changed = (plan.placements, plan.transfer_order) != (self.plan.placements, self.plan.transfer_order)
        if changed:
            self._apply_plan(plan)
            self.stats.replans += 1
            self.stats.replan_reasons.append(reasons)
        else:
            self.plan = plan
        return changed

    def _replica_group(self) -> Any:
        """plan_group when there are other replicas to agree with, else None."""
        group = self.plan_group
        if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return None
        return group

    def _agreed_min(self, value: int) -> int:
        """The least `value` over plan_group (e.g. free device bytes, which differ from card to card), so a
        plan made from it fits every replica; `value` itself without a group."""
        group = self._replica_group()
        if group is None:
            return value
        values: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(values, value, group=group)
        return min(values)

    def _from_first_rank(self, obj: Any) -> Any:
        """`obj` as the first rank of plan_group has it (broadcast), or as is without a group."""
        group = self._replica_group()
        if group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        return box[0]

    def predict(self) -> float:
        """The performance model's iteration time for the current plan and the measured inputs (where a
        rate was never measured nor given, the documented defaults stand in)."""
        base = self.costs if self.costs is not None else default_cost_inputs(self.device)
        costs, phases = self.measured.costs(base), self.measured.phases(self.phases)
        prediction = predict_iteration(self.subgroups, self.plan.placements, costs, phases, self._ready_order)
        return prediction.iteration_s

    # ----------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """torch's AdamW layout (step, exp_avg, exp_avg_sq per parameter; 'master_param' for non-fp32
        parameters), wherever the state lives. Loads with torch.load(weights_only=True). A bf16 host master
        of an fp32 parameter is not saved: the parameter holds its value exactly."""
        self._wait_all_params()
        sd = super().state_dict()
        if self.state_dtype != torch.float32:
            sd["offload_rng_state"] = self._generator.get_state()
        if self.strategy == "interleaved" and self._given_plan is None:  # the placement re-planning reached
            sd["offload_placement"] = {
                "placements": list(self.plan.placements),
                "transfer_order": list(self.plan.transfer_order),
                "steps": self.stats.steps,
            }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Copy saved state into this optimizer's buffers, wherever its own plan puts them. With fp32 state
        (the default) a checkpoint from any strategy continues bit-exactly under any other. With
        state_dtype=bf16 the host subgroups keep bf16 moments and the device ones fp32, so the numbers follow
        the placement: an interleaved optimizer first adopts the placement saved with the state (when it has
        the same subgroups and the placement fits its budget), and then continues as the saved run did until
        its next re-plan, which follows this run's own timings."""
        self._wait_all_params()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, the optimizer {len(self.param_groups)}"
            )
        for i, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"param group {i}: state_dict has {len(sg['params'])} parameters, "
                    f"the optimizer {len(g['params'])}"
                )
        for i, sg in enumerate(saved_groups):
            _check_group_flags(sg, f"state_dict param group {i}")
        saved_state = state_dict["state"]
        frozen_with_state = [  # torch's optimizer would hold their state: so do we (as it was saved)
            p
            for g, sg in zip(self.param_groups, saved_groups)
            for saved_id, p in zip(sg["params"], g["params"])
            if p not in self._subgroup_of and saved_state.get(saved_id)
        ]
        if frozen_with_state:
            self._loaded_frozen.update(frozen_with_state)
            self._build()
        if (saved_plan := state_dict.get("offload_placement")) is not None:
            self._adopt_placement(saved_plan)
        with torch.no_grad():
            for g, sg in zip(self.param_groups, saved_groups):
                for saved_id, p in zip(sg["params"], g["params"]):
                    self._load_param_state(p, saved_state.get(saved_id))
                for k, v in sg.items():
                    if k != "params":
                        g[k] = v
        if "offload_rng_state" in state_dict:
            self._generator.set_state(state_dict["offload_rng_state"])
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _adopt_placement(self, saved: dict[str, Any]) -> None:
        """Take the placement an interleaved optimizer had re-planned to when it saved (see load_state_dict)."""
        if self.strategy != "interleaved" or self._given_plan is not None:
            return
        placements = tuple(saved["placements"])
        if len(placements) != len(self.subgroups):
            warnings.warn(
                f"the checkpoint's placement covers {len(placements)} subgroups, this optimizer has "
                f"{len(self.subgroups)} (other parameters or subgroup_bytes): keeping this optimizer's own plan",
                stacklevel=3,
            )
            return
        plan = PlacementPlan(
            "interleaved",
            placements,
            tuple(saved["transfer_order"]),
            sum(s.device_state_bytes for s, where in zip(self.subgroups, placements) if where == DEVICE),
        )
        try:  # against what every replica has free: the replicas adopt it all or none
            self._check(plan, self._agreed_min(self._free_now()))
        except ValueError as exc:
            warnings.warn(f"the checkpoint's placement does not fit here ({exc}); keeping this optimizer's own plan",
                          stacklevel=3)  # fmt: skip
            return
        self._apply_plan(plan)
        self.stats.steps = int(saved["steps"])  # the re-plan interval counts on from the saved run

    def _load_param_state(self, p: torch.Tensor, saved: dict[str, Any] | None) -> None:
        if p not in self._subgroup_of:  # frozen, without state (load_state_dict included those saved with it)
            return
        st = self.state[p]
        if saved is None:
            for k in ("step", "exp_avg", "exp_avg_sq"):
                st[k].zero_()
            saved = {}
        else:
            for k in ("exp_avg", "exp_avg_sq"):
                if tuple(saved[k].shape) != tuple(p.shape):
                    shape = tuple(saved[k].shape)
                    raise ValueError(f"saved {k} has shape {shape} but the parameter {tuple(p.shape)}")
                st[k].copy_(saved[k])
            st["step"].copy_(torch.as_tensor(saved["step"], dtype=torch.float32))
        master = self._master(p)
        if master is not p:
            master.copy_(saved.get("master_param", p))
        self._param_version[p] = p._version

    def close(self) -> None:
        """Finish outstanding copies, remove hooks and stop the copy thread."""
        self._wait_all_params()
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()
        for h in self._module_hooks:
            h.remove()
        self._module_hooks.clear()
        self._transfers.close()
