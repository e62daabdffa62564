"""FedIT: plain LoRA, A and B averaged separately. Inexact: mean(B) mean(A) != mean(B_i A_i)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsb.aggregation.base import Direction, Strategy, WireNames, lora_names

if TYPE_CHECKING:
    from torch import Tensor, nn


class FedIT(Strategy, name="fedit"):
    exact = False
    display_name = "FedIT"
    table_order = 1

    @classmethod
    def wire_names(cls, module: str, d_out: int, d_in: int, rank: int, direction: Direction, clients: int) -> WireNames:
        return lora_names(module, d_out, d_in, rank)  # A and B, both ways

    def finish(self, model: nn.Module, round_index: int) -> dict[str, Tensor]:
        mean = self.mean_update()
        self.load_global(model, mean)
        return mean
