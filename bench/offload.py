"""offload suite: optimizer-state offloading measured on this CPU and projected for a GPU node.

1. Host AdamW update throughput (params/s) on 100M parameters (--quick: 10M), at 1 thread and at all cores:
   sysopt's fp32 host path (torch's fused kernel, as OffloadAdamW runs it), sysopt's C++ kernel (fp32 state;
   bf16 moments with fp32 or bf16 grads; bf16 masters rounded stochastically, with fp32 or bf16 grads; bf16
   Kahan masters), torch AdamW foreach and fused, and the peer
   DeepSpeedCPUAdam (when importable: `make bench-deps`). The implementations take turns in every repeat,
   so a change in machine load hits all of them alike.
2. bf16-state loss parity: the VLM trained single-process with OffloadAdamW(strategy="host"), fp32 state vs
   state_dtype=bfloat16 (fp32 masters) and vs state_dtype=master_dtype=bfloat16, same seed and batches; final
   loss = mean of the last 20 steps (--quick: 10).
3. VLM iteration time per strategy (device, host, fraction, interleaved) beside the performance model's
   prediction: OffloadAdamW.predict() after observe() of the medians of the measured forward and backward
   times and host/device update rates over the timed iterations (copy rates: the optimizer's own).
4. A projection (not a measurement) for one H100 on PCIe Gen5 x16 with a 32-core host, from the assumed
   HardwareProfile bench/profiles/h100_pcie5_32core.json: predicted iteration time of GPT-shaped 1.3B-13B
   models under host / fraction / interleaved placement (device where the state fits); also drawn in
   bench/results/offload_projection.png.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from sysopt.benchmark import BenchContext, Record, SuiteResult, goal, goal_ratio, register_suite
from sysopt.hardware.calibration import intraop_threads
from sysopt.hardware.profile import HardwareProfile
from sysopt.offload import (
    HOST,
    OffloadAdamW,
    PhaseTimes,
    cost_inputs_from_profile,
    cpu_kernel,
    default_cost_inputs,
    make_plan,
    partition,
)
from sysopt.offload.update import adamw_scalars, fused_adamw_, host_adamw_

PROFILE_PATH = Path(__file__).parent / "profiles" / "h100_pcie5_32core.json"
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
# The VLM parts run on one thread: on this shared 2-core machine OpenMP barriers of a second thread that
# other processes keep busy cost more than the thread gains, and one thread keeps repeats comparable.
VLM_THREADS = 1


def _cache_dir() -> Path:
    """JIT builds (sysopt's kernel, DeepSpeed's cpu_adam) go to TORCH_EXTENSIONS_DIR, by default ours."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "sysopt" / "torch_extensions"))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def _rate_record(name: str, n: float, seconds: list[float], unit: str, config: dict) -> Record:
    """n / time: the median time gives the value, the slowest and fastest runs give min and max."""
    return Record(
        name, n / statistics.median(seconds), unit, len(seconds), n / max(seconds), n / min(seconds), config
    )


def _time_record(name: str, seconds: list[float], config: dict) -> Record:
    return Record(name, statistics.median(seconds), "s", len(seconds), min(seconds), max(seconds), config)


def _take_turns(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, tuple[list[float], list[float]]]:
    """Wall and calling-thread CPU seconds per call of each function; each round calls each function once,
    in an order shuffled afresh every round (seeded): with a fixed order one implementation always follows
    the same neighbour, whose cache and memory state it inherits."""
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in fns}
    for r in range(warmup + repeats):
        order = list(fns.items())
        random.Random(r).shuffle(order)
        for name, fn in order:
            wall, cpu = time.perf_counter(), time.thread_time()
            fn()
            if r >= warmup:
                times[name][0].append(time.perf_counter() - wall)
                times[name][1].append(time.thread_time() - cpu)
    return times


# ----------------------------------------------------------------------------- 1. host update throughput


def _deepspeed_adam(param: torch.nn.Parameter, quick: bool) -> tuple[object | None, str]:
    """DeepSpeedCPUAdam on `param`, or None and why not. Quick mode does not start the ~minutes JIT build."""
    cache = _cache_dir()
    try:
        import deepspeed  # noqa: F401
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as e:  # noqa: BLE001 - any import failure means the peer is unavailable
        return None, f"deepspeed not importable ({type(e).__name__}: {e}); run `make bench-deps`"
    if quick and not any(cache.glob("cpu_adam*/cpu_adam*.so")):
        return (
            None,
            f"DeepSpeed's cpu_adam op is not built in {cache}; quick mode skips the JIT build (run the full suite once)",
        )
    try:
        opt = DeepSpeedCPUAdam([param], **HYPER, adamw_mode=True)
    except Exception as e:  # noqa: BLE001 - a failed JIT build: report it, never fake the peer
        return None, f"DeepSpeedCPUAdam failed to build ({type(e).__name__}: {e})"
    import deepspeed

    return opt, f"deepspeed {deepspeed.__version__}"


