"""A client's local round: one function, global state + data in, its update out.

`train_client` is the whole client path of both engines (the in-process transport calls it in a
loop on one shared model; a Flower ClientApp calls it once per message). How the optimizer steps
are taken is a `StepRunner`: plain AdamW steps (`SgdSteps`) or DP-SGD with opacus
(`fedsb.privacy.client.DpSgdSteps`). What a client keeps between rounds (its optimizer state,
its privacy accountant's history) goes in and comes back as a `ClientState`: the caller decides
where it lives (the `Experiment`'s `ClientStates` in process, the node's cache under Flower);
a `ClientData` is the client's data only.

A client is a data partition (plus its state), never a model copy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from fedsb.adapter.inject import trainable_state
from fedsb.data import Tokenized, bucketed_batches, collate
from fedsb.progress import progress_bar
from fedsb.training import StepResult, lr_at, make_optimizer, train_steps, warmup_steps_for

if TYPE_CHECKING:
    from fedsb.config import ExperimentConfig, TrainConfig


@dataclass
class ClientState:
    """What a client keeps between rounds and never uploads."""

    optimizer: dict[str, Any] | None = field(default=None, repr=False)  # train.keep_optimizer_state
    privacy_history: list[list[float]] | None = None  # its DP-SGD accountant's history


def steps_for(num_examples: int, batch_size: int, grad_accum: int, local_epochs: float, local_steps: int) -> int:
    """Optimizer steps per round of a client with `num_examples` examples (a server that holds
    no client data computes them from the counts the nodes reported)."""
    if local_steps > 0:
        return local_steps
    micro = math.ceil(local_epochs * math.ceil(num_examples / batch_size))
    return max(1, math.ceil(micro / grad_accum))


@dataclass
class ClientData:
    client_id: int
    items: list[Tokenized]
    classification: bool = False

    @property
    def num_examples(self) -> int:
        return len(self.items)

    def steps_per_round(self, batch_size: int, grad_accum: int, local_epochs: float, local_steps: int) -> int:
        return steps_for(self.num_examples, batch_size, grad_accum, local_epochs, local_steps)

    def batches(self, *, steps: int, batch_size: int, grad_accum: int, pad_id: int, seed: int) -> list[dict[str, Tensor]]:
        """steps * grad_accum micro-batches, length-bucketed, cycling over seeded epochs."""
        g = torch.Generator(device="cpu").manual_seed(seed)  # the data order is host-side
        lengths = [len(it) for it in self.items]
        needed = steps * grad_accum
        order: list[list[int]] = []
        while len(order) < needed:
            order += bucketed_batches(lengths, batch_size, g)
        return [collate([self.items[i] for i in idx], pad_id, self.classification) for idx in order[:needed]]


@dataclass
class ClientUpdate:
    """One client's answer to a round: its trained tensors and what it reports.

    `tensors` is what the server aggregates (decoded from the wire when a transport moved it);
    `state` is what the client keeps (never uploaded); `payload_bytes` is set by the transport.
    """

    client_id: int
    num_examples: int
    tensors: dict[str, Tensor]
    loss: float
    steps: int
    tokens: int
    seconds: float
    state: ClientState = field(default_factory=ClientState)
    payload_bytes: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. the client's epsilon


@dataclass(frozen=True)
class LocalPlan:
    """The run's settings a client needs for one round (instead of the whole federation)."""

    train: TrainConfig
    seed: int
    precision: str
    pad_id: int
    head_modules: list[str]
    steps: int  # optimizer steps per round
    total_steps: int  # over the whole run: the learning-rate schedule spans it


class StepRunner(Protocol):
    """Takes one round's optimizer steps on the model (already holding the global state)."""

    label: str

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
    ) -> tuple[StepResult, ClientState]: ...


class SgdSteps:
    """Plain steps: AdamW over length-bucketed batches, global gradient clipping, autocast."""

    label = ""

    def run(self, model, optimizer, params, client, plan, *, round_index, seed, lr_for_step, state, on_step):  # type: ignore[no-untyped-def]
        t = plan.train
        batches = client.batches(steps=plan.steps, batch_size=t.batch_size, grad_accum=t.grad_accum, pad_id=plan.pad_id, seed=seed)
        result = train_steps(
            model,
            batches,
            optimizer,
            params=params,
            grad_accum=t.grad_accum,
            lr_for_step=lr_for_step,
            first_step=round_index * plan.steps,
            max_grad_norm=t.max_grad_norm,
            precision=plan.precision,
            on_step=on_step,
            physical_batch=t.physical_batch,
            physical_tokens=t.physical_tokens,
            pack=t.pack_sequences,
        )
        return result, state


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


def step_runner(config: ExperimentConfig, noise_multiplier: float | None = None) -> StepRunner:
    """DP-SGD when `privacy.enabled` (with the client's calibrated noise), else plain steps."""
    if not config.privacy.enabled:
        return SgdSteps()
    from fedsb.privacy.client import DpSgdSteps  # slow dependency (opacus), only for DP runs

    if noise_multiplier is None:
        raise ValueError("privacy.enabled: the client's calibrated noise multiplier is required")
    p = config.privacy
    return DpSgdSteps(noise_multiplier=noise_multiplier, max_grad_norm=p.max_grad_norm, clipping=p.clipping, encoder_dropout=p.encoder_dropout)


def train_client(
    model: nn.Module,
    load_global: Callable[[nn.Module, dict[str, Tensor]], None],
    client: ClientData,
    plan: LocalPlan,
    round_index: int,
    global_state: dict[str, Tensor],
    *,
    runner: StepRunner,
    state: ClientState | None = None,
) -> ClientUpdate:
    """Load the global state, take this round's steps, return the client's tensors and state.

    The model is scratch space: the result is the returned update, not what the model holds.
    """
    t = plan.train
    state = state or ClientState()
    load_global(model, global_state)
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, t.lr, t.weight_decay)
    if t.keep_optimizer_state and state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    warmup = warmup_steps_for(plan.total_steps, t.warmup_ratio)
    seed = seed_for(plan.seed, round_index, client.client_id)

    def lr_for_step(s: int) -> float:
        return lr_at(s, base_lr=t.lr, total_steps=plan.total_steps, warmup_steps=warmup, schedule=t.schedule)

    start = time.perf_counter()
    device = next(model.parameters()).device  # seeding touches the CUDA generator too: restore it
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # sampling and dropout seeded per (round, client), globally untouched
        torch.manual_seed(seed)
        with progress_bar(f"round {round_index + 1} client {client.client_id}{runner.label}", total=plan.steps) as advance:
            result, new_state = runner.run(
                model, optimizer, params, client, plan, round_index=round_index, seed=seed, lr_for_step=lr_for_step, state=state, on_step=lambda loss: advance(1)
            )
    new_state.optimizer = optimizer_state_to_cpu(optimizer.state_dict()) if t.keep_optimizer_state else None
    return ClientUpdate(
        client_id=client.client_id,
        num_examples=client.num_examples,
        tensors=trainable_state(model, plan.head_modules),
        loss=result.mean_loss,
        steps=result.steps,
        tokens=result.tokens,
        seconds=time.perf_counter() - start,
        state=new_state,
    )
