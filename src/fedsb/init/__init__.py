"""LoRA-SB initializations: B, A, R0 from the first full fine-tuning step, or seeded random.

- "central": the gradient over a sample the party running it holds (the paper's method; under
  DP this must be public data).
- "random": orthonormal random B and A from a seed, R0 = 0; no data and no broadcast needed,
  since every party can draw the same factors from the seed.
- "federated": see `fedsb.init.federated` (clients send sketches of their own first step).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from fedsb.adapter.layer import AdapterLinear, LoraSBLinear
from fedsb.heap import release_free_memory
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


def sign_step_factors(
    layers: Mapping[str, AdapterLinear],
    grads: dict[str, Tensor],
    *,
    lr_eff: float,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    indices: Mapping[str, int] | None = None,
) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """{name: (P, S, Qt)}: the truncated randomized SVD of U = -lr_eff * sign(G) per layer.

    Consumes `grads`: each layer's gradient buffer is released as soon as its SVD is done.
    `indices` gives each layer's position among all target layers (its SVD test matrix is
    seeded by it) when `layers` is one group of them; default: positions in `layers`.
    """
    factors = {}
    for position, (name, layer) in enumerate(_lorasb_layers(layers).items()):
        index = position if indices is None else indices[name]
        u = grads.pop(name).sign_().mul_(-lr_eff)  # in place: no second copy of the gradients
        factors[name] = randomized_svd(
            u, layer.rank, oversample=oversample, power_iters=power_iters, generator=layer_generator(seed, index)
        )
        del u
    return factors


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
    factors = sign_step_factors(layers, grads, lr_eff=lr_eff, oversample=oversample, power_iters=power_iters, seed=seed)
    for name, layer in _lorasb_layers(layers).items():
        install_from_update(layer, *factors.pop(name))


# fp32 gradient accumulators one pass of the central init may hold when init.group_size = 0.
GRADIENT_BUFFER_BUDGET = 4 * 2**30


def layer_groups(layers: Mapping[str, AdapterLinear], group_size: int) -> list[dict[str, AdapterLinear]]:
    """Consecutive groups of `group_size` target layers. 0: bounded, as many consecutive layers
    as keep the fp32 buffers under GRADIENT_BUFFER_BUDGET: one group of all for models whose
    targets have under 1.07B weights (as before issue 31), 7 passes for Mistral-7B's 28 GB."""
    items = list(layers.items())
    if group_size > 0:
        return [dict(items[i : i + group_size]) for i in range(0, len(items), group_size)]
    groups: list[dict[str, AdapterLinear]] = []
    current: dict[str, AdapterLinear] = {}
    used = 0
    for name, layer in items:
        size = 4 * layer.base_layer.weight.numel()
        if current and used + size > GRADIENT_BUFFER_BUDGET:
            groups.append(current)
            current, used = {}, 0
        current[name] = layer
        used += size
    return groups + [current] if current else groups


def init_central(
    model: torch.nn.Module,
    layers: Mapping[str, AdapterLinear],
    batches: Iterable[Mapping[str, Any]],
    *,
    lr: float = 0.0,
    warmup_ratio: float = 0.0,
    total_steps: int = 0,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    loss_fn: LossFn = default_loss,
    precision: str = "fp32",
    progress: Callable[[int], None] | None = None,
    lr_eff: float | None = None,
    group_size: int = 0,
    timings: dict[str, float] | None = None,
    physical_tokens: int = 0,
    pack: bool = False,
) -> float:
    """The paper's initialization on data this party holds; returns lr_eff.

    lr_eff: the step's scale (a run passes its `InitPlan.lr_eff`); without it, the paper's
    `lr / warm-up steps` from `lr`, `warmup_ratio` and `total_steps`.
    `group_size` > 0 runs the gradient pass once per group of that many target layers, each
    group's SVDs right after its pass: the fp32 gradient buffers at any time are those of the
    largest group (4 bytes x its weights' numbers) instead of all targets', for one extra forward
    and input-gradient backward per further group. The result is the same as one pass.
    `timings`, when given, receives the seconds spent in "gradient pass" and "svd".
    `physical_tokens` bounds the tokens per forward, `pack` packs them (`estimate_gradients`).
    """
    if not lr_eff:
        if lr <= 0:
            raise ValueError("init_central: pass lr_eff, or lr (with warmup_ratio and total_steps) to derive it")
        lr_eff = effective_lr(lr, warmup_ratio, total_steps)
    batches = list(batches)
    indices = {name: i for i, name in enumerate(layers)}
    spent = {"gradient pass": 0.0, "svd": 0.0}
    factors: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # rank-r: installed once every group is done,
    for group in layer_groups(layers, group_size):  # so that each pass sees the model the first one saw
        t0 = time.perf_counter()
        grads = estimate_gradients(model, group, batches, loss_fn=loss_fn, precision=precision, progress=progress,
                                   physical_tokens=physical_tokens, pack=pack)
        t1 = time.perf_counter()
        factors.update(sign_step_factors(group, grads, lr_eff=lr_eff, oversample=oversample, power_iters=power_iters,
                                         seed=seed, indices=indices))
        spent["gradient pass"] += t1 - t0
        spent["svd"] += time.perf_counter() - t1
    for name, layer in _lorasb_layers(layers).items():
        install_from_update(layer, *factors.pop(name))
    release_free_memory(next(model.parameters()).device)  # the pass's activations and buffers, before training grows past them
    if timings is not None:
        timings.update(spent)
    return lr_eff


@torch.no_grad()
def init_random(layers: Mapping[str, AdapterLinear], *, seed: int = 0) -> None:
    """Orthonormal random B (out x r) and A (r x in) from `seed`, R0 = 0."""
    for index, layer in enumerate(_lorasb_layers(layers).values()):
        g = layer_generator(seed, index)
        # Drawn on the host: every client computes the same factors on any device (the digest).
        b, _ = torch.linalg.qr(torch.randn(layer.out_features, layer.rank, generator=g, device="cpu"))
        a, _ = torch.linalg.qr(torch.randn(layer.in_features, layer.rank, generator=g, device="cpu"))
        layer.set_factors(b, torch.zeros(layer.rank, layer.rank, device="cpu"), a.mT)


__all__ = [
    "INIT_METHODS",
    "default_loss",
    "estimate_gradients",
    "init_central",
    "init_from_gradients",
    "init_random",
    "install_from_update",
    "layer_generator",
    "layer_groups",
    "sign_step_factors",
]
