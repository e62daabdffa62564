"""Per-sample gradients of the LoRA baselines' `LoraLinear` for opacus.

`LoraLinear` holds lora_A and lora_B as its own parameters, next to the frozen base layer.
Opacus has no grad sampler for such a module; its functorch fallback works but re-runs the
whole module per sample and also differentiates the frozen base weight (d_out x d_in per
example), which is most of the cost. The closed form is two einsums.

LoRA-SB needs nothing here: its only trainable tensor is `R`, an `nn.Linear(r, r)`, which
opacus handles natively (hooks and ghost clipping).
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import Tensor, nn

from fedsb.adapter.layer import LoraLinear


@register_grad_sampler(LoraLinear)
def lora_linear_grad_sample(layer: LoraLinear, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """y = W x + s B A x: dL/dB_i = s sum_t g_t (A x_t)^T, dL/dA_i = s sum_t (B^T g_t) x_t^T.

    Activations are the module input (before adapter dropout): exact only without dropout,
    which is why private training refuses adapter.dropout > 0 for LoRA baselines.
    """
    x = activations[0]
    g = backprops
    if x.dtype != g.dtype:
        x = x.to(g.dtype)
    a = layer.lora_A.to(g.dtype)
    b = layer.lora_B.to(g.dtype)
    out: dict[nn.Parameter, Tensor] = {}
    if layer.lora_B.requires_grad:
        h = torch.einsum("b...i,ri->b...r", x, a)
        out[layer.lora_B] = torch.einsum("b...o,b...r->bor", g, h) * layer.scaling
    if layer.lora_A.requires_grad:
        gb = torch.einsum("b...o,or->b...r", g, b)
        out[layer.lora_A] = torch.einsum("b...r,b...i->bri", gb, x) * layer.scaling
    return out
