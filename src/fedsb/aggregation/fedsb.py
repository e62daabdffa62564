"""Fed-SB: average R (and the head). Exact, because B (mean R) A = mean(B R_i A)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsb.aggregation.base import Direction, Strategy, WireNames

if TYPE_CHECKING:
    from torch import Tensor, nn


class FedSB(Strategy, name="fedsb"):
    adapter_kind = "lorasb"
    supports_secagg = True  # the server needs only sum_i w_i R_i and sum_i w_i
    display_name = "Fed-SB"
    table_order = 0
    break_even_reference = "fedit"  # its one-time B/A broadcast is repaid against plain FedIT

    @classmethod
    def wire_names(cls, module: str, d_out: int, d_in: int, rank: int, direction: Direction, clients: int) -> WireNames:
        return [(f"{module}.R", (rank, rank))]  # both ways; B, A travel once (init broadcast)

    @classmethod
    def comm_params(cls, modules: list[tuple[str, int, int]], head: int, rank: int, clients: int) -> tuple[int, int]:
        n = rank * rank * len(modules) + head
        return n, n

    def prepare(self, model: nn.Module) -> None:
        """B, A and R0 come from the LoRA-SB initialization, not from here."""

    def finish(self, model: nn.Module, round_index: int) -> dict[str, Tensor]:
        mean = self.mean_update()
        self.load_global(model, mean)
        return mean
