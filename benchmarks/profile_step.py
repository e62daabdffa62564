"""Profile one training step (torch.profiler): top ops by self CPU time and time shares.

    python benchmarks/profile_step.py --out results/bench/profile --variant lorasb:64 --precision bf16

Writes profile[_<tag>].json and .md. Use it before and after a change to a hot
path; the shares (matmul, casts, optimizer, outside ops) say where the time goes.
"""

from __future__ import annotations

import argparse

from _common import write

from fedsb.bench.report import _table
from fedsb.bench.train import profile_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench/profile")
    ap.add_argument("--model", default=None, help="default: the packaged SmolLM2-135M-Instruct")
    ap.add_argument("--variant", action="append", help="lorasb:64, peft:64, peft:8, lora:64 or full (repeatable)")
    ap.add_argument("--precision", action="append", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--tag", default="", help="suffix of the output names (e.g. before / after)")
    ap.add_argument("--before", action="store_true", help="profile LoRA-SB from benchmarks/reference_layer.py (the code before the speed work)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results = {}
    md = []
    for variant in args.variant or ["lorasb:64"]:
        for prec in args.precision or ["bf16"]:
            custom = None
            if args.before:
                from reference_layer import reference_variant

                from fedsb.bench.train import DEFAULT_TARGETS, Variant

                custom = reference_variant(Variant.parse(variant).rank, DEFAULT_TARGETS)
            p = profile_step(args.model, variant=variant, precision=prec, batch=args.batch, seq=args.seq, top=args.top, steps=args.steps, custom=custom)
            key = f"{variant}{'-before' if args.before else ''}/{prec}"
            results[key] = p
            shares = ", ".join(f"{k} {100 * v:.1f}%" for k, v in p["shares_of_wall"].items())
            md.append(f"## {key}: {p['wall_ms_per_step']:.0f} ms/step under the profiler\n\n{shares}\n")
            md.append(_table(["op", "self ms", "total ms", "calls"], [[e["name"], f"{e['self_ms']:.1f}", f"{e['total_ms']:.1f}", e["calls"]] for e in p["top"]]))
    write(args.out, "profile" + (f"_{args.tag}" if args.tag else ""), results, "\n".join(md))


if __name__ == "__main__":
    main()
