"""sysopt.benchmark and sysopt-bench: the result JSON shape, goal targets, measure(), atomic
result files, and the CLI running the real calibrate suite in quick mode."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import statistics
from pathlib import Path

import pytest
import torch

from sysopt import benchmark
from sysopt.benchmark import (
    BenchContext,
    Goal,
    Record,
    SuiteResult,
    goal,
    goal_ratio,
    load_result,
    measure,
    parse_target,
    write_result,
)
from sysopt.cli import bench as bench_cli

REPO_BENCH = Path(__file__).resolve().parents[1] / "bench"


def sample_result() -> SuiteResult:
    a = Record(
        "interleaved_1f1b/multimodal/measured_step_s", 0.412, "s", 5, 0.405, 0.431, {"pp": 4, "vpp": 2}
    )
    b = Record("megatron/multimodal/measured_step_s", 0.425, "s", 5, 0.42, 0.44, {"pp": 4})
    c = Record("matmul/int8/1024/flops_per_s", 1.8e12, "FLOP/s", 3, 1.7e12, 1.9e12, {})
    goals = (goal_ratio("interleaved_1f1b vs megatron-core", a, b, "<= 1.0"),)
    return SuiteResult(
        "schedules", "2025-01-01T00:00:00+00:00", {"cpu": {"cores": 2}}, {"torch": "2.13.0"}, (a, b, c), goals
    )


def test_suite_result_json_shape_and_round_trip():
    result = sample_result()
    d = json.loads(result.to_json())
    assert list(d) == ["suite", "created", "profile", "versions", "records", "goals"]
    assert list(d["records"][0]) == ["name", "value", "unit", "repeats", "min", "max", "config"]
    assert list(d["goals"][0]) == ["name", "value", "target", "met", "from"]
    assert d["goals"][0]["from"] == [d["records"][0]["name"], d["records"][1]["name"]]
    assert SuiteResult.from_json(result.to_json()) == result
    assert result.record("matmul/int8/1024/flops_per_s").unit == "FLOP/s"


def test_suite_result_rejects_inconsistent_goals_and_records():
    r = sample_result()
    with pytest.raises(ValueError, match="unique"):
        SuiteResult("s", r.created, {}, {}, r.records + r.records[:1], ())
    orphan = goal("orphan", 1.0, ">= 1", ["no/such/record"])
    with pytest.raises(ValueError, match="no/such/record"):
        SuiteResult("s", r.created, {}, {}, r.records, (orphan,))


@pytest.mark.parametrize(
    "value, target, met",
    [
        (1.0, "<= 1.0", True),
        (1.0, "< 1.0", False),
        (1.031, "<= 1.03", False),
        (1.3, ">= 1.3", True),
        (1.29, ">=1.3", False),
        (2.0, "> 1.5e0", True),
        (-0.5, "> -1", True),
        (0.999, "== 1", False),
        (float("nan"), "<= 1.0", False),
    ],
)
def test_goal_target_parsing(value, target, met):
    assert goal("g", value, target, []).met is met


@pytest.mark.parametrize("bad", ["1.03", "<= ", "=< 1", "<= abc", "~ 1", ""])
def test_malformed_targets_are_rejected(bad):
    with pytest.raises(ValueError, match="target"):
        parse_target(bad)
    with pytest.raises(ValueError, match="target"):
        Goal("g", 1.0, bad, True, ())


def test_goal_ratio_value_and_met():
    fast = Record("a", 2.0, "s", 1, 2.0, 2.0)
    slow = Record("b", 2.6, "s", 1, 2.6, 2.6)
    speedup = goal_ratio("speed-up", slow, fast, ">= 1.3")
    assert speedup.value == pytest.approx(2.6 / 2.0) and speedup.met and speedup.from_ == ("b", "a")
    assert not goal_ratio("slow-down", fast, slow, ">= 1.3").met
    with pytest.raises(ValueError, match="value 0"):
        goal_ratio("x", fast, Record("zero", 0.0, "s", 1, 0.0, 0.0), ">= 1")


def test_measure_takes_median_min_max_after_warmup(monkeypatch):
    durations = [3.0, 1.0, 2.0, 5.0, 4.0]
    clock = iter(x for d in durations for x in (0.0, d))  # start/stop pairs of a fake perf_counter
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: next(clock))
    calls = []
    rec = measure(lambda: calls.append(1), repeats=5, warmup=2, name="op", config={"n": 1})
    assert len(calls) == 7
    assert (rec.value, rec.min, rec.max) == (statistics.median(durations), min(durations), max(durations))
    assert (rec.name, rec.unit, rec.repeats, rec.config) == ("op", "s", 5, {"n": 1})
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda: None, repeats=0, name="op")


def _no_tmp_left(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_write_result_writes_json_and_png_atomically(tmp_path, monkeypatch):
    import matplotlib.image

    result = sample_result()
    json_path, png_path = write_result(result, tmp_path / "results" / "schedules.json")
    assert png_path == tmp_path / "results" / "schedules.png"
    assert load_result(json_path) == result
    height, width = matplotlib.image.imread(png_path).shape[:2]
    assert height > 100 and width > 100
    assert _no_tmp_left(json_path.parent)
    old_json, old_png = json_path.read_bytes(), png_path.read_bytes()

    bad = SuiteResult("schedules", "t", {}, {}, (Record("x", 1.0, "s", 1, 1.0, 1.0, {"obj": object()}),), ())
    with pytest.raises(TypeError):  # not JSON-serialisable: nothing is touched
        write_result(bad, json_path)

    def broken_plot(result, path):
        Path(path).write_bytes(b"half a png")
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(benchmark, "plot_result", broken_plot)
    newer = SuiteResult.from_dict({**result.to_dict(), "created": "2026-01-01T00:00:00+00:00"})
    with pytest.raises(RuntimeError, match="renderer"):  # the PNG failed: the JSON is not replaced either
        write_result(newer, json_path)
    assert (json_path.read_bytes(), png_path.read_bytes()) == (old_json, old_png)
    assert _no_tmp_left(json_path.parent)


TOY_SUITE = """
from sysopt.benchmark import Record, goal_ratio, register_suite

