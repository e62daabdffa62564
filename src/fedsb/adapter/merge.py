"""Adapters folded into the base weights for inference, then put back bit for bit.

During evaluation nothing trains, so `W + (alpha/r) B R A` is one fixed matrix per layer: a
merged model runs one matmul per projection instead of four (W, A, R, B) and decodes much
faster, token by token, where small matmuls are dominated by per-op overhead.

`AdapterLinear.merge`/`unmerge` add and subtract in place, which is not bit-exact in floating
point (W + d - d != W). Here the merged weight is a new tensor built in fp32 and the original
weight tensor is put back afterwards: the training state is untouched, bit for bit.

A layer whose base weight is stored below fp32 (bf16, `model.frozen_dtype`) is left unmerged:
the fine-tuned delta is mostly smaller than half a bf16 step of W, so bf16(bf16(W) + delta) is
bf16(W) again and the adapter would vanish from the evaluation. Measured on arithmetic-small
(Fed-SB r = 64, bf16): merged 64% and 67%, unmerged 75% and 72% on the same adapters; the fp32-
stored path, merged once as bf16(W + delta), 73% and 74%. Unmerged, the layer computes what
training computed (W x and the adapter's B R A x apart).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fedsb.adapter.layer import AdapterLinear


def mergeable(layer: AdapterLinear) -> bool:
    """Only an fp32 base weight can take the delta without rounding it away (module docstring)."""
    return layer.base_layer.weight.dtype == torch.float32


@contextlib.contextmanager
def merged_adapters(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[int]:
    """Inside the block every unmerged adapter layer of `model` with an fp32 base weight is
    folded into it (the others run unmerged: see the module docstring).

    The sum `W + delta` is computed in fp32 and then stored in `dtype` (default: W's dtype), so
    a bf16 evaluation rounds the merged weight once rather than W and the delta separately.
    Yields the number of layers merged. Costs one extra copy of the adapted weights.
    """
    saved: list[tuple[AdapterLinear, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer in model.modules():
                if not isinstance(layer, AdapterLinear) or layer.merged or not mergeable(layer):
                    continue
                w = layer.base_layer.weight
                merged = (w.detach().float() + layer.delta_weight().float()).to(dtype or w.dtype)
                saved.append((layer, w.data))
                w.data = merged
                layer.merged = True
        yield len(saved)
    finally:
        with torch.no_grad():
            for layer, data in saved:
                layer.base_layer.weight.data = data
                layer.merged = False
                layer.clear_cast_cache()
