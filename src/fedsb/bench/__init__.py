"""Benchmarks of fedsb's own costs: training steps, memory, generation, init, federation rounds.

Every speed figure is a ratio of things measured side by side (interleaved repetitions) on the
same machine, because absolute times on a shared CPU are noise. `run_bench` runs the suite and
writes bench.json + bench.md; `fedsb bench` is its command line.
"""

from fedsb.bench.suite import SECTIONS, BenchSettings, run_bench

__all__ = ["SECTIONS", "BenchSettings", "run_bench"]