def _update_candidates(n: int, quick: bool) -> tuple[dict, dict, str | None]:
    """name -> (function, config); the DeepSpeed note when the peer is unavailable."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen) * 1e-2
    m32, v32 = torch.zeros(n), torch.zeros(n)
    m16, v16 = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
    g16, p16, c16 = g.bfloat16(), p.bfloat16(), torch.zeros(n, dtype=torch.bfloat16)
    p16_sr = p.bfloat16()
    steps = [torch.zeros(()) for _ in range(4)]
    kernel = cpu_kernel.status()
    impl = (
        f"C++ kernel ({kernel.vector_isa})"
        if kernel.available
        else f"torch reference (kernel unavailable: {kernel.error})"
    )
    base = {"n_params": n, "lr": HYPER["lr"], "weight_decay": HYPER["weight_decay"]}

    def cfg(what: str, param: str, grad: str, moments: str, bytes_per_param: int, **extra) -> dict:
        return {**base, "what": what, "param": param, "grad": grad, "moments": moments,
                "bytes_per_param": bytes_per_param, **extra}  # fmt: skip

    fns = {
        "sysopt_fp32": (
            lambda: fused_adamw_([p], [g], [m32], [v32], [steps[0]], **HYPER),
            cfg("OffloadAdamW's fp32 host update (torch._fused_adamw_, bitwise equal to torch AdamW fused)",
                "fp32", "fp32", "fp32", 28),
        ),
        "sysopt_cpp_fp32": (
            lambda: host_adamw_([p], [g], [m32], [v32], [steps[0]], **HYPER),
            cfg("sysopt C++ kernel, fp32 state (not used by OffloadAdamW: not bitwise equal to torch's fused)",
                "fp32", "fp32", "fp32", 28, impl=impl),
        ),
        "sysopt_bf16_state": (
            lambda: host_adamw_([p], [g], [m16], [v16], [steps[1]], **HYPER),
            cfg("OffloadAdamW state_dtype=bf16 host update: fp32 master, bf16 moments (stochastic rounding)",
                "fp32", "fp32", "bf16", 20, impl=impl),
        ),
        "sysopt_bf16_state_bf16_grad": (
            lambda: host_adamw_([p], [g16], [m16], [v16], [steps[1]], **HYPER),
            cfg("as sysopt_bf16_state with bf16 gradients (a bf16 model)", "fp32", "bf16", "bf16", 18, impl=impl),
        ),
        "sysopt_bf16_master": (
            lambda: host_adamw_([p16_sr], [g], [m16], [v16], [steps[3]], **HYPER),
            cfg("OffloadAdamW state_dtype=master_dtype=bf16 host update: bf16 master and moments, all three "
                "rounded stochastically", "bf16 (stochastic rounding)", "fp32", "bf16", 16, impl=impl),
        ),
        "sysopt_bf16_master_bf16_grad": (
            lambda: host_adamw_([p16_sr], [g16], [m16], [v16], [steps[3]], **HYPER),
            cfg("as sysopt_bf16_master with bf16 gradients (a bf16 model)", "bf16 (stochastic rounding)", "bf16",
                "bf16", 14, impl=impl),
        ),
        "sysopt_bf16_kahan": (
            lambda: host_adamw_([p16], [g16], [m16], [v16], [steps[2]], **HYPER, compensations=[c16]),
            cfg("kernel API: bf16 master + bf16 Kahan compensation, bf16 moments and grads (not wired into "
                "OffloadAdamW)", "bf16+kahan", "bf16", "bf16", 16, impl=impl),
        ),
    }  # fmt: skip
    for foreach in (True, False):
        param = torch.nn.Parameter(p)  # shares p's storage: updating it in place is what we time
        param.grad = g
        opt = torch.optim.AdamW([param], **HYPER, foreach=foreach, fused=not foreach)
        name = "torch_adamw_foreach" if foreach else "torch_adamw_fused"
        fns[name] = (opt.step, cfg(f"torch.optim.AdamW({'foreach' if foreach else 'fused'}=True).step()",
                                   "fp32", "fp32", "fp32", 28, peer=True))  # fmt: skip
    param = torch.nn.Parameter(p)
    param.grad = g
    ds, note = _deepspeed_adam(param, quick)
    fns["deepspeed_cpu_adam"] = (
        ds.step if ds is not None else None,
        cfg("DeepSpeedCPUAdam(adamw_mode=True).step()", "fp32", "fp32", "fp32", 28, peer=True,
            available=ds is not None, note=note),
    )  # fmt: skip
    return fns, note if ds is None else None


def throughput(ctx: BenchContext) -> tuple[list[Record], list]:
    """Rates per wall second at 1 thread and at all cores; at 1 thread also per CPU second of the calling
    thread (all the work runs there), which other processes' load on this shared machine barely moves:
    the 1-thread goals use it, the all-cores goals use wall time."""
    n = 10_000_000 if ctx.quick else 100_000_000
    fns, ds_missing = _update_candidates(n, ctx.quick)
    runnable = {k: fn for k, (fn, _) in fns.items() if fn is not None}
    records, goals = [], []
    suffix = f" [DeepSpeed unavailable: {ds_missing}]" if ds_missing else ""
    for threads in ctx.track(sorted({1, os.cpu_count() or 1}), "offload: host update throughput"):
        with intraop_threads(threads):  # 3x the repeats: single runs of the peer drift (0.83-1.67e9/s here)
            times = _take_turns(runnable, 3 * ctx.repeats)
        clocks = [("params_per_s", "params/s", 0)] + (
            [("params_per_cpu_s", "params/CPU-s", 1)] if threads == 1 else []
        )
        for what, unit, clock in clocks:
            by_name = {}
            for name, (_, config) in fns.items():
                rec_name = f"host_update/{n // 1_000_000}M/{threads}thread/{name}/{what}"
                config = {**config, "threads": threads, "clock": "thread CPU time" if clock else "wall",
                          "order": "implementations take turns in each repeat"}  # fmt: skip
                if name in times:
                    by_name[name] = _rate_record(rec_name, n, times[name][clock], unit, config)
                else:
                    by_name[name] = Record(rec_name, math.nan, unit, 0, math.nan, math.nan, config)
            records += by_name.values()
            if threads == 1 and clock == 0:
                continue  # at 1 thread the goals use CPU time
            basis = f"{threads} thread{'s' if threads > 1 else ''}, per {'CPU' if clock else 'wall'} second"
            ds = by_name["deepspeed_cpu_adam"]
            goals.append(goal_ratio(f"sysopt fp32 host update vs DeepSpeedCPUAdam ({basis}){suffix}",
                                    by_name["sysopt_fp32"], ds, ">= 1.0"))  # fmt: skip
            goals.append(goal_ratio(f"sysopt bf16-state host update vs DeepSpeedCPUAdam ({basis}){suffix}",
                                    by_name["sysopt_bf16_state"], ds, ">= 1.5"))  # fmt: skip
            goals.append(goal_ratio(f"sysopt bf16-master host update vs DeepSpeedCPUAdam ({basis}){suffix}",
                                    by_name["sysopt_bf16_master"], ds, ">= 1.5"))  # fmt: skip
            # the peer against torch's fused AdamW, which moves the same 28 B per parameter: far from 1, the
            # peer (or the machine during its turns) was disturbed, and the ratios above are not typical
            goals.append(goal_ratio(f"check, informative: DeepSpeedCPUAdam vs torch fused AdamW, same fp32 work "
                                    f"({basis}){suffix}", ds, by_name["torch_adamw_fused"], ">= 0.8"))  # fmt: skip
    ceiling, ceiling_goals = _compute_ceiling(ctx, {r.name: r for r in records}, n)
    return records + ceiling, goals + ceiling_goals


CACHED_N = 1_000_000  # 10-12 MB of bf16-master / bf16-state per call: in this host's L3 (32 MB), not its L2
CALLS_PER_SAMPLE = 20  # ~0.5 ms a call


def _compute_ceiling(ctx: BenchContext, by_name: dict[str, Record], n: int) -> tuple[list[Record], list]:
    """The C++ kernel's bf16 rates at 1 thread on cache-resident tensors, called directly (no per-call Python):
    about its compute ceiling (one-off sweeps on this host: flat at ~2.1-2.25e9 params/s from 128K to 1M
    elements). Against DeepSpeedCPUAdam at full size it bounds the 1-thread goals in this run: when
    DeepSpeed's memory-bound rate is high, a ceiling below 1.5x puts them out of reach for this kernel's exact
    IEEE math however little memory it moves."""
    kernel = cpu_kernel.load()
    if kernel is None:
        return [], []
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(CACHED_N, generator=gen) * 1e-2
    bf16 = {"dtype": torch.bfloat16}
    masters = {"sysopt_bf16_state": torch.randn(CACHED_N, generator=gen),
               "sysopt_bf16_master": torch.randn(CACHED_N, generator=gen).bfloat16()}  # fmt: skip
    scalars = adamw_scalars(HYPER["lr"], HYPER["betas"], HYPER["weight_decay"], HYPER["eps"], 1.0)
    fns = {}
    for name, p in masters.items():
        m, v = torch.zeros(CACHED_N, **bf16), torch.zeros(CACHED_N, **bf16)

        def run(p=p, m=m, v=v) -> None:
            for _ in range(CALLS_PER_SAMPLE):
                kernel.adamw_step([p], [], [g], [m], [v], scalars, [1, 2])

        fns[name] = run
    with intraop_threads(1):  # one kernel at a time: taking turns, each evicted the other's tensors (~-9%)
        times = {name: _take_turns({name: fn}, 3 * ctx.repeats)[name] for name, fn in fns.items()}
    records, goals = [], []
    ds = by_name[f"host_update/{n // 1_000_000}M/1thread/deepspeed_cpu_adam/params_per_cpu_s"]
    for name in fns:
        config = {"n_params": CACHED_N, "threads": 1, "clock": "thread CPU time", "calls_per_sample": CALLS_PER_SAMPLE,
                  "what": "the C++ kernel called directly on cache-resident tensors: about its compute ceiling"}  # fmt: skip
        record = _rate_record(f"host_update/{CACHED_N // 1_000_000}M_cached/1thread/{name}/params_per_cpu_s",
                              CACHED_N * CALLS_PER_SAMPLE, times[name][1], "params/CPU-s", config)  # fmt: skip
        records.append(record)
        full = by_name[f"host_update/{n // 1_000_000}M/1thread/{name}/params_per_cpu_s"]
        label = name.removeprefix("sysopt_").replace("_", "-")
        if math.isfinite(ds.value):
            goals.append(goal_ratio(f"ceiling, informative: sysopt {label} kernel on cached tensors vs DeepSpeedCPUAdam "
                                    f"at {n // 1_000_000}M (1 thread, per CPU second): about the most its 1-thread goal "
                                    "could reach in this run", record, ds, ">= 1.5"))  # fmt: skip
        goals.append(goal_ratio(f"informative: sysopt {label} at {n // 1_000_000}M vs its kernel on cached tensors "
                                "(1 thread, per CPU second; near 1 = compute-bound)", full, record, ">= 0.9"))  # fmt: skip
    return records, goals


# ----------------------------------------------------------------------------- VLM helpers


@functools.cache
def _dataset(seed: int = 0):
    """The training split (the same samples for every seed); `seed` orders the batches."""
    from sysopt.data import DigitsDataset, DigitsTaskConfig

    return DigitsDataset(DigitsTaskConfig(seed=seed), "train")


def _vlm_setup(model_config, batch: int, steps: int, seed: int = 0):
    """The VLM, AdamW param groups as the trainer makes them (no decay on vectors), the first batches."""
    from sysopt.data import BatchSampler
    from sysopt.models import VLM

    model = VLM(model_config)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    sampler = BatchSampler(_dataset(seed), batch)
    return model, groups, [sampler.global_batch(step) for step in range(steps)]


# ----------------------------------------------------------------------------- 2. bf16-state loss parity


RUNS = {  # label -> optimizer; the torch foreach run differs from fp32_state only in last-bit rounding
    "fp32_state": "OffloadAdamW(strategy='host'), fp32 state",
    "bf16_state": "OffloadAdamW(strategy='host', state_dtype=torch.bfloat16)",
    "bf16_master": "OffloadAdamW(strategy='host', state_dtype=torch.bfloat16, master_dtype=torch.bfloat16)",
    "fp32_torch_foreach": "torch.optim.AdamW(foreach=True): the run-to-run noise floor of this metric",
}
# model init, batch order and stochastic rounding all follow the seed
SEEDS, QUICK_SEEDS = tuple(range(8)), (0,)


def _train_losses(run: str, steps: int, batch: int, seed: int = 0) -> list[float]:
    """The trainer's single-process step (sysopt/train/loop.py): warmup-cosine LR, clip, step."""
    from sysopt.models import VLMConfig, vlm_loss
    from sysopt.train.config import OptimConfig
    from sysopt.train.lr import warmup_cosine_lr

    o = OptimConfig()
    model, groups, batches = _vlm_setup(VLMConfig(seed=seed), batch, steps, seed)
    groups[0]["weight_decay"] = o.weight_decay
    params = [p for g in groups for p in g["params"]]
    if run == "fp32_torch_foreach":
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, foreach=True)
        clip = lambda: torch.nn.utils.clip_grad_norm_(params, o.grad_clip)  # noqa: E731
    else:
        dtype = torch.bfloat16 if run in ("bf16_state", "bf16_master") else torch.float32
        master = torch.bfloat16 if run == "bf16_master" else torch.float32
        opt = OffloadAdamW(
            groups, lr=o.lr, betas=o.betas, eps=o.eps, strategy="host", state_dtype=dtype, master_dtype=master,
            seed=seed,
        )  # fmt: skip
        clip = lambda: opt.clip_grad_norm_(o.grad_clip)  # noqa: E731
    warmup = min(o.warmup_steps, steps // 4)
    losses = []
    for step, b in enumerate(batches):
        lr = warmup_cosine_lr(
            step, lr=o.lr, warmup_steps=warmup, max_steps=steps, min_lr_ratio=o.min_lr_ratio
        )
        for grp in opt.param_groups:
            grp["lr"] = lr
        loss = vlm_loss(model(b), b)
        loss.backward()
        clip()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if isinstance(opt, OffloadAdamW):
        opt.close()
    return losses


def loss_parity(ctx: BenchContext) -> tuple[list[Record], list]:
    """bf16 against fp32 state, each trained once per seed; two readings of "the loss", each averaged over the
    seeds: the final loss (mean of the last steps) and the mean loss over the whole run. A third run per seed,
    torch's foreach AdamW (fp32, differs from the fused kernel in last-bit rounding only), shows how far two
    runs drift apart from rounding alone: the noise floor of each reading. The goal reads the whole-run mean,
    the reading with the lower noise floor (a single seed's final loss moves by several % from rounding)."""
    from sysopt.models import VLMConfig
    from sysopt.train.config import OptimConfig

    steps, last, batch = (40, 10, 16) if ctx.quick else (200, 20, 32)
    seeds = QUICK_SEEDS if ctx.quick else SEEDS
    config = {"model": asdict(VLMConfig()), "optim": asdict(OptimConfig()), "steps": steps, "batch": batch,
              "threads": VLM_THREADS, "seeds": list(seeds), "last_steps": last,
              "warmup_steps": min(OptimConfig().warmup_steps, steps // 4)}  # fmt: skip
    finals: dict[str, list[float]] = {run: [] for run in RUNS}
    means: dict[str, list[float]] = {run: [] for run in RUNS}
    with intraop_threads(VLM_THREADS):
        for run, seed in ctx.track(
            [(r, s) for s in seeds for r in RUNS], "offload: loss parity (runs x seeds)"
        ):
            losses = _train_losses(run, steps, batch, seed)
            finals[run].append(statistics.fmean(losses[-last:]))
            means[run].append(statistics.fmean(losses))
    records = {}
    for run in RUNS:
        for reading, values, what in (("final_loss", finals[run], f"mean loss of the last {last} steps"),
                                      ("mean_loss", means[run], "mean loss over all steps")):  # fmt: skip
            records[(run, reading)] = Record(
                f"loss_parity/{run}/{reading}", statistics.fmean(values), "loss", len(values), min(values),
                max(values), {**config, "optimizer": RUNS[run], "value": f"{what}, averaged over the seeds",
                              "per_seed": values},
            )  # fmt: skip
    # paired per seed: the mean of |run / fp32 - 1| (a bias cancels in no direction here, but chaos between
    # two runs of one seed counts in full; the floor's own figure says how much of it is chaos)
    for run in RUNS:
        if run == "fp32_state":
            continue
        for reading, values in (("final_loss", finals), ("mean_loss", means)):
            diffs = [abs(a / b - 1) for a, b in zip(values[run], values["fp32_state"])]
            records[(run, f"{reading}_paired_abs")] = Record(
                f"loss_parity/{run}/{reading}_mean_abs_paired_diff", statistics.fmean(diffs), "fraction",
                len(diffs), min(diffs), max(diffs), {**config, "optimizer": RUNS[run], "per_seed": diffs,
                "value": f"mean over seeds of |{reading} / fp32_state's of the same seed - 1|"},
            )  # fmt: skip
    goals = []
    for reading in ("mean_loss", "final_loss"):
        fp32, floor = records[("fp32_state", reading)], records[("fp32_torch_foreach", reading)]
        label = "" if reading == "mean_loss" else " (informative)"
        for run, what in (("bf16_state", "bf16-state"), ("bf16_master", "bf16-master")):
            bf16 = records[(run, reading)]
            goals.append(goal(f"{what} {reading.replace('_', ' ')} within 1% of fp32 state over {len(seeds)} "
                              f"seeds (|bf16/fp32 - 1|){label}", abs(bf16.value / fp32.value - 1), "<= 0.01",
                              (bf16.name, fp32.name)))  # fmt: skip
        goals.append(goal(f"noise floor, informative: fp32 torch foreach vs fp32 state, {reading.replace('_', ' ')} "
                          "(rounding only)", abs(floor.value / fp32.value - 1), "<= 0.01", (floor.name, fp32.name)))  # fmt: skip
        for run, what in (("bf16_master", "bf16-master"), ("fp32_torch_foreach", "noise floor (foreach)")):
            paired = records[(run, f"{reading}_paired_abs")]
            goals.append(goal(f"{what}: {reading.replace('_', ' ')} per seed, mean |run/fp32 - 1| over {len(seeds)} "
                              "seeds (informative: chaos between runs counts in full)", paired.value, "<= 0.01",
                              (paired.name,)))  # fmt: skip
    return list(records.values()), goals


# ----------------------------------------------------------------------------- 3. iteration time per strategy


def _iterate(model, opt, batches) -> dict[str, list[float]]:
    """Per iteration: forward, backward, optimizer step (with zero_grad) and total seconds, and the host and
    device update seconds inside the step (from the optimizer's own counters)."""
    from sysopt.models import vlm_loss

    t: dict[str, list[float]] = {k: [] for k in ("forward", "backward", "step", "total", "host", "device")}
    for b in batches:
        host0, device0 = opt.stats.host_update_s, opt.stats.device_update_s
        t0 = time.perf_counter()
        loss = vlm_loss(model(b), b)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        for key, value in (("forward", t1 - t0), ("backward", t2 - t1), ("step", t3 - t2), ("total", t3 - t0),
                           ("host", opt.stats.host_update_s - host0), ("device", opt.stats.device_update_s - device0)):  # fmt: skip
            t[key].append(value)
    return t


def _observe_medians(opt: OffloadAdamW, t: dict[str, list[float]]) -> dict[str, float]:
    """Feed the model the medians over the timed iterations: phase times and update rates (the optimizer's
    own running averages weigh the last few steps, which machine load makes noisy)."""
    numel = {where: sum(opt.subgroups[i].numel for i in subgroups)
             for where, subgroups in (("host", opt.plan.host_subgroups), ("device", opt.plan.device_subgroups))}  # fmt: skip
    values = {"forward_s": statistics.median(t["forward"]), "backward_s": statistics.median(t["backward"])}
    for where in ("host", "device"):
        if numel[where] and statistics.median(t[where]) > 0:
            values[f"{where}_params_per_s"] = numel[where] / statistics.median(t[where])
    opt.observe(**values)
    return values


def iteration_vs_model(ctx: BenchContext) -> tuple[list[Record], list]:
    from sysopt.models import VLMConfig

    model_config = VLMConfig(dim=512, layers=4, vision_dim=128)
    batch, warmup, repeats = (
        4,
        3,
        2 * ctx.repeats,
    )  # repeats iterations calibrate the model, as many are timed
    subgroup_bytes = 16 * 2**20
    records, goals = [], []
    with intraop_threads(VLM_THREADS):
        for strategy in ctx.track(("device", "host", "fraction", "interleaved"), "offload: VLM per strategy"):
            model, groups, batches = _vlm_setup(model_config, batch, warmup + 2 * repeats)
            kwargs = {}
            if strategy in ("fraction", "interleaved"):  # both keep at most half of the state on the device
                total = sum(p.numel() for g in groups for p in g["params"]) * 8
                kwargs = {"fraction": 0.5, "device_budget_bytes": total // 2}
            opt = OffloadAdamW(groups, lr=1e-4, strategy=strategy, subgroup_bytes=subgroup_bytes,
                               replan_interval_steps=None, **kwargs)  # fmt: skip
            warm = _iterate(model, opt, batches[:warmup])
            if strategy == "interleaved":  # plan once from measured inputs, then hold the plan while timing
                _observe_medians(opt, warm)
                opt.replan(force=True)
            # out of sample: the model's inputs come from the even iterations, the measurement from the odd
            # ones (interleaved, so a drift of the machine's speed hits both halves alike)
            both = _iterate(model, opt, batches[warmup:])
            fed = _observe_medians(opt, {k: v[0::2] for k, v in both.items()})
            predicted = opt.predict()
            t = {k: v[1::2] for k, v in both.items()}
            config = {"strategy": strategy, "model": asdict(model_config), "batch": batch, "threads": VLM_THREADS,
                      "n_params": sum(s.numel for s in opt.subgroups), "subgroups": len(opt.subgroups),
                      "host_subgroups": len(opt.plan.host_subgroups), "subgroup_bytes": subgroup_bytes, **kwargs,
                      "observed_medians": fed, "model_inputs": dict(opt.measured.values),
                      "shared_processor": True, "copies_overlap": default_cost_inputs(torch.device("cpu")).copies_overlap}  # fmt: skip
            opt.close()
            prefix = f"vlm_iteration/{strategy}"
            measured = _time_record(f"{prefix}/measured_s", t["total"], config)
            pred = Record(f"{prefix}/predicted_s", predicted, "s", 1, predicted, predicted,
                          {**config, "kind": "performance model: predict() after observe() of the medians of "
                           f"{repeats} iterations interleaved with the {repeats} timed ones"})  # fmt: skip
            step_pred = predicted - fed["forward_s"] - fed["backward_s"]
            records += [
                measured,
                pred,
                _time_record(f"{prefix}/measured_step_s", t["step"], config),
                Record(f"{prefix}/predicted_step_s", step_pred, "s", 1, step_pred, step_pred, config),
            ]
            goals.append(goal(f"VLM {strategy}: model prediction error |predicted/measured - 1|",
                              abs(predicted / measured.value - 1), "<= 0.15", (pred.name, measured.name)))  # fmt: skip
    return records, goals


# ----------------------------------------------------------------------------- 4. projection for a GPU node

# GPT-style shapes (GPT-3 paper family): name -> (hidden, layers); vocab 50257, tied embedding.
GPT_SHAPES = {"1.3B": (2048, 24), "2.7B": (2560, 32), "6.7B": (4096, 32), "13B": (5120, 40)}
VOCAB = 50257
WORKLOAD = {
    "tokens_per_iteration": 8 * 2048,  # micro-batch 8 x sequence 2048 on the one GPU
    "seq_len": 2048,
    "param_dtype": "bf16 (fp32 master, fp32 moments: 12 B of optimizer state per parameter)",
    "grads": "bf16, 2 B per parameter copied device->host; updated bf16 params 2 B host->device",
    "activation_checkpointing": "full: backward = 2x forward GEMMs + 1 recomputed forward",
    "activation_bytes": "layers*tokens*hidden*2 (checkpointed layer inputs) + 34*tokens*hidden (one layer live)",
    "non_gemm_overhead": 1.10,  # norms, softmax, elementwise: +10% on the GEMM time
    "reserve_bytes": 3 * 2**30,  # CUDA workspace and allocator fragmentation
    "device_budget": "GPU free memory - bf16 weights - bf16 grads - activations - reserve",
    "subgroup_bytes": 256 * 2**20,
}


def _gpt_params(hidden: int, layers: int) -> list[torch.Tensor]:
    """Meta tensors in forward order: embedding, then per layer qkv, out-projection, fc1, fc2."""
    d = hidden
    params = [torch.empty(VOCAB, d, device="meta", dtype=torch.bfloat16)]
    for _ in range(layers):
        params += [
            torch.empty(s, device="meta", dtype=torch.bfloat16)
            for s in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d))
        ]
    return params


def _phases(profile: HardwareProfile, hidden: int, layers: int) -> PhaseTimes:
    """Forward from the profile's bf16 GEMM rates at this model's shapes, plus causal attention."""
    t, d, s = WORKLOAD["tokens_per_iteration"], hidden, WORKLOAD["seq_len"]
    per_layer = sum(
        profile.matmul_time_s(t, n, k, "bf16") for n, k in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d))
    )
    attention_flops = 2 * t * s * d  # QK^T and PV, causal: half of 2 * 2 * t * s * d
    per_layer += attention_flops / profile.calibration.matmul_flops_per_s["bf16"]
    head = profile.matmul_time_s(t, VOCAB, d, "bf16")
    forward = (layers * per_layer + head) * WORKLOAD["non_gemm_overhead"]
    return PhaseTimes(forward_s=forward, backward_s=3 * forward)


