"""Generation speed before/after the adapter's cached low-precision weights, side by side.

    python benchmarks/bench_generate.py --out results/bench/generate [--batch 16] [--threads 1]

Three models with the same LoRA-SB adapter (rank 64, seven projections), generating greedily on
the same GSM8K prompts under bf16 autocast, interleaved: "before" (benchmarks/reference_layer.py:
autocast re-casts every frozen weight at every decoding step), "after" (fedsb.adapter.layer
caches them), and "after + cached head": also the output head's weight cached in bf16 (a
monkeypatch here: the head is not an adapter layer), to size what that would add.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from _common import log, write
from reference_layer import build_lorasb

from fedsb.bench.generation import gsm8k_prompts
from fedsb.bench.machine import machine_info
from fedsb.bench.report import _mmm, _table
from fedsb.bench.timing import interleave, load_average, spread
from fedsb.bench.train import DEFAULT_TARGETS, Variant, build_variant, load_base
from fedsb.evaluation import generate_with_stats


def cache_head(model: torch.nn.Module) -> None:
    head = model.get_output_embeddings()
    cache: dict = {}

    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            key = (dtype, head.weight._version, head.weight.data_ptr())
            if cache.get("key") != key:
                cache["key"], cache["w"] = key, head.weight.detach().to(dtype)
            return F.linear(x.to(dtype), cache["w"], None if head.bias is None else head.bias.to(dtype))
        return F.linear(x, head.weight, head.bias)

    head.forward = forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench/generate")
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tok = load_base(args.model)
    texts, stops = gsm8k_prompts(tok, args.prompts)
    after, _ = build_variant(base, Variant("lorasb", args.rank), DEFAULT_TARGETS)
    before, _ = build_lorasb(copy.deepcopy(base), args.rank, DEFAULT_TARGETS)
    head, _ = build_variant(base, Variant("lorasb", args.rank), DEFAULT_TARGETS)
    cache_head(head)
    models = {"before": before, "after": after, "after + cached head": head}
    tokens: dict[str, list[int]] = {}
    fns = {}
    for bs in args.batch:
        for name, model in models.items():
            key = f"{name} / batch {bs}"
            tokens[key] = []

            def run(model=model, bs=bs, key=key) -> None:
                tokens[key].append(generate_with_stats(model, tok, texts, max_new_tokens=args.max_new_tokens, stop_strings=stops, batch_size=bs, progress=False, precision="bf16").tokens)

            fns[key] = run
    before_load = load_average()
    samples = interleave(fns, repeats=args.repeats, warmup=1, on_sample=lambda n, r, s: log(f"  {n} rep {r + 1}: {s.wall:.1f} s"))
    runs = {k: {"wall_s": spread([x.wall for x in v]), "tokens_per_s": spread([t / x.wall for t, x in zip(tokens[k][1:], v)]), "tokens": tokens[k][1:]} for k, v in samples.items()}
    ratios = {}
    for bs in args.batch:
        ref = samples[f"before / batch {bs}"]
        for name in ("after", "after + cached head"):
            cur = samples[f"{name} / batch {bs}"]
            ratios[f"speed-up {name} vs before, batch {bs} (before time / time)"] = {
                "wall": spread([b.wall / a.wall for a, b in zip(cur, ref)]), "cpu": spread([b.cpu / a.cpu for a, b in zip(cur, ref)]),
            }
    result = {"machine": machine_info(), "settings": vars(args), "runs": runs, "ratios": ratios, "load_average": {"before": before_load, "after": load_average()}}
    md = [f"# Generation before/after (GSM8K prompts, {args.prompts} prompts, up to {args.max_new_tokens} new tokens, bf16 autocast, "
          f"{torch.get_num_threads()} threads, load {result['load_average']})\n"]
    md.append(_table(["model / batch", "wall s", "generated tokens/s"], [[k, _mmm(v["wall_s"]), _mmm(v["tokens_per_s"], "{:.1f}")] for k, v in runs.items()]))
    md.append(_table(["ratio", "wall", "cpu"], [[k, _mmm(v["wall"]), _mmm(v["cpu"])] for k, v in ratios.items()]))
    write(args.out, "generate", result, "\n".join(md))


if __name__ == "__main__":
    main()
