"""precision='auto': choose a recipe per layer from the hardware and the GEMM shape.

The candidate format comes from the hardware (fp8 on GPUs with fp8 tensor cores, int8 on VNNI/AMX CPUs and
other GPUs); it is taken only when its modelled step time, three GEMMs at the format's calibrated throughput
plus the memory traffic of quantising the operands and dequantising the outputs, beats the high-precision step
by at least MIN_GAIN. Small GEMMs lose to the quantisation overhead and stay in high precision.
"""

from __future__ import annotations

import re

from .recipe import RECIPES, Recipe

MIN_GAIN = 0.10  # convert only when the modelled time drops by at least 10%

FP8_MIN_COMPUTE_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x)
# where a profile has no compute capability: names of fp8 GPUs, as whole words of the upper-cased name.
# Hopper H100/H200/H800/H20/GH200; Ada L4/L20/L40(S), GeForce RTX 40x0 and workstation "RTX ... Ada";
# Blackwell B100/B200/B300/GB200/GB300, GeForce RTX 50x0, "RTX PRO ...". Not Turing's Quadro RTX 4000/5000
# (hence no bare "RTX 40"/"RTX 50") nor Ampere's RTX A4000..A6000.
_FP8_GPU_NAME = re.compile(
    r"\b(?:G?H(?:100|200|800|20)|L(?:4|20|40S?)|G?B(?:100|200|300)|RTX [45]0[5-9]0|RTX PRO|ADA|BLACKWELL)\b"
)
_INT8_CPU_ISA = ("avx512_vnni", "amx_int8", "avx_vnni")

# used when the profile has no calibration (or the dtype did not run there): FLOP/s and bytes/s
_NOMINAL_CPU = {"fp32": 2.0e11, "bf16": 8.0e11, "int8": 1.8e12, "fp8": 1.3e11, "memory": 1.0e10}
_NOMINAL_GPU = {"fp32": 5.0e13, "bf16": 6.0e14, "int8": 1.2e15, "fp8": 1.2e15, "memory": 2.0e12}
# bytes moved per element: quantising (eager torch on CPU ~5 passes; fused Triton ~2 reads + 1-byte write)
# and the dequantising epilogue (read the accumulator, write the output)
_QUANT_BYTES = {"cpu": 25.0, "gpu": 9.0}
_EPILOGUE_BYTES = {"cpu": 8.0, "gpu": 0.0}  # on GPU the epilogue is fused into the GEMM

_RATE_NAME = {"e4m3": "fp8", "e5m2": "fp8", "int8": "int8", "bf16": "bf16"}


def _on_gpu(profile) -> bool:
    cal = profile.calibration
    if cal is not None:
        return str(cal.device).startswith("cuda")
    return len(profile.gpus) > 0


def gpu_has_fp8(gpu) -> bool:
    """Whether a GPU (a sysopt.hardware GPUInfo) has fp8 tensor cores: from its compute capability when the
    profile records it (>= 8.9), else from its name."""
    cc = getattr(gpu, "compute_capability", None)
    if cc is not None:
        return tuple(cc) >= FP8_MIN_COMPUTE_CAPABILITY
    return _FP8_GPU_NAME.search(gpu.name.upper()) is not None


def candidate_recipe(profile) -> str | None:
    """The low-precision recipe this hardware runs fast, or None. fp8 only when every GPU has fp8."""
    if _on_gpu(profile):
        if profile.gpus and all(gpu_has_fp8(g) for g in profile.gpus):
            return "fp8_rowwise"
        return "int8_rowwise"
    if any(flag in profile.cpu.isa for flag in _INT8_CPU_ISA):
        return "int8_rowwise"
    return None


def _gemm_time_s(profile, m: int, n: int, k: int, rate_name: str) -> float:
    cal = profile.calibration
    if cal is not None and rate_name in cal.matmul_flops_per_s:
        return profile.matmul_time_s(m, n, k, rate_name)
    nominal = _NOMINAL_GPU if _on_gpu(profile) else _NOMINAL_CPU
    if rate_name == "int8" and not _on_gpu(profile) and candidate_recipe(profile) is None:
        rate_name = "fp32"  # no VNNI: int8 GEMMs run no faster than fp32
    return 2.0 * m * n * k / nominal[rate_name]