@register_suite("{name}")
def run(ctx):
    if {fail}:
        raise RuntimeError("toy failure")
    steps = list(ctx.track(range(3), "toy"))
    a = Record("toy/a", 2.0, "s", ctx.repeats, 1.5, 2.5, {{"steps": len(steps)}})
    b = Record("toy/b", 1.0, "s", ctx.repeats, 1.0, 1.0)
    return ctx.result("{name}", [a, b], [goal_ratio("a over b", a, b, ">= 1.5")])
"""


def test_cli_lists_and_runs_all_suites_in_a_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "toy.py").write_text(TOY_SUITE.format(name="toy", fail=False))
    (tmp_path / "broken.py").write_text(TOY_SUITE.format(name="broken", fail=True))
    (tmp_path / "_helpers.py").write_text("raise AssertionError('helpers are not suites')\n")
    monkeypatch.setenv("SYSOPT_BENCH_DIR", str(tmp_path))
    monkeypatch.setenv("SYSOPT_CACHE_DIR", str(tmp_path / "cache"))
    assert bench_cli.main(["list"]) == 0
    assert capsys.readouterr().out.split() == ["broken", "toy"]
    with pytest.raises(SystemExit, match="available: broken, toy"):
        bench_cli.main(["nosuch"])
    assert bench_cli.main(["all", "--repeats", "2"]) == 1  # broken failed, toy still ran
    toy = load_result(tmp_path / "results" / "toy.json")
    assert (tmp_path / "results" / "toy.png").is_file() and not (
        tmp_path / "results" / "broken.json"
    ).exists()
    assert toy.record("toy/a").repeats == 2 and toy.record("toy/a").config == {"steps": 3}
    assert toy.goals[0].value == 2.0 and toy.goals[0].met
    assert toy.profile["cpu"]["cores"] >= 1  # the probed profile rides along
    assert toy.versions["torch"] == importlib.metadata.version("torch")


@pytest.mark.timeout(120)
def test_cli_runs_calibrate_suite_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("SYSOPT_BENCH_DIR", str(REPO_BENCH))
    monkeypatch.setenv("SYSOPT_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier on a shared 2-core machine
    try:
        out = tmp_path / "calibrate.json"
        assert bench_cli.main(["calibrate", "--quick", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = load_result(out)
    assert out.with_suffix(".png").is_file() and _no_tmp_left(tmp_path)
    assert result.suite == "calibrate" and result.versions["python"]
    cal = result.profile["calibration"]
    records = {r.name: r for r in result.records}
    for p in cal["matmul"]:  # each calibrated point appears as a FLOP/s record with its spread
        r = records[f"matmul/{p['dtype']}/{p['m']}x{p['n']}x{p['k']}/flops_per_s"]
        assert r.value == pytest.approx(p["flops_per_s"]) and r.min <= r.value <= r.max and r.unit == "FLOP/s"
    for prefix, fit in [
        ("copy/memcpy", cal["copy"]["memcpy"]),
        ("p2p", cal["p2p"]),
        ("allreduce", cal["allreduce"]),
    ]:
        assert records[f"{prefix}/latency_s"].value == fit["latency_s"] > 0
        assert records[f"{prefix}/bytes_per_s"].value == fit["bytes_per_s"] > 0
    assert records["optimizer/host/params_per_s"].value == pytest.approx(
        cal["optimizer_params_per_s"]["host"]
    )
    assert {g.name.split()[0] for g in result.goals} >= {"bf16", "int8"}
    for g in result.goals:  # each goal is the ratio of the two records it names
        num, den = (records[n].value for n in g.from_)
        assert g.value == pytest.approx(num / den) and g.met == (g.value >= 1.0)


def test_bench_context_result_stamps_profile_and_versions():
    ctx = BenchContext(repeats=1, quick=True, out_dir=Path("."), profile=None)
    r = Record("x", 1.0, "s", 1, 1.0, 1.0)
    result = ctx.result("toy", [r], [])
    assert result.profile == {} and result.versions["sysopt"] and result.records == (r,)
    assert datetime.datetime.fromisoformat(result.created).tzinfo is not None


# ---- bench/README.md results section -------------------------------------------------------------


def test_report_table_comes_from_the_json_and_keeps_the_prose(tmp_path):
    from sysopt.bench_report import BEGIN, END, update_readme

    results = tmp_path / "results"
    write_result(sample_result(), results / "schedules.json")
    missed = Record("toy/ratio", 0.5, "x", 1, 0.5, 0.5, {})
    other = SuiteResult("toy", "2025-01-02T00:00:00+00:00", {}, {"git_commit": "abc123def4567890"}, (missed,),
                        (goal("toy | ratio", 0.5, ">= 1.0", ["toy/ratio"]),))  # fmt: skip
    write_result(other, results / "toy.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"# intro\n\n{BEGIN}\nstale table\n{END}\n\ntrailing prose\n")
    assert update_readme(readme, results)
    text = readme.read_text()
    assert text.startswith("# intro\n") and text.endswith(f"{END}\n\ntrailing prose\n")
    assert "stale table" not in text
    assert "| interleaved_1f1b vs megatron-core | 0.9694 | <= 1.0 | yes |" in text  # 0.412 / 0.425
    assert "| toy \\| ratio | 0.5 | >= 1.0 | **no** |" in text
    assert "commit `abc123def456`" in text and text.index("### schedules") < text.index("### toy")
    assert not update_readme(readme, results)  # regenerating unchanged results changes nothing


def test_report_without_markers_is_a_clear_error(tmp_path):
    from sysopt.bench_report import update_readme

    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="must contain the line"):
        update_readme(readme, tmp_path)
    assert readme.read_text() == "no markers\n"


def test_committed_bench_readme_matches_committed_results(tmp_path):
    """bench/README.md's results section is what `sysopt-bench report` makes of bench/results/*.json."""
    import shutil

    from sysopt.bench_report import update_readme

    copy = tmp_path / "README.md"
    shutil.copy(REPO_BENCH / "README.md", copy)
    assert not update_readme(copy, REPO_BENCH / "results"), (
        "run `sysopt-bench report` and commit bench/README.md"
    )


