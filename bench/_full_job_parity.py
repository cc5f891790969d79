"""Summarise full-length parity runs (the default 1,500-step job, one `sysopt-train` run per variant and seed)
into a JSON and a PNG: `python bench/_full_job_parity.py RUNS_DIR OUT_DIR`. RUNS_DIR holds one run directory
per run (hydra.run.dir=RUNS_DIR/<name>): `<variant>` is seed 0, `<variant>@seed<k>` seed k, and the variant
`fp32` is the reference. Not a suite (the leading underscore): the runs take 2-8 minutes each on 2 cores and
are started by hand, e.g.
  sysopt-train hydra.run.dir=RUNS/fp32
  sysopt-train hydra.run.dir=RUNS/bf16state offload=host offload.state_dtype=bf16
  sysopt-train hydra.run.dir=RUNS/int8_rowwise precision=int8_rowwise         # and each other recipe
  sysopt-train hydra.run.dir=RUNS/fp32@seed1 model.seed=1 data.seed=1 train.seed=1   # other seeds: all three
  sysopt-train hydra.run.dir=RUNS/fp32_seed1 model.seed=1       # (older control: the model seed alone)

Each run is compared with the fp32 run of the same seed (paired: same initial weights and batches, so the
difference is the variant's, not the seed's). Per variant the JSON gives every seed's paired differences and
their mean and spread over seeds; the spread of seed-to-seed differences of fp32 itself is the noise floor.

A paired difference is not free of noise either: any perturbation, however small, sends a run down another
trajectory within some hundred steps. Variants named `null_*` measure that floor: fp32 perturbed by a change
too small to matter on its own, e.g.
  sysopt-train hydra.run.dir=RUNS/null_lr_x1.0001@seed1 optim.lr=0.0030003 model.seed=1 data.seed=1 train.seed=1
Their largest |paired difference| over seeds is the JSON's noise_floor_paired_null_max_abs: a variant whose
paired differences stay inside it is not told apart from fp32 by these runs.

With data.label_noise the final loss sits just above the noise floor, so final_loss_mean_rel is small by
construction; final_loss_mean_diff gives the same difference in nats, to set beside fp32's excess over the
floor. excess_over_floor_rel divides by that excess, which can be a few thousandths of a nat: the split's
floor is an expectation, and the ~19k sequences of the last 10% of steps have a floor of their own that
differs from it by sampling, so fp32 can sit at or under the split's floor and the ratio then runs away.
"""

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FIELDS = (
    "mean_loss_whole_run_rel",
    "mean_loss_second_half_rel",
    "final_loss_rel",
    "final_loss_mean_rel",  # runs from before the summary's final_loss_mean lack these three
    "final_loss_mean_diff",
    "excess_over_floor_rel",
    "eval_loss_rel",
    "eval_accuracy_points",
)


def eval_of(d: Path, s: dict) -> dict:
    """The run's held-out eval: from summary.json, or (runs older than the summary's eval_loss) scored
    again from its final checkpoint by sysopt.train.evaluate_checkpoint and cached in eval.json."""
    if "eval_loss" in s:
        return {"eval_loss": s["eval_loss"], "eval_accuracy": s["eval_accuracy"]}
    cache = d / "eval.json"
    if not cache.is_file():
        from sysopt.train import evaluate_checkpoint

        got = evaluate_checkpoint(d)
        if got["step"] != s["steps"]:
            raise SystemExit(
                f"{d}: the latest checkpoint is step {got['step']}, not the run's last ({s['steps']})"
            )
        cache.write_text(json.dumps(got) + "\n")
    return json.loads(cache.read_text())


def _delayed(d: Path) -> bool:
    from sysopt.precision import recipe as named
    from sysopt.train import JobConfig

    r = JobConfig.from_json((d / "job.json").read_text()).precision.resolved_recipe()
    if isinstance(r, str):
        r = None if r == "auto" else named(r)
    return r is not None and r.scaling == "delayed"


