"""Issue 4: one training step of LoRA-SB against peft LoRA, side by side, plus peak memory.

    python benchmarks/bench_step.py --out results/bench/step [--before] [--repeats 5]

Default model (SmolLM2-135M) on the CPU, batch 4 x 128 tokens, all seven projections; LoRA-SB
rank 64 vs peft LoRA rank 8 and 64 (`peft.get_peft_model` + `LoraConfig`), fp32 and bf16
autocast, timed interleaved. `--before` adds LoRA-SB as the code was before the speed work
(benchmarks/reference_layer.py: the old adapter layer, AdamW's per-tensor loop and the
full-logits loss), so the effect of the changes is itself a side-by-side ratio. `--task arith`
trains on that task's examples (response-only labels) instead of random ids, and also times
LoRA-SB with the full-logits loss alone. Memory: RSS high-water mark of training, one fresh
process per setting.
"""

from __future__ import annotations

import argparse
from _common import log, write
from reference_layer import reference_variant

from fedsb.bench.machine import machine_info
from fedsb.bench.report import _mmm, _table
from fedsb.bench.train import CustomVariant, measure_memory, measure_training


def full_logits_variant(rank: int, targets: list[str]) -> CustomVariant:
    """LoRA-SB trained with the model's own loss (`model(**batch).loss`: logits at every position)."""
    from fedsb.bench.train import Variant, build_variant

    return CustomVariant("lorasb", rank, lambda m: build_variant(m, Variant("lorasb", rank), targets, copy_model=False), loss_fn=lambda m, b: m(**b).loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench/step")
    ap.add_argument("--model", default=None)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--low-rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", action="store_true", help="also time the code before the speed work (layer, optimizer, loss)")
    ap.add_argument("--full", action="store_true", help="also time full fine-tuning")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--task", default=None, help="train on this task's examples (response-only labels) instead of random ids, "
                    "and also time LoRA-SB with the model's own full-logits loss")
    ap.add_argument("--only-lorasb", action="store_true", help="skip the peft variants")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from fedsb.bench.train import DEFAULT_TARGETS

    variants = [f"lorasb:{args.rank}"] + ([] if args.only_lorasb else [f"peft:{args.rank}", f"peft:{args.low_rank}"]) + (["full"] if args.full else [])
    custom = {f"lorasb-r{args.rank}-before": reference_variant(args.rank, DEFAULT_TARGETS)} if args.before else {}
    if args.task:
        custom[f"lorasb-r{args.rank}-full-logits"] = full_logits_variant(args.rank, DEFAULT_TARGETS)
    result = {"machine": machine_info()}
    result["train"] = measure_training(
        args.model, variants=variants, batch=args.batch, seq=args.seq, repeats=args.repeats, custom=custom, data_task=args.task, log=log,
    )
    if not args.no_memory:
        result["memory"] = measure_memory(args.model, variants, ["fp32", "bf16"], batch=args.batch, seq=args.seq, log=log)
    t = result["train"]
    md = [f"# Training step: LoRA-SB vs peft LoRA ({t['batch']} x {t['seq']} tokens of {t['data']}, {t['repeats']} interleaved repetitions, "
          f"{result['machine']['torch_threads']} threads, load {t['load_average']})\n"]
    md.append(_table(["variant", "precision", "step s", "tokens/s", "% of matmul peak"], [
        [e["variant"], e["precision"], _mmm(e["wall_s"]), _mmm(e["tokens_per_s"], "{:.0f}"), _mmm(e.get("fraction_of_matmul_peak"), "{:.0f}%", 100)]
        for e in t["runs"].values()
    ]))
    md.append(_table(["ratio", "wall", "cpu time"], [[k, _mmm(v["wall"]), _mmm(v["cpu"])] for k, v in t["ratios"].items()]))
    if "memory" in result:
        md.append(f"Memory: {result['memory']['method']}\n")
        md.append(_table(["variant/precision", "RSS before MiB", "training delta MiB"], [
            [k, f"{v['rss_before_bytes'] / 2**20:.0f}", f"{v['training_delta_bytes'] / 2**20:.0f}"] for k, v in result["memory"]["runs"].items()
        ]))
    write(args.out, "step", result, "\n".join(md))


if __name__ == "__main__":
    main()
