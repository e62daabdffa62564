"""How a run initializes its adapter, decided once (`InitPlan`) instead of re-derived at each use.

Whether a run does a LoRA-SB init is the strategy's declaration (`Strategy.one_time_init`), not
`adapter_kind` + `init.method` compared again in every module; the step scale `lr_eff` is a
number computed here and passed on, never recomputed from its inputs further down.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from fedsb.init.svd import effective_lr

# A sign step above this on every weight is far beyond a full fine-tuning step (~1e-5..1e-4).
LARGE_INIT_STEP = 1e-3
SEEDED_LORA = "seeded-lora"  # the LoRA baselines: A drawn from the shared seed in `Strategy.prepare`
STEP_METHODS = ("central", "federated")  # inits that imitate a first full fine-tuning step (lr_eff)
COMPUTED_METHODS = ("central", "federated", "svd")  # B, A computed, not drawn from the seed


@dataclass(frozen=True)
class InitPlan:
    """One run's init: its method, the scale of its step, whether it is a DP mechanism."""

    method: str  # init.method for a LoRA-SB strategy, else SEEDED_LORA
    lr_eff: float | None = None  # the imitated first step's scale (central and federated inits only)
    private: bool = False  # privacy.enabled and the init reads client data: a Gaussian mechanism (`privacy.init`)

    @property
    def lorasb(self) -> bool:
        """The adapter's B, A (and R0) come from a LoRA-SB init, shipped or verified once."""
        return self.method != SEEDED_LORA

    @property
    def computed_factors(self) -> bool:
        """B, A computed (gradients, or the frozen weights' SVD), not drawn from the seed: worth
        evaluating after the init, and what a deployment broadcasts (or checks) once."""
        return self.method in COMPUTED_METHODS


def plan_init(config: Any, strategy: Any, mean_total_steps: int | None, *, private: bool = False) -> InitPlan:
    """The run's `InitPlan` from its config, its strategy (class or instance) and the mean
    optimizer steps per client over the run (the paper's lr_eff = train.lr / warm-up steps);
    `mean_total_steps=None` (a party that does not know the steps yet): no lr_eff. `private`:
    the privacy state found the init to be a Gaussian mechanism on client data
    (`PrivacyState.private_init`; it refuses an init that would read them without noise).
    """
    if not strategy.one_time_init():
        return InitPlan(SEEDED_LORA)
    method = config.init.method
    lr_eff = _lr_eff(config, mean_total_steps) if method in STEP_METHODS and mean_total_steps is not None else None
    return InitPlan(method, lr_eff, bool(private))


def _lr_eff(config: Any, mean_total_steps: int) -> float:
    """`init.lr_eff` when set, else the paper's `train.lr / warm-up steps` (warned when large)."""
    if config.init.lr_eff:
        return config.init.lr_eff
    lr_eff = effective_lr(config.train.lr, config.train.warmup_ratio, mean_total_steps)
    if lr_eff > LARGE_INIT_STEP:
        warnings.warn(
            f"the LoRA-SB init puts a step of {lr_eff:g} (train.lr / warm-up steps) on every adapted "
            f"weight; with few warm-up steps and R's large learning rate this can break the model "
            f"before training starts. Set init.lr_eff (e.g. 1e-5, a full fine-tuning step) to decouple it.",
            stacklevel=3,
        )
    return lr_eff
