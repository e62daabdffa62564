"""FFA-LoRA: A frozen at a seeded random init shared by all clients, only B trains and is averaged."""

from __future__ import annotations

from fedsb.aggregation.base import Direction, WireNames, lora_names
from fedsb.aggregation.fedit import FedIT


class FFALoRA(FedIT, name="ffa"):
    train_a = False
    exact = True  # A is shared, so mean(B_i) A = mean(B_i A)
    display_name = "FFA-LoRA"
    table_order = 2

    @classmethod
    def wire_names(cls, module: str, d_out: int, d_in: int, rank: int, direction: Direction, clients: int) -> WireNames:
        return lora_names(module, d_out, d_in, rank)[1:]  # B only, both ways

    @classmethod
    def comm_params(cls, modules: list[tuple[str, int, int]], head: int, rank: int, clients: int) -> tuple[int, int]:
        """The paper counts half of FedIT's adapters; the true count (B only, r * d_out) differs
        whenever d_out != d_in (grouped-query k/v projections, MLP up/gate/down)."""
        true = sum(rank * d_out for _, d_out, _ in modules) + head
        return true, sum(rank * (d_in + d_out) for _, d_out, d_in in modules) // 2 + head
