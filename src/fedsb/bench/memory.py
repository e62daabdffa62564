"""Resident memory: the current RSS, its high-water mark, and measuring one setting per process.

On Linux, writing "5" to /proc/self/clear_refs resets the high-water mark (VmHWM), so a
process can load a model, reset, train, and read the peak of training alone. Elsewhere we fall
back to `getrusage(RUSAGE_SELF).ru_maxrss`, which cannot be reset (then "peak" includes loading)
and which, on Linux, a fresh child inherits from its parent across fork + exec.
A setting whose memory is compared against another runs in its own fresh subprocess, because
freed memory is not always returned to the OS and would hide the second setting's growth.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from typing import Any


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else None


def peak_rss_bytes() -> int:
    """VmHWM; `ru_maxrss` only where /proc is missing (on Linux it survives fork + exec)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS; False where the OS cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_child(function: str, kwargs: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
    """Run `fedsb.bench.child` in a fresh interpreter: `function` ("module:name") with `kwargs`.

    The function must return a JSON-able dict; the child adds its peak RSS (`process_peak_rss_bytes`).
    """
    import torch  # slow dependency (torch): fedsb.bench.child loads this module into every measured process

    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the child uses the parent's thread count
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run(
        [sys.executable, "-m", "fedsb.bench.child", function, json.dumps(kwargs)],
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child {function} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])
