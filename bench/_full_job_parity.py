"""Summarise full-length parity runs (the default 1,500-step job, one `sysopt-train` run per variant) into a
JSON and a PNG: `python bench/_full_job_parity.py RUNS_DIR OUT_DIR`, where RUNS_DIR holds one run directory
per variant (hydra.run.dir=RUNS_DIR/<name>), one of them named fp32 (the reference). Not a suite (the
leading underscore): the runs take about 40 minutes on 2 cores and are started by hand, e.g.
  sysopt-train hydra.run.dir=RUNS/fp32
  sysopt-train hydra.run.dir=RUNS/fp32_seed1 model.seed=1          # the noise floor
  sysopt-train hydra.run.dir=RUNS/bf16state offload=host offload.state_dtype=bf16
  sysopt-train hydra.run.dir=RUNS/int8_rowwise precision=int8_rowwise   # and each other recipe
"""

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

root = Path(sys.argv[1])
out_dir = Path(sys.argv[2])
out_dir.mkdir(parents=True, exist_ok=True)
runs = {}
for d in sorted(p for p in root.iterdir() if (p / "summary.json").is_file()):
    s = json.loads((d / "summary.json").read_text())
    m = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [r["step"] for r in m if "loss" in r]
    losses = [r["loss"] for r in m if "loss" in r]
    half = losses[len(losses) // 2 :]
    acc = s["eval_accuracy"]
    runs[d.name] = {
        "overrides": json.loads((d / "job.json").read_text()).get("precision", {}),
        "final_loss": s["final_loss"],
        "mean_logged_loss_whole_run": statistics.mean(losses),
        "mean_logged_loss_second_half": statistics.mean(half),
        "eval_accuracy": acc,
        "mean_eval_accuracy": statistics.mean(acc.values()),
        "step_time_s": s["step_time_s"],
        "steps": s["steps"],
        "curve": [steps, losses],
    }
ref = runs["fp32"]
for r in runs.values():
    r["vs_fp32"] = {
        "mean_loss_whole_run_rel": r["mean_logged_loss_whole_run"] / ref["mean_logged_loss_whole_run"] - 1,
        "mean_loss_second_half_rel": r["mean_logged_loss_second_half"] / ref["mean_logged_loss_second_half"]
        - 1,
        "eval_accuracy_points": 100 * (r["mean_eval_accuracy"] - ref["mean_eval_accuracy"]),
        "worst_task_points": min(
            100 * (r["eval_accuracy"][t] - ref["eval_accuracy"][t]) for t in ref["eval_accuracy"]
        ),
    }
(out_dir / "summary.json").write_text(
    json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "curve"} for k, v in runs.items()}, indent=2)
    + "\n"
)
fig, ax = plt.subplots(figsize=(9, 5))
for name, r in runs.items():
    ax.plot(
        *r["curve"], label=f"{name} ({100 * r['mean_eval_accuracy']:.1f}%)", lw=1.2 if name != "fp32" else 2.5
    )
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("training loss (logged every 25 steps)")
ax.set_title("default job, 1,500 steps, dp=2: each variant against fp32 (mean eval exact match in legend)")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out_dir / "loss.png", dpi=100)
for name, r in runs.items():
    v = r["vs_fp32"]
    print(
        f"| {name} | {r['mean_logged_loss_whole_run']:.4f} | {100 * v['mean_loss_whole_run_rel']:+.1f}% | {r['mean_logged_loss_second_half']:.4f} | {100 * v['mean_loss_second_half_rel']:+.1f}% | {100 * r['mean_eval_accuracy']:.2f} | {v['eval_accuracy_points']:+.2f} | {v['worst_task_points']:+.2f} | {1e3 * r['step_time_s']:.1f} |"
    )
