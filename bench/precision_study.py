"""Quantisation study: SQNR of INT8, FP8-E4M3 and FP8-E5M2 at tensorwise, rowwise and blockwise (1x32)
granularity, on synthetic Gaussian, Laplace and Student-t tensors and on the VLM's real weights, activations
(inputs of every nn.Linear), output gradients (dy of every nn.Linear) and weight gradients after a short fp32
training run (train_fp32_vlm).

It checks the qualitative finding of van Baalen et al. 2023 ("FP8 versus INT8 for efficient deep learning
inference"): with one scale per tensor, INT8 matches or beats FP8-E4M3 on well-behaved (Gaussian, Laplace)
tensors and FP8-E4M3 wins where outliers dominate (heavy-tailed Student-t); finer scales shrink the outliers'
reach and hand the advantage back to INT8. A separate suite (`sysopt-bench precision_study`) because the bench
CLI has no per-suite flags. Writes precision_study.json/.png plus precision_study.md (the SQNR table) and
precision_study_sqnr.png (a heatmap of the same numbers).

A second table runs each named recipe's three GEMMs on the operands (input, weight, output gradient) of the
VLM's linears that the trainer converts, and gives the SQNR of each GEMM's output (sysopt.precision.gemm_sqnr):
where the per-tensor SQNRs above say what a format loses, this says what a recipe loses per GEMM.

SQNR = 10 log10(sum x^2 / sum (x - dequant(quant(x)))^2) in dB, scales from each group's own amax
(sysopt.kernels.quantize). Each tensor is laid out 2-D as (rows, contraction dim): rowwise means per output
channel for weights and per token for activations and gradients.
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from sysopt import kernels
from sysopt.benchmark import BenchContext, Record, SuiteResult, goal, register_suite
from sysopt.data import BatchSampler, DigitsDataset, DigitsTaskConfig
from sysopt.kernels.formats import FORMAT_DTYPES, dequantize
from sysopt.models import VLM, VLMConfig, vlm_loss
from sysopt.precision import GEMMS, RECIPES, diagnostics, gemm_sqnr, recipe
from sysopt.precision.convert import default_filter
from sysopt.train.config import OptimConfig, TrainConfig
from sysopt.train.lr import warmup_cosine_lr

FORMATS = ("int8", "e4m3", "e5m2")
GRANULARITIES = ("tensorwise", "rowwise", "blockwise")
BLOCK = (1, 32)  # smaller than a row of every VLM tensor (widths 16..512), so blockwise differs from rowwise
SYNTHETIC_SHAPE = (4096, 256)
STUDY_STEPS, QUICK_STUDY_STEPS = 100, 20
SOURCES_REAL = ("weights", "activations", "grad_outputs", "weight_grads")
GEMM_STUDY_MIN_FEATURES = 64  # the trainer's precision configs convert the VLM's linears from 64 features


def synthetic(seed: int = 0) -> dict[str, torch.Tensor]:
    """Unit-scale tensors of SYNTHETIC_SHAPE drawn from well-behaved to heavy-tailed distributions."""
    torch.manual_seed(seed)
    return {
        "gaussian": torch.randn(SYNTHETIC_SHAPE),
        "laplace": torch.distributions.Laplace(0.0, 1.0).sample(SYNTHETIC_SHAPE),
        "student_t3": torch.distributions.StudentT(3.0).sample(SYNTHETIC_SHAPE),
        "student_t2": torch.distributions.StudentT(2.0).sample(SYNTHETIC_SHAPE),
    }


def sqnr_db(x: torch.Tensor, fmt: str, granularity: str) -> float:
    """SQNR of quantising 2-D x to `fmt` with scales at `granularity` (blockwise: BLOCK)."""
    block = BLOCK if granularity == "blockwise" else None
    q, scale = kernels.quantize(x, FORMAT_DTYPES[fmt], granularity, block)
    return diagnostics.sqnr_db(x, dequantize(q, scale, block))


def kurtosis(x: torch.Tensor) -> float:
    """Excess kurtosis (0 for a Gaussian, 3 for Laplace): how much the tails weigh."""
    x = x.double().flatten()
    z = (x - x.mean()) / x.std()
    return float(z.pow(4).mean() - 3)


def amax_over_rms(x: torch.Tensor) -> float:
    """max |x| / rms(x): how far the largest value (which sets a tensorwise scale) sits from the bulk."""
    x = x.double()
    return float(x.abs().max() / x.pow(2).mean().sqrt())


def train_fp32_vlm(steps: int, train_set: DigitsDataset) -> nn.Module:
    """VLM(VLMConfig()) trained in fp32, single process, for `steps` steps: batches of the trainer's default
    global batch, fused AdamW with decay on matrices only, warmup + cosine LR (OptimConfig's defaults, warmup
    scaled to the run length) and gradient clipping, as sysopt.train does."""
    o, batch_size = OptimConfig(), TrainConfig().global_batch
    warmup = max(1, round(o.warmup_steps * steps / TrainConfig().max_steps))
    model = VLM(VLMConfig())
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sampler = BatchSampler(train_set, batch_size)
    model.train()
    for step in range(steps):
        lr = warmup_cosine_lr(
            step, lr=o.lr, warmup_steps=warmup, max_steps=steps, min_lr_ratio=o.min_lr_ratio
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sampler.global_batch(step)
        vlm_loss(model(batch), batch).backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def vlm_tensors(steps: int) -> tuple[dict[str, list[torch.Tensor]], list[tuple[torch.Tensor, ...]]]:
    """Train the VLM in fp32 for `steps` steps, then run one more batch and collect, for every nn.Linear, its
    weight, its input, the gradient at its output and its weight gradient (each 2-D). Also returns the
    (input, weight, grad_output) of each linear that convert() would make low precision, for gemm_sqnr."""
    train_set = DigitsDataset(DigitsTaskConfig(), "train")
    model = train_fp32_vlm(steps, train_set)
    model.train()
    flat = lambda t: t.detach().reshape(-1, t.shape[-1]).clone()  # noqa: E731
    linears = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, nn.Linear)]
    seen: dict[str, dict[str, torch.Tensor]] = {fqn: {} for fqn, _ in linears}
    handles = []
    for fqn, m in linears:
        handles.append(m.register_forward_hook(lambda mod, inp, out, f=fqn: seen[f].update(x=flat(inp[0]))))
        handles.append(
            m.register_full_backward_hook(lambda mod, gin, gout, f=fqn: seen[f].update(dy=flat(gout[0])))
        )
    batch = BatchSampler(train_set, TrainConfig().global_batch).global_batch(steps)
    model.zero_grad(set_to_none=True)
    vlm_loss(model(batch), batch).backward()
    for h in handles:
        h.remove()
    found = {
        "weights": [m.weight.detach().clone() for _, m in linears],
        "activations": [seen[fqn]["x"] for fqn, _ in linears],
        "grad_outputs": [seen[fqn]["dy"] for fqn, _ in linears],
        "weight_grads": [m.weight.grad.detach().clone() for _, m in linears],
    }
    converts = default_filter(linears, keep_first_last=True, min_features=GEMM_STUDY_MIN_FEATURES)
    operands = [
        (seen[f]["x"], m.weight.detach().clone(), seen[f]["dy"]) for f, m in linears if converts(m, f)
    ]
    return found, operands


def recipe_records(operands: list[tuple[torch.Tensor, ...]], config: dict) -> list[Record]:
    """Per named recipe and GEMM: SQNR of the GEMM's output on the VLM's operands (median over layers)."""
    records = []
    for name in RECIPES:
        per_layer = [gemm_sqnr(recipe(name), x, w, dy) for x, w, dy in operands]
        for gemm in GEMMS:
            values = [layer[gemm] for layer in per_layer]
            records.append(_summary(f"gemm_sqnr/{name}/{gemm}", values, "dB", config))
    return records


def _summary(name: str, values: list[float], unit: str, config: dict) -> Record:
    return Record(name, statistics.median(values), unit, len(values), min(values), max(values), config)


def study_records(sources: dict[str, list[torch.Tensor]], configs: dict[str, dict]) -> list[Record]:
    """Per source: SQNR per format and granularity (median over the source's tensors, min..max), kurtosis and
    amax/rms."""
    records = []
    for source, tensors in sources.items():
        config = configs[source]
        for fmt in FORMATS:
            for granularity in GRANULARITIES:
                values = [sqnr_db(t, fmt, granularity) for t in tensors]
                records.append(_summary(f"sqnr/{source}/{fmt}/{granularity}", values, "dB", config))
        records.append(_summary(f"stats/{source}/excess_kurtosis", [kurtosis(t) for t in tensors], "kurtosis",
                                config))  # fmt: skip
        records.append(_summary(f"stats/{source}/amax_over_rms", [amax_over_rms(t) for t in tensors], "ratio",
                                config))  # fmt: skip
    return records


def _difference_goal(label: str, records: dict, source: str, first: str, second: str, target: str):
    """Goal on SQNR(first) - SQNR(second) in dB, tensorwise, for `source`."""
    a, b = (records[f"sqnr/{source}/{fmt}/tensorwise"] for fmt in (first, second))
    return goal(label, a.value - b.value, target, [a.name, b.name])


def study_goals(records: list[Record]) -> list:
    """The paper's claims on the synthetic tensors, each as a tensorwise SQNR difference."""
    by_name = {r.name: r for r in records}
    return [
        _difference_goal("gaussian, tensorwise: SQNR int8 - e4m3 [dB] (INT8 matches or beats FP8)", by_name,
                         "gaussian", "int8", "e4m3", ">= 0"),
        _difference_goal("laplace, tensorwise: SQNR int8 - e4m3 [dB] (INT8 matches or beats FP8)", by_name,
                         "laplace", "int8", "e4m3", ">= 0"),
        _difference_goal("student_t3, tensorwise: SQNR e4m3 - int8 [dB] (FP8 wins on outliers)", by_name,
                         "student_t3", "e4m3", "int8", "> 0"),
    ]  # fmt: skip


def difference_records(records: list[Record], sources: list[str]) -> list[Record]:
    """SQNR(int8) - SQNR(e4m3) per source and granularity (positive: INT8 wins), from the medians above."""
    by_name = {r.name: r for r in records}
    out = []
    for source in sources:
        for granularity in GRANULARITIES:
            a, b = (by_name[f"sqnr/{source}/{fmt}/{granularity}"] for fmt in ("int8", "e4m3"))
            diff = a.value - b.value
            out.append(Record(f"int8_minus_e4m3/{source}/{granularity}", diff, "dB difference", 1, diff, diff,
                              {"from": [a.name, b.name]}))  # fmt: skip
    return out


@register_suite("precision_study")
def run(ctx: BenchContext) -> SuiteResult:
    sources = {name: [t] for name, t in synthetic().items()}
    configs = {name: {"shape": list(SYNTHETIC_SHAPE), "block": list(BLOCK)} for name in sources}
    steps = QUICK_STUDY_STEPS if ctx.quick else STUDY_STEPS
    real, operands = vlm_tensors(steps)
    for source, tensors in real.items():
        sources[source] = tensors
        configs[source] = {"vlm_training_steps": steps, "tensors": len(tensors), "block": list(BLOCK),
                           "elements": sum(t.numel() for t in tensors)}  # fmt: skip
    records = study_records(sources, configs)
    records += difference_records(records, list(sources))
    records += recipe_records(operands, {"vlm_training_steps": steps, "layers": len(operands),
                                         "min_features": GEMM_STUDY_MIN_FEATURES})  # fmt: skip
    result = ctx.result("precision_study", records, study_goals(records))
    table = sqnr_table(result, list(sources)) + "\n" + recipe_table(result)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "precision_study.md").write_text(table)
    print(table)
    _plot_heatmap(result, list(sources), ctx.out_dir / "precision_study_sqnr.png")
    return result


