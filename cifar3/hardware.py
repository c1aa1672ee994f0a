"""What machine this is, in the words reports use: CPU model, cores, and the vector units that decide which
kernels run (AVX2, AVX-512, AVX512-BF16, AMX)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")
# An ordinary AVX2 CPU, emulated for PyTorch: set before torch is imported, it keeps torch's kernels (ATen's
# and oneDNN's) at AVX2. ONNX Runtime has no such switch.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_name() -> str:
    """The CPU's model name ('AMD EPYC 9B14'), or what the platform says when /proc/cpuinfo has none."""
    names = (line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name"))
    return next(names, "") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Which of ISA_FLAGS the CPU reports (Linux; empty elsewhere)."""
    flags = next((set(line.split(":", 1)[1].split()) for line in _cpuinfo() if line.startswith("flags")), set())
    return [flag for flag in ISA_FLAGS if flag in flags]


def describe_machine(device) -> str:
    """The GPU's name for a CUDA device, else describe_cpu(): what computed a report's figures."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return describe_cpu()


def describe_cpu() -> str:
    """'AMD EPYC 9B14, 2 cores (avx2, avx512f, avx512_bf16)': the machine line of every CPU report."""
    flags = cpu_flags()
    return f"{cpu_name()}, {os.cpu_count()} cores" + (f" ({', '.join(flags)})" if flags else "")
