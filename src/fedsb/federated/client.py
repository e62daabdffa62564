"""A simulated client: a data partition (plus, optionally, its optimizer state), never a model copy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fedsb.data import Tokenized, bucketed_batches, collate


@dataclass
class ClientData:
    client_id: int
    items: list[Tokenized]
    classification: bool = False
    optimizer_state: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def num_examples(self) -> int:
        return len(self.items)

    def steps_per_round(self, batch_size: int, grad_accum: int, local_epochs: float, local_steps: int) -> int:
        if local_steps > 0:
            return local_steps
        micro = math.ceil(local_epochs * math.ceil(self.num_examples / batch_size))
        return max(1, math.ceil(micro / grad_accum))

    def batches(self, *, steps: int, batch_size: int, grad_accum: int, pad_id: int, seed: int) -> list[dict[str, Tensor]]:
        """steps * grad_accum micro-batches, length-bucketed, cycling over seeded epochs."""
        g = torch.Generator().manual_seed(seed)
        lengths = [len(it) for it in self.items]
        needed = steps * grad_accum
        order: list[list[int]] = []
        while len(order) < needed:
            order += bucketed_batches(lengths, batch_size, g)
        return [collate([self.items[i] for i in idx], pad_id, self.classification) for idx in order[:needed]]


@dataclass
class ClientResult:
    client_id: int
    num_examples: int
    loss: float
    steps: int
    tokens: int
    seconds: float


def seed_for(seed: int, round_index: int, client_id: int) -> int:
    """Per (run, round, client) seed: batches and dropout do not depend on who trained before."""
    return (seed * 1_000_003 + round_index * 10_007 + client_id) % (2**63)


def optimizer_state_to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "state": {k: {n: (t.detach().cpu().clone() if isinstance(t, Tensor) else t) for n, t in v.items()} for k, v in state["state"].items()},
        "param_groups": state["param_groups"],
    }


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
