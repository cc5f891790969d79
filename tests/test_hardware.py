"""sysopt.hardware: profile JSON round trip, probing without a GPU, a fake NVML, the alpha-beta fit,
a real quick calibration, and the profile cache."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import types
import warnings
from pathlib import Path

import pytest

from sysopt.hardware import (
    ISA_FLAGS,
    Calibration,
    CPUInfo,
    GPUInfo,
    HardwareProfile,
    LinkFit,
    MatmulPoint,
    calibrate,
    fit_alpha_beta,
    load_or_calibrate,
    probe,
)
from sysopt.hardware import cache as cache_module
from sysopt.hardware import calibration as calibration_module
from sysopt.hardware.probe import parse_cpuinfo


def handmade_profile() -> HardwareProfile:
    points = (
        MatmulPoint("fp32", 512, 512, 512, 2.0e-3, 2 * 512**3 / 2.0e-3),
        MatmulPoint("fp32", 1024, 1024, 1024, 1.0e-2, 2 * 1024**3 / 1.0e-2),
        MatmulPoint("bf16", 1024, 1024, 1024, 2.5e-3, 2 * 1024**3 / 2.5e-3),
    )
    cal = Calibration(
        device="cuda:0",
        matmul=points,
        matmul_flops_per_s={"fp32": points[1].flops_per_s, "bf16": points[2].flops_per_s},
        copy={k: LinkFit(1e-5, 2.5e10) for k in ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable")},
        p2p=None,
        allreduce=LinkFit(3.0e-5, 1.2e10),
        collective_world_size=2,
        collective_backend="nccl",
        optimizer_params_per_s={"host": 2.0e8, "device": 5.0e9},
        created="2025-01-01T00:00:00+00:00",
    )
    gpu = GPUInfo(0, "Fake H100", 80 << 30, 79 << 30, 5, 16, 18, 1980, None, (9, 0))
    cpu = CPUInfo("Fake Xeon", 8, 16, ("avx2", "avx512f"), 64 << 30)
    return HardwareProfile(cpu=cpu, gpus=(gpu,), calibration=cal, created="2025-01-01T00:00:00+00:00")


# ---- profile JSON -----------------------------------------------------------------------------


def test_profile_json_round_trip(tmp_path):
    profile = handmade_profile()
    assert HardwareProfile.from_json(profile.to_json()) == profile
    assert HardwareProfile.load(profile.save(tmp_path / "p.json")) == profile
    uncalibrated = dataclasses.replace(profile, calibration=None, gpus=())
    assert HardwareProfile.from_json(uncalibrated.to_json()) == uncalibrated
    d = json.loads(profile.to_json())
    assert set(d) == {"cpu", "gpus", "calibration", "created"}
    assert set(d["calibration"]["copy"]["h2d_pinned"]) == {"latency_s", "bytes_per_s"}
    assert [f.name for f in dataclasses.fields(GPUInfo)] == list(d["gpus"][0])
    # profiles written before GPUs recorded their compute capability still load, without it
    del d["gpus"][0]["compute_capability"]
    assert HardwareProfile.from_json(json.dumps(d)).gpus[0].compute_capability is None
    # profiles written before the tensor-parallel fits existed still load, without them
    for key in ("tp_collectives", "tp_chunk_overhead_s"):
        del d["calibration"][key]
    old = HardwareProfile.from_json(json.dumps(d))
    assert old.calibration.tp_collectives == {} and old.calibration.tp_chunk_overhead_s is None
    with_tp = dataclasses.replace(
        profile.calibration, tp_collectives={"all_gather": LinkFit(1e-3, 1e9)}, tp_chunk_overhead_s=2e-4
    )
    assert (
        HardwareProfile.from_json(dataclasses.replace(profile, calibration=with_tp).to_json()).calibration
        == with_tp
    )


def test_cost_queries_follow_the_calibration():
    profile = handmade_profile()
    cal = profile.calibration
    # at a measured shape the model returns the measured time
    assert profile.matmul_time_s(1024, 1024, 1024, "bf16") == pytest.approx(2.5e-3, rel=1e-12)
    assert profile.matmul_time_s(512, 512, 512) == pytest.approx(2.0e-3, rel=1e-12)
    # a dtype never calibrated falls back to fp32
    assert profile.matmul_time_s(1024, 1024, 1024, "int8") == profile.matmul_time_s(1024, 1024, 1024, "fp32")
    assert profile.copy_time_s(1 << 20, pinned=False, direction="d2h") == pytest.approx(
        1e-5 + (1 << 20) / 2.5e10
    )
    assert profile.allreduce_time_s(4096) == pytest.approx(3.0e-5 + 4096 / 1.2e10)
    assert profile.optimizer_update_time_s(10**9, where="device") == pytest.approx(10**9 / 5.0e9)
    with pytest.raises(ValueError, match="world_size"):
        profile.p2p_time_s(4096)  # p2p is None in this profile
    with pytest.raises(ValueError, match="where='gpu'"):
        profile.optimizer_update_time_s(10, where="gpu")
    bare = dataclasses.replace(profile, calibration=None)
    with pytest.raises(ValueError, match="calibration is None"):
        bare.matmul_time_s(8, 8, 8)
    assert cal.matmul_flops_per_s["fp32"] == max(p.flops_per_s for p in cal.matmul if p.dtype == "fp32")


# ---- probe ------------------------------------------------------------------------------------


def test_probe_without_gpu_or_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    profile = probe()
    assert profile.gpus == ()
    assert profile.calibration is None
    cpu = profile.cpu
    assert 1 <= cpu.cores <= cpu.threads
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert cpu.threads <= usable  # the CPUs this process may run on (a cgroup quota may cap them more)
    assert cpu.model
    sysconf_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert cpu.host_memory_bytes == pytest.approx(sysconf_bytes, rel=0.01)
    assert set(cpu.isa) <= set(ISA_FLAGS)
    if Path("/proc/cpuinfo").is_file():  # independent parse: any "flags" line, word-split
        text = Path("/proc/cpuinfo").read_text()
        flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())
        assert set(cpu.isa) == {f for f in ISA_FLAGS if f in flags}


def _cpuinfo_2x4x2() -> str:
    """/proc/cpuinfo of 2 sockets x 4 cores x 2 hyper-threads; logical CPUs 2k and 2k+1 share a core."""
    blocks = []
    for socket in range(2):
        for core in range(4):
            for _thread in range(2):  # hyper-threads share a core id
                blocks.append(
                    f"processor\t: {len(blocks)}\nmodel name\t: Test CPU\nphysical id\t: {socket}\n"
                    f"core id\t\t: {core}\nflags\t\t: fpu avx2 avx512f amx_tile\n"
                )
    return "\n".join(blocks)


def test_parse_cpuinfo_counts_physical_cores():
    model, cores, flags = parse_cpuinfo(_cpuinfo_2x4x2())
    assert (model, cores) == ("Test CPU", 2 * 4)
    assert {"avx2", "avx512f", "amx_tile"} <= flags and "avx512_vnni" not in flags
    assert parse_cpuinfo(_cpuinfo_2x4x2(), allowed={0, 1, 2, 9})[1] == 3  # cores under those CPUs


def test_probe_cpu_counts_only_the_cpus_this_process_may_use(monkeypatch):
    """Under taskset / a cpuset (the affinity mask) or a cgroup CPU quota, probe_cpu reports the CPUs the
    process may use, so a plan does not put one rank on each core of the whole machine."""
    import importlib

    probe_module = importlib.import_module(
        "sysopt.hardware.probe"
    )  # the module (the package exports probe())

    files = {"/proc/cpuinfo": _cpuinfo_2x4x2(), "/sys/fs/cgroup/cpu.max": "max 100000\n"}
    monkeypatch.setattr(probe_module, "_read", lambda path: files.get(path, ""))
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # taskset -c 0
    assert (probe_module.probe_cpu().cores, probe_module.probe_cpu().threads) == (1, 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert (probe_module.probe_cpu().cores, probe_module.probe_cpu().threads) == (2, 4)
    files["/sys/fs/cgroup/cpu.max"] = "150000 100000\n"  # a quota of 1.5 CPUs: 2 may run at once
    assert (probe_module.probe_cpu().cores, probe_module.probe_cpu().threads) == (2, 2)
    files["/sys/fs/cgroup/cpu.max"] = "max 100000\n"
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS / Windows: the whole machine
    assert (probe_module.probe_cpu().cores, probe_module.probe_cpu().threads) == (8, 16)


def _fake_nvml(init_error: bool = False, uuids: bool = False, mig_slices=None) -> types.ModuleType:
    """A pynvml stand-in with two cards (an A100 and an L4). `uuids`: it answers nvmlDeviceGetUUID
    (GPU-aaaa..., GPU-bbbb...); `mig_slices`: MIG enabled on the A100 with slices of these sizes (bytes),
    UUIDs MIG-1111..., MIG-2222..."""

    class NVMLError(Exception):
        pass

    devices = [
        {
            "name": b"Fake A100",
            "total": 40 << 30,
            "free": 39 << 30,
            "gen": 4,
            "width": 16,
            "links": 12,
            "sm": 1410,
            "cc": (8, 0),
        },
        {
            "name": "Fake L4",
            "total": 24 << 30,
            "free": 20 << 30,
            "gen": None,
            "width": None,
            "links": 0,
            "sm": None,
            "cc": None,
        },
    ]

    def query(key):
        def get(handle, *rest):
            value = devices[handle][key]
            if value is None:
                raise NVMLError("not supported")
            return value

        return get

    def init():
        if init_error:
            raise NVMLError("driver not loaded")

    def nvlink_state(handle, link):
        if link >= 18:
            raise NVMLError("invalid link")
        return 1 if link < devices[handle]["links"] else 0

    nvml = types.ModuleType("pynvml")
    nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM, nvml.NVML_FEATURE_ENABLED, nvml.NVML_NVLINK_MAX_LINKS = (
        0,
        2,
        1,
        18,
    )
    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(devices)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetName = query("name")
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        total=devices[h]["total"], free=devices[h]["free"]
    )
    nvml.nvmlDeviceGetMaxPcieLinkGeneration = query("gen")
    nvml.nvmlDeviceGetMaxPcieLinkWidth = query("width")
    nvml.nvmlDeviceGetNvLinkState = nvlink_state
    nvml.nvmlDeviceGetMaxClockInfo = lambda h, clock: query("sm")(h) if clock == 0 else 1593
    nvml.nvmlDeviceGetCudaComputeCapability = query("cc")
    if uuids or mig_slices:
        names = {0: "GPU-aaaa-0000", 1: "GPU-bbbb-1111"}
        names.update(
            {("mig", i): f"MIG-{i + 1}{i + 1}{i + 1}{i + 1}-x" for i in range(len(mig_slices or ()))}
        )
        nvml.nvmlDeviceGetUUID = lambda h: names[h].encode()
    if mig_slices:
        base_memory, base_name = nvml.nvmlDeviceGetMemoryInfo, nvml.nvmlDeviceGetName

        def memory(h):
            if isinstance(h, tuple):
                return types.SimpleNamespace(total=mig_slices[h[1]], free=mig_slices[h[1]] - (1 << 20))
            return base_memory(h)

        def handle_of_slice(h, i):
            if h != 0 or i >= len(mig_slices):
                raise NVMLError("not found")
            return ("mig", i)

        nvml.NVML_DEVICE_MIG_ENABLE = 1
        nvml.nvmlDeviceGetMigMode = lambda h: [1, 1] if h == 0 else [0, 0]
        nvml.nvmlDeviceGetMaxMigDeviceCount = lambda h: 7 if h == 0 else 0
        nvml.nvmlDeviceGetMigDeviceHandleByIndex = handle_of_slice
        nvml.nvmlDeviceGetMemoryInfo = memory
        nvml.nvmlDeviceGetName = lambda h: f"Fake A100 MIG {h[1]}g" if isinstance(h, tuple) else base_name(h)
    return nvml


def test_probe_reads_gpus_through_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus = probe().gpus
    assert gpus == (
        GPUInfo(0, "Fake A100", 40 << 30, 39 << 30, 4, 16, 12, 1410, 1593, (8, 0)),
        GPUInfo(1, "Fake L4", 24 << 30, 20 << 30, None, None, 0, None, 1593, None),
    )
    old_nvml = _fake_nvml()
    del old_nvml.nvmlDeviceGetCudaComputeCapability  # nvidia-ml-py without the query: capability unknown
    monkeypatch.setitem(sys.modules, "pynvml", old_nvml)
    assert [g.compute_capability for g in probe().gpus] == [None, None]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(init_error=True))
    assert probe().gpus == ()


def _torch_sees_two_gpus(monkeypatch):
    import torch

    cards = [("NVIDIA H100 80GB HBM3", 80 << 30, (9, 0)), ("NVIDIA L4", 24 << 30, (8, 9))]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards))
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda i: types.SimpleNamespace(
            name=cards[i][0], total_memory=cards[i][1], major=cards[i][2][0], minor=cards[i][2][1]
        ),
    )
    return [GPUInfo(i, n, m, m, None, None, 0, None, None, cc) for i, (n, m, cc) in enumerate(cards)]


def test_gpus_nvml_cannot_describe_come_from_torch_with_a_warning(monkeypatch):
    """One card NVML may not read (here its memory query fails, as for a card outside the job's cgroup) made
    the probe report no GPU at all, silently: the planner and precision=auto then treated an H100 host as a
    CPU one. So did a GPU host without nvidia-ml-py. torch.cuda names the GPUs instead, with a warning."""
    expected = _torch_sees_two_gpus(monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = _fake_nvml()

    def memory(handle):
        if handle == 1:
            raise RuntimeError("Insufficient Permissions")
        return types.SimpleNamespace(total=40 << 30, free=39 << 30)

    nvml.nvmlDeviceGetMemoryInfo = memory
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with pytest.warns(UserWarning, match="Insufficient Permissions.*taking 2 from torch.cuda"):
        assert probe().gpus == tuple(expected)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no nvidia-ml-py
    with pytest.warns(UserWarning, match="ModuleNotFoundError.*taking 2 from torch.cuda"):
        assert probe().gpus == tuple(expected)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml())  # NVML whole again: its figures, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [g.pcie_gen for g in probe().gpus] == [4, None]


def test_probe_respects_cuda_visible_devices(monkeypatch):
    """NVML lists every card; a process sees those CUDA_VISIBLE_DEVICES names (index or UUID prefix), in
    that order, numbered from 0 as torch numbers them; the list ends at the first entry matching nothing."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(uuids=True))
    cases = {
        "1": ["Fake L4"],
        "GPU-bbbb": ["Fake L4"],
        "1,0": ["Fake L4", "Fake A100"],
        "0,nope,1": ["Fake A100"],
        "": [],
        "-1": [],
    }
    for value, names in cases.items():
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        gpus = probe().gpus
        assert [g.name for g in gpus] == names, value
        assert [g.index for g in gpus] == list(range(len(names)))  # cuda:0, cuda:1, ... in this process
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")
    assert probe().gpus[0].uuid == "GPU-bbbb-1111" and probe().gpus[0].memory_total_bytes == 24 << 30
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [g.uuid for g in probe().gpus] == ["GPU-aaaa-0000", "GPU-bbbb-1111"]


def test_probe_reports_a_mig_slice_not_the_whole_card(monkeypatch):
    """With MIG on, CUDA opens a slice: its memory (not the card's 40 GiB) is what a plan may use."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(mig_slices=(10 << 30, 20 << 30)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    first, l4 = probe().gpus
    assert (first.mig, first.memory_total_bytes, first.uuid) == (True, 10 << 30, "MIG-1111-x")
    assert first.name == "Fake A100 MIG 0g" and first.pcie_gen == 4  # links and clocks: the card's
    assert not l4.mig and l4.memory_total_bytes == 24 << 30
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-2222")
    (second,) = probe().gpus
    assert (second.index, second.mig, second.memory_total_bytes) == (0, True, 20 << 30)
    profile = dataclasses.replace(handmade_profile(), gpus=(second,))
    from sysopt.planner import Machine

    assert Machine.from_profile(profile).memory_bytes == 20 << 30
    assert GPUInfo.from_dict(json.loads(json.dumps(second.to_dict()))) == second


# ---- alpha-beta fit ---------------------------------------------------------------------------


def test_fit_alpha_beta_recovers_exact_line_and_clamps():
    sizes = [1 << 10, 1 << 16, 1 << 20, 1 << 24]
    fit = fit_alpha_beta(sizes, [5e-6 + n / 2e9 for n in sizes])
    assert fit.latency_s == pytest.approx(5e-6, rel=1e-9)
    assert fit.bytes_per_s == pytest.approx(2e9, rel=1e-9)
    # a line through the origin minus noise: the intercept would be negative -> clamped positive
    noisy = fit_alpha_beta([1e3, 1e6, 1e7], [1e-7, 1e-3, 1.1e-2])
    assert noisy.latency_s > 0 and noisy.bytes_per_s > 0
    # time falling with size (pure noise): slope <= 0 -> bandwidth from the best observed n/t
    flat = fit_alpha_beta([1e3, 1e6], [2e-3, 1e-3])
    assert flat.latency_s > 0 and flat.bytes_per_s == pytest.approx(1e6 / 1e-3)
    with pytest.raises(ValueError, match="distinct sizes"):
        fit_alpha_beta([4096, 4096], [1e-5, 2e-5])
    with pytest.raises(ValueError, match=">= 2"):
        fit_alpha_beta([4096], [1e-5])


# ---- real quick calibration -------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated():
    samples = []
    steps = []

    def progress(items, description):
        for item in items:
            steps.append(item[0])
            yield item

    profile = calibrate(quick=True, world_size=2, threads=1, progress=progress, samples=samples)
    return profile, samples, steps


@pytest.mark.timeout(120)
def test_quick_calibration_fits_are_positive(calibrated):
    profile, samples, steps = calibrated
    cal = profile.calibration
    assert steps == ["matmul", "copy", "collectives", "optimizer"]
    assert cal.device == "cpu" and set(cal.copy) == {"memcpy"}
    fits = [*cal.copy.values(), cal.p2p, cal.allreduce, *cal.tp_collectives.values()]
    assert all(f is not None and f.latency_s > 0 and f.bytes_per_s > 0 for f in fits)
    assert set(cal.tp_collectives) == {"all_gather", "reduce_scatter"}
    assert cal.tp_chunk_overhead_s is not None and cal.tp_chunk_overhead_s >= 0
    assert any(s.name.startswith("tp_all_gather/") and s.config["ops"] == 4 for s in samples)
    assert (cal.collective_world_size, cal.collective_backend) == (2, "gloo")
    assert cal.optimizer_params_per_s["host"] > 0
    assert cal.optimizer_params_per_s["device"] == cal.optimizer_params_per_s["host"]  # CPU-only
    assert HardwareProfile.from_json(profile.to_json()) == profile
    # every figure is backed by raw samples; the point's time is their median
    by_name = {s.name: s for s in samples}
    for p in cal.matmul:
        secs = sorted(by_name[f"matmul/{p.dtype}/{p.m}x{p.n}x{p.k}"].seconds)
        assert p.seconds == secs[len(secs) // 2]
        assert p.flops_per_s == pytest.approx(2 * p.m * p.n * p.k / p.seconds)


@pytest.mark.timeout(120)
def test_quick_calibration_matmul_time_scales_with_size(calibrated):
    profile, _, _ = calibrated
    cal = profile.calibration
    assert {"fp32", "bf16", "int8"} <= set(cal.matmul_flops_per_s)
    for dtype, best in cal.matmul_flops_per_s.items():
        points = [p for p in cal.matmul if p.dtype == dtype]
        assert best == max(p.flops_per_s for p in points)
        for p in points:  # the model reproduces each measurement at its own shape
            assert profile.matmul_time_s(p.m, p.n, p.k, dtype) == pytest.approx(p.seconds, rel=1e-9)
        sizes = [64, 128, 256, 512, 1024, 2048, 4096]
        times = [profile.matmul_time_s(s, s, s, dtype) for s in sizes]
        assert all(a < b for a, b in zip(times, times[1:])), (dtype, times)
        largest = max(p.m for p in points)  # beyond the measured range the rate is held: time ~ FLOPs
        t1, t2 = (
            profile.matmul_time_s(largest, largest, largest, dtype),
            profile.matmul_time_s(*[2 * largest] * 3, dtype),
        )
        assert t2 / t1 == pytest.approx(8.0, rel=1e-9)


# ---- cache ------------------------------------------------------------------------------------


def test_a_cpu_profile_on_a_gpu_node_measures_its_collectives_over_gloo(monkeypatch):
    # a node with 8 GPUs: a CPU calibration used to time NCCL on the GPUs and file the figures as the CPU's
    import torch

    import sysopt.dist
    from sysopt.hardware import collectives

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    asked = []

    def fake_launch(fn, world_size, args=(), backend=None, timeout_s=None):
        asked.append(backend)
        raise RuntimeError("not launched in this test")

    monkeypatch.setattr(sysopt.dist, "launch", fake_launch)
    for device, world_size in ((None, 2), ("cpu", 2), ("cuda", 2), ("cuda", 16)):
        with pytest.warns(UserWarning, match="not launched"):
            got = collectives.calibrate_collectives(
                world_size, quick=True, repeats=1, device=None if device is None else torch.device(device)
            )
        assert got[2] == asked[-1]
    assert asked == ["gloo", "gloo", "nccl", "gloo"]


def test_collective_calibration_inside_a_torchrun_rank_is_skipped_with_the_fix(monkeypatch):
    """Under torchrun launch() runs its function in this process, as one rank: rank 0 alone got the timings
    and every other rank failed with a TypeError reading results it does not have."""
    import sysopt.dist
    from sysopt.hardware import collectives

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sysopt.dist, "launch", lambda *a, **k: pytest.fail("launched inside a rank"))
    with pytest.warns(UserWarning, match="one rank of a torchrun/srun job; calibrate outside it"):
        got = collectives.calibrate_collectives(2, quick=True, repeats=1)
    assert got[:2] == (None, None) and got[3] == {} and got[4] is None


def _chunk_overhead_with_a_late_peer(delay_s: float) -> float | None:
    """Under launch: rank 1 sleeps `delay_s` before each collective of the chunked TP layer, so rank 0
    waits that long per chunk; rank 0 returns the calibrated per-chunk overhead."""
    import torch
    import torch.distributed as dist

    from sysopt.hardware.collectives import _chunk_overhead_s
    from sysopt.tensor_parallel import comm

    if dist.get_rank() == 1:
        exchange = comm.exchange

        def late_exchange(*args, **kwargs):
            time.sleep(delay_s)
            return exchange(*args, **kwargs)

        comm.exchange = late_exchange
    overhead = _chunk_overhead_s(repeats=5, warmup=1, device=torch.device("cpu"))
    return overhead if dist.get_rank() == 0 else None


@pytest.mark.timeout(120)
def test_chunk_overhead_is_host_work_not_the_wait_for_a_late_peer():
    # the old estimator (wall time of 8 chunks minus 1, per extra chunk) read the peer's 5 ms delay per
    # collective as ~5 ms of overhead per chunk, and auto then refused to split; a chunk costs this rank
    # its slicing and launching only (the collective's latency is charged on the communication side)
    from sysopt.dist import launch

    overhead = launch(_chunk_overhead_with_a_late_peer, 2, args=(5e-3,), timeout_s=100)[0]
    assert 0 <= overhead < 1e-3


def measured_as_asked(threads=None, world_size=2, device=None, quick=False, **_) -> HardwareProfile:
    """handmade_profile() as calibrate(threads=, world_size=, device=, quick=) would measure it here: on this
    machine's CPU and GPUs, as probe() sees them."""
    import torch

    p = dataclasses.replace(handmade_profile(), cpu=probe().cpu, gpus=probe().gpus)
    cal = dataclasses.replace(
        p.calibration,
        device=str(device or calibration_module.default_device()),
        threads=threads or torch.get_num_threads(),
        collective_world_size=world_size,
        quick=quick,
    )
    return dataclasses.replace(p, calibration=cal)


def counting_calibrate(calls: list):
    """A stand-in for calibration.calibrate that records its arguments and measures as asked."""
    return lambda **kw: calls.append(kw) or measured_as_asked(**kw)


def test_cache_is_used_on_second_call(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(calibration_module, "calibrate", counting_calibrate(calls))
    path = tmp_path / "profile.json"
    first = load_or_calibrate(path, quick=True)
    second = load_or_calibrate(path, quick=True)
    assert len(calls) == 1 and calls[0]["quick"] is True
    assert first == second == HardwareProfile.load(path)
    load_or_calibrate(path, refresh=True)
    assert len(calls) == 2
    path.write_text("{not json")  # a corrupt cache is recalibrated, with a warning
    with pytest.warns(UserWarning, match="unreadable profile cache"):
        assert load_or_calibrate(path, quick=True) == first
    assert len(calls) == 3
    # JSON of another shape too (these raised AttributeError out of every reader of the cache)
    shapeless = json.loads(path.read_text())
    shapeless["calibration"]["copy"] = None
    for n, text in enumerate(["null", "[]", json.dumps(shapeless)]):
        path.write_text(text)
        with pytest.warns(UserWarning, match="unreadable profile cache"):
            assert cache_module.load_cached(path) is None
        with pytest.warns(UserWarning, match="unreadable profile cache"):
            assert load_or_calibrate(path, quick=True) == first
        assert len(calls) == 4 + n


def test_a_quick_calibration_at_an_explicit_path_does_not_stand_in_for_a_full_one(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(calibration_module, "calibrate", counting_calibrate(calls))
    path = tmp_path / "p.json"
    load_or_calibrate(path, quick=True)
    with pytest.warns(UserWarning, match="a quick calibration, and a full one was asked for"):
        full = load_or_calibrate(path, quick=False)
    assert [c["quick"] for c in calls] == [True, False] and full.calibration.quick is False
    assert (
        load_or_calibrate(path, quick=True) == full and len(calls) == 2
    )  # a full one serves a quick request
    assert HardwareProfile.from_json(full.to_json()).calibration.quick is False  # kept in the JSON


def test_a_calibration_whose_collectives_failed_is_not_cached(tmp_path, monkeypatch):
    """A failed collective launch (e.g. ranks spawned from a script without a __main__ guard) must not
    be cached: the cache would serve a profile without collective fits until the code changed."""
    good = measured_as_asked()
    failed = dataclasses.replace(
        good, calibration=dataclasses.replace(good.calibration, collective_world_size=1)
    )
    results = [failed, good]
    monkeypatch.setattr(calibration_module, "calibrate", lambda **kw: results.pop(0))
    path = tmp_path / "profile.json"
    with pytest.warns(UserWarning, match="not cached"):
        assert load_or_calibrate(path, quick=True).calibration.collective_world_size == 1
    assert not path.exists()
    assert load_or_calibrate(path, quick=True).calibration.collective_world_size == 2  # measured again
    assert HardwareProfile.load(path).calibration.collective_world_size == 2


def test_default_cache_paths_separate_quick_from_full(tmp_path, monkeypatch):
    monkeypatch.setenv("SYSOPT_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(calibration_module, "calibrate", counting_calibrate(calls))
    assert cache_module.default_cache_path().parent == tmp_path
    load_or_calibrate(quick=True)
    assert cache_module.default_cache_path(quick=True).is_file()
    assert not cache_module.default_cache_path(quick=False).exists()
    load_or_calibrate(quick=False)  # a quick calibration never stands in for a full one
    assert len(calls) == 2 and cache_module.default_cache_path(quick=False).is_file()
    load_or_calibrate(quick=True)  # ... but a full one serves a quick request
    assert len(calls) == 2


def test_a_cached_profile_serves_only_the_hardware_it_was_probed_on(tmp_path, monkeypatch):
    """The cache file is named by host, device, threads and world size only: a calibration made with four GPUs
    visible served a process that sees one (CUDA_VISIBLE_DEVICES=0), or another MIG slice, or fewer CPUs
    (taskset), and the planner planned for devices the process does not have."""
    import importlib

    probe_module = importlib.import_module("sysopt.hardware.probe")  # (sysopt.hardware.probe is the function)
    monkeypatch.setenv("SYSOPT_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(calibration_module, "calibrate", counting_calibrate(calls))
    here = probe()
    four = tuple(GPUInfo(i, "Fake H100", 80 << 30, 79 << 30, 5, 16, 18, 1980, None, (9, 0)) for i in range(4))
    seen = {"gpus": four}
    monkeypatch.setattr(probe_module, "probe_gpus", lambda: seen["gpus"])
    first = load_or_calibrate(quick=True)
    assert first.gpus == four and len(calls) == 1
    assert load_or_calibrate(quick=True) == first and len(calls) == 1  # the same GPUs: served from the cache
    seen["gpus"] = four[:1]  # CUDA_VISIBLE_DEVICES=0
    assert cache_module.other_hardware(first) is not None
    with pytest.warns(UserWarning, match="ignoring cached profile .*probed with .*cuda:3 Fake H100"):
        assert cache_module.load_cached() is None
    with pytest.warns(
        UserWarning, match=r"this process sees \d+ CPU threads, cuda:0 Fake H100\); calibrating again"
    ):
        assert load_or_calibrate(quick=True).gpus == four[:1]
    assert len(calls) == 2
    fewer_cpus = dataclasses.replace(here.cpu, threads=1, cores=1)
    monkeypatch.setattr(probe_module, "probe_cpu", lambda: fewer_cpus)  # taskset -c 0
    with pytest.warns(UserWarning, match="probed with .* CPU threads"):
        assert load_or_calibrate(quick=True).cpu == fewer_cpus
    assert len(calls) == 3


def test_cache_measured_by_other_code_is_calibrated_again(tmp_path, monkeypatch):
    """A cached calibration records which code measured it; once that code (or torch) changes,
    load_or_calibrate measures again, says why, and caches the new figures; read-only lookups
    (load_cached: the trainer, TP overlap 'auto') ignore it too."""
    calls = []
    monkeypatch.setattr(calibration_module, "calibrate", counting_calibrate(calls))
    path = tmp_path / "profile.json"
    load_or_calibrate(path, quick=True)
    assert json.loads(path.read_text())["calibration"]["code"] == cache_module.calibrating_code()
    load_or_calibrate(path, quick=True)
    assert len(calls) == 1
    saved = json.loads(path.read_text())
    saved["calibration"]["code"] = "0" * 16  # as if written before the collectives changed
    path.write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match="measured by other code"):
        assert cache_module.load_cached(path) is None  # the same check as load_or_calibrate
    with pytest.warns(UserWarning, match="measured by other code"):
        load_or_calibrate(path, quick=True)
    assert len(calls) == 2
    assert json.loads(path.read_text())["calibration"]["code"] == cache_module.calibrating_code()
    monkeypatch.setattr(cache_module.torch, "__version__", "0.0.0")
    cache_module.calibrating_code.cache_clear()
    try:
        with pytest.warns(UserWarning, match="measured by other code"):
            load_or_calibrate(path, quick=True)  # another torch: measured again
    finally:
        cache_module.calibrating_code.cache_clear()
    assert len(calls) == 3


def test_a_cached_profile_serves_only_the_request_it_was_measured_for(tmp_path, monkeypatch):
    """Threads, collective world size and device are part of what a calibration measured: an all-thread
    profile (sysopt-probe --calibrate) never answers a one-thread request (sysopt-plan), nor a 2-rank
    collective fit a 4-rank request, nor a CPU profile a request for cuda:1; each request gets its own
    cache file, measured once."""
    import torch

    monkeypatch.setenv("SYSOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)  # as if every core were free
    calls = []
    monkeypatch.setattr(calibration_module, "calibrate", counting_calibrate(calls))
    requests = [{}, {"threads": 1}, {"world_size": 4}, {"device": "cuda:1"}]
    for kwargs in requests * 2:  # the second round is served from the cache
        cal = load_or_calibrate(**kwargs).calibration
        assert cal.threads == kwargs.get("threads", 8)
        assert cal.collective_world_size == kwargs.get("world_size", 2)
        assert cal.device == kwargs.get("device", "cpu")
    assert [
        {k: v for k, v in c.items() if k in ("threads", "world_size", "device")} for c in calls
    ] == requests
    assert load_or_calibrate(threads=8).calibration.threads == 8 and len(calls) == 4  # threads=None was 8
    # read-only lookups filter the same way, and prefer what this process runs with
    assert cache_module.load_cached(threads=1).calibration.threads == 1
    assert cache_module.load_cached(world_size=4).calibration.collective_world_size == 4
    assert cache_module.load_cached(device="cuda:1").calibration.device == "cuda:1"
    assert cache_module.load_cached(threads=3) is None
    best = cache_module.load_cached().calibration
    assert (best.threads, best.device, best.collective_world_size) == (8, "cpu", 2)
    # a profile at an explicit path measured with other arguments is measured again and replaced
    path = tmp_path / "mine.json"
    load_or_calibrate(path, threads=1)
    with pytest.warns(UserWarning, match="measured with device=cpu threads=1 world_size=2, asked for"):
        assert load_or_calibrate(path, threads=2).calibration.threads == 2
    assert HardwareProfile.load(path).calibration.threads == 2 and len(calls) == 6


# ---- sysopt-probe -----------------------------------------------------------------------------


def test_probe_cli_json_and_cached_calibration(tmp_path, monkeypatch, capsys):
    from sysopt.cli import probe as probe_cli

    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert probe_cli.main(["--json"]) == 0
    printed = HardwareProfile.from_json(capsys.readouterr().out)
    assert printed.calibration is None and printed.cpu == probe().cpu

    calls = []
    monkeypatch.setattr(calibration_module, "calibrate", counting_calibrate(calls))
    cache = tmp_path / "p.json"
    for argv in (["--calibrate", "--json"], ["--calibrate", "--json"], ["--refresh", "--json"]):
        assert probe_cli.main([*argv, "--quick", "--cache", str(cache)]) == 0
        assert HardwareProfile.from_json(capsys.readouterr().out) == measured_as_asked(quick=True)
    assert len(calls) == 2  # the second run used the cache; --refresh recalibrated


def test_probe_cli_calibrates_with_the_given_threads_world_size_and_device(tmp_path, monkeypatch, capsys):
    from sysopt.cli import probe as probe_cli

    calls = []
    monkeypatch.setattr(calibration_module, "calibrate", counting_calibrate(calls))
    argv = ["--calibrate", "--json", "--quick", "--threads", "1", "--world-size", "3", "--device", "cpu"]
    assert probe_cli.main([*argv, "--cache", str(tmp_path / "p.json")]) == 0
    assert (calls[0]["threads"], calls[0]["world_size"], calls[0]["device"]) == (1, 3, "cpu")
    cal = HardwareProfile.from_json(capsys.readouterr().out).calibration
    assert (cal.threads, cal.collective_world_size) == (1, 3)
    with pytest.raises(SystemExit):
        probe_cli.main(["--calibrate", "--world-size", "0"])


def test_probe_cli_table_shows_gpus_and_calibration():
    from rich.console import Console

    from sysopt.cli.probe import render

    console = Console(record=True, width=120)
    render(handmade_profile(), console)
    text = console.export_text()
    for expected in ("Fake Xeon", "Fake H100", "gen5 x16", "h2d_pinned", "all-reduce", "bf16", "p2p"):
        assert expected in text
    assert f"{handmade_profile().calibration.matmul_flops_per_s['bf16'] / 1e9:.1f}" in text
