"""Privacy accounting with opacus' RDP accountant, one ledger per protected party.

A ledger is the accountant's history, a list of (noise multiplier, sample rate, steps) entries;
RDP composes them by addition, so a Gaussian-mechanism init (sample rate q, one step) and the
DP-SGD steps of every round add up in one epsilon. The history is plain JSON: it goes into the
checkpoint meta, so a resumed run keeps counting where it stopped.

RDP rather than opacus' default PRV accountant: it composes heterogeneous entries exactly as
written and its state is the history itself. It is slightly looser (a larger epsilon for the
same noise), which errs on the safe side.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

Entry = tuple[float, float, int]  # (noise multiplier, sample rate, steps)
MAX_SIGMA = 1e6


class PrivacyError(ValueError):
    """A privacy setting that cannot be honoured; the message says what to change."""


def check_budget(*, target_epsilon: float, delta: float) -> None:
    if not target_epsilon > 0 or math.isinf(target_epsilon) or math.isnan(target_epsilon):
        raise PrivacyError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")


def default_delta(num_examples: int) -> float:
    """1 / (10 n): below 1/n, so that leaking one whole record is not within the guarantee."""
    if num_examples <= 0:
        raise PrivacyError("a party without examples has nothing to protect (num_examples = 0)")
    return 1.0 / (10 * num_examples)


ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)  # the RDP orders opacus' RDPAccountant uses


@lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    """RDP of one sampled Gaussian step at every order; cached because the series for
    fractional orders is slow (0.2 s at q = 0.25) and the same (sigma, q) recurs constantly."""
    return np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(ORDERS)), dtype=float)


def epsilon_of(history: Iterable[Sequence[float]], delta: float) -> float:
    """(epsilon at `delta`) of the composition of the history's Gaussian mechanisms.

    The same numbers as opacus' RDPAccountant(history).get_epsilon(delta): RDP is additive over
    steps, so `steps` steps cost steps x the RDP of one.
    """
    entries = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not entries:
        return 0.0
    total = sum(n * _rdp_per_step(s, q) for s, q, n in entries)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a looser, still valid bound
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(ORDERS), rdp=total, delta=delta)
    return float(eps)


@lru_cache(maxsize=256)
def _calibrate_cached(target_epsilon: float, delta: float, sample_rate: float, steps: int, prior: tuple[Entry, ...], tolerance: float) -> float:
    return _calibrate(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps, prior=prior, tolerance=tolerance)


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: Sequence[Entry] = (),
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (to `tolerance` in epsilon) such that `prior` plus `steps`
    sampled Gaussian steps at `sample_rate` stay within (target_epsilon, delta).

    Without `prior` this is exactly opacus' `get_noise_multiplier` (the function behind
    `make_private_with_epsilon`) with the RDP accountant; with it, the budget already spent
    (e.g. by a private init) is taken into account.
    """
    prior_key = tuple((float(s), float(q), int(n)) for s, q, n in prior)
    return _calibrate_cached(float(target_epsilon), float(delta), float(sample_rate), int(steps), prior_key, float(tolerance))


def _calibrate(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, prior: Sequence[Entry], tolerance: float) -> float:
    check_budget(target_epsilon=target_epsilon, delta=delta)
    if not 0 < sample_rate <= 1:
        raise PrivacyError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps <= 0:
        raise PrivacyError(f"steps must be > 0, got {steps}")
    spent = epsilon_of(prior, delta)
    if spent >= target_epsilon:
        raise PrivacyError(
            f"the private init alone spends epsilon {spent:.3g} >= target {target_epsilon}: "
            "raise privacy.init_noise_multiplier or use public data for the init"
        )

    def eps(sigma: float) -> float:
        return epsilon_of([*prior, (sigma, sample_rate, steps)], delta)

    low, high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        high *= 2
        eps_high = eps(high)
        if high > MAX_SIGMA:
            raise PrivacyError(f"target epsilon {target_epsilon} is out of reach (noise multiplier > {MAX_SIGMA:g})")
    while target_epsilon - eps_high > tolerance:
        mid = (low + high) / 2
        e = eps(mid)
        if e < target_epsilon:
            high, eps_high = mid, e
        else:
            low = mid
    return high


@dataclass
class Ledger:
    """One protected party's accountant: its delta, its calibrated noise, its history."""

    delta: float
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    planned_steps: int = 0
    history: list[list[float]] = field(default_factory=list)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Append (or extend the last entry, as opacus does) `steps` Gaussian steps."""
        if steps <= 0:
            return
        if self.history and self.history[-1][0] == noise_multiplier and self.history[-1][1] == sample_rate:
            self.history[-1][2] = int(self.history[-1][2]) + steps
        else:
            self.history.append([float(noise_multiplier), float(sample_rate), int(steps)])

    @property
    def steps(self) -> int:
        return sum(int(n) for _, _, n in self.history)

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta)

    def to_dict(self) -> dict[str, Any]:
        return {
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "planned_steps": self.planned_steps,
            "history": [list(e) for e in self.history],
            "epsilon": self.epsilon(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Ledger":
        return cls(
            delta=float(data["delta"]),
            noise_multiplier=data.get("noise_multiplier"),
            sample_rate=data.get("sample_rate"),
            planned_steps=int(data.get("planned_steps", 0)),
            history=[[float(s), float(q), int(n)] for s, q, n in data.get("history", [])],
        )


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """Opacus' convention: q = 1 / (number of batches of an epoch) = 1 / ceil(n / batch_size)."""
    return 1.0 / math.ceil(num_examples / batch_size)