def load_run(d: Path) -> dict:
    s = json.loads((d / "summary.json").read_text())
    m = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in m if "loss" in r]
    losses = [r["loss"] for r in m if "loss" in r]
    acc = s["eval_accuracy"]
    scored = eval_of(d, s)
    if any(abs(scored["eval_accuracy"][t] - acc[t]) > 1e-9 for t in acc):
        # runs before eval froze the amax histories recorded into them while evaluating, so their
        # delayed-scaling eval depended on batch order; the re-scored eval (frozen) is the one used
        if not _delayed(d):
            raise SystemExit(
                f"{d}: the checkpoint's eval accuracy {scored['eval_accuracy']} is not the run's {acc}"
            )
        acc = scored["eval_accuracy"]
    job = json.loads((d / "job.json").read_text())
    return {
        "overrides": job.get("precision", {}),
        "label_noise": job.get("data", {}).get("label_noise", 0.0),
        "final_loss": s["final_loss"],
        "final_loss_mean": s.get("final_loss_mean"),
        "train_loss_floor": s.get("train_loss_floor", 0.0),
        "eval_loss": scored["eval_loss"],
        "mean_logged_loss_whole_run": statistics.mean(losses),
        "mean_logged_loss_second_half": statistics.mean(losses[len(losses) // 2 :]),
        "eval_accuracy": acc,
        "mean_eval_accuracy": statistics.mean(acc.values()),
        "step_time_s": s["step_time_s"],
        "steps": s["steps"],
        "curve": [steps, losses],
    }


def versus(r: dict, ref: dict) -> dict:
    extra = {}
    if r["final_loss_mean"] is not None and ref["final_loss_mean"] is not None:
        extra["final_loss_mean_rel"] = r["final_loss_mean"] / ref["final_loss_mean"] - 1
        extra["final_loss_mean_diff"] = r["final_loss_mean"] - ref["final_loss_mean"]
        floor = ref["train_loss_floor"]
        if floor > 0 and r["train_loss_floor"] == floor:  # what is left to learn, beyond the noise
            extra["excess_over_floor_rel"] = (r["final_loss_mean"] - floor) / (
                ref["final_loss_mean"] - floor
            ) - 1
    return extra | {
        "mean_loss_whole_run_rel": r["mean_logged_loss_whole_run"] / ref["mean_logged_loss_whole_run"] - 1,
        "mean_loss_second_half_rel": r["mean_logged_loss_second_half"] / ref["mean_logged_loss_second_half"]
        - 1,
        "final_loss_rel": r["final_loss"] / ref["final_loss"] - 1,
        "eval_loss_rel": r["eval_loss"] / ref["eval_loss"] - 1,
        "eval_accuracy_points": 100 * (r["mean_eval_accuracy"] - ref["mean_eval_accuracy"]),
        "worst_task_points": min(
            100 * (r["eval_accuracy"][t] - ref["eval_accuracy"][t]) for t in ref["eval_accuracy"]
        ),
    }


def _t(values: list[float]) -> float | None:
    if len(values) < 2 or statistics.stdev(values) == 0:
        return None
    return statistics.mean(values) / (statistics.stdev(values) / len(values) ** 0.5)


def summarise(root: Path) -> dict:
    """The runs under root (one directory each, named <variant>[@seed<k>]), each compared with fp32 of the same
    seed; per variant the paired differences over seeds; the noise floors. `curves` holds each run's logged
    training losses (for plot(); main() leaves them out of summary.json)."""
    runs: dict[tuple[str, int], dict] = {}
    for d in sorted(p for p in root.iterdir() if (p / "summary.json").is_file()):
        variant, _, seed = d.name.partition("@seed")
        runs[(variant, int(seed or 0))] = load_run(d)
    noise_levels = {r["label_noise"] for r in runs.values()}
    if len(noise_levels) > 1:
        raise SystemExit(
            f"{root} mixes runs with data.label_noise in {sorted(noise_levels)}: their losses do not compare; "
            "keep each noise level's runs in a directory of their own"
        )
    for (_variant, seed), r in runs.items():
        ref = runs.get(("fp32", seed))
        r["paired_with"] = f"fp32 seed {seed}" if ref is not None else "fp32 seed 0 (no same-seed fp32 run)"
        r["vs_fp32"] = versus(r, ref if ref is not None else runs[("fp32", 0)])
    variants: dict[str, dict] = {}
    for variant in sorted({v for v, _ in runs}):
        seeds = sorted(s for v, s in runs if v == variant)
        per_seed = {s: runs[(variant, s)]["vs_fp32"] for s in seeds}
        agg = {}
        for field in (f for f in FIELDS if all(f in per_seed[s] for s in seeds)):
            values = [per_seed[s][field] for s in seeds]
            agg[field] = {
                "mean": statistics.mean(values),
                "stdev": statistics.stdev(values) if len(values) > 1 else None,
                "min": min(values),
                "max": max(values),
                # mean over its standard error: |t| well above 2 with many seeds says the paired
                # difference is not zero (the null variants show what chaos alone gives)
                "t": _t(values),
                "positive_seeds": sum(x > 0 for x in values),
            }
        variants[variant] = {"seeds": seeds, "per_seed": per_seed, "over_seeds": agg}
    # the noise floor: fp32 against fp32 of other seeds (every ordered pair of distinct seeds)
    fp32_seeds = sorted(s for v, s in runs if v == "fp32")
    pairs = [versus(runs[("fp32", a)], runs[("fp32", b)]) for a in fp32_seeds for b in fp32_seeds if a != b]
    noise = (
        {f: max(abs(p[f]) for p in pairs) for f in FIELDS if all(f in p for p in pairs)} if pairs else None
    )
    nulls = [r["vs_fp32"] for (v, _), r in runs.items() if v.startswith("null")]
    paired_noise = (
        {f: max(abs(n[f]) for n in nulls) for f in FIELDS if all(f in n for n in nulls)} if nulls else None
    )
    summary = {
        "runs": {
            f"{v}@seed{s}": {k: x for k, x in r.items() if k != "curve"} for (v, s), r in sorted(runs.items())
        },
        "variants": variants,
        "noise_floor_fp32_between_seeds_max_abs": noise,
        "noise_floor_paired_null_max_abs": paired_noise,
        "curves": {f"{v}@seed{s}": r["curve"] for (v, s), r in sorted(runs.items())},
    }
    return summary


def plot(summary: dict, path: Path) -> None:
    """Loss curves of every run, and each seed's paired final-loss difference per variant."""
    runs = {(k.partition("@seed")[0], int(k.partition("@seed")[2])): r for k, r in summary["runs"].items()}
    for key, curve in summary["curves"].items():
        variant, _, seed = key.partition("@seed")
        runs[(variant, int(seed))] = {**runs[(variant, int(seed))], "curve": curve}
    variants = summary["variants"]

    fig, (ax, dots) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, variant in enumerate(variants):
        for seed in variants[variant]["seeds"]:
            r = runs[(variant, seed)]
            label = (
                f"{variant} ({len(variants[variant]['seeds'])} seeds)"
                if seed == variants[variant]["seeds"][0]
                else None
            )
            ax.plot(*r["curve"], color=colors[i % len(colors)], lw=2.0 if variant == "fp32" else 1.0, alpha=0.8,
                    label=label)  # fmt: skip
    noise_level = next(iter({r["label_noise"] for r in runs.values()}))
    floors = sorted({r["train_loss_floor"] for r in runs.values()})
    if floors[-1] > 0:
        ax.axhline(
            statistics.mean(floors), color="k", ls=":", lw=1, label="noise floor (least reachable loss)"
        )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (as logged: every train.log_every steps)")
    job = "default job" + (f" with data.label_noise={noise_level}" if noise_level else "")
    steps = sorted({r["steps"] for r in runs.values()})
    ax.set_title(f"{job}, {'/'.join(f'{n:,}' for n in steps)} steps: each variant and seed")
    ax.legend(fontsize=8)
    # each seed's paired difference from fp32 in the final loss (the whole-run mean for older runs)
    field = "final_loss_mean_rel" if all("final_loss_mean_rel" in v["over_seeds"] for v in variants.values()) \
        else "mean_loss_whole_run_rel"  # fmt: skip
    others = [v for v in variants if v != "fp32"]
    for i, variant in enumerate(others):
        values = [100 * x[field] for x in variants[variant]["per_seed"].values()]
        dots.plot(
            [i] * len(values),
            values,
            "o",
            alpha=0.7,
            color=colors[(list(variants).index(variant)) % len(colors)],
        )
        dots.plot([i - 0.25, i + 0.25], [statistics.mean(values)] * 2, color="k", lw=2)
    dots.axhspan(-2, 2, color="0.9", zorder=0, label="within 2% (issue 6's goal)")
    dots.axhline(0, color="k", lw=0.5)
    dots.set_xticks(range(len(others)), others, rotation=30, ha="right", fontsize=8)
    label = "final loss (last 10% of steps)" if field == "final_loss_mean_rel" else "whole-run mean loss"
    dots.set_ylabel(f"{label} vs fp32 of the same seed (%)")
    dots.set_title("paired differences: one dot per seed, bar = mean")
    dots.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(summary: dict) -> None:
    """The paired differences per variant (mean [min, max] over seeds), t values and the noise floors."""
    variants = summary["variants"]
    runs = summary["runs"]
    noise, paired_noise = (
        summary["noise_floor_fp32_between_seeds_max_abs"],
        summary["noise_floor_paired_null_max_abs"],
    )
    columns = [
        ("mean_loss_whole_run_rel", "mean loss, whole run", 100, "%"),
        ("mean_loss_second_half_rel", "2nd half", 100, "%"),
        ("final_loss_rel", "last step's loss", 100, "%"),
        ("final_loss_mean_rel", "final loss (last 10% of steps)", 100, "%"),
        ("final_loss_mean_diff", "final loss difference (millinats)", 1000, ""),
        ("excess_over_floor_rel", "final loss above the noise floor", 100, "%"),
        ("eval_loss_rel", "eval loss", 100, "%"),
        ("eval_accuracy_points", "eval exact match (points)", 1, ""),
    ]
    columns = [c for c in columns if all(c[0] in v["over_seeds"] for v in variants.values())]
    print("| variant | seeds | " + " | ".join(f"{label} vs fp32" for _, label, _, _ in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for variant, v in variants.items():
        cells = []
        for field, _, scale, unit in columns:
            a = v["over_seeds"][field]
            spread = f" [{scale * a['min']:+.1f}, {scale * a['max']:+.1f}]" if a["stdev"] is not None else ""
            cells.append(f"{scale * a['mean']:+.1f}{unit}{spread}")
        print(f"| {variant} | {len(v['seeds'])} | " + " | ".join(cells) + " |")
    for field, label, _, _ in columns[:1] + [
        c for c in columns if c[0] in ("final_loss_mean_rel", "excess_over_floor_rel")
    ]:
        print(f"{label} vs fp32, over seeds: mean / standard error (t), seeds above fp32")
        for variant, v in variants.items():
            a = v["over_seeds"][field]
            if a["t"] is not None:
                print(f"  {variant}: t={a['t']:+.2f}, {a['positive_seeds']}/{len(v['seeds'])} seeds above")
    fp32_runs = {
        int(k.partition("@seed")[2]): r for k, r in runs.items() if k.partition("@seed")[0] == "fp32"
    }
    if any(r["train_loss_floor"] > 0 for r in fp32_runs.values()):
        excess = {
            s: round(1000 * (r["final_loss_mean"] - r["train_loss_floor"]), 1) for s, r in fp32_runs.items()
        }
        print("fp32's final loss above the split's noise floor, per seed (millinats):", excess)
    if noise:
        print(
            "noise floor (fp32 between seeds, max |difference|):", {k: round(x, 4) for k, x in noise.items()}
        )
    if paired_noise:
        print(
            "paired noise floor (null variants vs fp32, max |difference|):",
            {k: round(x, 4) for k, x in paired_noise.items()},
        )


def main(root: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(root)
    (out_dir / "summary.json").write_text(
        json.dumps({k: v for k, v in summary.items() if k != "curves"}, indent=2) + "\n"
    )
    plot(summary, out_dir / "loss.png")
    print_table(summary)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
