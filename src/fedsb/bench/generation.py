"""Evaluation speed: generated tokens/s of batched greedy generation on GSM8K prompts.

The model carries unmerged LoRA-SB adapters, as it does when the federation evaluates, and
generation goes through `fedsb.evaluation.generate_with_stats` (the engine behind `generate`)
with the task's stop strings. Only tokens up to EOS count: work spent on sequences of a batch
that already finished is the price of batching and is included in the time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fedsb.bench.timing import interleave, load_average, spread, summarize


def gsm8k_prompts(tokenizer: Any, limit: int) -> tuple[list[str], tuple[str, ...]]:
    from fedsb.evaluation import task_template
    from fedsb.tasks import get_task
    from fedsb.tasks.prompts import render_prompt

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
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    from fedsb.adapter.inject import inject_adapters
    from fedsb.bench.train import DEFAULT_TARGETS, load_base
    from fedsb.evaluation import generate_with_stats
    from fedsb.init import init_random

    model, tok = load_base(model_name)
    layers = inject_adapters(model, list(targets or DEFAULT_TARGETS), kind="lorasb", rank=rank)
    init_random(layers, seed=0)
    texts, stops = gsm8k_prompts(tok, prompts)
    tokens: dict[str, list[int]] = {}
    fns = {}
    for bs in batch_sizes:
        subset = texts[: prompts_batch1] if bs == 1 else texts
        key = f"batch {bs}"
        tokens[key] = []

        def run(subset: list[str] = subset, bs: int = bs, key: str = key) -> None:
            out = generate_with_stats(model, tok, subset, max_new_tokens=max_new_tokens, stop_strings=stops, batch_size=bs, progress=False, precision=precision)
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
    if "batch 1" in samples:
        for key in samples:
            if key != "batch 1":
                ratios[f"tokens/s {key} / batch 1"] = spread(
                    [(t / x.wall) / (t1 / x1.wall) for t, x, t1, x1 in zip(tokens[key][warmup:], samples[key], tokens["batch 1"][warmup:], samples["batch 1"])]
                )
    return {
        "model": model_name or "default", "adapter": f"LoRA-SB r={rank}, unmerged", "precision": precision,
        "max_new_tokens": max_new_tokens, "stop_strings": list(stops), "repeats": repeats,
        "runs": runs, "ratios": ratios, "load_average": {"before": before, "after": load_average()},
    }


