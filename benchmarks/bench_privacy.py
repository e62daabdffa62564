"""Throughput of private vs non-private training on the CPU, side by side in one run.

The packaged all-MiniLM-L6-v2 with a 3-way head on SNLI pairs; Fed-SB (LoRA-SB on query and
value, r = 32, head trained) and, for the per-sample-gradient cost of a LoRA baseline, FedIT's
LoRA (r = 32). Modes:

- nonprivate-fp32: the engine's own `train_steps` (AdamW, fp32)
- nonprivate-auto: the same with train.precision = "auto" (bf16 autocast where the CPU has it)
- dp-hooks: opacus per-sample gradients (hooks), flat clipping, fp32
- dp-ghost: opacus ghost clipping (no per-sample gradients for linear layers), fp32
- dp-functorch (LoRA only): opacus' generic functorch fallback instead of our LoraLinear sampler

Examples/s counts the examples actually processed (Poisson batches vary in size) over the
measured steps, after one warm-up step. The modes run interleaved, `--repeats` times, and the
table gives the median and the best repeat: on a shared machine the best is the least disturbed
measurement. Private runs use a physical batch of twice the expected Poisson batch, so a
logical batch is almost never split. Writes JSON and a markdown table.

    python benchmarks/bench_privacy.py --examples 256 --steps 4 --batch-size 16 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fedsb.adapter.inject import adapter_layers, inject_adapters, mark_trainable
from fedsb.data import collate, tokenize_all
from fedsb.init import init_random
from fedsb.models import load_classifier
from fedsb.privacy.engine import PrivateSession
from fedsb.tasks import get_task
from fedsb.training import make_optimizer, train_steps

HEAD = ["classifier"]


def build(base: torch.nn.Module, kind: str, rank: int) -> torch.nn.Module:
    model = copy.deepcopy(base)
    inject_adapters(model, ["query", "value"], kind=kind, rank=rank)
    if kind == "lorasb":
        init_random(adapter_layers(model), seed=0)
    else:
        g = torch.Generator().manual_seed(0)
        for layer in adapter_layers(model).values():
            layer.reset(g)
    mark_trainable(model, HEAD)
    return model


def run_nonprivate(model: torch.nn.Module, items: list, pad: int, *, steps: int, batch_size: int, precision: str) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, 1e-4, 0.0)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(items), generator=g).tolist()
    batches = [collate([items[i] for i in order[(s * batch_size) % len(items) :][:batch_size]], pad, True) for s in range(steps + 1)]

    def go(bs: list) -> None:
        train_steps(model, bs, opt, params=params, grad_accum=1, lr_for_step=lambda s: 1e-4, first_step=0, max_grad_norm=1.0, precision=precision)

    go(batches[:1])  # warm-up
    start = time.perf_counter()
    go(batches[1:])
    wall = time.perf_counter() - start
    n = sum(len(b["labels"]) for b in batches[1:])
    return {"examples": n, "seconds": wall, "examples_per_s": n / wall}


def run_private(model: torch.nn.Module, items: list, pad: int, *, steps: int, batch_size: int, clipping: str) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, 1e-4, 0.0)
    session = PrivateSession(
        model, opt, num_examples=len(items), batch_size=batch_size, physical_batch_size=2 * batch_size,
        noise_multiplier=1.0, max_grad_norm=1.0, clipping=clipping, noise_seed=0,
    )  # fmt: skip
    torch.manual_seed(0)
    with session:
        kwargs = {"make_batch": lambda idx: collate([items[i] for i in idx], pad, True), "lr_for_step": lambda s: 1e-4}
        session.train(steps=1, **kwargs)  # warm-up
        start = time.perf_counter()
        stats = session.train(steps=steps, **kwargs)
        wall = time.perf_counter() - start
    return {"examples": stats.examples, "seconds": wall, "examples_per_s": stats.examples / wall}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=256, help="SNLI training pairs to sample from")
    ap.add_argument("--steps", type=int, default=4, help="measured optimizer steps per mode and repeat")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of every mode")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--no-lora", action="store_true", help="skip the LoRA (FedIT) rows")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/privacy"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    base, tok = load_classifier(None, num_labels=3)
    examples = get_task("snli").train_examples(limit=args.examples, seed=0)
    items = tokenize_all(examples, tok, "alpaca", args.max_length)
    pad = tok.pad_token_id
    kw = {"steps": args.steps, "batch_size": args.batch_size}
    plan: list[tuple[str, str, str]] = [
        ("fedsb", "lorasb", m) for m in ("nonprivate-fp32", "nonprivate-auto", "dp-hooks", "dp-ghost")
    ]
    if not args.no_lora:
        plan += [("fedit", "lora", m) for m in ("nonprivate-fp32", "dp-hooks", "dp-ghost", "dp-functorch")]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(m, mode): [] for m, _, mode in plan}
    for repeat in range(args.repeats):
        for method, kind, mode in plan:
            model = build(base, kind, args.rank)
            if mode.startswith("nonprivate"):
                r = run_nonprivate(model, items, pad, precision=mode.split("-")[1], **kw)
            else:
                r = run_private(model, items, pad, clipping={"dp-hooks": "flat", "dp-ghost": "ghost", "dp-functorch": "functorch"}[mode], **kw)
            runs[(method, mode)].append(r)
            print(f"[{repeat + 1}/{args.repeats}] {method:6s} {mode:16s} {r['examples_per_s']:8.2f} examples/s ({r['examples']} in {r['seconds']:.1f} s)", flush=True)
            del model
    rows = []
    for (method, mode), rs in runs.items():
        rates = sorted(r["examples_per_s"] for r in rs)
        rows.append({"method": method, "rank": args.rank, "mode": mode, "examples_per_s": statistics.median(rates), "best_examples_per_s": rates[-1], "runs": rs})
    for row in rows:  # relative to the same method's non-private fp32 row
        ref = next(r for r in rows if r["method"] == row["method"] and r["mode"] == "nonprivate-fp32")
        row["relative_to_nonprivate_fp32"] = row["examples_per_s"] / ref["examples_per_s"]
        row["best_relative_to_nonprivate_fp32"] = row["best_examples_per_s"] / ref["best_examples_per_s"]
    meta = {
        "model": "all-MiniLM-L6-v2 (packaged)",
        "targets": ["query", "value"],
        "head": HEAD,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "steps": args.steps,
        "repeats": args.repeats,
        "examples": args.examples,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"Training throughput on the CPU ({meta['torch_threads']} threads), all-MiniLM-L6-v2, query+value, r = {args.rank}, "
        f"batch {args.batch_size}, SNLI pairs (max length {args.max_length}).",
        "",
        f"Median and best of {args.repeats} interleaved repeats of {args.steps} steps.",
        "",
        "| method | mode | examples/s (median) | vs non-private fp32 | examples/s (best) | vs non-private fp32 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['method']} | {r['mode']} | {r['examples_per_s']:.2f} | {r['relative_to_nonprivate_fp32']:.2f}x "
        f"| {r['best_examples_per_s']:.2f} | {r['best_relative_to_nonprivate_fp32']:.2f}x |"
        for r in rows
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
