"""Issue 19: memory and small-batch speed, before vs after, side by side in one run.

    python benchmarks/bench_memory.py --out results/bench/memory [--threads 1] [--model tiny-llama]

Reproduces the issue's run (the packaged SmolLM2-135M, GSM8K, 3 clients x 16 examples, rank 64 on
all seven projections, max length 256, 1 round, batch 1 x gradient accumulation 4, init on 16
pooled examples, lr 1e-4 cosine, warm-up 0.02, init.lr_eff 4.17e-4, no evaluation) through
`fedsb.federated.experiment.run_experiment`, four times, each in a fresh process:

- before: the code path before issue 19, selected by settings (`model.frozen_dtype = "fp32"`,
  `train.physical_batch = 1`, `init.group_size = 0`, `init.physical_tokens = 0`);
- after: the defaults;

in fp32 and in bf16. Per run: peak RSS per phase and what holds it, client-training tokens/s,
end-to-end wall (interpreter start to exit), the init's gradient pass and SVD seconds. The
machine may be shared: compare the ratios, which are measured side by side. Writes memory.json
and memory.md.
"""

from __future__ import annotations

import argparse
import json

from _common import log, write

from fedsb.bench.machine import machine_info
from fedsb.bench.phases import BEFORE, RUNS, measure_memory_phases, render_phases
from fedsb.bench.timing import load_average

TARGETS = {  # issue 19's acceptance, on this run
    "bf16 peak RSS <= 2.7 GB": lambda r: r["runs"]["after/bf16"]["peak_rss_bytes"] <= 2.7e9,
    "fp32 peak RSS <= 3.6 GB": lambda r: r["runs"]["after/fp32"]["peak_rss_bytes"] <= 3.6e9,
    "bf16 training tokens/s >= 1.8x before": lambda r: r["ratios"]["bf16"]["training tokens/s after / before"] >= 1.8,
    "bf16 end to end <= 0.65x before": lambda r: r["ratios"]["bf16"]["end to end after / before"] <= 0.65,
}


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:train.physical_tokens=1024,train.pack_sequences=false' -> (name, nested settings)."""
    name, _, body = text.partition(":")
    settings: dict = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        section, _, option = key.strip().partition(".")
        settings.setdefault(section, {})[option] = json.loads(value)
    return name.strip(), settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench/memory")
    ap.add_argument("--model", default=None, help="default: the packaged SmolLM2-135M-Instruct")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each child")
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--before-init-batch", type=int, default=0,
                    help="init.batch_size of the 'before' run (default: the same as after, 8). Today's path puts a "
                         "whole init batch (8 x 256 tokens) in one forward, which needs 5-6.5 GB: on a machine "
                         "without that much free memory, 2 gives the after path's init forward size (<= 512 tokens)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:SECTION.KEY=VALUE[,...]",
                    help="an extra variant: the defaults with these settings (JSON values), e.g. "
                         "'unpacked:train.pack_sequences=false'; repeatable")
    ap.add_argument("--run", choices=sorted(RUNS), default="issue19",
                    help="issue19: the GSM8K run above; demo: `fedsb demo`'s Fed-SB run")
    args = ap.parse_args()
    before = json.loads(json.dumps(BEFORE))
    if args.before_init_batch:
        before["init"]["batch_size"] = args.before_init_batch
    start = load_average()
    r = measure_memory_phases(
        args.model, variants={"before": before, "after": {}, **dict(map(parse_variant, args.variant))}, precisions=args.precisions, config=RUNS[args.run],
        out_root=f"{args.out}/runs", threads=args.threads, log=log,
    )
    r["machine"] = machine_info()
    r["load_average"] = {"start": start, "end": load_average()}
    r["run"] = args.run
    met = {}
    for name, check in TARGETS.items() if args.run == "issue19" else ():  # the targets are set on that run
        try:
            met[name] = bool(check(r))
        except KeyError:
            met[name] = None
    r["targets"] = met
    md = [f"# Issue 19: memory and small-batch speed, run {args.run!r} ({r['model']}, {args.threads} torch thread(s) "
          f"per run, load average {r['load_average']})\n", render_phases(r)]
    if met:
        md += ["Targets:\n", *(f"- {k}: {'met' if v else ('not measured' if v is None else '**not met**')}" for k, v in met.items())]
    write(args.out, "memory", r, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
