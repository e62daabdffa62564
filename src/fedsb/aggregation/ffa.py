"""FFA-LoRA: A frozen at a seeded random init shared by all clients, only B trains and is averaged."""

from __future__ import annotations

from fedsb.aggregation.fedit import FedIT
from fedsb.aggregation.registry import register_strategy


@register_strategy("ffa")
class FFALoRA(FedIT):
    train_a = False
    exact = True  # A is shared, so mean(B_i) A = mean(B_i A)
