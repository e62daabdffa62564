"""`init = "federated"`: the LoRA-SB initialization without raw data or full gradients at the server.

Each client computes its own first step U_i = -lr_eff * sign(G_i) on a few local examples and
takes part in the sketch protocol of `fedsb.init.federated` (only sums of sketches travel).
U_i is a sign matrix, so the simulation keeps it as int8: one byte per weight per client.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fedsb.adapter.inject import adapter_layers
from fedsb.data import collate
from fedsb.init import estimate_gradients, install_from_update
from fedsb.init.federated import federated_randomized_svd
from fedsb.progress import progress_bar

if TYPE_CHECKING:
    from fedsb.federated.comm import CommLedger
    from fedsb.federated.server import Federation


def client_init_batches(fed: "Federation", client_index: int, per_client: int) -> list[dict[str, Tensor]]:
    """The first `per_client` examples of a seeded shuffle of the client's own data."""
    client = fed.clients[client_index]
    g = torch.Generator().manual_seed(fed.config.seed * 31 + client_index)
    order = torch.randperm(client.num_examples, generator=g)[:per_client].tolist()
    items = [client.items[i] for i in order]
    bs = fed.config.init.batch_size
    pad = fed.tokenizer.pad_token_id
    return [collate(items[i : i + bs], pad, fed.classification) for i in range(0, len(items), bs)]


def run_federated_init(fed: "Federation", ledger: "CommLedger") -> dict[str, Any]:
    cfg = fed.config
    layers = adapter_layers(fed.model)
    lr_eff = fed.init_lr_eff()
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
    for _ in fed.clients:
        ledger.record_one_time("federated_init_up", result.upload_bytes_per_client)
        ledger.record_one_time("federated_init_down", result.download_bytes_per_client)
    return {
        "lr_eff": lr_eff,
        "examples_per_client": per_client,
        "exchanges": result.rounds,
        "upload_bytes_per_client": result.upload_bytes_per_client,
        "download_bytes_per_client": result.download_bytes_per_client,
    }
