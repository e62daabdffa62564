"""`fedsb eval`: evaluate a base model, or a saved adapter (merged for speed), on any task."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence, TypeVar

import typer
from rich.console import Console

from fedsb.config import ConfigError

T = TypeVar("T")
SUBSETS = ("first", "seeded")


def choose_subset(items: Sequence[T], limit: int, rule: str, seed: int) -> tuple[list[T], list[int]]:
    """(the subset, its positions in `items`): the first `limit` (lm-eval's `--limit`) or a
    seeded random choice kept in source order (what training configs use); all when limit is 0."""
    if rule not in SUBSETS:
        raise typer.BadParameter(f"--subset {rule!r}: allowed {', '.join(SUBSETS)}")
    if limit < 0:
        raise typer.BadParameter(f"--limit {limit}: must be >= 0")
    from fedsb.tasks.io import seeded_subset  # imports every task module (fedsb.tasks, ~25 ms): kept off the CLI's start-up

    positions = list(range(len(items)))
    if limit and limit < len(items):
        positions = positions[:limit] if rule == "first" else seeded_subset(positions, limit, seed)
    return [items[i] for i in positions], positions


def evaluate_command(
    task: Annotated[str, typer.Option(help="task name, e.g. gsm8k, arith, boolq")],
    adapter: Annotated[Optional[Path], typer.Option(help="adapter folder written by fedsb (omit: the base model)")] = None,
    model: Annotated[Optional[str], typer.Option(help="base model: hub name, path, or omitted for the packaged default")] = None,
    limit: Annotated[int, typer.Option(help="evaluate N examples (0: all); which ones: --subset")] = 0,
    subset: Annotated[str, typer.Option(help="with --limit: 'first' N (as lm-eval's --limit) or a 'seeded' random N in file order")] = "seeded",
    seed: Annotated[int, typer.Option(help="seed of a seeded subset")] = 0,
    mode: Annotated[str, typer.Option(help="generate or loglik (multiple choice: acc and acc_norm)")] = "generate",
    protocol: Annotated[Optional[str], typer.Option(help="commonsense tasks: 'label' (the papers') or 'text' (option text, as lm-eval); default: the task's")] = None,
    batch_size: Annotated[int, typer.Option(help="prompts per batch")] = 32,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="default: the task's own")] = None,
    template: Annotated[Optional[str], typer.Option(help="prompt template (default: the task's)")] = None,
    precision: Annotated[str, typer.Option(help="auto, fp32 or bf16 (fp32 to compare with lm-eval)")] = "auto",
    merge: Annotated[bool, typer.Option(help="fold the adapter into the weights first (same accuracy, faster)")] = True,
    out: Annotated[Optional[Path], typer.Option(help="write the result JSON here")] = None,
    option: Annotated[Optional[list[str]], typer.Option(help="a task option KEY=VALUE (repeatable), e.g. task sft: eval_path=party-a/eval.jsonl answer_check=regex")] = None,
) -> None:
    """Evaluate a model or a trained adapter; prints accuracy with a 95% interval and throughput."""
    # Slow dependencies (torch, transformers): only once the command runs.
    from fedsb.adapter.export import load_adapter, read_adapter_config  # slow dependency (torch): the CLI stays torch-free
    from fedsb.adapter.inject import adapter_layers  # imports torch (fedsb.adapter.inject)
    from fedsb.models import load_model  # imports torch (fedsb.models)
    from fedsb.scoring import EvalSettings, evaluate_task  # imports torch (fedsb.scoring)
    from fedsb.tasks import get_task  # imports every task module (fedsb.tasks, ~25 ms): kept off the CLI's start-up

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
    t = get_task(task, **({"protocol": protocol} if protocol else {}), **task_options(option or []))
    examples, positions = choose_subset(t.eval_examples(), limit, subset, seed)
    settings = EvalSettings(batch_size=batch_size, precision=precision, template=template, max_new_tokens=max_new_tokens, mode=mode, details=True)
    result = evaluate_task(net, tokenizer, t, examples, settings)
    result = {k: v for k, v in result.items() if k != "predictions"}
    console.print(_summary_line(task, result))
    if out is not None:
        record: dict[str, Any] = {
            "task": task,
            "adapter": str(adapter) if adapter else None,
            "model": model,
            "protocol": getattr(t, "protocol", None),
            "subset": {"rule": subset if limit else "all", "limit": limit, "seed": seed if subset == "seeded" else None},
            "example_ids": [ex.meta.get("id", i) for ex, i in zip(examples, positions)],
            **result,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2))


def task_options(items: list[str]) -> dict[str, Any]:
    """`--option KEY=VALUE` items as task options: a TOML value (number, bool, quoted string) or
    else the text as it is."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out


def _summary_line(task: str, result: dict[str, Any]) -> str:
    lo, hi = result.get("ci95", (None, None))
    if result.get("accuracy") is None:  # e.g. task sft without an answer check: loss and perplexity
        return f"{task}: held-out loss {result.get('loss')} (perplexity {result.get('perplexity')}) on {result['n']} examples in {result.get('wall_s', 0):.1f} s"
    parts = [f"{task}: {result.get('headline', 'accuracy')} {100 * result['accuracy']:.2f}%"]
    if lo is not None:
        parts.append(f"[95% CI {100 * lo:.1f}-{100 * hi:.1f}]")
    if result.get("loss") is not None:
        parts.append(f"held-out loss {result['loss']:.4f}")
    for key, (a, b) in result.get("intervals", {}).items():
        if key != result.get("headline"):
            parts.append(f"({key} {100 * result['metrics'][key]:.2f}% [{100 * a:.1f}-{100 * b:.1f}])")
    parts.append(f"on {result['n']} examples in {result.get('wall_s', 0):.1f} s")
    if result.get("protocol"):
        parts.append(f"(protocol {result['protocol']}, precision {result.get('precision_used')})")
    line = " ".join(parts)
    if result.get("tokens_per_s"):
        line += f", {result['tokens_per_s']:.1f} generated tokens/s"
    return line
