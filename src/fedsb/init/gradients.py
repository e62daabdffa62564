"""Estimate the full-weight gradient of the target layers over a small sample.

Like peft's LoRA-GA: only the target weights require grad while the gradient is estimated, and
every `requires_grad` flag and the train/eval mode are put back afterwards, whatever happens.
Each backward's gradient is moved into one fp32 accumulator per target weight by a
post-accumulate hook (a weight stored in bf16 gets a bf16 `.grad`, which must not be summed in
bf16), so the extra memory is one fp32 copy of the target weights passed in: pass a group of
layers at a time to bound it (`fedsb.init.init_central`'s `group_size`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from fedsb.adapter.layer import AdapterLinear
from fedsb.physical_batch import PhysicalBatch, plan_physical_batches, supports_repacking
from fedsb.precision import autocast_context
from fedsb.training import causal_lm_loss, physical_batch_loss, supports_packing

LossFn = Callable[[nn.Module, Mapping[str, Any]], Tensor]


def default_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """The model's own loss (`labels` in the batch), as Hugging Face models compute it; for a
    causal LM the output head runs only where labels need it (`fedsb.training.causal_lm_loss`)."""
    return causal_lm_loss(model, batch)


@contextmanager
def preserved_training_state(model: nn.Module) -> Iterator[None]:
    """Restore every parameter's `requires_grad` and every module's train/eval mode on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.train(mode)


def estimate_gradients(
    model: nn.Module,
    layers: Mapping[str, AdapterLinear],
    batches: Iterable[Mapping[str, Any]],
    *,
    loss_fn: LossFn = default_loss,
    precision: str = "fp32",
    progress: Callable[[int], None] | None = None,
    physical_tokens: int = 0,
    pack: bool = False,
) -> dict[str, Tensor]:
    """Mean gradient of the loss w.r.t. each target layer's base weight, {name: fp32 grad}.

    `physical_tokens` > 0 (causal LM batches, default loss): the batches' rows are re-cut into
    forwards of at most that many tokens with the same per-batch loss normalization
    (`fedsb.physical_batch`; packed into one sequence each with `pack`, where the model allows):
    the activations, not the gradient, are this pass's largest holder.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("gradient estimation needs at least one batch")
    forwards = _forwards(batches, loss_fn, physical_tokens, pack and supports_packing(model))
    weights = {name: layer.base_layer.weight for name, layer in layers.items()}
    grads: dict[str, Tensor] = {}

    def accumulate(name: str) -> Callable[[Tensor], None]:
        def hook(w: Tensor) -> None:
            g = w.grad
            w.grad = None
            if name in grads:
                grads[name].add_(g)  # fp32 += this backward's (possibly bf16) gradient
            else:
                grads[name] = g if g.dtype == torch.float32 else g.float()

        return hook

    handles = []
    with preserved_training_state(model):
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for name, w in weights.items():
                w.grad = None
                w.requires_grad_(True)
                handles.append(w.register_post_accumulate_grad_hook(accumulate(name)))
            model.eval()  # no dropout: the estimate is deterministic
            device = next(model.parameters()).device
            for forward in forwards:
                with autocast_context(device, precision):
                    if isinstance(forward, PhysicalBatch):
                        loss = physical_batch_loss(model, forward, device)
                    else:
                        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in forward.items()}
                        loss = loss_fn(model, batch).float() / len(batches)
                loss.backward()
                if progress is not None and not isinstance(forward, PhysicalBatch):
                    progress(1)
            if progress is not None and forwards and isinstance(forwards[0], PhysicalBatch):
                progress(len(batches))
        finally:
            for h in handles:
                h.remove()
    missing = [name for name in weights if name not in grads]
    if missing:
        raise RuntimeError(f"target {missing[0]!r} received no gradient: is it used in the forward pass?")
    return {name: grads[name] for name in weights}


def _forwards(
    batches: list[Mapping[str, Any]], loss_fn: LossFn, physical_tokens: int, pack: bool
) -> list[Mapping[str, Any]] | list[PhysicalBatch]:
    """The forward passes: the batches as given (each loss_fn / number of batches), or re-cut."""
    if physical_tokens <= 0 or loss_fn is not default_loss or not all(supports_repacking(b) for b in batches):
        return batches
    return plan_physical_batches(batches, max_rows=0, max_tokens=physical_tokens, pack=pack)
