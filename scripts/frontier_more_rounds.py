"""Probe for issue 14: do Fed-SB and FFA-LoRA keep learning past the frontier's 6 rounds?

Runs one (method, rank) of configs/frontier-arith.toml at its chosen learning rate with more
rounds, exactly as the sweep's test cells do otherwise (same data, holdout task, test problems,
scoring every 2 rounds), and prints the per-round curve with cumulative upload per client.

    python scripts/frontier_more_rounds.py "Fed-SB" 64 --rounds 12 --seed 0 --out results/rounds12
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedsb.sweep import load_sweep
from fedsb.sweep.spec import Cell


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("method")
    ap.add_argument("rank", type=int)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", default="configs/frontier-arith.toml")
    ap.add_argument("--out", default="results/rounds12")
    args = ap.parse_args()

    from fedsb.federated.checkpoint import has_checkpoint
    from fedsb.federated.experiment import run_experiment

    sweep = load_sweep(args.sweep)
    sweep.set = [*sweep.set, f"federation.rounds={args.rounds}"]
    chosen = json.loads((sweep.out / "chosen.json").read_text())  # the sweep's validation choices
    method = next(m for m in sweep.methods if m.name == args.method)
    lr = next(float(c["lr"]) for c in chosen if c["method"] == args.method and int(c["rank"]) == args.rank)
    cfg = sweep.cell_config(Cell("test", method, args.rank, lr, args.seed))
    out = Path(args.out) / f"{method.slug}-r{args.rank}-lr{lr:g}-s{args.seed}-rounds{args.rounds}"
    summary = run_experiment(cfg, out, resume=has_checkpoint(out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    up = 0
    print(f"{args.method} r{args.rank} lr {lr:g} seed {args.seed}: base {summary['accuracy_before']}")
    for r in rows:
        up += r["upload_bytes_per_client"]
        if r.get("eval"):
            print(f"  round {r['round']:2d}  upload/client {up / 1e6:8.2f} MB  accuracy {100 * r['eval']['accuracy']:.1f}%")


if __name__ == "__main__":
    main()
