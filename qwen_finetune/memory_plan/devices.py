"""The device a run trains on: its memory and its peak FLOP/s in the run's precision.

GPUs are looked up by name in a table of vendor datasheet peaks (dense, no sparsity); on CPU the
peak is measured with a short float32/bfloat16 matmul (about a quarter of a second), which is what
bench/ divides by as well (at larger sizes, so the bench's figure is somewhat higher).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Literal

import torch

from .run_setup import DeviceKind, Precision

TERA = 1e12


@dataclass(frozen=True)
class GpuPeaks:
    half: float  # bf16/fp16 tensor-core FLOP/s with float32 accumulation, dense
    fp32: float  # plain float32 FLOP/s (no TF32)
    bf16: bool = True  # False: the GPU has no bf16 tensor cores (its half figure is fp16 only)


# Matched against torch.cuda.get_device_name() in this order (the first key contained in the name).
GPU_PEAKS: list[tuple[str, GpuPeaks]] = [
    ("H100 PCIe", GpuPeaks(756 * TERA, 51.2 * TERA)),
    ("H100", GpuPeaks(989.4 * TERA, 66.9 * TERA)),
    ("H800", GpuPeaks(989.4 * TERA, 66.9 * TERA)),
    ("H200", GpuPeaks(989.4 * TERA, 66.9 * TERA)),
    ("H20", GpuPeaks(148 * TERA, 44 * TERA)),
    ("A100", GpuPeaks(312 * TERA, 19.5 * TERA)),
    ("A800", GpuPeaks(312 * TERA, 19.5 * TERA)),
    ("L40S", GpuPeaks(362 * TERA, 91.6 * TERA)),
    ("L40", GpuPeaks(181 * TERA, 90.5 * TERA)),
    ("L4", GpuPeaks(121 * TERA, 30.3 * TERA)),
    ("A10G", GpuPeaks(70 * TERA, 31.2 * TERA)),
    ("A10", GpuPeaks(125 * TERA, 31.2 * TERA)),
    ("RTX 6000 Ada", GpuPeaks(364 * TERA, 91.1 * TERA)),
    ("A6000", GpuPeaks(154.8 * TERA, 38.7 * TERA)),
    ("RTX 4090", GpuPeaks(165.2 * TERA, 82.6 * TERA)),
    ("RTX 3090", GpuPeaks(71 * TERA, 35.6 * TERA)),
    ("V100", GpuPeaks(125 * TERA, 15.7 * TERA, bf16=False)),
    ("T4", GpuPeaks(65 * TERA, 8.1 * TERA, bf16=False)),
    ("MI300X", GpuPeaks(1307 * TERA, 163.4 * TERA)),
    ("MI250", GpuPeaks(362 * TERA, 47.9 * TERA)),
]
CPU_MATMUL_SIZE = 1024
CPU_MATMUL_SECONDS = 0.25


@dataclass(frozen=True)
class Device:
    kind: DeviceKind
    name: str
    memory_bytes: int  # what a run may use: the GPU's memory, or the machine's available RAM
    peak_flops: float | None  # in the run's compute precision; None when unknown
    peak_source: str


def gpu_peak(name: str, precision: Precision) -> tuple[float | None, str]:
    """The datasheet peak of a GPU by name in this precision, and where it came from."""
    for key, peaks in GPU_PEAKS:
        if key.lower() in name.lower():
            if precision == "fp32":
                return peaks.fp32, f"{key} datasheet, float32"
            if precision == "bf16" and not peaks.bf16:
                return peaks.fp32, f"{key} has no bf16 tensor cores: its float32 peak"
            return peaks.half, f"{key} datasheet, {precision} tensor cores (dense)"
    return None, f"{name!r} is not in the GPU peak table: no time estimate"


def measure_cpu_matmul_peak(precision: Precision, seconds: float = CPU_MATMUL_SECONDS) -> float:
    """Best rate of repeated square matmuls within `seconds` (after one warm-up), all torch threads."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # CPU fp16 matmuls are emulated
    generator = torch.Generator().manual_seed(0)
    size = CPU_MATMUL_SIZE
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        best = max(best, 2 * size**3 / (time.perf_counter() - started))
    return best


def cpu_device(precision: Precision, measure: bool = True) -> Device:
    import psutil

    name = f"CPU ({torch.get_num_threads()} torch threads)"
    memory = int(psutil.virtual_memory().available)
    if not measure:
        return Device("cpu", name, memory, None, "not measured")
    peak = measure_cpu_matmul_peak(precision)
    source = (
        f"measured: {CPU_MATMUL_SIZE}x{CPU_MATMUL_SIZE} {precision} matmul, best over {CPU_MATMUL_SECONDS} s"
    )
    return Device("cpu", name, memory, peak, source)


def cuda_device(index: int, precision: Precision) -> Device:
    properties = torch.cuda.get_device_properties(index)
    peak, source = gpu_peak(properties.name, precision)
    return Device("cuda", properties.name, int(properties.total_memory), peak, source)


def detect_device(
    use_cpu: bool, precision: Precision, local_rank: int | None = None, measure: bool = True
) -> Device:
    """The device this process trains on: the CUDA device of its local rank, else the CPU (its peak
    measured unless `measure` is False)."""
    if not use_cpu and torch.cuda.is_available():
        index = local_rank if local_rank is not None and local_rank >= 0 else 0
        return cuda_device(int(os.environ.get("LOCAL_RANK", index)), precision)
    return cpu_device(precision, measure=measure)


def device_by_name(
    kind: Literal["cpu", "cuda"], name: str, memory_bytes: int, precision: Precision
) -> Device:
    """A device described rather than detected (planning for a GPU this machine does not have)."""
    peak, source = gpu_peak(name, precision) if kind == "cuda" else (None, "not measured")
    return Device(kind, name, memory_bytes, peak, source)
