"""Measure, per adapted module, how far the aggregate is from the mean of the clients' updates.

    error = ||dW_global - sum_i w_i dW_i||_F / ||sum_i w_i dW_i||_F      (weights normalized)

dW_i is client i's effective weight change (its adapter delta); dW_global is the global adapter
delta plus whatever the strategy folded into the frozen weights this round (FedEx, FLoRA).
The running sum holds one full-size matrix per module, whatever the number of clients.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedsb.adapter.inject import adapter_layers


class ExactnessMeter:
    def __init__(self) -> None:
        self._sum: dict[str, Tensor] = {}
        self._base_before: dict[str, Tensor] = {}
        self._total = 0.0

    @torch.no_grad()
    def begin_round(self, model: nn.Module, snapshot_base: bool) -> None:
        self._sum, self._total = {}, 0.0
        self._base_before = (
            {n: layer.base_layer.weight.detach().double().clone() for n, layer in adapter_layers(model).items()}
            if snapshot_base
            else {}
        )

    @torch.no_grad()
    def add_client(self, model: nn.Module, weight: float) -> None:
        """Call right after the client trained, while the model holds its tensors."""
        for name, layer in adapter_layers(model).items():
            delta = layer.delta_weight().double()
            if name in self._sum:
                self._sum[name].add_(delta, alpha=weight)
            else:
                self._sum[name] = delta * weight
        self._total += weight

    @torch.no_grad()
    def finish(self, model: nn.Module) -> dict[str, float]:
        errors = {}
        for name, layer in adapter_layers(model).items():
            target = self._sum[name] / self._total
            global_delta = layer.delta_weight().double()
            if name in self._base_before:
                global_delta += layer.base_layer.weight.double() - self._base_before[name]
            denom = target.norm().item()
            errors[name] = (global_delta - target).norm().item() / denom if denom > 0 else 0.0
        self._sum, self._base_before = {}, {}
        return errors
