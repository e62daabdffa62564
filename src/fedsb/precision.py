"""Placement and mixed precision, decided in one place before the model is loaded.

`resolve_placement` turns `model.device`, `train.precision` and `model.frozen_dtype` into a
`Placement` (the device, the resolved training precision, the frozen weights' dtype): "auto"
picks CUDA when available, bf16 where the device runs it natively, and fp32 frozen weights for
the strategies that fold updates into W. The bf16 capability checks live here and nowhere else.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from fedsb.errors import FedsbError

PRECISIONS = ("auto", "fp32", "bf16")


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - depends on the build
        return False


def native_bf16(device: torch.device | str) -> bool:
    """True where bf16 arithmetic is native, not emulated: a CUDA device with bf16 support, or a
    CPU with AVX512-BF16 or AMX (stricter than `cpu_has_fast_bf16`, which oneDNN also answers
    True on plain AVX512; evaluation uses this one to decide whether to cast weights to bf16)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        cpu = torch.cpu
        return bool(
            getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
            or getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        )
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
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


# --- placement: where the model lives and in which dtypes -----------------------------------

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


class DeviceError(FedsbError, ValueError):
    """`model.device` names a device this machine does not have."""

    exit_code = 2


def check_device_setting(setting: str, key: str = "model.device") -> None:
    """A one-line error unless `setting` is "auto", "cpu", "cuda" or "cuda:N"."""
    if not isinstance(setting, str) or not DEVICE_PATTERN.fullmatch(setting):
        raise DeviceError(f"{key} = {setting!r}: allowed values are 'auto', 'cpu', 'cuda' or 'cuda:N'")


def resolve_device(setting: str = "auto", key: str = "model.device") -> torch.device:
    """"auto": the current CUDA device when torch sees one, else the CPU. An explicit CUDA
    device that is missing is an error, never a silent fall-back to the CPU."""
    check_device_setting(setting, key)
    if setting == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(setting)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{key} = {setting!r}: torch sees no CUDA device (torch {torch.__version__}); use 'auto' or 'cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"{key} = {setting!r}: there are {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@dataclass(frozen=True)
class Placement:
    """Where a run's model lives and in which dtypes (see `resolve_placement`)."""

    device: torch.device
    precision: str  # resolved training precision: "fp32" or "bf16"
    frozen_dtype: torch.dtype  # storage of the adapted layers' frozen W, A, B

    @property
    def on_cpu(self) -> bool:
        """CPU-only tuning (fp32 attention under autocast, malloc_trim, fp32 clones) applies."""
        return self.device.type == "cpu"

    @property
    def load_dtype(self) -> torch.dtype:
        """The dtype the checkpoint is read in. The CPU path reads fp32 and stores the adapted
        layers' frozen weights in `frozen_dtype` afterwards (unchanged since issue 19); an
        accelerator reads `frozen_dtype` directly, so a 7B model is never staged in fp32."""
        return torch.float32 if self.on_cpu else self.frozen_dtype


def resolve_placement(device: str = "auto", precision: str = "auto", frozen: str = "auto", *, folds_into_base: bool = False) -> Placement:
    """The device, training precision and frozen dtype of a run, decided together before the
    model is loaded (`precision` "auto" depends on the device, the frozen dtype on both)."""
    dev = resolve_device(device)
    resolved = resolve_precision(precision, dev)
    return Placement(dev, resolved, frozen_dtype(frozen, resolved, folds_into_base=folds_into_base))
