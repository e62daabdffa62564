"""The whole suite, the same as `fedsb bench`: writes bench.json and bench.md into --out.

    python benchmarks/bench_suite.py --out results/bench [--quick] [--section train --section round]
"""

from __future__ import annotations

import argparse

from _common import log

from fedsb.bench.suite import SECTIONS, BenchSettings, run_bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--model", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--section", action="append", choices=SECTIONS)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = BenchSettings.quick() if args.quick else BenchSettings.full()
    if args.repeats:
        settings.repeats = args.repeats
    run_bench(args.out, model=args.model, quick=args.quick, sections=args.section or SECTIONS, settings=settings, log=log)


if __name__ == "__main__":
    main()