def projection(ctx: BenchContext) -> tuple[list[Record], dict]:
    profile = HardwareProfile.load(PROFILE_PATH)
    assumptions = json.loads(PROFILE_PATH.read_text()).get("assumptions", {})
    costs = cost_inputs_from_profile(profile, "cuda:0")
    free = profile.gpus[0].memory_free_bytes
    records, curves = [], {}
    for size, (hidden, layers) in GPT_SHAPES.items():
        params = _gpt_params(hidden, layers)
        n = sum(p.numel() for p in params)
        subgroups = partition([params], WORKLOAD["subgroup_bytes"])
        phases = _phases(profile, hidden, layers)
        t = WORKLOAD["tokens_per_iteration"]
        activations = layers * t * hidden * 2 + 34 * t * hidden
        budget = max(0, free - 4 * n - activations - WORKLOAD["reserve_bytes"])
        state = sum(s.device_state_bytes for s in subgroups)
        strategies = {
            "host": {},
            "fraction": {"device_fraction": min(1.0, budget / state)},
            "interleaved": {},
        }
        if state <= budget:
            strategies = {"device": {}, **strategies}
        for strategy, extra in strategies.items():
            plan = make_plan(
                strategy, subgroups, device_budget_bytes=budget, costs=costs, phases=phases, **extra
            )
            value = plan.predicted_iteration_s
            curves.setdefault(strategy, []).append((n, value))
            config = {"kind": "projection", "profile": str(PROFILE_PATH.relative_to(PROFILE_PATH.parents[2])),
                      "profile_assumptions": assumptions, "workload": WORKLOAD, "model": size, "n_params": n,
                      "hidden": hidden, "layers": layers, "strategy": strategy, **extra,
                      "forward_s": phases.forward_s, "backward_s": phases.backward_s,
                      "device_budget_bytes": budget, "state_bytes": state, "device_state_bytes": plan.device_state_bytes,
                      "subgroups": len(subgroups), "host_subgroups": plan.placements.count(HOST),
                      "cost_inputs": costs.to_dict()}  # fmt: skip
            name = f"projection/h100_pcie5_32core/{size}/{strategy}/iteration_s"
            records.append(Record(name, value, "s (projection)", 1, value, value, config))
    return records, curves


