"""FedIT: plain LoRA, A and B averaged separately. Inexact: mean(B) mean(A) != mean(B_i A_i)."""

from __future__ import annotations

from torch import Tensor, nn

from fedsb.aggregation.base import Strategy
from fedsb.aggregation.registry import register_strategy


@register_strategy("fedit")
class FedIT(Strategy):
    exact = False

    def finish(self, model: nn.Module, round_index: int) -> dict[str, Tensor]:
        mean = self.mean_update()
        self.load_global(model, mean)
        return mean