def test_planner_suite_turns_the_plan_records_into_goals(tmp_path, monkeypatch):
    """The planner suite's goals, from a faked sysopt-plan run: per-config error, the count within 15%, and the
    top choice (the spread's first) against the fastest measured."""
    from sysopt.cli import plan
    from sysopt.hardware import probe

    rows = [("top", 0.100, 0.110), ("b", 0.050, 0.080), ("c", 0.200, 0.190)]  # label, predicted, measured

    def fake_main(argv):
        out = Path(argv[argv.index("--json") + 1])
        records = [
            {"config": {"tp": 1}, "label": label, "predicted_step_s": p, "measured_step_s": m,
             "status": "measured", "times_s": [0.99 * m, m, 1.02 * m]}
            for label, p, m in rows
        ]  # fmt: skip
        out.write_text(json.dumps({"ranking": [], "records": records}))
        return 0

    monkeypatch.setattr(plan, "main", fake_main)
    monkeypatch.setattr("sysopt.hardware.load_or_calibrate", lambda **kw: probe())
    suite = bench_cli.load_suite("planner", bench_cli.bench_dir())
    result = suite(benchmark.BenchContext(repeats=3, out_dir=tmp_path))
    by_name = {g.name: g for g in result.goals}
    assert by_name["top: |predicted / measured - 1|"].value == pytest.approx(abs(0.100 / 0.110 - 1))
    assert by_name["b: |predicted / measured - 1|"].met is False  # 37.5% off
    assert by_name["configurations predicted within 15% of measured"].value == 2
    top = by_name["planner's top choice (measured) / fastest measured"]
    assert top.value == pytest.approx(0.110 / 0.080) and not top.met
    assert result.record("b/measured_step_s").min == pytest.approx(0.99 * 0.080)
    assert (tmp_path / "planner" / "measured_spread.json").is_file() and (
        tmp_path / "planner_scatter.png"
    ).is_file()