def _plot_projection(curves: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    styles = {
        "device": ("s", "--", 9),
        "host": ("o", "-", 6),
        "fraction": ("^", ":", 7),
        "interleaved": ("D", "-", 4),
    }
    for strategy, points in curves.items():  # overlapping lines stay visible: own marker, size and dash
        xs, ys = [n / 1e9 for n, _ in points], [v for _, v in points]
        marker, line, size = styles[strategy]
        label = "fraction (largest that fits)" if strategy == "fraction" else strategy
        left.plot(xs, ys, marker=marker, linestyle=line, markersize=size, label=label)
    left.set_xlabel("model parameters (billions)")
    left.set_ylabel("predicted iteration time (s)")
    left.set_title("PROJECTION: 1x H100 80GB, PCIe Gen5 x16, 32-core host", fontsize=9)
    left.legend(fontsize=8)
    inter = dict(curves["interleaved"])
    for base in ("host", "fraction"):
        pts = [(n / 1e9, v / inter[n]) for n, v in curves[base]]
        right.plot(
            [x for x, _ in pts], [y for _, y in pts], marker="o", label=f"interleaved speed-up over {base}"
        )
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_xlabel("model parameters (billions)")
    right.set_ylabel("speed-up (x)")
    right.set_title("assumed profile bench/profiles/h100_pcie5_32core.json", fontsize=9)
    right.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=90)


# ----------------------------------------------------------------------------- suite


@register_suite("offload")
def run(ctx: BenchContext) -> SuiteResult:
    _cache_dir()
    cpu_kernel.load()  # build (or load the cached build of) the C++ kernel before anything is timed
    records, goals = [], []
    for part in (throughput, loss_parity, iteration_vs_model):
        r, g = part(ctx)
        records += r
        goals += g
    projected, curves = projection(ctx)
    records += projected
    _plot_projection(curves, ctx.out_dir / "offload_projection.png")
    return ctx.result("offload", records, goals)