def sqnr_table(result: SuiteResult, sources: list[str]) -> str:
    """Markdown: one row per source, one column per (format, granularity); VLM rows are medians over tensors."""
    cols = [(g, f) for g in GRANULARITIES for f in FORMATS]
    lines = [
        f"SQNR [dB] ({result.created}; blockwise = {BLOCK[0]}x{BLOCK[1]}; VLM rows: median over its linears)",
        "",
        "| source | kurtosis | amax/rms | " + " | ".join(f"{f} {g[:5]}" for g, f in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for s in sources:
        cells = [f"{result.record(f'sqnr/{s}/{f}/{g}').value:.1f}" for g, f in cols]
        kurt = result.record(f"stats/{s}/excess_kurtosis").value
        peak = result.record(f"stats/{s}/amax_over_rms").value
        lines.append(f"| {s} | {kurt:.1f} | {peak:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def recipe_table(result: SuiteResult) -> str:
    """Markdown: one row per named recipe, the SQNR of each GEMM's output (median and worst layer)."""
    lines = [
        "GEMM-output SQNR [dB] per named recipe on the VLM's converted linears (median over layers, worst in "
        "brackets; against float64; `sysopt.precision.gemm_sqnr`)",
        "",
        "| recipe | " + " | ".join(GEMMS) + " |",
        "|---|" + "---|" * len(GEMMS),
    ]
    for name in RECIPES:
        cells = [result.record(f"gemm_sqnr/{name}/{g}") for g in GEMMS]
        lines.append(f"| {name} | " + " | ".join(f"{r.value:.1f} ({r.min:.1f})" for r in cells) + " |")
    return "\n".join(lines) + "\n"


def _plot_heatmap(result: SuiteResult, sources: list[str], path) -> None:
    from matplotlib.figure import Figure

    cols = [(g, f) for g in GRANULARITIES for f in FORMATS]
    values = [[result.record(f"sqnr/{s}/{f}/{g}").value for g, f in cols] for s in sources]
    fig = Figure(figsize=(11, 0.5 * len(sources) + 2), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    for i, row in enumerate(values):
        best = {g: max(row[j] for j, (gg, _) in enumerate(cols) if gg == g) for g in GRANULARITIES}
        for j, v in enumerate(row):
            weight = "bold" if v == best[cols[j][0]] else "normal"
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="white", weight=weight)
    ax.set_xticks(range(len(cols)), [f"{f}\n{g}" for g, f in cols], fontsize=7)
    ax.set_yticks(range(len(sources)), sources, fontsize=8)
    fig.colorbar(image, ax=ax, label="SQNR [dB]")
    ax.set_title(f"quantisation SQNR (bold: best format per granularity), {result.created}", fontsize=9)
    fig.savefig(path, dpi=90)