def test_planner_suite_does_not_take_the_runner_up_for_a_top_choice_that_did_not_run(tmp_path, monkeypatch):
    from sysopt.cli import plan
    from sysopt.hardware import probe

    def fake_main(argv):
        records = [
            {"config": {"tp": 1}, "label": label, "predicted_step_s": 0.1, "measured_step_s": m,
             "status": status, "times_s": None}
            for label, m, status in (("top", None, "failed: out of memory"), ("b", 0.08, "measured"))
        ]  # fmt: skip
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps({"ranking": [], "records": records}))
        return 0

    monkeypatch.setattr(plan, "main", fake_main)
    monkeypatch.setattr("sysopt.hardware.load_or_calibrate", lambda **kw: probe())
    suite = bench_cli.load_suite("planner", bench_cli.bench_dir())
    result = suite(benchmark.BenchContext(repeats=3, out_dir=tmp_path))
    (top,) = [g for g in result.goals if g.name.startswith("planner's top choice")]
    assert not top.met and "did not run: failed: out of memory" in top.name  # b / b would read 1.0, met


def test_git_commit_is_dirty_for_code_changes_not_for_benchmark_outputs(tmp_path):
    import subprocess

    from sysopt.benchmark import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "bench" / "README.md").write_text("table\n")
    (tmp_path / "bench" / "results" / "s.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    clean = git_commit(tmp_path)
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "bench" / "results" / "s.json").write_text('{"new": 1}\n')
    (tmp_path / "bench" / "README.md").write_text("new table\n")
    assert git_commit(tmp_path) == clean  # a suite's own outputs
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == clean + "-dirty"
    git("checkout", "-q", "--", "code.py")
    (tmp_path / "new_module.py").write_text("y = 1\n")  # not yet added, but it runs
    assert git_commit(tmp_path) == clean + "-dirty"


