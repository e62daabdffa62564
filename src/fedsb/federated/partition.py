"""Split a data set across clients: IID, contiguous shards (the paper's split), Dirichlet non-IID.

Parties with their own files (`federation.client_data`) are not split: `fedsb.federated.parties`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from fedsb.config import ConfigError


def partition_indices(
    n: int,
    num_clients: int,
    scheme: str,
    *,
    seed: int,
    keys: Sequence[str | None] | None = None,
    alpha: float = 0.5,
) -> list[list[int]]:
    """Client index lists covering range(n) exactly once; every client gets at least one example."""
    if num_clients > n:
        raise ConfigError(
            f"federation.num_clients = {num_clients}: only {n} training examples, and each client needs at least one"
        )
    rng = np.random.default_rng(seed)
    if scheme == "shards":
        return [part.tolist() for part in np.array_split(np.arange(n), num_clients)]
    if scheme == "iid":
        return [sorted(part.tolist()) for part in np.array_split(rng.permutation(n), num_clients)]
    if scheme == "dirichlet":
        if keys is None or all(k is None for k in keys):
            raise ConfigError('federation.partition = "dirichlet" needs a key (label) per example; this task provides none')
        return _dirichlet(keys, num_clients, alpha, rng)
    raise ValueError(f"unknown partition {scheme!r}; allowed: iid, shards, dirichlet")


def _dirichlet(keys: Sequence[str | None], num_clients: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    by_key: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        by_key[str(k)].append(i)
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for key in sorted(by_key):
        idx = rng.permutation(by_key[key])
        shares = rng.dirichlet([alpha] * num_clients)
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for c, part in enumerate(np.split(idx, cuts)):
            clients[c].extend(part.tolist())
    # No client may end up empty: move one example from the largest client to each empty one.
    for c in range(num_clients):
        if not clients[c]:
            donor = max(range(num_clients), key=lambda j: len(clients[j]))
            clients[c].append(clients[donor].pop())
    return [sorted(c) for c in clients]


def sample_clients(num_clients: int, fraction: float, *, seed: int, round_index: int) -> list[int]:
    """The clients of one round: a seeded function of (seed, round), so a resumed run agrees."""
    k = max(1, int(round(fraction * num_clients)))
    if k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_index])
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())
