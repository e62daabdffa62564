"""Mixed precision: bf16 autocast where the hardware runs it fast, fp32 for what trains."""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch

PRECISIONS = ("auto", "fp32", "bf16")


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - depends on the build
        return False


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """Map "auto" to "bf16" on a CUDA device or a CPU with fast bf16, else "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast_context(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16 when asked; parameters (R, its gradient, optimizer state) stay fp32."""
    precision = resolve_precision(precision, device)
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
