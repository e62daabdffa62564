"""`fedsb eval`: evaluate a base model, or a saved adapter (merged for speed), on any task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console


def evaluate_command(
    task: Annotated[str, typer.Option(help="task name, e.g. gsm8k, arith, boolq")],
    adapter: Annotated[Optional[Path], typer.Option(help="adapter folder written by fedsb (omit: the base model)")] = None,
    model: Annotated[Optional[str], typer.Option(help="base model: hub name, path, or omitted for the packaged default")] = None,
    limit: Annotated[int, typer.Option(help="evaluate a seeded subset of N examples (0: all)")] = 0,
    seed: Annotated[int, typer.Option(help="seed of the subset")] = 0,
    mode: Annotated[str, typer.Option(help="generate or loglik")] = "generate",
    batch_size: Annotated[int, typer.Option(help="prompts per batch")] = 32,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="default: the task's own")] = None,
    template: Annotated[Optional[str], typer.Option(help="prompt template (default: the task's)")] = None,
    precision: Annotated[str, typer.Option(help="auto, fp32 or bf16")] = "auto",
    merge: Annotated[bool, typer.Option(help="fold the adapter into the weights first (same accuracy, faster)")] = True,
    out: Annotated[Optional[Path], typer.Option(help="write the result JSON here")] = None,
) -> None:
    """Evaluate a model or a trained adapter; prints accuracy with a 95% interval and throughput."""
    from fedsb.adapter.export import load_adapter, read_adapter_config
    from fedsb.adapter.inject import adapter_layers
    from fedsb.evaluation import evaluate
    from fedsb.models import load_model
    from fedsb.tasks import get_task

    console = Console()
    kind = "causal"
    if adapter is not None:
        config = read_adapter_config(adapter)
        model = model or config.get("base_model")
        kind = "classifier" if config.get("head_modules") else "causal"
    net, tokenizer = load_model(model, kind)
    if adapter is not None:
        load_adapter(net, adapter)
        if merge:
            for layer in adapter_layers(net).values():
                layer.merge()
    t = get_task(task)
    examples = t.eval_examples(limit=limit or None, seed=seed)
    custom = getattr(t, "evaluate_model", None)
    if custom is not None:
        result = custom(net, tokenizer, examples, batch_size=batch_size, precision=precision)
    else:
        result = evaluate(net, tokenizer, t, examples, template=template, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, mode=mode, precision=precision)  # fmt: skip
    result = {k: v for k, v in result.items() if k != "predictions"}
    lo, hi = result.get("ci95", (None, None))
    console.print(
        f"{task}: accuracy {100 * result['accuracy']:.2f}% "
        + (f"[95% CI {100 * lo:.1f}-{100 * hi:.1f}] " if lo is not None else "")
        + f"on {result['n']} examples in {result.get('wall_s', 0):.1f} s"
        + (f", {result['tokens_per_s']:.1f} generated tokens/s" if result.get("tokens_per_s") else "")
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"task": task, "adapter": str(adapter) if adapter else None, **result}, indent=2))
