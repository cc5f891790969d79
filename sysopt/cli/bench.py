"""sysopt-bench: run benchmark suites from bench/<suite>.py and write bench/results/<suite>.json (+ .png).

sysopt-bench list | all | report | <suite> [--json PATH] [--repeats N] [--quick]

`report` regenerates the results section of bench/README.md from bench/results/*.json; running a suite
into bench/results does that too.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sysopt import benchmark


def bench_dir() -> Path:
    """$SYSOPT_BENCH_DIR, else ./bench, else the bench/ folder beside the installed sysopt package."""
    if env := os.environ.get("SYSOPT_BENCH_DIR"):
        return Path(env)
    if (Path.cwd() / "bench").is_dir():
        return Path.cwd() / "bench"
    import sysopt

    return Path(sysopt.__file__).resolve().parents[1] / "bench"


def available_suites(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.py") if not p.name.startswith("_"))


def load_suite(name: str, folder: Path) -> benchmark.SuiteFn:
    """Import folder/<name>.py by path (it calls register_suite) and return the registered function."""
    path = folder / f"{name}.py"
    if not path.is_file():
        raise SystemExit(
            f"sysopt-bench: no suite {name!r} in {folder}; available: {', '.join(available_suites(folder)) or 'none'} "
            "(set SYSOPT_BENCH_DIR to use another folder)"
        )
    spec = importlib.util.spec_from_file_location(f"sysopt_bench_suites.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if name not in benchmark.SUITES:
        raise SystemExit(
            f"sysopt-bench: {path} did not call register_suite({name!r}); suite names follow file names"
        )
    return benchmark.SUITES[name]


def _profile():
    """The cached calibrated profile when there is one (no calibration is run here), else a probe."""
    from sysopt.hardware import load_cached, probe

    return load_cached() or probe()


def print_summary(result: benchmark.SuiteResult, console: Console) -> None:
    table = Table(title=f"{result.suite}: records", title_justify="left")
    table.add_column("name", overflow="fold")  # long hierarchical names wrap instead of being cut
    for col in ("value", "unit", "min", "max"):
        table.add_column(col, justify="left" if col == "unit" else "right", no_wrap=True)
    for r in result.records:
        table.add_row(r.name, f"{r.value:.4g}", r.unit, f"{r.min:.4g}", f"{r.max:.4g}")
    console.print(table)
    if result.goals:
        goals = Table(title=f"{result.suite}: goals", title_justify="left")
        goals.add_column("goal", overflow="fold")
        for col in ("value", "target", "met"):
            goals.add_column(col, no_wrap=True)
        for g in result.goals:
            goals.add_row(g.name, f"{g.value:.4g}", g.target, "[green]yes[/]" if g.met else "[red]no[/]")
        console.print(goals)


def run_suite(
    name: str, folder: Path, ctx: benchmark.BenchContext, json_path: Path | None, console: Console
) -> Path:
    suite = load_suite(name, folder)
    result = suite(dataclasses.replace(ctx, started_commit=benchmark.git_commit()))
    if result.suite != name:
        raise SystemExit(f"sysopt-bench: suite file {name}.py returned a result for suite {result.suite!r}")
    json_path = json_path or ctx.out_dir / f"{name}.json"
    _, png_path = benchmark.write_result(result, json_path)
    print_summary(result, console)
    console.print(f"wrote {json_path} and {png_path}")
    if json_path.parent.resolve() == (folder / "results").resolve():
        _report(folder, console)
    return json_path


def _report(folder: Path, console: Console) -> None:
    from sysopt.bench_report import update_readme

    readme = folder / "README.md"
    if readme.is_file():
        changed = update_readme(readme, folder / "results")
        console.print(f"{'updated' if changed else 'unchanged'}: results table in {readme}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sysopt-bench", description=__doc__.splitlines()[0])
    parser.add_argument("suite", help="a suite name (a file bench/<suite>.py), 'all', 'list' or 'report'")
    parser.add_argument(
        "--json", type=Path, default=None, help="result path (default bench/results/<suite>.json)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per figure (default 5; 3 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    args = parser.parse_args(argv)
    console = Console()
    folder = bench_dir()
    names = available_suites(folder)
    if args.suite == "list":
        console.print("\n".join(names) if names else f"no suites in {folder}")
        return 0
    if args.suite == "report":
        _report(folder, console)
        return 0
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1")
    if args.suite == "all" and args.json is not None:
        parser.error("--json names one file; with 'all' each suite writes bench/results/<suite>.json")
    ctx = benchmark.BenchContext(
        repeats=args.repeats or (3 if args.quick else 5),
        quick=args.quick,
        # a suite's other artefacts (timeline PNGs, raw JSON) go beside its result: a --json run elsewhere
        # must not overwrite the committed ones under bench/results
        out_dir=args.json.parent if args.json is not None else folder / "results",
        profile=_profile(),
        show_progress=True,
    )
    if args.suite != "all":
        run_suite(args.suite, folder, ctx, args.json, console)
        return 0
    failed = []
    for name in names:  # one failing suite does not stop the others
        try:
            run_suite(name, folder, ctx, None, console)
        except Exception as exc:  # noqa: BLE001 - reported, and the exit status says so
            console.print(f"[red]suite {name} failed: {type(exc).__name__}: {exc}[/]")
            failed.append(name)
    if failed:
        console.print(f"[red]failed suites: {', '.join(failed)}[/]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
