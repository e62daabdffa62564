"""Local training of the trainable tensors: AdamW, warm-up + decay schedule, accumulation.

The schedule runs over the whole federation (all rounds), not per round: restarting warm-up
every round was a bug of the paper's code. Every step that exists gets a non-zero learning rate,
so few examples with large accumulation still train (another of its bugs).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsb.precision import autocast_context


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Learning rate of 0-based optimizer step `step`; positive for every step < total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return base_lr * (1.0 - progress * decay_steps / (decay_steps + 1))
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress * decay_steps / (decay_steps + 1)))
    raise ValueError(f"unknown schedule {schedule!r}; allowed: linear, cosine, constant")


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    return int(round(warmup_ratio * total_steps))


@lru_cache(maxsize=64)
def _takes_logits_to_keep(forward_owner: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(forward_owner.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward
        return False


def causal_lm_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """`model(**batch).loss` of a causal LM, with the output head run only where a label needs it.

    Logits at position t predict the label at t+1; with response-only labels most positions
    carry none (88% of them for the answer-only arithmetic task), and the vocabulary projection,
    the fp32 upcast and the log-softmax over 49k tokens are a large share of a small model's step.
    So the logits are computed from the first position (over the batch) whose next label counts
    (`logits_to_keep`) and the loss is the same mean cross-entropy as transformers'
    `ForCausalLMLoss`. Anything else (classifiers, models without `logits_to_keep`, batches without
    a label) gets the model's own loss.
    """
    labels, ids = batch.get("labels"), batch.get("input_ids")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrappers pass kwargs on
    if labels is None or ids is None or labels.dim() != 2 or labels.shape != ids.shape or not _takes_logits_to_keep(type(base)):
        return model(**batch).loss
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]  # what position t predicts
    counted = (shifted != -100).any(dim=0)
    if not bool(counted.any()):
        return model(**batch).loss
    first = int(counted.nonzero()[0])
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=shifted.shape[1] - first).logits
    return F.cross_entropy(logits.float().flatten(0, -2), shifted[:, first:].flatten(), ignore_index=-100)


@dataclass
class StepResult:
    steps: int
    mean_loss: float
    tokens: int


def make_optimizer(params: Sequence[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    bad = [p.dtype for p in params if p.dtype != torch.float32]
    if bad:  # bf16 R loses small AdamW steps (27.5% of R's diagonal never moved in the paper's code)
        raise TypeError(f"trainable tensors must be fp32, found {bad[0]}")
    # One fused kernel for all tensors: the default per-tensor loop on the CPU runs ~10 small ops
    # per tensor (2,100 for SmolLM2's 210 R matrices), which costs more than the update itself.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def train_steps(
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    params: Sequence[nn.Parameter],
    grad_accum: int,
    lr_for_step: Callable[[int], float],
    first_step: int,
    max_grad_norm: float,
    precision: str,
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], Tensor] | None = None,
    on_step: Callable[[float], None] | None = None,
) -> StepResult:
    """Run optimizer steps over `batches` (grad_accum micro-batches per step)."""
    model.train()
    device = next(model.parameters()).device
    losses: list[float] = []
    tokens = 0
    step = first_step
    groups = [batches[i : i + grad_accum] for i in range(0, len(batches), grad_accum)]
    for group in groups:
        for g in optimizer.param_groups:
            g["lr"] = lr_for_step(step)
        optimizer.zero_grad(set_to_none=True)
        group_loss = 0.0
        for batch in group:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast_context(device, precision):
                loss = (loss_fn or causal_lm_loss)(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss is {loss.item()} at step {step}: a batch without supervised tokens "
                    "(response cut by train.max_length?) or a learning rate that is too high"
                )
            (loss.float() / len(group)).backward()
            group_loss += loss.item() / len(group)
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        losses.append(group_loss)
        step += 1
        if on_step is not None:
            on_step(group_loss)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(steps=len(groups), mean_loss=sum(losses) / max(1, len(losses)), tokens=tokens)
