"""Federated, private-by-design LoRA-SB initialization (`init = "federated"`).

The server holds no data. Client i holds, per target layer, its first-step update
`U_i = -lr_eff * sign(G_i)` (d_out x d_in) and a weight `w_i` (its share of the examples). The
server needs the rank-r SVD of the weighted mean `U = sum_i w_i U_i`, but never sees any `U_i`:
it runs the randomized range finder of `fedsb.init.svd` on sums of client messages only.

Exchanges (one download and one upload each; all layers travel in the same message):

1. sketch: every party draws the same test matrix Omega (d_in x k, k = min(r + p, d_out, d_in))
   from a seed known to all (`derive_seed(seed, layer_index)`); client uploads `Y_i = U_i Omega`;
   the server sums `Y = sum w_i Y_i` (= U Omega) and orthonormalizes `Q = orth(Y)`.
2. per power iteration, two exchanges: the server sends Q, clients upload `W_i = U_i^T Q`; the
   server sends `P = orth(sum w_i W_i)`, clients upload `Y_i = U_i P`; `Q = orth(sum w_i Y_i)`.
3. projection: the server sends Q, clients upload `Z_i = Q^T U_i`; the server computes
   `svd.svd_from_projection(Q, sum w_i Z_i, r)` = (P, S, Qt) and LoRA-SB takes B = P, A = Qt,
   R0 = diag(S).

Every message is linear in `U_i`, so the server only ever needs weighted sums: the protocol
runs unchanged under secure aggregation, and user-level differential privacy is Gaussian noise on
each sum (`noise_std`) after a per-client norm clip (`clip_norm`). With one client, weight 1 and
no noise, the arithmetic is exactly that of `svd.randomized_svd`, so the result is identical.
The message plan and its bytes (shapes only) are in `fedsb.sketch_protocol`, torch-free for `fedsb comm`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedsb.init import svd
from fedsb.sketch_protocol import CommunicationCost, Exchange, Shapes, communication_cost, protocol_exchanges, sketch_width  # noqa: F401  (this module's API)

LayerFactor = Callable[[str], Tensor]

_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------- shared randomness


def _splitmix64(x: int) -> int:
    """One SplitMix64 step: a fixed, platform-independent 64-bit mixer (no Python `hash`)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, layer_index: int) -> int:
    """A 63-bit seed for layer `layer_index`, the same on every party that knows `seed`.

    Mixing (rather than `seed + layer_index`) keeps the per-layer test matrices of neighbouring
    seeds unrelated, so that runs with seeds 0 and 1 do not share Omega with a one-layer shift.
    """
    if layer_index < 0:
        raise ValueError(f"layer_index must be >= 0, got {layer_index}")
    return _splitmix64(_splitmix64(seed & _MASK64) ^ layer_index) >> 1


def layer_generator(seed: int, layer_index: int) -> torch.Generator:
    """The CPU generator from which every party draws the test matrix of one layer."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, layer_index))  # the same sketch on every device


# --------------------------------------------------------------------------- client side


def client_sketch(u_i: Tensor, omega: Tensor) -> Tensor:
    """Round 1 message `Y_i = U_i Omega` (d_out x k): a random sketch of the column space."""
    return u_i.float() @ omega.to(u_i.device)


def client_power_left(u_i: Tensor, q: Tensor) -> Tensor:
    """Power-iteration message `U_i^T Q` (d_in x k), Q being the server's column basis."""
    return u_i.float().mT @ q.to(u_i.device)


def client_power_right(u_i: Tensor, p: Tensor) -> Tensor:
    """Power-iteration message `U_i P` (d_out x k), P being the server's row-space basis."""
    return u_i.float() @ p.to(u_i.device)


def client_project(u_i: Tensor, q: Tensor) -> Tensor:
    """Round 2 message `Z_i = Q^T U_i` (k x d_in): U_i expressed in the agreed basis Q."""
    return q.to(u_i.device).mT @ u_i.float()


def clip_message(message: Tensor, clip_norm: float | None) -> Tensor:
    """Scale `message` down to Frobenius norm `clip_norm` if it is larger (None: unchanged).

    In a deployment each client clips its own message before secure aggregation; this bounds
    one client's influence on each sum, which is what the DP noise must cover.
    """
    if clip_norm is None:
        return message
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = float(torch.linalg.vector_norm(message))
    return message * (clip_norm / norm) if norm > clip_norm else message


# --------------------------------------------------------------------------- server side


