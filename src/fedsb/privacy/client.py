"""Sample-level DP-SGD as a step runner of the one client path (`federated.client.train_client`).

Differences from plain steps, all for the guarantee: every step is a Poisson sample of the
client's examples (expected size batch_size * grad_accum, split into physical batches of
batch_size), per-example gradients are clipped to privacy.max_grad_norm and Gaussian noise is
added (opacus); the global max_grad_norm clipping is not applied (per-example clipping replaces
it); train.precision applies to the frozen encoder only (see `privacy.engine`): R, the head,
per-sample gradients, clipping and noise stay fp32. The client's accountant history comes in
with its `ClientState` and goes back out with this round's steps added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fedsb.data import collate
from fedsb.privacy.engine import PrivateSession
from fedsb.training import StepResult

if TYPE_CHECKING:  # the client path calls this runner, not the other way round: no import circle
    from fedsb.federated.client import ClientData, ClientState, LocalPlan


@dataclass(frozen=True)
class DpSgdSteps:
    noise_multiplier: float  # calibrated for the client's whole run (`PrivacyState.build`)
    max_grad_norm: float
    clipping: str = "flat"
    encoder_dropout: bool = True
    label: str = " (DP)"

    def run(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        client: ClientData,
        plan: LocalPlan,
        *,
        round_index: int,
        seed: int,
        lr_for_step: Callable[[int], float],
        state: ClientState,
        on_step: Callable[[float], None],
    ) -> tuple[StepResult, ClientState]:
        t = plan.train

        def make_batch(indices: list[int]) -> dict[str, Tensor]:
            return collate([client.items[i] for i in indices], plan.pad_id, client.classification)

        session = PrivateSession(
            model,
            optimizer,
            num_examples=client.num_examples,
            batch_size=t.batch_size * t.grad_accum,
            physical_batch_size=t.batch_size,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            clipping=self.clipping,
            history=state.privacy_history or [],
            noise_seed=seed,
            precision=plan.precision,  # bf16 autocast for the frozen encoder; what trains stays fp32
            lengths=[len(it) for it in client.items],  # length-sorted micro-batches of each Poisson draw
            dropout=self.encoder_dropout,
        )
        with session:
            stats = session.train(steps=plan.steps, make_batch=make_batch, lr_for_step=lr_for_step, first_step=round_index * plan.steps, on_step=on_step)
        history = [list(e) for e in session.history]
        return StepResult(steps=stats.steps, mean_loss=stats.mean_loss, tokens=stats.tokens), replace(state, privacy_history=history)
