"""Aggregation strategies: Fed-SB and the baselines FedIT, FFA-LoRA, FedEx-LoRA, FLoRA.

Each strategy is one module here that declares itself (`class X(Strategy, name="x")`); the
registry finds them with pkgutil. Nothing here imports torch: `fedsb comm` reads the
declarations without it.
"""

from fedsb.aggregation.base import Strategy, weighted_mean, weighted_sum_into
from fedsb.aggregation.registry import get_strategy, register_strategy, strategy_names, table_order

__all__ = ["Strategy", "get_strategy", "register_strategy", "strategy_names", "table_order", "weighted_mean", "weighted_sum_into"]