def server_sum(
    messages: list[Tensor],
    weights: list[float],
    *,
    clip_norm: float | None = None,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """`sum_i w_i clip(m_i) + N(0, noise_std^2)`: all the server learns in one exchange.

    Under secure aggregation the server receives this sum and nothing else. The clip is applied
    here to simulate each client clipping its own message. The noise is this simulation's
    stand-in for the DP mechanism; it gives user-level DP only together with `clip_norm`
    (sensitivity `max_i w_i * clip_norm` per sum, composed over all exchanges and layers), and
    only if its seed is secret from whoever sees the sum. `generator=None` with noise draws a
    fresh, unreproducible seed.
    """
    if not messages or len(messages) != len(weights):
        raise ValueError(f"need one weight per message, got {len(messages)} and {len(weights)}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    device = messages[0].device
    total = torch.zeros(messages[0].shape, dtype=torch.float32, device=device)
    for message, weight in zip(messages, weights, strict=True):
        total.add_(clip_message(message.float().to(device), clip_norm), alpha=weight)
    if noise_std > 0:
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(secrets.randbits(63))
        noise = torch.randn(total.shape, generator=generator, dtype=torch.float32, device="cpu")  # same on any device
        total.add_(noise.to(device), alpha=noise_std)
    return total


def normalize_weights(weights: Sequence[float], n_clients: int) -> list[float]:
    """Weights divided by their sum, so that the sums are weighted means (one client -> [1.0])."""
    if len(weights) != n_clients:
        raise ValueError(f"{n_clients} clients but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


# --------------------------------------------------------------------------- simulation driver


@dataclass(frozen=True)
class FederatedInitResult:
    """Per-layer truncated SVD of the weighted mean update, and what the protocol cost.

    `factors[layer] = (P, S, Qt)`: LoRA-SB uses B = P, A = Qt, R0 = diag(S).
    """

    factors: dict[str, tuple[Tensor, Tensor, Tensor]]
    upload_bytes_per_client: int
    download_bytes_per_client: int
    rounds: int


def _as_getter(factor: LayerFactor | Mapping[str, Tensor]) -> LayerFactor:
    """A client as a function layer -> U_i, so that U_i can be produced on demand."""
    if isinstance(factor, Mapping):
        return factor.__getitem__
    if callable(factor):
        return factor
    raise TypeError(f"a client must be a Mapping[str, Tensor] or a Callable[[str], Tensor], got {type(factor)}")


def _fetch(getter: LayerFactor, layer: str, shape: tuple[int, int]) -> Tensor:
    """U_i of one layer, checked against the agreed shape (a mismatch would corrupt the sums)."""
    u = getter(layer)
    if tuple(u.shape) != tuple(shape):
        raise ValueError(f"layer {layer!r}: client factor has shape {tuple(u.shape)}, expected {tuple(shape)}")
    return u


def _layer_svd(
    layer: str,
    shape: tuple[int, int],
    omega: Tensor,
    getters: Sequence[LayerFactor],
    weights: list[float],
    *,
    rank: int,
    power_iters: int,
    clip_norm: float | None,
    noise_std: float,
    noise_generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run all exchanges for one layer, mirroring `svd.randomized_range` + `svd_from_projection`.

    Each client's U_i is fetched once per exchange and dropped right after its message is made,
    so at most one U_i is alive at a time (callables are called 2 + 2 * power_iters times).
    """

    def exchange(client_fn: Callable[[Tensor, Tensor], Tensor], broadcast: Tensor) -> Tensor:
        messages = [client_fn(_fetch(get, layer, shape), broadcast) for get in getters]
        return server_sum(messages, weights, clip_norm=clip_norm, noise_std=noise_std, generator=noise_generator)

    q = svd.orthonormal_basis(exchange(client_sketch, omega))
    for _ in range(power_iters):
        p = svd.orthonormal_basis(exchange(client_power_left, q))
        q = svd.orthonormal_basis(exchange(client_power_right, p))
    return svd.svd_from_projection(q, exchange(client_project, q), rank)


def federated_randomized_svd(
    client_factors: Sequence[LayerFactor] | Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    layer_shapes: Mapping[str, tuple[int, int]],
    *,
    rank: int,
    oversample: int = 10,
    power_iters: int = 0,
    seed: int,
    clip_norm: float | None = None,
    noise_std: float = 0.0,
    noise_seed: int | None = None,
) -> FederatedInitResult:
    """Simulate the protocol for every layer and client; return the server's SVD factors.

    `layer_shapes` is the plan every party agrees on: its order gives each layer's index for
    `derive_seed(seed, index)`, hence Omega. `weights` are normalized to sum to one. Noise, when
    `noise_std > 0`, comes from `noise_seed` (a secret of the noise-adding party, distinct from
    the public `seed`; None draws a fresh one), one independent stream per layer.
    """
    getters = [_as_getter(factor) for factor in client_factors]
    if not getters:
        raise ValueError("need at least one client")
    normalized = normalize_weights(weights, len(getters))
    cost = communication_cost(layer_shapes, rank=rank, oversample=oversample, power_iters=power_iters)
    if noise_std > 0 and noise_seed is None:
        noise_seed = secrets.randbits(63)
    factors = {}
    for index, (layer, shape) in enumerate(layer_shapes.items()):
        k = sketch_width(shape, rank, oversample)
        omega = svd.gaussian_test_matrix(shape[1], k, layer_generator(seed, index))
        noise_generator = layer_generator(noise_seed, index) if noise_std > 0 else None
        factors[layer] = _layer_svd(
            layer, shape, omega, getters, normalized,
            rank=rank, power_iters=power_iters, clip_norm=clip_norm,
            noise_std=noise_std, noise_generator=noise_generator,
        )  # fmt: skip
    return FederatedInitResult(
        factors=factors,
        upload_bytes_per_client=cost.upload_bytes_per_client,
        download_bytes_per_client=cost.download_bytes_per_client,
        rounds=cost.rounds,
    )