def test_a_suite_whose_code_changed_while_it_ran_is_stamped_dirty(monkeypatch):
    from sysopt.benchmark import BenchContext, git_commit

    now = git_commit()
    if now is None:
        pytest.skip("not a git checkout")
    same = BenchContext(started_commit=now).result("s", [], [])
    assert same.versions["git_commit"] == now and "git_commit_at_end" not in same.versions
    moved = BenchContext(started_commit="0" * 40).result("s", [], [])  # another commit when it started
    assert moved.versions["git_commit"] == "0" * 40 + "-dirty"
    assert moved.versions["git_commit_at_end"] == now
    monkeypatch.setattr(benchmark, "git_commit", lambda repo=None: None)  # git gone at the end: not a change
    unknown = BenchContext(started_commit=now).result("s", [], [])
    assert unknown.versions["git_commit"] is None and "git_commit_at_end" not in unknown.versions


def test_readme_reports_the_load_averages_a_suites_records_carry():
    from sysopt.bench_report import suite_section

    records = (Record("a", 1.0, "s", 1, 1.0, 1.0, {"loadavg_1min_before_after": [1.04, 2.15]}),
               Record("b", 1.0, "s", 1, 1.0, 1.0, {"loadavg_1min_before": 0.5, "loadavg_1min_after": 0.7}))  # fmt: skip
    result = SuiteResult("toy", "2025-01-02T00:00:00+00:00", {}, {"git_commit": "x"}, records, ())
    assert "load average during the run: 0.5-2.1 (1-minute" in suite_section(result, "toy.json")


def test_readme_keeps_the_dirty_mark_of_a_shortened_commit():
    from sysopt.bench_report import suite_section

    result = SuiteResult("toy", "2025-01-02T00:00:00+00:00", {}, {"git_commit": "0123456789abcdef" * 2 + "-dirty"},
                         (), ())  # fmt: skip
    assert "commit `0123456789ab-dirty`" in suite_section(result, "toy.json")


def test_cli_json_elsewhere_keeps_the_suites_artefacts_beside_it(tmp_path, monkeypatch):
    """With --json outside bench/results, a suite's other artefacts (its ctx.out_dir files) land beside that
    JSON: a trial run must not overwrite the committed ones under bench/results."""
    folder = tmp_path / "bench"
    (folder / "results").mkdir(parents=True)
    (folder / "artefact.py").write_text(
        "from sysopt.benchmark import register_suite\n"
        "@register_suite('artefact')\n"
        "def run(ctx):\n"
        "    (ctx.out_dir / 'side.txt').write_text('x')\n"
        "    return ctx.result('artefact', [], [])\n"
    )
    monkeypatch.setenv("SYSOPT_BENCH_DIR", str(folder))
    monkeypatch.setattr(bench_cli, "_profile", lambda: None)
    elsewhere = tmp_path / "trial"
    elsewhere.mkdir()
    assert bench_cli.main(["artefact", "--json", str(elsewhere / "artefact.json")]) == 0
    assert (elsewhere / "side.txt").is_file() and (elsewhere / "artefact.json").is_file()
    assert not (folder / "results" / "side.txt").exists()


# ---- precision_parity: pairing by seed, goals on the mean, reuse of finished runs --------------------------


