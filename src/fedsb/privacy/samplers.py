"""Per-sample gradients for opacus, fp32 islands under autocast, and length-sorted micro-batches.

- `lora_linear_grad_sample`: the closed form for the LoRA baselines' `LoraLinear`.
- `precision_islands`: trainable `nn.Linear` modules (R, the head) computed in fp32 (`Fp32Linear`)
  while the frozen encoder runs under bf16 autocast with cast-once weights (`FrozenBf16Linear`).
- `physical_batches`: a drawn Poisson batch split into micro-batches, sorted by length first.

`LoraLinear` holds lora_A and lora_B as its own parameters, next to the frozen base layer.
Opacus has no grad sampler for such a module; its functorch fallback works but re-runs the
whole module per sample and also differentiates the frozen base weight (d_out x d_in per
example), which is most of the cost. The closed form is two einsums.

LoRA-SB's only trainable tensor is `R`, an `nn.Linear(r, r)` applied to the r-dimensional
`A x`: opacus' own linear grad sampler forms its per-sample gradient as sum_t (B^T g_t)-ish
backprops (r) outer (A x_t) (r), an r x r tensor per example; nothing d-sized is materialized.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.linear import compute_linear_grad_sample, compute_linear_norm_sample
from opacus.grad_sample.utils import register_norm_sampler
from opacus.utils.module_utils import trainable_modules
from torch import Tensor, nn

from fedsb.adapter.layer import LoraLinear


@register_grad_sampler(LoraLinear)
def lora_linear_grad_sample(layer: LoraLinear, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """y = W x + s B A x: dL/dB_i = s sum_t g_t (A x_t)^T, dL/dA_i = s sum_t (B^T g_t) x_t^T.

    Activations are the module input (before adapter dropout): exact only without dropout,
    which is why private training refuses adapter.dropout > 0 for LoRA baselines.
    """
    x = activations[0].float()  # fp32 per-sample gradients, also when the forward ran in bf16
    g = backprops.float()
    a = layer.lora_A.float()
    b = layer.lora_B.float()
    out: dict[nn.Parameter, Tensor] = {}
    if layer.lora_B.requires_grad:
        h = torch.einsum("b...i,ri->b...r", x, a)
        out[layer.lora_B] = torch.einsum("b...o,b...r->bor", g, h) * layer.scaling
    if layer.lora_A.requires_grad:
        gb = torch.einsum("b...o,or->b...r", g, b)
        out[layer.lora_A] = torch.einsum("b...r,b...i->bri", gb, x) * layer.scaling
    return out


class Fp32Linear(nn.Linear):
    """An `nn.Linear` that computes in fp32 under autocast (input upcast, autocast off).

    Swapped in as the class of a trainable linear layer for a bf16 session (`precision_islands`), so
    that its output, the backprops reaching it and opacus' per-sample gradients are fp32.
    """

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight, self.bias)


register_grad_sampler(Fp32Linear)(compute_linear_grad_sample)
register_norm_sampler(Fp32Linear)(compute_linear_norm_sample)


class FrozenBf16Linear(nn.Linear):
    """A frozen `nn.Linear` whose bf16 weight is cast once per session, not once per call.

    Under autocast torch re-casts a weight that does not require grad on every call (its cast
    cache keeps only trainable leaves): for the frozen encoder's key, output and feed-forward
    layers that is a full copy of the encoder's weights per micro-batch, forward and backward.
    Outside autocast it is a plain fp32 linear.
    """

    _bf16: tuple[Tensor, Tensor | None]

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return F.linear(x, self.weight, self.bias)
        w, b = self._bf16
        return F.linear(x.to(w.dtype), w, b)


@dataclass
class PrecisionIslands:
    """Modules whose class `precision_islands` swapped; `restore` puts classes and dropout back."""

    modules: list[nn.Module]
    dropout: list[tuple[nn.Module, str, float]]
    handles: list[Any]

    def restore(self) -> None:
        for handle in self.handles:
            handle.remove()
        for module in self.modules:
            if isinstance(module, FrozenBf16Linear):
                del module._bf16
            module.__class__ = nn.Linear
        for module, attr, value in self.dropout:
            setattr(module, attr, value)
        self.modules, self.dropout, self.handles = [], [], []


def precision_islands(model: nn.Module, *, dtype: torch.dtype = torch.bfloat16, dropout: bool = True) -> PrecisionIslands:
    """For a bf16 session: trainable `nn.Linear`s compute in fp32, frozen ones use a cached `dtype` copy.

    In place and reversible: the class swap keeps each module, its parameters and their
    identity, so the optimizer, opacus' hooks and the federation's references stay valid.
    `dropout=False` also sets every dropout probability of the model to 0 for the session
    (nn.Dropout.p and attention modules' `dropout_prob` / `attention_dropout`).

    The embeddings' output is cast to `dtype` under autocast, so the residual stream is bf16
    from the start: otherwise fp32 embeddings keep it fp32 (bf16 + fp32 promotes), and every
    linear layer re-casts its input, forward and backward (15% of a step in a profile).
    """
    trainable = {id(m) for _, m in trainable_modules(model)}
    swapped: list[nn.Module] = []
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        if id(module) in trainable:
            module.__class__ = Fp32Linear
        elif not any(p.requires_grad for p in module.parameters()):
            module.__class__ = FrozenBf16Linear
            with torch.no_grad():
                module._bf16 = (module.weight.detach().to(dtype), None if module.bias is None else module.bias.detach().to(dtype))
        else:
            continue
        swapped.append(module)
    saved: list[tuple[nn.Module, str, float]] = []
    if not dropout:
        for module in model.modules():
            for attr in ("p", "dropout_prob", "attention_dropout"):
                value = getattr(module, attr, None) if (attr != "p" or isinstance(module, nn.Dropout)) else None
                if isinstance(value, float) and value > 0:
                    saved.append((module, attr, value))
                    setattr(module, attr, 0.0)
    handles = []
    embeddings = _embeddings_module(model)
    if embeddings is not None:
        handles.append(embeddings.register_forward_hook(_cast_output_hook(dtype)))
    return PrecisionIslands(swapped, saved, handles)


def _embeddings_module(model: nn.Module) -> nn.Module | None:
    """The module whose output starts the residual stream (BERT's `embeddings`, else the token embedding)."""
    base = getattr(model, "base_model", model)
    found = getattr(base, "embeddings", None)
    if isinstance(found, nn.Module):
        return found
    get = getattr(model, "get_input_embeddings", None)
    return get() if callable(get) else None


def _cast_output_hook(dtype: torch.dtype):
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, Tensor) and output.is_floating_point() and torch.is_autocast_enabled(output.device.type):
            return output.to(dtype)
        return output

    return hook


def split_logical_batch(indices: Sequence[int], max_size: int, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """One drawn logical batch as micro-batches of at most `max_size`, sorted by length if given.

    Same chunk sizes as opacus' BatchMemoryManager (`np.array_split` into ceil(n / max_size)
    near-equal parts); with lengths, neighbours in a chunk have similar lengths, so dynamic
    padding wastes little. Every drawn index appears exactly once.
    """
    idx = [int(i) for i in indices]
    if lengths is not None:
        idx.sort(key=lambda i: lengths[i])
    if not idx:
        return [[]]
    return [c.tolist() for c in np.array_split(np.asarray(idx, dtype=np.int64), math.ceil(len(idx) / max_size))]


def physical_batches(loader: Iterable, max_size: int, optimizer: object, lengths: Sequence[int] | None = None) -> Iterator[list[int]]:
    """Micro-batches of each Poisson batch `loader` draws, telling the DP optimizer where a step ends.

    Like opacus' BatchMemoryManager: all but the last micro-batch of a logical batch signal a
    skipped step (clip and accumulate only); an empty draw is one (noise-only) step.
    """
    for (drawn,) in loader:
        chunks = split_logical_batch(drawn.tolist(), max_size, lengths)
        for chunk in chunks[:-1]:
            optimizer.signal_skip_step(do_skip=True)
            yield chunk
        optimizer.signal_skip_step(do_skip=False)
        yield chunks[-1]
