"""User-level DP (DP-FedAvg, McMahan et al. 2018) as a wrapper around any averaging strategy.

Each client's update (its trained tensors minus the global ones it started from) is clipped to
L2 norm `clip_norm` over all its tensors together; the server averages the clipped updates
without example-count weights (a weight would scale one client's influence) and adds Gaussian
noise of std `noise_multiplier * clip_norm / m` to the mean of the m sampled clients. One client
changes the mean by at most clip_norm / m (replace-one adjacency), so each round is a Gaussian
mechanism with that noise multiplier, and the rounds compose in an RDP accountant with sample
rate = the client fraction (see `docs/privacy.md` for what that assumes).

For Fed-SB the update is R_i - R (r x r per layer): the noise lives in the r x r space and the
model sees B xi A, which is isotropic noise of the same Frobenius norm (B, A orthonormal).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fedsb.adapter.inject import trainable_state
from fedsb.aggregation.base import Strategy, weighted_sum_into
from fedsb.privacy.accounting import Ledger, PrivacyError

def _noise_seed(seed: int, round_index: int) -> int:
    return (seed * 1_000_003 + round_index * 10_007 + 7_919) % (2**63)


class UserLevelDP(Strategy):
    """Clip each client's update, average unweighted, add Gaussian noise, then let `inner` apply it."""

    def __init__(self, inner: Strategy, *, clip_norm: float, noise_multiplier: float, sample_rate: float, delta: float) -> None:
        if inner.user_level_dp_note:  # the strategy declares why noise on the mean cannot cover it
            raise PrivacyError(f"user-level DP does not support strategy {inner.name!r}: {inner.user_level_dp_note}")
        if clip_norm <= 0 or noise_multiplier <= 0:
            raise PrivacyError(f"user-level DP needs clip norm > 0 and noise multiplier > 0, got {clip_norm}, {noise_multiplier}")
        super().__init__(weighted=False, head_modules=inner.head_modules, seed=inner.seed)
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.adapter_kind = inner.adapter_kind  # type: ignore[misc]
        self.train_a = inner.train_a  # type: ignore[misc]
        self.modifies_base = inner.modifies_base  # type: ignore[misc]
        self.exact = False  # type: ignore[misc]  # the noise is the point
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.ledger = Ledger(delta=delta, noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        self.last_round: dict[str, Any] = {}

    # --- delegated to the wrapped strategy ---------------------------------------------------

    def prepare(self, model: nn.Module) -> None:
        self.inner.prepare(model)

    def load_global(self, model: nn.Module, state: Mapping[str, Tensor]) -> None:
        self.inner.load_global(model, state)

    def download_state(self, model: nn.Module) -> dict[str, Tensor]:
        return self.inner.download_state(model)

    def client_weight(self, num_examples: int) -> float:
        return 1.0

    # --- the Gaussian mechanism ----------------------------------------------------------

    def begin_round(self, model: nn.Module) -> None:
        super().begin_round(model)
        self.inner.begin_round(model)
        # What every client starts from, on the host beside the decoded uploads: the mechanism
        # (clip, sum, seeded noise) runs on the CPU wherever the model lives.
        self._global = {k: v.to("cpu") for k, v in trainable_state(model, self.head_modules).items()}
        self._norms: list[float] = []

    def add(self, model: nn.Module, update: Mapping[str, Tensor], num_examples: int) -> None:
        delta = {k: update[k].to("cpu", torch.float64) - self._global[k].double() for k in self._global}
        norm = float(torch.sqrt(sum((d * d).sum() for d in delta.values())))
        self._norms.append(norm)
        scale = min(1.0, self.clip_norm / (norm + 1e-12))
        weighted_sum_into(self._sums, {k: d * scale for k, d in delta.items()}, 1.0)
        self._total += 1.0
        self._count += 1

    @torch.no_grad()
    def finish(self, model: nn.Module, round_index: int) -> dict[str, Tensor]:
        if self._count == 0:
            raise ValueError("no client update to aggregate")
        g = torch.Generator(device="cpu").manual_seed(_noise_seed(self.seed, round_index))
        std = self.noise_multiplier * self.clip_norm / self._count
        noisy = {}
        for key in sorted(self._sums):
            mean = self._sums[key] / self._count
            noise = torch.randn(mean.shape, generator=g, dtype=torch.float64, device="cpu") * std
            noisy[key] = (self._global[key].double() + mean + noise).float()
        # The wrapped strategy sees a single "client" whose upload is the noisy global update.
        self.inner.add(model, noisy, 1)
        download = self.inner.finish(model, round_index)
        self.ledger.record(self.noise_multiplier, self.ledger.sample_rate or 1.0, 1)
        self.last_round = {
            "user_clip_fraction": sum(n > self.clip_norm for n in self._norms) / len(self._norms),
            "user_update_norm_mean": sum(self._norms) / len(self._norms),
            "user_noise_std": std,
        }
        return download


def wrap_user_level(strategy: Strategy, config: Any) -> Strategy:
    """The strategy wrapped for DP-FedAvg when `privacy.user_level`, else unchanged."""
    p = config.privacy
    if not p.user_level:
        return strategy
    n = config.federation.num_clients
    delta = p.user_delta if p.user_delta is not None else 1.0 / (10 * n)
    return UserLevelDP(
        strategy,
        clip_norm=p.user_clip_norm,
        noise_multiplier=p.user_noise_multiplier,
        sample_rate=config.federation.client_fraction,
        delta=delta,
    )
