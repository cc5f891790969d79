"""sysopt-probe: show what this machine is (CPU, GPUs) and, with --calibrate, what it measured.

sysopt-probe [--json] [--calibrate] [--quick] [--refresh] [--cache PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

from sysopt.hardware import HardwareProfile, LinkFit, load_or_calibrate, probe

GIB = 1024**3


def _fit_row(table: Table, name: str, fit: LinkFit | None) -> None:
    if fit is None:
        table.add_row(name, "-", "-")
    else:
        table.add_row(name, f"{fit.latency_s * 1e6:.1f} µs", f"{fit.bytes_per_s / 1e9:.2f} GB/s")


def render(profile: HardwareProfile, console: Console) -> None:
    cpu = Table(title="CPU", title_justify="left", show_header=False)
    cpu.add_row("model", profile.cpu.model)
    cpu.add_row("cores / threads", f"{profile.cpu.cores} / {profile.cpu.threads}")
    cpu.add_row("ISA", " ".join(profile.cpu.isa) or "(none of the tracked flags)")
    cpu.add_row("host memory", f"{profile.cpu.host_memory_bytes / GIB:.1f} GiB")
    console.print(cpu)

    if not profile.gpus:
        console.print("GPUs: none found (no NVML, or no NVIDIA device)")
    else:
        gpus = Table(title="GPUs", title_justify="left")
        for col in ("#", "name", "memory free / total", "PCIe", "NVLink links", "SM / mem clock"):
            gpus.add_column(col)
        for g in profile.gpus:
            pcie = f"gen{g.pcie_gen} x{g.pcie_width}" if g.pcie_gen else "?"
            clocks = f"{g.sm_clock_mhz or '?'} / {g.memory_clock_mhz or '?'} MHz"
            mem = f"{g.memory_free_bytes / GIB:.1f} / {g.memory_total_bytes / GIB:.1f} GiB"
            name = f"{g.name} (MIG slice)" if g.mig and "MIG" not in g.name else g.name
            gpus.add_row(str(g.index), name, mem, pcie, str(g.nvlink_links), clocks)
        console.print(gpus)

    cal = profile.calibration
    if cal is None:
        console.print("calibration: not run (use --calibrate)")
        return
    threads = f", {cal.threads} thread{'s' if cal.threads != 1 else ''}" if cal.threads else ""
    mm = Table(title=f"matmul on {cal.device}{threads}", title_justify="left")
    mm.add_column("dtype")
    mm.add_column("best GFLOP/s", justify="right")
    for dtype, rate in cal.matmul_flops_per_s.items():
        mm.add_row(dtype, f"{rate / 1e9:.1f}")
    console.print(mm)
    links = Table(title="links (time = latency + bytes / bandwidth)", title_justify="left")
    for col in ("link", "latency", "bandwidth"):
        links.add_column(col)
    for kind, fit in cal.copy.items():
        _fit_row(links, f"copy {kind}", fit)
    ws = f"world_size={cal.collective_world_size}, {cal.collective_backend or 'none'}"
    _fit_row(links, f"p2p ({ws})", cal.p2p)
    _fit_row(links, f"all-reduce ({ws})", cal.allreduce)
    console.print(links)
    opt = ", ".join(
        f"{where} {rate / 1e6:.0f} M params/s" for where, rate in cal.optimizer_params_per_s.items()
    )
    console.print(f"AdamW update: {opt}\ncalibrated: {cal.created}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sysopt-probe", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the profile as JSON (for machines)")
    parser.add_argument(
        "--calibrate", action="store_true", help="include calibration (cached after the first run)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a quick calibration (smaller sizes, fewer repeats)"
    )
    parser.add_argument(
        "--refresh", action="store_true", help="recalibrate, ignoring the cache (implies --calibrate)"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache file (default ~/.cache/sysopt/profile-<host>-<device>-t<threads>-w<ranks>[-quick].json)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads to calibrate with (default: current)",
    )
    parser.add_argument(
        "--world-size", type=int, default=2, help="ranks the collectives are calibrated over (default 2)"
    )
    parser.add_argument(
        "--device", default=None, help="device to calibrate compute on, e.g. cpu (default: a GPU if present)"
    )
    args = parser.parse_args(argv)
    for name in ("threads", "world_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}={value} must be >= 1")
    err = Console(stderr=True)  # progress and notes on stderr, so --json output stays clean
    if args.calibrate or args.refresh:

        def progress(steps, description):
            return track(list(steps), description=description, console=err, transient=True)

        profile = load_or_calibrate(
            args.cache, quick=args.quick, refresh=args.refresh, progress=progress,
            threads=args.threads, world_size=args.world_size, device=args.device,
        )  # fmt: skip
    else:
        profile = probe()
    if args.json:
        print(profile.to_json())
    else:
        render(profile, Console())
    return 0


if __name__ == "__main__":
    sys.exit(main())