def _memory_bytes_per_s(profile) -> float:
    """Bytes per second read plus written (what _QUANT_BYTES and _EPILOGUE_BYTES count): twice the calibrated
    memcpy rate on a CPU, as a copy of n bytes reads n and writes n (the planner's memory_touch_bytes_per_s)."""
    cal = profile.calibration
    if cal is not None and not _on_gpu(profile) and "memcpy" in cal.copy:
        return 2 * cal.copy["memcpy"].bytes_per_s
    return (_NOMINAL_GPU if _on_gpu(profile) else _NOMINAL_CPU)["memory"]


def _quantised_elements(recipe: Recipe, m: int, n: int, k: int) -> int:
    """Elements quantised in one forward+backward, counting reuse of transposable quantisations."""
    operands = {  # gemm -> ((role, elements), (role, elements)) in operand order
        "forward": (("input", m * k), ("weight", n * k)),
        "grad_input": (("grad_output", m * n), ("weight", n * k)),
        "grad_weight": (("grad_output", m * n), ("input", m * k)),
    }
    done: set[tuple[str, str]] = set()
    total = 0
    for gemm, pair in operands.items():
        formats = getattr(recipe, gemm)
        if formats[0] not in _RATE_NAME or formats[0] == "bf16":
            continue
        for (role, elements), fmt in zip(pair, formats):
            granularity = recipe.weight_scaling_granularity if role == "weight" else recipe.granularity
            reusable = granularity == "tensorwise" or (
                role == "weight" and granularity == "blockwise" and len(set(recipe.weight_block)) == 1
            )
            if reusable and (role, fmt) in done:
                continue
            done.add((role, fmt))
            total += elements
    return total


def step_time_s(profile, recipe: Recipe | None, m: int, n: int, k: int, high: str) -> float:
    """Modelled forward+backward time of one (m tokens, k in, n out) linear under `recipe` (None: `high`)."""
    shapes = {"forward": (m, n, k), "grad_input": (m, k, n), "grad_weight": (n, k, m)}
    if recipe is None:
        return sum(_gemm_time_s(profile, *s, high) for s in shapes.values())
    where = "gpu" if _on_gpu(profile) else "cpu"
    total = 0.0
    for gemm, shape in shapes.items():
        fmt = getattr(recipe, gemm)[0]
        total += _gemm_time_s(profile, *shape, _RATE_NAME.get(fmt, high))
        if fmt in ("e4m3", "e5m2", "int8"):
            total += shape[0] * shape[1] * _EPILOGUE_BYTES[where] / _memory_bytes_per_s(profile)
    total += _quantised_elements(recipe, m, n, k) * _QUANT_BYTES[where] / _memory_bytes_per_s(profile)
    return total


def auto_recipe_for(
    profile, in_features: int, out_features: int, tokens: int, *, high: str | None = None
) -> str | None:
    """Recipe name for a linear (in_features -> out_features) over `tokens` rows per step, or None (keep it
    in high precision). `high` is the training dtype's rate name ('fp32' or 'bf16'; default fp32 on CPU,
    bf16 on GPU). `profile` is a sysopt.hardware.HardwareProfile (calibrated or not)."""
    if min(in_features, out_features, tokens) < 1:
        raise ValueError(
            f"auto_recipe_for(in_features={in_features}, out_features={out_features}, tokens={tokens}): "
            "sizes must be positive"
        )
    name = candidate_recipe(profile)
    if name is None:
        return None
    high = high or ("bf16" if _on_gpu(profile) else "fp32")
    m, n, k = tokens, out_features, in_features
    low = step_time_s(profile, RECIPES[name], m, n, k, high)
    base = step_time_s(profile, None, m, n, k, high)
    return name if low <= (1.0 - MIN_GAIN) * base else None
