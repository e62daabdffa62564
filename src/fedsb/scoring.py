"""Which evaluation a task gets, from what it declares; the model loops live here, not in tasks.

A task declares its `output_type` (lm-evaluation-harness's names) and holds data, prompts and
graders; `evaluate_task` picks the loop:
- "classify": `classify_accuracy`, the argmax of a sequence-classification head;
- "generate_until", "multiple_choice": `fedsb.evaluation.evaluate` (greedy generations graded by
  `task.score`, or options ranked by log-likelihood, as `EvalSettings.mode` says);
- a task that declares `heldout_loss = True` (the user's own SFT data): `heldout_evaluation`,
  held-out loss and perplexity, its answer check if any, and a few generations to read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedsb.data import IGNORE_INDEX, collate, tokenize_pair
from fedsb.evaluation import _inference, evaluate, generate_with_stats, task_template, wilson_interval
from fedsb.precision import autocast_context
from fedsb.tasks.base import PairExample, Task


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate: from the run's config, or from `fedsb eval`'s options."""

    batch_size: int = 16
    precision: str = "auto"
    template: str | None = None  # prompt template; None: the task's own
    max_new_tokens: int | None = None  # generation budget; None: the task's own
    mode: str = "generate"  # "generate" or "loglik", for generative and multiple-choice tasks
    max_length: int = 1024  # tokens per held-out example (heldout_loss tasks)
    details: bool = False  # per-example scores and picks (loglik mode)


def evaluate_task(model: torch.nn.Module, tokenizer: Any, task: Task, examples: Sequence[Any], settings: EvalSettings) -> dict[str, Any]:
    """The task's evaluation (see the module docstring); the result keeps "predictions" if any."""
    s = settings
    if task.output_type == "classify":
        return classify_accuracy(model, tokenizer, list(examples), max_length=task.max_length, batch_size=s.batch_size, precision=s.precision)  # type: ignore[attr-defined]
    if task.heldout_loss:
        return heldout_evaluation(
            model, tokenizer, task, list(examples), batch_size=s.batch_size, precision=s.precision,
            template=s.template, max_new_tokens=s.max_new_tokens, max_length=s.max_length,
        )  # fmt: skip
    return evaluate(
        model, tokenizer, task, examples, template=s.template, batch_size=s.batch_size,
        max_new_tokens=s.max_new_tokens, mode=s.mode, precision=s.precision, details=s.details,
    )  # fmt: skip


def classify_accuracy(model: torch.nn.Module, tokenizer: Any, examples: list[PairExample], *, max_length: int, batch_size: int, precision: str) -> dict[str, Any]:
    """Accuracy of the classifier's argmax, batched by length; Wilson 95% interval."""
    start = time.perf_counter()
    device = next(model.parameters()).device
    encoded = [tokenize_pair(ex, tokenizer, max_length) for ex in examples]  # as in training
    order = sorted(range(len(examples)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    predictions = [0] * len(examples)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast_context(device, precision):
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                batch = collate([encoded[i] for i in idx], pad, classification=True)
                logits = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits
                for i, p in zip(idx, logits.argmax(-1).tolist()):
                    predictions[i] = p
    finally:
        model.train(was_training)
    correct = sum(int(p == ex.label) for p, ex in zip(predictions, examples))
    n = len(examples)
    return {
        "accuracy": correct / n if n else None,
        "n": n,
        "correct": correct,
        "ci95": list(wilson_interval(correct, n)),
        "wall_s": time.perf_counter() - start,
    }


def heldout_evaluation(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Any,
    examples: list[Any],
    *,
    batch_size: int = 16,
    precision: str = "auto",
    template: str | None = None,
    max_new_tokens: int | None = None,
    max_length: int = 1024,
) -> dict[str, Any]:
    """Held-out loss / perplexity, the task's answer check if any, and `num_samples` generations."""
    tpl = template or task.default_template
    start = time.perf_counter()
    loss_sum, tokens = heldout_loss(model, tokenizer, examples, tpl, max_length=max_length, precision=precision)
    checked = task.options.answer_check != "none"
    shown = examples if checked else examples[: task.options.num_samples]
    gens = generate_with_stats(
        model, tokenizer, [ex.prompt_text(tokenizer, tpl) for ex in shown],
        max_new_tokens=max_new_tokens or task.max_new_tokens, batch_size=batch_size, progress=True, precision=precision,
    ).texts if shown else []  # fmt: skip
    scores = [task.score(g, ex) for g, ex in zip(gens, shown)]
    n = len(examples)
    loss = loss_sum / tokens if tokens else None
    out: dict[str, Any] = {
        "task": task.name,
        "n": n,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)) if loss is not None else None,
        "eval_tokens": tokens,
        "loss_sum": loss_sum,
    }
    if checked:
        correct = sum(int(s["correct"]) for s in scores)
        out.update(correct=correct, accuracy=correct / n if n else None, ci95=list(wilson_interval(correct, n)))
    out["samples"] = [
        {"prompt": ex.prompt_text(tokenizer, tpl), "reference": ex.reference, "generation": g, **({"correct": s["correct"]} if checked else {})}
        for ex, g, s in list(zip(shown, gens, scores if checked else [{}] * len(gens)))[: task.options.num_samples]
    ]
    out["wall_s"] = time.perf_counter() - start
    return out


def heldout_loss(model: torch.nn.Module, tokenizer: Any, examples: list[Any], template: str, *, max_length: int, precision: str, tokens_per_forward: int = 2048) -> tuple[float, int]:
    """(summed next-token loss, token count) over the examples' trained tokens (fp32 softmax).

    Rows go through in length order, as many per forward as fit in `tokens_per_forward` padded
    tokens, so the logits of a 49k vocabulary stay a few hundred MB.
    """
    if not examples:
        return 0.0, 0
    items = sorted((ex.tokenize(tokenizer, template, max_length) for ex in examples), key=len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with _inference(model, precision, merge=True):
        i = 0
        while i < len(items):
            j = i + 1
            while j < len(items) and len(items[j]) * (j + 1 - i) <= tokens_per_forward:
                j += 1
            batch = {k: v.to(device) for k, v in collate(items[i:j], pad).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total += float(nll)
            count += int((labels != IGNORE_INDEX).sum())
            i = j
    return total, count
