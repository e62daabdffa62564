"""A run's privacy state: one sample-level ledger per client, the user-level ledger, reporting.

Built once per federation: each client's DP-SGD noise is calibrated up front for the whole run
(every round it could be sampled in, plus the private init if any), so its epsilon after the
last round is <= the target. The ledgers' histories go into the checkpoint meta ("privacy").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedsb.config import check_sample_delta
from fedsb.privacy.accounting import Ledger, calibrate_noise, default_delta, poisson_sample_rate
from fedsb.privacy.init import planned_init_entries
from fedsb.privacy.user_level import UserLevelDP


@dataclass
class PrivacyState:
    """The run's privacy ledgers. Each client's sample-level ledger is the one owner of its DP
    accountant history: on the server only the driver reads it into a round's `ClientTask` and
    writes back the history the client returns (`fedsb.federated.experiment.ClientStates`)."""

    clients: dict[int, Ledger] = field(default_factory=dict)  # sample-level DP-SGD (privacy.enabled)
    user: Ledger | None = None  # DP-FedAvg (privacy.user_level); owned by the strategy wrapper
    init: dict[str, Any] = field(default_factory=dict)  # what the private init did, if any
    private_init: bool = False  # the init is a Gaussian mechanism on client data (its entries are planned)

    @classmethod
    def build(cls, cfg: Any, *, examples: dict[int, int], total_steps: dict[int, int], strategy: Any = None, lorasb_init: bool = False) -> "PrivacyState":
        """examples / total_steps: per client id, its example count and its optimizer steps over
        the run; strategy: the (possibly `UserLevelDP`-wrapped) strategy, owner of the user ledger;
        lorasb_init: the run does a LoRA-SB init (`Strategy.one_time_init`), the only one that
        may read client data (refused here unless it is a Gaussian mechanism)."""
        p, t = cfg.privacy, cfg.train
        state = cls(user=strategy.ledger if isinstance(strategy, UserLevelDP) else None)
        if not p.enabled:
            return state
        check_sample_delta(p, list(examples.values()))  # n is known only now
        logical_batch = t.batch_size * t.grad_accum
        prior = planned_init_entries(cfg, sum(examples.values()), lorasb_init)
        state.private_init = bool(prior)
        for cid, n in examples.items():
            delta = p.delta if p.delta is not None else default_delta(n)
            q = poisson_sample_rate(n, logical_batch)
            steps = total_steps[cid]
            sigma = calibrate_noise(target_epsilon=p.target_epsilon, delta=delta, sample_rate=q, steps=steps, prior=prior)
            state.clients[cid] = Ledger(delta=delta, noise_multiplier=sigma, sample_rate=q, planned_steps=steps)
        return state

    # --- reporting -----------------------------------------------------------------------

    def epsilons(self) -> dict[int, float]:
        return {cid: ledger.epsilon() for cid, ledger in self.clients.items()}

    def round_metrics(self, strategy: Any = None) -> dict[str, Any]:
        """What a metrics row carries: sample-level epsilon (max over clients), user-level epsilon."""
        out: dict[str, Any] = {}
        if self.clients:
            eps = self.epsilons()
            out["epsilon"] = max(eps.values())
            out["epsilon_per_client"] = [eps[c] for c in sorted(eps)]
        if self.user is not None:
            out["user_epsilon"] = self.user.epsilon()
            out.update(getattr(strategy, "last_round", {}) or {})
        return out

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.clients:
            eps = self.epsilons()
            out["epsilon"] = max(eps.values())
            out["clients"] = {str(c): {**ledger.to_dict(), "epsilon": eps[c]} for c, ledger in sorted(self.clients.items())}
        if self.user is not None:
            out["user_epsilon"] = self.user.epsilon()
            out["user"] = self.user.to_dict()
        if self.init:
            out["init"] = self.init
        return out

    # --- checkpoint ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "clients": {str(c): ledger.to_dict() for c, ledger in self.clients.items()},
            "user": self.user.to_dict() if self.user is not None else None,
            "init": self.init,
        }

    def load_dict(self, data: dict[str, Any]) -> None:
        """Restore the histories of a checkpoint (noise multipliers are recomputed identically)."""
        for cid, entry in (data.get("clients") or {}).items():
            ledger = Ledger.from_dict(entry)
            mine = self.clients.get(int(cid))
            if mine is None:
                raise ValueError(f"checkpoint has a privacy ledger for client {cid}, which this run does not have")
            mine.history = ledger.history
        if self.user is not None and data.get("user"):
            self.user.history = Ledger.from_dict(data["user"]).history
        self.init = data.get("init") or {}
