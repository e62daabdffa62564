"""LoRA-SB initializations: B, A, R0 from the first full fine-tuning step, or seeded random.

- "central": the gradient over a sample the party running it holds (the paper's method; under
  DP this must be public data).
- "random": orthonormal random B and A from a seed, R0 = 0; no data and no broadcast needed,
  since every party can draw the same factors from the seed.
- "federated": see `fedsb.init.federated` (clients send sketches of their own first step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from fedsb.adapter.layer import AdapterLinear, LoraSBLinear
from fedsb.init.federated import layer_generator  # one test matrix per (seed, layer), shared by all inits
from fedsb.init.gradients import LossFn, default_loss, estimate_gradients
from fedsb.init.svd import effective_lr, randomized_svd

INIT_METHODS = ("central", "random", "federated")


def _lorasb_layers(layers: Mapping[str, AdapterLinear]) -> dict[str, LoraSBLinear]:
    bad = [n for n, layer in layers.items() if not isinstance(layer, LoraSBLinear)]
    if bad:
        raise TypeError(f"LoRA-SB initialization needs LoraSBLinear layers; {bad[0]!r} is not one")
    return dict(layers)  # type: ignore[arg-type]


@torch.no_grad()
def install_from_update(layer: LoraSBLinear, p: Tensor, s: Tensor, qt: Tensor) -> None:
    """B = P, A = Q^T, R0 = diag(S) / scaling, so that delta_weight() = P diag(S) Q^T."""
    layer.set_factors(p, torch.diag(s) / layer.scaling, qt)


def init_from_gradients(
    layers: Mapping[str, AdapterLinear],
    grads: dict[str, Tensor],
    *,
    lr_eff: float,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
) -> None:
    """U = -lr_eff * sign(G) per layer, truncated randomized SVD, install. Consumes `grads`."""
    for index, (name, layer) in enumerate(_lorasb_layers(layers).items()):
        u = grads.pop(name).sign_().mul_(-lr_eff)  # in place: no second copy of the gradients
        p, s, qt = randomized_svd(
            u, layer.rank, oversample=oversample, power_iters=power_iters, generator=layer_generator(seed, index)
        )
        del u
        install_from_update(layer, p, s, qt)


def init_central(
    model: torch.nn.Module,
    layers: Mapping[str, AdapterLinear],
    batches: Iterable[Mapping[str, Any]],
    *,
    lr: float,
    warmup_ratio: float,
    total_steps: int,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    loss_fn: LossFn = default_loss,
    precision: str = "fp32",
    progress: Callable[[int], None] | None = None,
    lr_eff: float | None = None,
) -> float:
    """The paper's initialization on data this party holds; returns lr_eff.

    lr_eff defaults to the paper's `lr / warm-up steps`; pass it to set the step's scale directly.
    """
    lr_eff = lr_eff or effective_lr(lr, warmup_ratio, total_steps)
    grads = estimate_gradients(model, layers, batches, loss_fn=loss_fn, precision=precision, progress=progress)
    init_from_gradients(layers, grads, lr_eff=lr_eff, oversample=oversample, power_iters=power_iters, seed=seed)
    return lr_eff


@torch.no_grad()
def init_random(layers: Mapping[str, AdapterLinear], *, seed: int = 0) -> None:
    """Orthonormal random B (out x r) and A (r x in) from `seed`, R0 = 0."""
    for index, layer in enumerate(_lorasb_layers(layers).values()):
        g = layer_generator(seed, index)
        b, _ = torch.linalg.qr(torch.randn(layer.out_features, layer.rank, generator=g))
        a, _ = torch.linalg.qr(torch.randn(layer.in_features, layer.rank, generator=g))
        layer.set_factors(b, torch.zeros(layer.rank, layer.rank), a.mT)


__all__ = [
    "INIT_METHODS",
    "default_loss",
    "estimate_gradients",
    "init_central",
    "init_from_gradients",
    "init_random",
    "install_from_update",
    "layer_generator",
]
