"""`init = "federated"`: the LoRA-SB initialization without raw data or full gradients at the server.

Each client computes its own first step U_i = -lr_eff * sign(G_i) on a few local examples and
takes part in the sketch protocol of `fedsb.init.federated` (only sums of sketches travel).
U_i is a sign matrix, so the simulation keeps it as int8: one byte per weight per client.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fedsb.adapter.inject import adapter_layers
from fedsb.data import collate
from fedsb.init import estimate_gradients, install_from_update
from fedsb.init import svd
from fedsb.init.federated import (
    client_power_left,
    client_power_right,
    client_project,
    client_sketch,
    communication_cost,
    federated_randomized_svd,
    layer_generator,
    normalize_weights,
    server_sum,
    sketch_width,
)
from fedsb.progress import progress_bar

if TYPE_CHECKING:
    from fedsb.federated.comm import CommLedger
    from fedsb.federated.federation import Federation


def _lr_eff(fed: "Federation") -> float:
    """The run's step scale, computed once in its `InitPlan`."""
    lr_eff = fed.init_plan.lr_eff
    if lr_eff is None:
        raise ValueError(f"init.method = {fed.init_plan.method!r}: the federated init is not this run's")
    return lr_eff


def client_init_batches(fed: "Federation", client_index: int, per_client: int) -> list[dict[str, Tensor]]:
    """The first `per_client` examples of a seeded shuffle of the client's own data."""
    client = fed.clients[client_index]
    g = torch.Generator(device="cpu").manual_seed(fed.config.seed * 31 + client_index)
    order = torch.randperm(client.num_examples, generator=g, device="cpu")[:per_client].tolist()
    items = [client.items[i] for i in order]
    bs = fed.config.init.batch_size
    pad = fed.tokenizer.pad_token_id
    return [collate(items[i : i + bs], pad, fed.classification) for i in range(0, len(items), bs)]


def run_federated_init(fed: "Federation", ledger: "CommLedger") -> dict[str, Any]:
    cfg = fed.config
    layers = adapter_layers(fed.model)
    lr_eff = _lr_eff(fed)
    per_client = max(1, math.ceil(cfg.init.num_samples / len(fed.clients)))
    signs: list[dict[str, Tensor]] = []
    with progress_bar("init: client gradients", total=len(fed.clients)) as advance:
        for c in range(len(fed.clients)):
            grads = estimate_gradients(fed.model, layers, client_init_batches(fed, c, per_client), precision=fed.precision)
            signs.append({name: g.sign().to(torch.int8) for name, g in grads.items()})
            del grads
            advance(1)

    def client_factor(i: int):
        return lambda layer: signs[i][layer].float().mul_(-lr_eff)

    result = federated_randomized_svd(
        [client_factor(i) for i in range(len(fed.clients))],
        [c.num_examples for c in fed.clients] if cfg.federation.weighted else [1.0] * len(fed.clients),
        {name: (layer.out_features, layer.in_features) for name, layer in layers.items()},
        rank=cfg.adapter.rank,
        oversample=cfg.init.oversample,
        power_iters=cfg.init.power_iters,
        seed=cfg.seed,
    )
    for name, layer in layers.items():
        install_from_update(layer, *result.factors[name])
    return _record_init_traffic(ledger, len(fed.clients), result, lr_eff=lr_eff, per_client=per_client)


# --- the same protocol as messages (a transport moves each exchange) ---------------------------

CLIENT_MESSAGES = {"sketch": client_sketch, "left": client_power_left, "right": client_power_right, "project": client_project}
# exchange kind, broadcast {layer: tensor} -> {client id: {layer: message}} (every client, in order)
InitExchange = Callable[[str, dict[str, Tensor]], dict[int, dict[str, Tensor]]]


def agreed_setup(fed: "Federation") -> tuple[dict[str, tuple[int, int]], int, float]:
    """What every party agrees on: layer shapes (their order gives Omega's seeds), examples per
    client, and the step scale lr_eff."""
    layers = adapter_layers(fed.model)
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in layers.items()}
    per_client = max(1, math.ceil(fed.config.init.num_samples / len(fed.clients)))
    return shapes, per_client, _lr_eff(fed)


