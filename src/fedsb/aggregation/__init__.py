"""Aggregation strategies: Fed-SB and the baselines FedIT, FFA-LoRA, FedEx-LoRA, FLoRA."""

from fedsb.aggregation import fedex, fedit, fedsb, ffa, flora  # noqa: F401  (registration)
from fedsb.aggregation.base import Strategy, weighted_mean, weighted_sum_into
from fedsb.aggregation.registry import get_strategy, register_strategy, strategy_names, table_order

__all__ = ["Strategy", "get_strategy", "register_strategy", "strategy_names", "table_order", "weighted_mean", "weighted_sum_into"]
