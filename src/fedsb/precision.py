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


FROZEN_DTYPES = ("auto", "fp32", "bf16")


def frozen_dtype(setting: str, precision: str, *, folds_into_base: bool = False) -> torch.dtype:
    """The dtype frozen tensors (W, frozen A and B) are stored in.

    "auto": bf16 when training autocasts to bf16 (the frozen tensors are only read in bf16
    there), fp32 otherwise; also fp32 for strategies that fold updates into W every round
    (FedEx-LoRA, FLoRA), whose small folded steps would be rounded away in bf16, like R's AdamW
    steps were in the paper's bf16 code. `precision` is the resolved training precision.
    """
    if setting not in FROZEN_DTYPES:
        raise ValueError(f"frozen dtype must be one of {FROZEN_DTYPES}, got {setting!r}")
    if setting == "bf16" and folds_into_base:
        raise ValueError("model.frozen_dtype = 'bf16' with a strategy that folds updates into the base weights "
                         "(fedex, flora) would round the folded steps away; use 'auto' or 'fp32'")
    if setting == "auto":
        return torch.bfloat16 if precision == "bf16" and not folds_into_base else torch.float32
    return torch.bfloat16 if setting == "bf16" else torch.float32
