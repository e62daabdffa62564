"""What machine a benchmark ran on, and its measured matmul peak in each precision."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from typing import Any

import torch

from fedsb.precision import cpu_has_fast_bf16

# CPU flags that decide how fast bf16 (and int8) matmuls can be on x86.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:  # pragma: no cover - not Linux
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    flags = cpu_flags()
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):  # pragma: no cover
        mem_gib = None
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(mem_gib, 1) if mem_gib else None,
        "cpu_flags": {f: f in flags for f in RELEVANT_FLAGS},
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "fast_bf16": cpu_has_fast_bf16(),
        "python": platform.python_version(),
    }


def matmul_fn(n: int, dtype: torch.dtype, inner: int = 3, seed: int = 0) -> tuple[Callable[[], None], float]:
    """A callable doing `inner` n x n matmuls in `dtype` (operands made once), and its FLOP count."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)

    def run() -> None:
        for _ in range(inner):
            torch.mm(a, b, out=out)

    return run, 2.0 * n**3 * inner
