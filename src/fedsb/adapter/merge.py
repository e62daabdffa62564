"""Adapters folded into the base weights for inference, then put back bit for bit.

During evaluation nothing trains, so `W + (alpha/r) B R A` is one fixed matrix per layer: a
merged model runs one matmul per projection instead of four (W, A, R, B) and decodes much
faster, token by token, where small matmuls are dominated by per-op overhead.

`AdapterLinear.merge`/`unmerge` add and subtract in place, which is not bit-exact in floating
point (W + d - d != W). Here the merged weight is a new tensor built in fp32 and the original
weight tensor is put back afterwards: the training state is untouched, bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fedsb.adapter.layer import AdapterLinear


@contextlib.contextmanager
def merged_adapters(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[int]:
    """Inside the block every unmerged adapter layer of `model` is folded into its base weight.

    The sum `W + delta` is computed in fp32 and then stored in `dtype` (default: W's dtype), so
    a bf16 evaluation rounds the merged weight once rather than W and the delta separately.
    Yields the number of layers merged. Costs one extra copy of the adapted weights.
    """
    saved: list[tuple[AdapterLinear, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer in model.modules():
                if not isinstance(layer, AdapterLinear) or layer.merged:
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
