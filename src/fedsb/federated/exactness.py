"""Measure, per adapted module, how far the aggregate is from the mean of the clients' updates.

    error = ||dW_global - sum_i w_i dW_i||_F / ||sum_i w_i dW_i||_F      (weights normalized)

dW_i is client i's effective weight change (its adapter delta); dW_global is the global adapter
delta plus whatever the strategy folded into the frozen weights this round (FedEx, FLoRA).

Forming every client's full d_out x d_in delta costs as much as a training step on a 135M
model, so the norms are measured on `probes` seeded Gaussian vectors V (d_in x k):
E ||X V||_F^2 / k = ||X||_F^2 (Hutchinson), and X V is computed from the factors
(B (R (A V))) in fp64 without forming X. The estimate of a non-zero error is within a few tens
of percent for k = 32; an exact aggregate gives ~1e-16 either way. `probes=0` forms the full
matrices instead (small models, tests).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedsb.adapter.inject import adapter_layers
from fedsb.adapter.layer import AdapterLinear, LoraSBLinear


def delta_times(layer: AdapterLinear, v: Tensor | None) -> Tensor:
    """dW v in fp64 from the factors (or dW itself when v is None)."""
    b = layer.lora_B.detach().double()
    a = layer.lora_A.detach().double()
    if isinstance(layer, LoraSBLinear):
        r = layer.R.weight.detach().double()
        return (b @ (r @ (a if v is None else a @ v))) * layer.scaling
    return (b @ (a if v is None else a @ v)) * layer.scaling


class ExactnessMeter:
    def __init__(self, probes: int = 32, seed: int = 0) -> None:
        self.probes = probes
        self.seed = seed
        self._sum: dict[str, Tensor] = {}
        self._base_before: dict[str, Tensor] = {}
        self._v: dict[str, Tensor | None] = {}
        self._total = 0.0

    def _probe(self, name: str, layer: AdapterLinear) -> Tensor | None:
        if self.probes <= 0:
            return None
        if name not in self._v:
            g = torch.Generator().manual_seed(self.seed * 7_919 + len(self._v))
            self._v[name] = torch.randn(layer.in_features, self.probes, generator=g, dtype=torch.float64)
        return self._v[name]

    def _base(self, layer: AdapterLinear, v: Tensor | None) -> Tensor:
        w = layer.base_layer.weight.detach().double()
        return w if v is None else w @ v

    @torch.no_grad()
    def begin_round(self, model: nn.Module, snapshot_base: bool) -> None:
        self._sum, self._total = {}, 0.0
        self._base_before = (
            {n: self._base(layer, self._probe(n, layer)) for n, layer in adapter_layers(model).items()}
            if snapshot_base
            else {}
        )

    @torch.no_grad()
    def add_client(self, model: nn.Module, weight: float) -> None:
        """Call right after the client trained, while the model holds its tensors."""
        for name, layer in adapter_layers(model).items():
            delta = delta_times(layer, self._probe(name, layer))
            if name in self._sum:
                self._sum[name].add_(delta, alpha=weight)
            else:
                self._sum[name] = delta * weight
        self._total += weight

    @torch.no_grad()
    def finish(self, model: nn.Module) -> dict[str, float]:
        errors = {}
        for name, layer in adapter_layers(model).items():
            v = self._probe(name, layer)
            target = self._sum[name] / self._total
            global_delta = delta_times(layer, v)
            if name in self._base_before:
                global_delta += self._base(layer, v) - self._base_before[name]
            denom = target.norm().item()
            errors[name] = (global_delta - target).norm().item() / denom if denom > 0 else 0.0
        self._sum, self._base_before = {}, {}
        return errors
