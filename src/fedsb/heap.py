"""Give freed heap memory back to the operating system between phases.

The activations of a forward/backward pass are mostly tensors of a few hundred KB, which glibc
serves from its arenas; after they are freed, the pages usually stay with the process, so the
init's gradient pass (activations + fp32 gradient buffers) would leave about a gigabyte of RSS
that the next phase then grows past. `malloc_trim(0)` returns the free pages; it takes a few
milliseconds, so it is called once per phase (after the init, after a client's training), never
per step. A no-op where glibc is absent (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:  # pragma: no cover - no loadable C library
        return None


def release_free_memory(device: Any = "cpu") -> bool:
    """Return free heap pages to the OS; True when glibc's `malloc_trim` released any.

    `device`: where the phase's tensors lived. CPU-only tuning: on an accelerator the
    activations were never on the host heap, so nothing is trimmed (and False returned)."""
    if getattr(device, "type", str(device).split(":")[0]) != "cpu":
        return False
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
