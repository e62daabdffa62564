"""The frozen B, A of Fed-SB: what the setup message carries once, and when it must.

Both sides use this: the server encodes B, A from its model for the setup broadcast, and a
node that computes them itself (`init.method = "svd"`) checks them against the server's sha256.
"""

from __future__ import annotations

from torch import Tensor, nn

from fedsb.adapter.inject import adapter_state
from fedsb.aggregation import get_strategy
from fedsb.config import ExperimentConfig
from fedsb.init.plan import plan_init


def frozen_state(model: nn.Module) -> dict[str, Tensor]:
    """B and A (everything of the adapter but R): what the init broadcast carries."""
    return {k: v for k, v in adapter_state(model).items() if not k.endswith(".R")}


def needs_frozen_broadcast(config: ExperimentConfig) -> bool:
    """Fed-SB whose B, A the node holds in its cache, checked against the server's sha256: a
    data-driven init ships them; "svd" is computed by the node itself and verified
    (`node_party.local_factors`), shipped only when its hash differs. A seeded random init is
    recomputed locally."""
    return plan_init(config, get_strategy(config.federation.strategy), None).computed_factors