def test_precision_parity_pairs_runs_by_seed_and_reuses_finished_ones(tmp_path, monkeypatch):
    import sys

    suite = bench_cli.load_suite("precision_parity", bench_cli.bench_dir())
    mod = sys.modules["sysopt_bench_suites.precision_parity"]
    fp32 = {0: (0.50, 0.90), 1: (0.60, 0.80)}  # seed -> (final loss, mean eval accuracy)
    off = {"fp8_rowwise": {0: (0.96, 0.01), 1: (1.03, 0.0)}}  # relative loss, accuracy offset vs fp32
    calls = []

    def fake_training(job, run_dir):
        run_dir = Path(run_dir)
        calls.append(run_dir.name)
        variant, seed = run_dir.name.split("@seed")
        loss, acc = fp32[int(seed)]
        rel, dacc = off.get(variant, {}).get(int(seed), (1.0, 0.0))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "job.json").write_text(job.to_json())
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 3.0}) + "\n")
        summary = {"final_loss": loss * rel, "final_loss_mean": loss * rel, "train_loss_floor": 0.45,
                   "eval_loss": 0.2, "eval_accuracy": {"a": acc + dacc, "b": acc + dacc},
                   "step_time_s": 0.05, "steps": job.train.max_steps}  # fmt: skip
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(mod, "run_training", fake_training)
    monkeypatch.setattr(mod, "SEEDS", 2)
    monkeypatch.setattr(mod, "git_commit", lambda: "abc123")  # a clean commit: runs go to the reusable cache
    monkeypatch.setenv("SYSOPT_PARITY_DIR", str(tmp_path / "cache"))
    root, temporary = mod._runs_root(quick=False)
    assert not temporary and root.parent == tmp_path / "cache" and root.name.startswith("abc123_")
    stale = root / "int8_rowwise@seed1"  # another job's run in the cache
    stale.mkdir(parents=True)
    (stale / "job.json").write_text(mod.compose_job([]).to_json())
    (stale / "summary.json").write_text(json.dumps({"steps": 1500, "eval_accuracy": {}}))
    (stale / "marker").touch()
    partial = stale.parent / "fp32@seed0"  # this job's run, interrupted before its summary: trained again
    partial.mkdir()
    (partial / "job.json").write_text(mod.compose_job(mod.job_overrides([], 0, False)).to_json())
    (partial / "marker").touch()
    ctx = benchmark.BenchContext(repeats=1, out_dir=tmp_path / "out")
    result = suite(ctx)
    assert len(calls) == 2 * len(mod.variants(mod.compose_job([])))  # the stale and partial runs too
    assert not (stale / "marker").exists() and (partial / "marker").exists()  # another job's run was removed
    goals = {g.name: g for g in result.goals}
    loss = goals["fp8_rowwise: |final loss / fp32 - 1|, mean of 2 paired seeds"]
    assert loss.value == pytest.approx(abs((-0.04 + 0.03) / 2)) and loss.met  # each seed against its own fp32
    acc = goals["fp8_rowwise: |eval exact match - fp32, points|, mean of 2 paired seeds"]
    assert acc.value == pytest.approx(0.5) and acc.met
    assert result.record("parity/fp8_rowwise/final_loss_vs_fp32").value == pytest.approx(-0.005)
    assert result.record("parity/fp8_rowwise/final_loss_vs_fp32").min == pytest.approx(-0.04)
    assert any("control null_lr_x1.0001" in g.name and "informative" in g.name for g in result.goals)
    assert (ctx.out_dir / mod.SUMMARY_JSON).is_file() and (ctx.out_dir / mod.LOSS_PNG).is_file()
    from sysopt.bench_report import results_markdown

    benchmark.write_result(result, ctx.out_dir / "precision_parity.json")
    assert "### precision_parity" in results_markdown(ctx.out_dir)  # its runs' JSON is not read as a result
    calls.clear()
    off["fp8_rowwise"][0] = (1.10, 0.0)  # not seen again: the finished runs of the same jobs are reused
    again = {g.name: g.value for g in suite(ctx).goals}
    assert calls == [] and again[loss.name] == pytest.approx(loss.value)
