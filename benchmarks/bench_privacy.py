"""Throughput of DP-SGD, old path vs fast path, and non-private training, side by side in one run.

The packaged all-MiniLM-L6-v2 with a 3-way head on SNLI pairs; Fed-SB (LoRA-SB on query and
value, r = 32, head trained) and optionally FedIT's LoRA (r = 32). Every private mode draws the
same Poisson logical batches (expected size `--logical-batch`) and clips, noises and accounts
the same way; they differ only in how a drawn batch is computed:

- dp-old: the path before the speed work, reproduced: fp32 throughout, micro-batches of
  `--old-physical` (16, the old config's batch) in draw order, padded to their longest member
- dp-sorted-fp32: the drawn batch sorted by length into micro-batches of `--physical` (fp32)
- dp-fast: sorted micro-batches of `--physical` and the frozen encoder under bf16 autocast
  (R, head, per-sample gradients, clipping, noise in fp32): what `train.precision = "auto"` runs
- dp-fast-nodropout: dp-fast with the frozen encoder's dropout off for the session
- nonprivate-fp32 / nonprivate-auto: the engine's own `train_steps` on sorted micro-batches of
  `--physical` (reference: what DP costs on top)

Examples/s counts the examples actually processed (Poisson batches vary in size) over the
measured steps, after one warm-up step, per CPU second of the process (with one torch thread
this is the figure that other jobs on a shared machine disturb least) and per wall second. The
modes run interleaved, `--repeats` times; the table gives the medians and the best wall repeat.

    python benchmarks/bench_privacy.py --examples 1024 --logical-batch 256 --steps 2 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
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
from fedsb.privacy.samplers import split_logical_batch
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


def run_nonprivate(model: torch.nn.Module, items: list, pad: int, *, steps: int, logical: int, physical: int, precision: str) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, 1e-4, 0.0)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(items), generator=g).tolist()
    lengths = [len(it) for it in items]
    per_step = []
    for s in range(steps + 1):
        drawn = order[(s * logical) % len(items) :][:logical]
        per_step.append([collate([items[i] for i in c], pad, True) for c in split_logical_batch(drawn, physical, lengths)])

    def go(groups: list) -> None:
        for bs in groups:
            train_steps(model, bs, opt, params=params, grad_accum=len(bs), lr_for_step=lambda s: 1e-4, first_step=0, max_grad_norm=1.0, precision=precision)

    go(per_step[:1])  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    go(per_step[1:])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = sum(len(b["labels"]) for bs in per_step[1:] for b in bs)
    return {"examples": n, "seconds": wall, "cpu_seconds": cpu, "examples_per_s": n / wall, "examples_per_cpu_s": n / cpu}


def run_private(
    model: torch.nn.Module, items: list, pad: int, *, steps: int, logical: int, physical: int, precision: str, sort: bool, dropout: bool = True, clipping: str = "flat"
) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, 1e-4, 0.0)
    session = PrivateSession(
        model, opt, num_examples=len(items), batch_size=logical, physical_batch_size=physical,
        noise_multiplier=1.0, max_grad_norm=1.0, clipping=clipping, noise_seed=0,
        precision=precision, lengths=[len(it) for it in items] if sort else None, dropout=dropout,
    )  # fmt: skip
    torch.manual_seed(0)
    with session:
        kwargs = {"make_batch": lambda idx: collate([items[i] for i in idx], pad, True), "lr_for_step": lambda s: 1e-4}
        session.train(steps=1, **kwargs)  # warm-up
        start, cpu = time.perf_counter(), time.process_time()
        stats = session.train(steps=steps, **kwargs)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = stats.examples
    return {"examples": n, "seconds": wall, "cpu_seconds": cpu, "examples_per_s": n / wall, "examples_per_cpu_s": n / cpu}


PRIVATE_MODES = {  # mode: (precision, sorted, physical batch option, encoder dropout)
    "dp-old": ("fp32", False, "old_physical", True),
    "dp-sorted-fp32": ("fp32", True, "physical", True),
    "dp-fast": ("bf16", True, "physical", True),
    "dp-fast-nodropout": ("bf16", True, "physical", False),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=1024, help="SNLI training pairs to sample from")
    ap.add_argument("--steps", type=int, default=2, help="measured optimizer steps per mode and repeat")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of every mode")
    ap.add_argument("--logical-batch", type=int, default=256, help="expected Poisson batch (one optimizer step)")
    ap.add_argument("--physical", type=int, default=64, help="micro-batch of the sorted paths")
    ap.add_argument("--old-physical", type=int, default=16, help="micro-batch of the old path")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--lora", action="store_true", help="also the LoRA (FedIT) rows")
    ap.add_argument("--modes", default="nonprivate-fp32,nonprivate-auto,dp-old,dp-sorted-fp32,dp-fast,dp-fast-nodropout")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/privacy"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    base, tok = load_classifier(None, num_labels=3)
    examples = get_task("snli", eval_fraction=0.12).train_examples(limit=args.examples, seed=0)
    items = tokenize_all(examples, tok, "alpaca", args.max_length)
    pad = tok.pad_token_id
    modes = args.modes.split(",")
    plan: list[tuple[str, str, str]] = [("fedsb", "lorasb", m) for m in modes]
    if args.lora:
        plan += [("fedit", "lora", m) for m in modes]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(m, mode): [] for m, _, mode in plan}
    for repeat in range(args.repeats):
        for method, kind, mode in plan:
            model = build(base, kind, args.rank)
            kw = {"steps": args.steps, "logical": args.logical_batch}
            if mode.startswith("nonprivate"):
                r = run_nonprivate(model, items, pad, physical=args.physical, precision=mode.split("-")[1], **kw)
            else:
                precision, sort, phys, dropout = PRIVATE_MODES[mode]
                r = run_private(model, items, pad, physical=getattr(args, phys), precision=precision, sort=sort, dropout=dropout, **kw)
            runs[(method, mode)].append(r)
            print(
                f"[{repeat + 1}/{args.repeats}] {method:6s} {mode:18s} {r['examples_per_cpu_s']:8.2f} examples/CPU-s "
                f"{r['examples_per_s']:8.2f} examples/s ({r['examples']} in {r['cpu_seconds']:.1f} CPU-s, {r['seconds']:.1f} s)",
                flush=True,
            )
            del model
    rows = []
    for (method, mode), rs in runs.items():
        rates = sorted(r["examples_per_s"] for r in rs)
        cpu_rates = sorted(r["examples_per_cpu_s"] for r in rs)
        rows.append({
            "method": method, "rank": args.rank, "mode": mode, "examples_per_cpu_s": statistics.median(cpu_rates),
            "examples_per_s": statistics.median(rates), "best_examples_per_s": rates[-1], "runs": rs,
        })  # fmt: skip
    for row in rows:  # relative to the same method's old DP path
        ref = next((r for r in rows if r["method"] == row["method"] and r["mode"] == "dp-old"), None)
        row["cpu_vs_dp_old"] = row["examples_per_cpu_s"] / ref["examples_per_cpu_s"] if ref else None
        row["vs_dp_old"] = row["examples_per_s"] / ref["examples_per_s"] if ref else None
        row["best_vs_dp_old"] = row["best_examples_per_s"] / ref["best_examples_per_s"] if ref else None
    meta = {
        "model": "all-MiniLM-L6-v2 (packaged)",
        "targets": ["query", "value"],
        "head": HEAD,
        "logical_batch": args.logical_batch,
        "physical": args.physical,
        "old_physical": args.old_physical,
        "max_length": args.max_length,
        "steps": args.steps,
        "repeats": args.repeats,
        "examples": args.examples,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "load_average": list(os.getloadavg()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    fmt = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
    lines = [
        f"DP-SGD throughput on the CPU ({meta['torch_threads']} thread(s)), all-MiniLM-L6-v2, query+value, r = {args.rank}, "
        f"Poisson logical batch {args.logical_batch}, SNLI pairs; load average at the end {meta['load_average'][0]:.1f}.",
        "",
        f"Median of {args.repeats} interleaved repeats of {args.steps} step(s) per CPU second of the process (one thread: "
        "robust to other jobs on the machine), and per wall second (median and best).",
        "",
        "| method | mode | examples / CPU-s | vs dp-old | examples/s (median) | vs dp-old | examples/s (best) | vs dp-old |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['method']} | {r['mode']} | {r['examples_per_cpu_s']:.2f} | {fmt(r['cpu_vs_dp_old'])} | {r['examples_per_s']:.2f} | {fmt(r['vs_dp_old'])} "
        f"| {r['best_examples_per_s']:.2f} | {fmt(r['best_vs_dp_old'])} |"
        for r in rows
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
