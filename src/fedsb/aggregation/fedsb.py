"""Fed-SB: average R (and the head). Exact, because B (mean R) A = mean(B R_i A)."""

from __future__ import annotations

from torch import Tensor, nn

from fedsb.aggregation.base import Strategy
from fedsb.aggregation.registry import register_strategy


@register_strategy("fedsb")
class FedSB(Strategy):
    adapter_kind = "lorasb"
    supports_secagg = True  # the server needs only sum_i w_i R_i and sum_i w_i

    def prepare(self, model: nn.Module) -> None:
        """B, A and R0 come from the LoRA-SB initialization, not from here."""

    def finish(self, model: nn.Module, round_index: int) -> dict[str, Tensor]:
        mean = self.mean_update()
        self.load_global(model, mean)
        return mean
