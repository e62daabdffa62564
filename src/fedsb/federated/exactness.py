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

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fedsb.adapter.inject import adapter_layers
from fedsb.adapter.layer import AdapterLinear, LoraSBLinear


def _version_key(t: Tensor) -> tuple[int, int]:
    return (t.data_ptr(), t._version)


class _FactorCache:
    """fp64 copies of B and of A V, reused while the factors are unchanged.

    Fed-SB's B and A are frozen and shared by every client, so without this the meter would
    convert and multiply the same matrices once per client per round (7% of a round on SmolLM2
    with 10 clients). The key is the tensor's storage and in-place version counter, so any
    change to a factor (FedIT's trained A and B, a new init) recomputes. Each entry holds the
    source tensor, so its storage cannot be freed and its address reused by another tensor.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[tuple[int, int], Tensor, Tensor]] = {}

    def get(self, name: str, kind: str, t: Tensor, make: Callable[[], Tensor]) -> Tensor:
        key = _version_key(t)
        hit = self._entries.get((name, kind))
        if hit is not None and hit[0] == key:
            return hit[2]
        value = make()
        self._entries[(name, kind)] = (key, t, value)
        return value


def outer_factors(layer: AdapterLinear, v: Tensor | None, cache: _FactorCache | None = None, name: str = "") -> tuple[Tensor, Tensor]:
    """(B, A v) in fp64 (A itself when v is None), from `cache` while the factors are unchanged."""
    a_t, b_t = layer.lora_A.detach(), layer.lora_B.detach()

    def a_times_v() -> Tensor:
        a = a_t.double()
        return a if v is None else a @ v

    if cache is None:
        return b_t.double(), a_times_v()
    return cache.get(name, "b", b_t, b_t.double), cache.get(name, "av", a_t, a_times_v)


def delta_times(layer: AdapterLinear, v: Tensor | None, cache: _FactorCache | None = None, name: str = "") -> Tensor:
    """dW v in fp64 from the factors (or dW itself when v is None)."""
    b, av = outer_factors(layer, v, cache, name)
    if isinstance(layer, LoraSBLinear):
        r = layer.R.weight.detach().double()
        return (b @ (r @ av)) * layer.scaling
    return (b @ av) * layer.scaling


class ExactnessMeter:
    def __init__(self, probes: int = 32, seed: int = 0) -> None:
        self.probes = probes
        self.seed = seed
        self._sum: dict[str, Tensor] = {}
        # Fed-SB: clients share B, so sum_i w_i B R_i (A V) = B sum_i w_i R_i (A V); the r x k
        # sums wait here, per layer with the B (version key, fp64 copy) they share, and meet B
        # once. A client with another B (FedIT, or a bug) flushes the group into _sum first.
        self._r_space: dict[str, tuple[tuple[int, int], Tensor, Tensor]] = {}
        self._base_before: dict[str, Tensor] = {}
        self._v: dict[str, Tensor | None] = {}
        self._total = 0.0
        self._factors = _FactorCache()

    def _probe(self, name: str, layer: AdapterLinear) -> Tensor | None:
        if self.probes <= 0:
            return None
        if name not in self._v:  # drawn on the host so the probes are the same on every device
            g = torch.Generator(device="cpu").manual_seed(self.seed * 7_919 + len(self._v))
            v = torch.randn(layer.in_features, self.probes, generator=g, dtype=torch.float64, device="cpu")
            self._v[name] = v.to(layer.lora_A.device)
        return self._v[name]

    def _base(self, layer: AdapterLinear, v: Tensor | None) -> Tensor:
        w = layer.base_layer.weight.detach().double()
        return w if v is None else w @ v

    @torch.no_grad()
    def begin_round(self, model: nn.Module, snapshot_base: bool) -> None:
        self._sum, self._r_space, self._total = {}, {}, 0.0
        self._base_before = (
            {n: self._base(layer, self._probe(n, layer)) for n, layer in adapter_layers(model).items()}
            if snapshot_base
            else {}
        )

    def _accumulate(self, name: str, delta: Tensor, weight: float) -> None:
        if name in self._sum:
            self._sum[name].add_(delta, alpha=weight)
        else:
            self._sum[name] = delta * weight

    def _flush(self, name: str) -> None:
        group = self._r_space.pop(name, None)
        if group is not None:
            self._accumulate(name, group[1] @ group[2], 1.0)

    @torch.no_grad()
    def add_client(self, model: nn.Module, weight: float) -> None:
        """Call right after the client trained, while the model holds its tensors."""
        for name, layer in adapter_layers(model).items():
            v = self._probe(name, layer)
            if not (isinstance(layer, LoraSBLinear) and v is not None):
                self._accumulate(name, delta_times(layer, v, self._factors, name), weight)
                continue
            b, av = outer_factors(layer, v, self._factors, name)
            rav = (layer.R.weight.detach().double() @ av) * (layer.scaling * weight)
            key = _version_key(layer.lora_B)
            group = self._r_space.get(name)
            if group is not None and group[0] == key:
                group[2].add_(rav)
            else:
                self._flush(name)
                self._r_space[name] = (key, b, rav)
        self._total += weight

    @torch.no_grad()
    def finish(self, model: nn.Module) -> dict[str, float]:
        errors = {}
        for name in list(self._r_space):
            self._flush(name)
        for name, layer in adapter_layers(model).items():
            v = self._probe(name, layer)
            target = self._sum[name] / self._total
            global_delta = delta_times(layer, v, self._factors, name)
            if name in self._base_before:
                global_delta += self._base(layer, v) - self._base_before[name]
            denom = target.norm().item()
            errors[name] = (global_delta - target).norm().item() / denom if denom > 0 else 0.0
        self._sum, self._r_space, self._base_before = {}, {}, {}
        return errors
