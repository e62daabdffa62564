"""Attention kernel under CPU bf16 autocast: torch's SDPA in bf16 vs in fp32 vs eager, one step.

    python benchmarks/bench_attention.py --out results/bench/attention [--threads 1] [--layers 30]

On this CPU (avx512_bf16, no AMX) the bf16 flash-attention kernel, forward and especially
backward, is slower than the fp32 one; autocast runs SDPA in bf16. Timed side by side, LoRA-SB
rank 64, batch 4 x 128: "sdpa" (transformers' default), "sdpa-fp32" (the same SDPA call with
autocast off and q, k, v upcast; output cast back to bf16, a custom attention function
registered with transformers' AttentionInterface, defined below) and "eager" (bf16 matmuls,
fp32 softmax). Not wired into fedsb: this measures what the change would buy.
"""

from __future__ import annotations

import argparse

import torch
from _common import log, write

from fedsb.bench.machine import machine_info
from fedsb.bench.report import _mmm, _table
from fedsb.bench.timing import interleave, load_average, ratio, spread
from fedsb.bench.train import DEFAULT_TARGETS, Variant, build_variant, load_base, random_batch, step_callable


def register_sdpa_fp32() -> str:
    """Register "sdpa_fp32": SDPA computed in fp32 when CPU autocast is on (else plain SDPA)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def sdpa_fp32(module, query, key, value, attention_mask, **kwargs):
        if query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            mask = attention_mask.float() if attention_mask is not None and attention_mask.is_floating_point() else attention_mask
            with torch.autocast("cpu", enabled=False):
                out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask, **kwargs)
            return out.to(dtype), weights
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("sdpa_fp32", sdpa_fp32)
    AttentionMaskInterface.register("sdpa_fp32", sdpa_mask)
    return "sdpa_fp32"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench/attention")
    ap.add_argument("--model", default=None)
    ap.add_argument("--layers", type=int, default=None, help="keep only the first n decoder layers (faster)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    register_sdpa_fp32()
    base, _ = load_base(args.model)
    if args.layers:
        base.model.layers = base.model.layers[: args.layers]
        base.config.num_hidden_layers = args.layers
    data = random_batch(base.config.vocab_size, 4, 128)
    fns = {}
    for impl in ("sdpa", "sdpa_fp32", "eager"):
        model, params = build_variant(base, Variant("lorasb", args.rank), DEFAULT_TARGETS)
        model.set_attn_implementation(impl)
        for prec in ("fp32", "bf16"):
            fns[f"{impl}/{prec}"] = step_callable(model, params, data, prec)
    before = load_average()
    samples = interleave(fns, repeats=args.repeats, warmup=1, on_sample=lambda n, r, s: log(f"  {n} rep {r + 1}: {s.cpu:.2f} s cpu"))
    ratios = {}
    for impl in ("sdpa_fp32", "eager"):
        for prec in ("fp32", "bf16"):
            a, b = samples[f"{impl}/{prec}"], samples[f"sdpa/{prec}"]
            ratios[f"step time {impl} / sdpa ({prec})"] = {"wall": ratio(a, b), "cpu": ratio(a, b, "cpu")}
    for impl in ("sdpa", "sdpa_fp32", "eager"):
        a, b = samples[f"{impl}/fp32"], samples[f"{impl}/bf16"]
        ratios[f"bf16 speed-up with {impl} (fp32 time / bf16 time)"] = {"wall": ratio(a, b), "cpu": ratio(a, b, "cpu")}
    result = {
        "machine": machine_info(), "layers": base.config.num_hidden_layers, "runs": {k: {"wall_s": spread([s.wall for s in v]), "cpu_s": spread([s.cpu for s in v])} for k, v in samples.items()},
        "ratios": ratios, "load_average": {"before": before, "after": load_average()},
    }
    md = [f"# Attention kernel under bf16 autocast (LoRA-SB r{args.rank}, 4 x 128, {result['layers']} layers, {torch.get_num_threads()} threads, load {result['load_average']})\n"]
    md.append(_table(["impl/precision", "step wall s", "step cpu s"], [[k, _mmm(v["wall_s"]), _mmm(v["cpu_s"])] for k, v in result["runs"].items()]))
    md.append(_table(["ratio", "wall", "cpu"], [[k, _mmm(v["wall"]), _mmm(v["cpu"])] for k, v in ratios.items()]))
    write(args.out, "attention", result, "\n".join(md))


if __name__ == "__main__":
    main()
