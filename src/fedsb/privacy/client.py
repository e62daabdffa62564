"""One client's local round under sample-level DP-SGD; mirrors `server.train_client`.

Same contract: load the global adapter, train, leave the client's tensors in the shared model,
return a `ClientResult`. Differences, all for the guarantee: every step is a Poisson sample of
the client's examples (expected size batch_size * grad_accum, split into physical batches of
batch_size), per-example gradients are clipped to privacy.max_grad_norm and Gaussian noise is
added (opacus); the global max_grad_norm clipping is not applied (per-example clipping
replaces it); train.precision applies to the frozen encoder only (see `privacy.engine`). The client's accountant history carries over
from round to round in `fed.privacy`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from fedsb.data import collate
from fedsb.federated.client import ClientData, ClientResult, optimizer_state_to_cpu, seed_for, trainable_parameters
from fedsb.privacy.engine import PrivateSession
from fedsb.progress import progress_bar
from fedsb.training import lr_at, make_optimizer, warmup_steps_for


def train_client_private(fed: Any, client: ClientData, round_index: int, global_state: dict[str, Tensor]) -> ClientResult:
    """Load the global adapter, run this round's DP-SGD steps; the model then holds the client's tensors."""
    cfg, p = fed.config.train, fed.config.privacy
    ledger = fed.privacy.clients[client.client_id]
    fed.strategy.load_global(fed.model, global_state)
    params = trainable_parameters(fed.model)
    optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay)
    if cfg.keep_optimizer_state and client.optimizer_state is not None:
        optimizer.load_state_dict(client.optimizer_state)
    steps = fed.steps_per_round[client.client_id]
    total = fed.total_steps(client.client_id)
    warmup = warmup_steps_for(total, cfg.warmup_ratio)
    seed = seed_for(fed.config.seed, round_index, client.client_id)
    pad = fed.tokenizer.pad_token_id

    def make_batch(indices: list[int]) -> dict[str, Tensor]:
        return collate([client.items[i] for i in indices], pad, fed.classification)

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # Poisson sampling and dropout: seeded per (round, client)
        torch.manual_seed(seed)
        session = PrivateSession(
            fed.model,
            optimizer,
            num_examples=client.num_examples,
            batch_size=cfg.batch_size * cfg.grad_accum,
            physical_batch_size=cfg.batch_size,
            noise_multiplier=ledger.noise_multiplier,
            max_grad_norm=p.max_grad_norm,
            clipping=p.clipping,
            history=ledger.history,
            noise_seed=seed,
            precision=cfg.precision,  # bf16 autocast for the frozen encoder; what trains stays fp32
            lengths=[len(it) for it in client.items],  # length-sorted micro-batches of each Poisson draw
        )
        with session, progress_bar(f"round {round_index + 1} client {client.client_id} (DP)", total=steps) as advance:
            stats = session.train(
                steps=steps,
                make_batch=make_batch,
                lr_for_step=lambda s: lr_at(s, base_lr=cfg.lr, total_steps=total, warmup_steps=warmup, schedule=cfg.schedule),
                first_step=round_index * steps,
                on_step=lambda loss: advance(1),
            )
        ledger.history = [list(e) for e in session.history]
    if cfg.keep_optimizer_state:
        client.optimizer_state = optimizer_state_to_cpu(optimizer.state_dict())
    return ClientResult(client.client_id, client.num_examples, stats.mean_loss, stats.steps, stats.tokens, time.perf_counter() - start)
