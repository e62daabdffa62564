"""The in-process transport: clients train one after the other on the server's own model.

One base model lives in memory whatever the number of clients: a client is a data partition.
Every upload and download still goes through the wire format (`fedsb.federated.comm`) and is
counted. FedEx residuals and FLoRA stacks are already folded into the shared base weights by
the server's `Strategy.finish`, which is what each client would do with them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from fedsb.federated import comm
from fedsb.federated.client import ClientState, ClientUpdate, LocalPlan, step_runner, train_client
from fedsb.federated.federation import Federation


@dataclass
class RunContext:
    """What a transport may use of the run: the federation and the ledger it records bytes in."""

    fed: Federation
    ledger: comm.CommLedger


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

    def exchange(self, run: RunContext, round_index: int, download: bytes, sampled: list[int]) -> RoundExchange: ...

    def after_round(self, run: RunContext, round_index: int, download: bytes) -> dict[str, Any]:
        """After aggregation, with the next download; returns extra row fields."""
        ...

    def checkpoint_meta(self, download: bytes) -> dict[str, Any]: ...

    def after_checkpoint(self, download: bytes) -> None: ...

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]: ...


def local_plan(fed: Federation, client_id: int) -> LocalPlan:
    """What client `client_id`'s round needs from the run (the same on a Flower node)."""
    return LocalPlan(
        train=fed.config.train,
        seed=fed.config.seed,
        precision=fed.precision,
        pad_id=fed.tokenizer.pad_token_id,
        head_modules=fed.head_modules,
        steps=fed.steps_per_round[client_id],
        total_steps=fed.total_steps(client_id),
    )


def client_round(fed: Federation, client_id: int, round_index: int, global_state: dict, state: ClientState) -> ClientUpdate:
    """`train_client` for one partition of `fed`, with its step runner (DP-SGD under privacy.enabled)."""
    noise = fed.privacy.clients[client_id].noise_multiplier if fed.config.privacy.enabled else None
    return train_client(
        fed.model,
        fed.strategy.load_global,
        fed.clients[client_id],
        local_plan(fed, client_id),
        round_index,
        global_state,
        runner=step_runner(fed.config, noise),
        state=state,
    )


class InProcessTransport:
    engine = "in-process"
    per_client = True

    def start(self, run: RunContext, download: bytes, meta: dict[str, Any] | None) -> bytes:
        return download

    def exchange(self, run: RunContext, round_index: int, download: bytes, sampled: list[int]) -> RoundExchange:
        ex = RoundExchange(updates=iter(()), seconds={"serialize": 0.0})
        ex.updates = self._updates(run, round_index, download, sampled, ex)
        return ex

    def _updates(self, run: RunContext, round_index: int, download: bytes, sampled: list[int], ex: RoundExchange) -> Iterator[ClientUpdate]:
        fed, ledger = run.fed, run.ledger
        wire = fed.config.federation.wire_dtype
        global_state = fed.strategy.client_start_state(fed.model, comm.decode(download)[0])
        shapes = {k: tuple(v.shape) for k, v in global_state.items()}
        for cid in sampled:
            client = fed.clients[cid]
            ledger.record_down(round_index, cid, len(download))
            history = fed.privacy.clients[cid].history if fed.privacy is not None and cid in fed.privacy.clients else None
            update = client_round(fed, cid, round_index, global_state, ClientState(optimizer=client.optimizer_state, privacy_history=history))
            if fed.config.train.keep_optimizer_state:
                client.optimizer_state = update.state.optimizer
            t0 = time.perf_counter()
            payload = comm.encode(update.tensors, wire)
            update.tensors, _ = comm.decode(payload, expected=shapes)
            update.payload_bytes = len(payload)
            ex.seconds["serialize"] += time.perf_counter() - t0
            ledger.record_up(round_index, cid, len(payload))
            ex.reports.append(replace(update, tensors={}))  # numbers only: tensors go to the strategy
            yield update

    def after_round(self, run: RunContext, round_index: int, download: bytes) -> dict[str, Any]:
        return {}

    def checkpoint_meta(self, download: bytes) -> dict[str, Any]:
        return {}

    def after_checkpoint(self, download: bytes) -> None:
        pass

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {}
