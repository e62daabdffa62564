"""Side-by-side timing on a shared, noisy machine.

Absolute times on a CPU that other jobs share are noise; what survives is a *ratio* of two
things timed next to each other. `interleave` runs every candidate once per repetition
(A, B, C, A, B, C, ...), rotating which goes first, so that a load spike hits all of them
alike; `ratio` pairs the measurements of one repetition before taking the median.

Each sample records wall time and the process's CPU time: wall time is what a user waits for,
CPU time is far less sensitive to other processes stealing the cores (but counts OpenMP spin
waits), so a ratio that agrees on both is trustworthy.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sample:
    wall: float
    cpu: float


def timed(fn: Callable[[], Any]) -> tuple[Sample, Any]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return Sample(time.perf_counter() - w0, time.process_time() - c0), out


def interleave(
    fns: Mapping[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    on_sample: Callable[[str, int, Sample], None] | None = None,
) -> dict[str, list[Sample]]:
    """Time every function `repeats` times, interleaved; the first `warmup` rounds are discarded."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    samples: dict[str, list[Sample]] = {n: [] for n in names}
    for rep in range(-warmup, repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:  # rotate the order: no one always goes first
            sample, _ = timed(fns[name])
            if rep >= 0:
                samples[name].append(sample)
                if on_sample is not None:
                    on_sample(name, rep, sample)
    return samples


def spread(values: list[float]) -> dict[str, Any]:
    """Median with min/max and the relative spread (max-min)/median."""
    if not values:
        return {"n": 0}
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "rel_spread": (max(values) - min(values)) / med if med else None,
        "n": len(values),
        "values": list(values),
    }


def summarize(samples: list[Sample]) -> dict[str, Any]:
    return {"wall_s": spread([s.wall for s in samples]), "cpu_s": spread([s.cpu for s in samples])}


def ratio(a: list[Sample], b: list[Sample], what: str = "wall") -> dict[str, Any]:
    """Per-repetition ratios a_i / b_i (measured next to each other), summarized."""
    return spread([getattr(x, what) / getattr(y, what) for x, y in zip(a, b) if getattr(y, what) > 0])


def rate(samples: list[Sample], amount: float) -> dict[str, Any]:
    """amount / wall time per repetition (tokens/s, GFLOP/s, ...), summarized."""
    return spread([amount / s.wall for s in samples if s.wall > 0])


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every OS
        return None
