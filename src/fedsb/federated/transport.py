"""The transport boundary and the in-process transport.

The driver (`fedsb.federated.experiment`) hands a `Transport` the download and one
`ClientTask` per sampled client (its `LocalPlan`, the `ClientState` it resumes from, its DP
noise), with the run as a `RunContext`: never the `Federation`. The transport returns a
`RoundExchange` of `ClientUpdate`s.

The in-process transport: clients train one after the other on the server's own model. One
base model lives in memory whatever the number of clients: a client is a data partition.
Every upload and download still goes through the wire format (`fedsb.federated.comm`) and is
counted. FedEx residuals and FLoRA stacks are already folded into the shared base weights by
the server's `Strategy.finish`, which is what each client would do with them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from torch import Tensor, nn

from fedsb.aggregation import Strategy
from fedsb.config import ExperimentConfig
from fedsb.federated import comm
from fedsb.federated.client import ClientData, ClientState, ClientUpdate, LocalPlan, step_runner, train_client


@dataclass(frozen=True)
class ClientTask:
    """One sampled client's part of a round, as the driver hands it to a transport."""

    client_id: int
    plan: LocalPlan
    state: ClientState  # what the client resumes from (the Experiment's record; a Flower node keeps its own)
    noise_multiplier: float | None  # its calibrated DP-SGD noise under privacy.enabled, else None


@dataclass
class RunContext:
    """What a transport may use of the run: never the Federation."""

    config: ExperimentConfig
    strategy: Strategy
    model: nn.Module  # the server's model (trainable state; the folded base of FedEx/FLoRA)
    ledger: comm.CommLedger
    steps_per_round: Mapping[int, int]
    counts: Mapping[int, int]  # examples per client the server knows; {} on a data-free server


@dataclass
class RoundExchange:
    """What a transport returns for one round.

    `updates` is consumed once, in order, by the driver (a generator keeps one client's tensors
    in memory at a time); `reports` holds every contributing client's numbers once `updates` is
    consumed (under SecAgg+ the single update is the secure mean and the reports are apart).
    """

    updates: Iterable[ClientUpdate]
    reports: list[ClientUpdate] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)  # sampled clients without an accepted update
    seconds: dict[str, float] = field(default_factory=dict)  # transport time split (serialize, exchange, ...)
    row: dict[str, Any] = field(default_factory=dict)  # extra metrics-row fields (accepted, flower, ...)


class Transport(Protocol):
    """Moves one round's download to the sampled clients and their updates back.

    Optional: `init_exchange(kind, broadcast)` runs one exchange of the federated init's sketch
    protocol on the clients (`federated_run.InitExchange`); without it the clients' side of the
    protocol runs in process.
    """

    engine: str  # "in-process" or "deployment": recorded in the checkpoint and the summary
    per_client: bool  # False when the server only ever sees an aggregate (SecAgg+): no exactness meter

    def start(self, run: RunContext, download: bytes, meta: dict[str, Any] | None) -> bytes:
        """Before the first round (meta: the checkpoint's, on resume); returns the download to use."""
        ...

    def exchange(self, run: RunContext, round_index: int, download: bytes, tasks: list[ClientTask]) -> RoundExchange:
        """Move `download` to each task's client (in `tasks`' order) and their updates back."""
        ...

    def after_round(self, run: RunContext, round_index: int, download: bytes) -> dict[str, Any]:
        """After aggregation, with the next download; returns extra row fields."""
        ...

    def checkpoint_meta(self, download: bytes) -> dict[str, Any]: ...

    def after_checkpoint(self, download: bytes) -> None: ...

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class LocalClients:
    """What the in-process transport trains with: the server's own model and the clients' data
    it holds (never the Federation: what a client resumes from and its noise come in its task)."""

    config: ExperimentConfig  # its step runner (DP-SGD under privacy.enabled)
    model: nn.Module
    load_global: Callable[[nn.Module, dict[str, Tensor]], None]  # the strategy's
    clients: Sequence[ClientData]

    def train(self, task: ClientTask, round_index: int, global_state: dict[str, Tensor]) -> ClientUpdate:
        """`train_client` for one task: the client's data here, its plan, state and noise in `task`."""
        return train_client(
            self.model,
            self.load_global,
            self.clients[task.client_id],
            task.plan,
            round_index,
            global_state,
            runner=step_runner(self.config, task.noise_multiplier),
            state=task.state,
        )


def start_state(strategy: Strategy, model: nn.Module, download: bytes) -> dict[str, Tensor]:
    """What a client trains from, decoding only the download's tensors it starts from: FedEx's
    residuals (one d_out x d_in matrix per layer, 28 GB for Mistral-7B) are folded into the base by
    `apply_download` from their own decode, never materialized here (docs/gpu.md)."""
    keys = [k for k in strategy.download_state(model) if strategy.downloads_start_value(k)]
    return strategy.client_start_state(model, comm.decode(download, keys=keys)[0])


class InProcessTransport:
    """Clients train one after the other on the server's model (`LocalClients`); every payload
    goes through the wire format and is counted. `clients` may be bound after construction
    (`Experiment.run` binds the federation it builds)."""

    engine = "in-process"
    per_client = True

    def __init__(self, clients: LocalClients | None = None) -> None:
        self.clients = clients

    def start(self, run: RunContext, download: bytes, meta: dict[str, Any] | None) -> bytes:
        return download

    def exchange(self, run: RunContext, round_index: int, download: bytes, tasks: list[ClientTask]) -> RoundExchange:
        if self.clients is None:
            raise RuntimeError("InProcessTransport: no local clients bound (Experiment.run binds them)")
        ex = RoundExchange(updates=iter(()), seconds={"serialize": 0.0})
        ex.updates = self._updates(self.clients, run, round_index, download, tasks, ex)
        return ex

    @staticmethod
    def _updates(local: LocalClients, run: RunContext, round_index: int, download: bytes, tasks: list[ClientTask], ex: RoundExchange) -> Iterator[ClientUpdate]:
        ledger = run.ledger
        wire = run.config.federation.wire_dtype
        global_state = start_state(run.strategy, run.model, download)
        shapes = {k: tuple(v.shape) for k, v in global_state.items()}
        for task in tasks:
            cid = task.client_id
            ledger.record_down(round_index, cid, len(download))
            update = local.train(task, round_index, global_state)
            t0 = time.perf_counter()
            payload = comm.encode(update.tensors, wire)
            update.tensors, _ = comm.decode(payload, expected=shapes)
            update.payload_bytes = len(payload)
            ex.seconds["serialize"] += time.perf_counter() - t0
            ledger.record_up(round_index, cid, len(payload))
            ex.reports.append(replace(update, tensors={}))  # numbers only (and the client's state): tensors go to the strategy
            yield update

    def after_round(self, run: RunContext, round_index: int, download: bytes) -> dict[str, Any]:
        return {}

    def checkpoint_meta(self, download: bytes) -> dict[str, Any]:
        return {}

    def after_checkpoint(self, download: bytes) -> None:
        pass

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {}
