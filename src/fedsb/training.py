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

from fedsb.head_loss import chunked_head_cross_entropy, fused_head_supported, head_softcap
from fedsb.heap import release_free_memory
from fedsb.physical_batch import plan_physical_batches, supports_repacking
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


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (peft wrappers pass kwargs on), else `model`."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@lru_cache(maxsize=64)
def _takes_logits_to_keep(forward_owner: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(forward_owner.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward
        return False


def _shifted_labels(batch: Mapping[str, Tensor]) -> Tensor | None:
    """What position t predicts (labels moved left by one), for a causal LM batch; else None."""
    labels, ids = batch.get("labels"), batch.get("input_ids")
    if labels is None or ids is None or labels.dim() != 2 or labels.shape != ids.shape:
        return None
    return F.pad(labels, (0, 1), value=-100)[:, 1:]


def _head_logits(model: nn.Module, batch: Mapping[str, Tensor], shifted: Tensor) -> tuple[Tensor, int]:
    """(logits from the first position whose next label counts, that position) (`logits_to_keep`)."""
    base = _unwrapped(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    counted = (shifted != -100).any(dim=0)
    if not _takes_logits_to_keep(type(base)) or not bool(counted.any()):
        return model(**inputs).logits, 0
    first = int(counted.nonzero()[0])
    return model(**inputs, logits_to_keep=shifted.shape[1] - first).logits, first


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
    shifted = _shifted_labels(batch)
    base = _unwrapped(model)
    if shifted is None or not _takes_logits_to_keep(type(base)) or not bool((shifted != -100).any()):
        return model(**batch).loss
    logits, first = _head_logits(model, batch, shifted)
    return F.cross_entropy(logits.float().flatten(0, -2), shifted[:, first:].flatten(), ignore_index=-100)


def causal_lm_row_losses(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Summed cross-entropy of each row's supervised tokens (rows,), fp32: the pieces from which
    any per-token normalization over any grouping of rows can be rebuilt exactly."""
    shifted = _shifted_labels(batch)
    if shifted is None:
        raise ValueError("per-row losses need a causal LM batch (2-D labels shaped like input_ids)")
    logits, first = _head_logits(model, batch, shifted)
    target = shifted[:, first:]
    ce = F.cross_entropy(logits.float().flatten(0, -2), target.flatten(), ignore_index=-100, reduction="none")
    return ce.view(target.shape).sum(dim=1)


# Causal LMs whose transformers implementation builds its attention mask with
# `masking_utils.create_causal_mask`, which keeps packed rows apart when it gets position_ids
# that restart at 0 and no attention mask (tests/test_physical_batch.py checks it on tiny-llama).
PACKING_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # tested: llama (tiny-llama, SmolLM2)


def supports_packing(model: nn.Module) -> bool:
    """True where rows can be packed into one sequence (see `fedsb.physical_batch`)."""
    base = _unwrapped(model)
    config = getattr(base, "config", None)
    return (
        getattr(config, "model_type", None) in PACKING_MODEL_TYPES
        and getattr(config, "_attn_implementation", None) in ("sdpa", "eager", "flex_attention", "fedsb_sdpa")
        and _takes_logits_to_keep(type(base))
    )


def causal_lm_packed_loss(model: nn.Module, batch: Mapping[str, Tensor], token_weight: Tensor) -> Tensor:
    """Sum over the supervised tokens of one packed row of (cross-entropy x the token's weight).
    The head runs only at the positions whose next label counts (`logits_to_keep` as indices)."""
    shifted = _shifted_labels(batch)
    if shifted is None or shifted.shape[0] != 1:
        raise ValueError("a packed batch is one row of input_ids, labels and position_ids")
    keep = (shifted[0] != -100).nonzero().squeeze(1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # no KV cache: with one, transformers does not look for packed rows in position_ids
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits[0]
    ce = F.cross_entropy(logits.float(), shifted[0, keep], reduction="none")
    return (ce * token_weight[0, keep]).sum()


def fused_head_loss(model: nn.Module, batch: Mapping[str, Tensor], token_weight: Tensor) -> Tensor:
    """sum over supervised tokens of (cross-entropy x the token's weight), the head and its loss
    fused in token chunks (`fedsb.head_loss`); padded or packed rows alike. token_weight: fp32,
    shaped like input_ids."""
    base = _unwrapped(model)
    shifted = _shifted_labels(batch)
    if shifted is None:
        raise ValueError("the fused head loss needs a causal LM batch (2-D labels shaped like input_ids)")
    keep = shifted != -100
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = base.model(**inputs, use_cache=False).last_hidden_state  # no KV cache: packed rows stay apart
    return chunked_head_cross_entropy(hidden[keep], base.get_output_embeddings().weight, shifted[keep], token_weight[keep], softcap=head_softcap(base))


def physical_batch_loss(model: nn.Module, part: Any, device: torch.device) -> Tensor:
    """The weighted loss of one `fedsb.physical_batch.PhysicalBatch` (padded or packed)."""
    batch = {k: v.to(device) for k, v in part.batch.items()}
    base = _unwrapped(model)
    if fused_head_supported(base):
        if part.token_weight is not None:
            weight = part.token_weight.to(device)
        else:  # every token of a row carries its row's weight
            weight = part.row_weight.to(device)[:, None].expand_as(batch["input_ids"])
        return fused_head_loss(model, batch, weight)
    if part.token_weight is not None:
        return causal_lm_packed_loss(model, batch, part.token_weight.to(device))
    return (causal_lm_row_losses(model, batch) * part.row_weight.to(device)).sum()


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
    physical_batch: int | None = None,
    physical_tokens: int = 0,
    pack: bool = False,
) -> StepResult:
    """Run optimizer steps over `batches` (grad_accum micro-batches per step).

    `physical_batch` None runs each micro-batch as given. Otherwise (causal LM loss only) the rows
    of a step are re-cut into forwards of at most `physical_batch` rows (0: no limit) and
    `physical_tokens` padded tokens (0: no limit), with the same loss (`fedsb.physical_batch`);
    `pack` packs each forward's rows into one sequence where the model supports it.
    """
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
        tokens += sum(int(b["attention_mask"].sum()) for b in group if "attention_mask" in b)
        repack = physical_batch is not None and loss_fn is None and all(supports_repacking(b) for b in group)
        if repack:
            group_loss = _accumulate_repacked(
                model, group, device, precision, step, physical_batch, physical_tokens, pack and supports_packing(model)
            )
        else:
            group_loss = _accumulate_micro_batches(model, group, device, precision, step, loss_fn or causal_lm_loss)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        losses.append(group_loss)
        step += 1
        if on_step is not None:
            on_step(group_loss)
    optimizer.zero_grad(set_to_none=True)
    release_free_memory(device)
    return StepResult(steps=len(groups), mean_loss=sum(losses) / max(1, len(losses)), tokens=tokens)


def _check_finite(loss: Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"training loss is {loss.item()} at step {step}: a batch without supervised tokens "
            "(response cut by train.max_length?) or a learning rate that is too high"
        )


def _accumulate_micro_batches(
    model: nn.Module, group: Sequence[Mapping[str, Tensor]], device: torch.device, precision: str, step: int,
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], Tensor],
) -> float:
    """One forward + backward per micro-batch, each mean loss divided by the micro-batch count."""
    group_loss = 0.0
    for batch in group:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_context(device, precision):
            loss = loss_fn(model, batch)
        _check_finite(loss, step)
        (loss.float() / len(group)).backward()
        group_loss += loss.item() / len(group)
    return group_loss


def _accumulate_repacked(
    model: nn.Module, group: Sequence[Mapping[str, Tensor]], device: torch.device, precision: str, step: int,
    max_rows: int, max_tokens: int, pack: bool,
) -> float:
    """The same gradient as `_accumulate_micro_batches` with `causal_lm_loss`, from re-cut forwards."""
    try:
        plan = plan_physical_batches(group, max_rows=max_rows, max_tokens=max_tokens, pack=pack)
    except FloatingPointError as err:
        raise FloatingPointError(f"training loss is nan at step {step}: {err}") from None
    group_loss = 0.0
    for part in plan:
        with autocast_context(device, precision):
            loss = physical_batch_loss(model, part, device)
        _check_finite(loss, step)
        loss.backward()
        group_loss += loss.item()
    return group_loss