def client_signs(fed: "Federation", client_index: int) -> dict[str, Tensor]:
    """sign(G_i) per layer (int8) on the client's own examples: all it keeps for the protocol."""
    _, per_client, _ = agreed_setup(fed)
    grads = estimate_gradients(fed.model, adapter_layers(fed.model), client_init_batches(fed, client_index, per_client), precision=fed.precision)
    return {name: g.sign().to(torch.int8) for name, g in grads.items()}


def client_init_message(fed: "Federation", signs: dict[str, Tensor], kind: str, broadcast: dict[str, Tensor]) -> dict[str, Tensor]:
    """One client's upload for one exchange, every layer: U_i = -lr_eff * sign(G_i) times the
    broadcast basis (for the sketch, Omega drawn from the shared seed)."""
    shapes, _, lr_eff = agreed_setup(fed)
    cfg = fed.config.init
    out = {}
    for index, (name, shape) in enumerate(shapes.items()):
        u = signs[name].float().mul_(-lr_eff)
        if kind == "sketch":
            k = sketch_width(shape, fed.config.adapter.rank, cfg.oversample)
            basis = svd.gaussian_test_matrix(shape[1], k, layer_generator(fed.config.seed, index))
        else:
            basis = broadcast[name]
        out[name] = CLIENT_MESSAGES[kind](u, basis)
    return out


def run_federated_init_exchanges(fed: "Federation", ledger: "CommLedger", exchange: InitExchange) -> dict[str, Any]:
    """The server side of the sketch protocol over a transport (e.g. Flower messages): the
    same arithmetic as `run_federated_init` layer by layer (client order, normalized weights),
    all layers in one message per exchange; the server never sees a client's U_i."""
    cfg = fed.config
    shapes, per_client, lr_eff = agreed_setup(fed)
    n = len(fed.clients)
    weights = normalize_weights([c.num_examples for c in fed.clients] if cfg.federation.weighted else [1.0] * n, n)

    def summed(kind: str, broadcast: dict[str, Tensor]) -> dict[str, Tensor]:
        replies = exchange(kind, broadcast)
        if sorted(replies) != list(range(n)):
            raise RuntimeError(f"federated init: exchange {kind!r} got replies from clients {sorted(replies)}, needs all {n}")
        return {name: server_sum([replies[c][name] for c in range(n)], weights) for name in shapes}

    q = {name: svd.orthonormal_basis(y) for name, y in summed("sketch", {}).items()}
    for _ in range(cfg.init.power_iters):
        p = {name: svd.orthonormal_basis(w) for name, w in summed("left", q).items()}
        q = {name: svd.orthonormal_basis(y) for name, y in summed("right", p).items()}
    z = summed("project", q)
    layers = adapter_layers(fed.model)
    for name in shapes:
        install_from_update(layers[name], *svd.svd_from_projection(q[name], z[name], cfg.adapter.rank))
    cost = communication_cost(shapes, rank=cfg.adapter.rank, oversample=cfg.init.oversample, power_iters=cfg.init.power_iters)
    return _record_init_traffic(ledger, len(fed.clients), cost, lr_eff=lr_eff, per_client=per_client)


def _record_init_traffic(ledger: "CommLedger", num_clients: int, cost: Any, *, lr_eff: float, per_client: Any) -> dict[str, Any]:
    """Count the sketch exchanges as one-time bytes of every client; the init's summary."""
    for _ in range(num_clients):
        ledger.record_one_time("federated_init_up", cost.upload_bytes_per_client)
        ledger.record_one_time("federated_init_down", cost.download_bytes_per_client)
    return {
        "lr_eff": lr_eff,
        "examples_per_client": per_client,
        "exchanges": cost.rounds,
        "upload_bytes_per_client": cost.upload_bytes_per_client,
        "download_bytes_per_client": cost.download_bytes_per_client,
    }
