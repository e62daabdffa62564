"""Evaluation speed: generated tokens/s of batched greedy generation on GSM8K prompts.

The model carries LoRA-SB adapters, as it does when the federation evaluates, and generation
goes through `fedsb.evaluation.generate_with_stats` (the engine behind `generate`) with the
task's stop strings; the adapters are merged into the weights for the call (the default). The
largest batch also runs as before the speed work ("before": unmerged, strided LM-head input),
interleaved with the merged runs, and
`agreement` compares greedy texts on `agreement_prompts` prompts: unmerged fp32 (the
reference) against merged fp32 and merged in the benchmark's precision. Only tokens up to EOS
count: work spent on sequences of a batch that already finished is included in the time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

from fedsb.bench.timing import interleave, load_average, spread, summarize
from fedsb.tasks import get_task
from fedsb.tasks.prompts import render_prompt


@contextlib.contextmanager
def _before_fixes() -> Iterator[None]:
    """The generation path as it was before the speed work: adapters unmerged (merge=False at
    the call) and the LM head fed a strided view (no `contiguous_head_input`)."""
    with mock.patch("fedsb.evaluation.contiguous_head_input", lambda model: contextlib.nullcontext()):
        yield


def gsm8k_prompts(tokenizer: Any, limit: int) -> tuple[list[str], tuple[str, ...]]:
    from fedsb.evaluation import task_template  # imports torch (fedsb.evaluation)

    task = get_task("gsm8k")
    examples = task.eval_examples(limit=limit)
    template = task_template(task)
    return [render_prompt(ex.instruction, template, tokenizer) for ex in examples], tuple(task.stop_strings)


def measure_generation(
    model_name: str | None = None,
    *,
    batch_sizes: Sequence[int] = (1, 16, 32),
    prompts: int = 32,
    prompts_batch1: int = 8,
    max_new_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
    precision: str = "auto",
    rank: int = 64,
    targets: Sequence[str] | None = None,
    agreement_prompts: int = 50,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    from fedsb.adapter.inject import inject_adapters  # imports torch (fedsb.adapter.inject)
    from fedsb.bench.train import DEFAULT_TARGETS, load_base  # imports torch (fedsb.bench.train)
    from fedsb.evaluation import generate_with_stats  # imports torch (fedsb.evaluation)
    from fedsb.init import init_random  # imports torch (fedsb.init)

    model, tok = load_base(model_name)
    layers = inject_adapters(model, list(targets or DEFAULT_TARGETS), kind="lorasb", rank=rank)
    init_random(layers, seed=0)
    texts, stops = gsm8k_prompts(tok, prompts)
    tokens: dict[str, list[int]] = {}
    fns = {}
    largest = max(batch_sizes)
    cases = [(f"batch {bs}", bs, True) for bs in batch_sizes] + [(f"batch {largest} unmerged (before)", largest, False)]
    for key, bs, after in cases:
        subset = texts[: prompts_batch1] if bs == 1 else texts
        tokens[key] = []

        def run(subset: list[str] = subset, bs: int = bs, key: str = key, after: bool = after) -> None:
            with contextlib.nullcontext() if after else _before_fixes():
                out = generate_with_stats(model, tok, subset, max_new_tokens=max_new_tokens, stop_strings=stops, batch_size=bs, progress=False, precision=precision, merge=after)
            tokens[key].append(out.tokens)

        fns[key] = run
    before = load_average()
    samples = interleave(
        fns, repeats=repeats, warmup=warmup,
        on_sample=(lambda n, r, s: log(f"  generate {n} rep {r + 1}: {s.wall:.2f} s")) if log else None,
    )
    runs = {}
    for key, s in samples.items():
        toks = tokens[key][warmup:]
        runs[key] = {
            **summarize(s),
            "prompts": prompts_batch1 if key == "batch 1" else len(texts),
            "generated_tokens": toks,
            "tokens_per_s": spread([t / x.wall for t, x in zip(toks, s)]),
        }
    ratios = {}
    before_key = f"batch {largest} unmerged (before)"
    ratios[f"tokens/s batch {largest} merged / unmerged"] = spread(
        [(t / x.wall) / (t0 / x0.wall) for t, x, t0, x0 in zip(tokens[f"batch {largest}"][warmup:], samples[f"batch {largest}"], tokens[before_key][warmup:], samples[before_key])]
    )
    if "batch 1" in samples:
        for key in samples:
            if key not in ("batch 1", before_key):
                ratios[f"tokens/s {key} / batch 1"] = spread(
                    [(t / x.wall) / (t1 / x1.wall) for t, x, t1, x1 in zip(tokens[key][warmup:], samples[key], tokens["batch 1"][warmup:], samples["batch 1"])]
                )
    agreement = greedy_agreement(model, tok, agreement_prompts, max_new_tokens, largest, precision) if agreement_prompts else {}
    return {
        "model": model_name or "default", "adapter": f"LoRA-SB r={rank}, merged for generation", "precision": precision,
        "agreement": agreement,
        "max_new_tokens": max_new_tokens, "stop_strings": list(stops), "repeats": repeats,
        "runs": runs, "ratios": ratios, "load_average": {"before": before, "after": load_average()},
    }




def greedy_agreement(model: Any, tok: Any, n: int, max_new_tokens: int, batch_size: int, precision: str) -> dict[str, Any]:
    """Share of prompts whose greedy text equals the unmerged fp32 reference, per variant."""
    from fedsb.evaluation import generate, inference_precision  # imports torch (fedsb.evaluation)

    texts, stops = gsm8k_prompts(tok, n)
    kw = dict(max_new_tokens=max_new_tokens, stop_strings=stops, batch_size=batch_size, progress=False)
    ref = generate(model, tok, texts, precision="fp32", merge=False, **kw)
    variants = {"merged fp32": ("fp32", True)}
    mode = inference_precision(model, precision)
    if mode != "as_is":
        variants[f"merged {mode}"] = (precision, True)
        variants[f"unmerged {mode}"] = (precision, False)
    out: dict[str, Any] = {"prompts": len(texts), "reference": "unmerged fp32"}
    for name, (prec, merge) in variants.items():
        got = generate(model, tok, texts, precision=prec, merge=merge, **kw)
        out[name] = sum(a == b for a, b in zip(got, ref)) / max(len(ref), 1)
    return out
