"""The Flower transport: the experiment driver's rounds, with the network in the middle.

`fedsb.federated.experiment.Experiment` runs the experiment (setup, base evaluation, init,
round loop, evaluation schedule, privacy accounting, checkpoint, summary) exactly as in process;
`FlowerTransport` implements only the driver's hooks, over the pieces of the deployment:

- `discovery.Nodes`: SuperNodes -> partitions, setup (config, B, A), fixed example counts,
  round messages;
- `rounds.plain_round` / `secagg_round.secure_round`: one round's messages, deadline, quorum
  and screening (`screening.screen_reply`, `codec.decode_update`);
- `base_chain.BaseChain`: FedEx/FLoRA's folded bases, the same chain on server and nodes;
- `remote_eval`: federated loss and node-data mode's party evaluations;
- `events.EventLog`: every missing, rejected or failed node, logged with its reason.

It sees the run only through the driver's `RunContext` (config, strategy, model, ledger, steps,
counts), never a `Federation`. The results folder is opened as the in-process engine opens it
(`fedsb.rundir.open_run`); the checkpoint (written by the driver) gets the server's RNG state
and the base chain, so `resume = true` ends with the same result as an uninterrupted run.
"""

from __future__ import annotations

import base64
import json
import logging
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid
from torch import Tensor

from fedsb.aggregation import get_strategy
from fedsb.config import ConfigError, ExperimentConfig
from fedsb.errors import FedsbError
from fedsb.federated.checkpoint import has_checkpoint
from fedsb.federated.experiment import Experiment
from fedsb.federated.transport import ClientTask, RoundExchange, RunContext
from fedsb.flower.base_chain import BaseChain
from fedsb.flower.discovery import Nodes
from fedsb.flower.events import EventLog, RoundFailed, one_line
from fedsb.flower.init_exchange import init_exchange
from fedsb.flower.messaging import CountingGrid
from fedsb.flower.refusals import check_supported
from fedsb.flower.remote_eval import PartyEval, federated_eval
from fedsb.flower.rounds import RoundResult, plain_round
from fedsb.flower.secagg_round import secure_round
from fedsb.flower.settings import RunSettings, config_text, experiment_config, sha256
from fedsb.rundir import RunDirError, failed_start, open_run, restart_failed_start

log = logging.getLogger("fedsb.flower")

__all__ = ["FlowerTransport", "RoundFailed", "run_server"]


def _rng_state() -> dict[str, Any]:
    """Every RNG the server touches, JSON-ready (for the checkpoint's meta)."""
    np_state = np.random.get_state()
    return {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


class FlowerTransport:
    """The driver's hooks over a Flower federation (see the module docstring)."""

    engine = "deployment"

    def __init__(self, grid: Grid, context: Context, settings: RunSettings, config: ExperimentConfig, out_dir: Path) -> None:
        self.grid = CountingGrid(grid)
        self.context = context
        self.settings = settings
        self.config = config
        self.out_dir = out_dir
        self.per_client = not settings.secagg  # under SecAgg+ the server sees only the aggregate
        self.events = EventLog(out_dir)
        folds = get_strategy(config.federation.strategy).modifies_base  # FedEx/FLoRA: the base chain
        self.chain = BaseChain.start(sha256(config_text(config))) if folds else None
        self.nodes = Nodes(self.grid, settings, config, self.events, self.chain)
        self.party_eval = PartyEval(self.nodes)

    def start(self, run: RunContext, download: bytes, meta: dict[str, Any] | None) -> bytes:
        """Discovery and setup (config, and B, A once); on resume the RNG state and base chain."""
        if meta is not None:
            self._resume(meta)
        self.nodes.attach(run)
        if meta is not None and self.chain is not None:
            download = self._restore_chain(meta, download)
        # "svd": the nodes compute B, A themselves and check the announced sha256; only a node
        # whose factors differ asks for them (`Nodes.setup`'s second pass, counted as a fallback)
        local = self.config.init.method == "svd"
        if self.nodes.node_of and meta is None:  # set up already (discovery, the federated init's exchanges): B, A now
            self.nodes.resending = False
            self.nodes.setup(sorted(self.nodes.node_of.values()), with_frozen=not local)
        else:
            self.nodes.setup(self.nodes.wait_for_nodes(), with_frozen=meta is None and not local)
        return download

    def _resume(self, meta: dict[str, Any]) -> None:
        # the nodes cache the config by hash: a resumed deployment must run the same one
        # (in process, `fedsb run --resume --set federation.rounds=...` may extend a run)
        if meta.get("config_sha256") not in (None, self.nodes.config_sha):
            raise ConfigError(f"{self.out_dir}: the checkpoint was written with another config; refusing to resume")
        self.nodes.resending = True  # every node got B, A in the interrupted run
        if "rng" in meta:
            _restore_rng(meta["rng"])
        self.events("resumed", from_round=int(meta["round"]) + 1)

    def _restore_chain(self, meta: dict[str, Any], download: bytes) -> bytes:
        """The interrupted run's download and base chain (or a resync: every node gets a catch-up)."""
        assert self.chain is not None
        start_round = int(meta["round"]) + 1
        restored = self.chain.restore(self.out_dir, meta, download, start_round)
        if restored is None:
            self.events("base-resync", round=start_round + 1, reason="the checkpoint's download is missing: every node gets the server's base")
            return download
        return restored

    def init_exchange(self, kind: str, broadcast: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:
        """One exchange of the federated init on the nodes (`init_exchange.init_exchange`)."""
        return init_exchange(self.nodes, kind, broadcast)

    def discover(self) -> dict[int, int]:
        """Node-data mode: the nodes' fixed example counts, before the driver builds its model."""
        return self.nodes.discover()

    def exchange(self, run: RunContext, round_index: int, download: bytes, tasks: list[ClientTask]) -> RoundExchange:
        """Send the round to the sampled partitions' nodes; return the screened updates."""
        sampled = [task.client_id for task in tasks]
        self.nodes.setup_again()
        self.grid.reset()
        self.nodes.catchup_bytes = 0
        if self.settings.secagg:
            result = secure_round(self.nodes, self.context, run, round_index, sampled, download)
        else:
            result = plain_round(self.nodes, run, round_index, sampled, download)
        reports = result.reports if result.reports is not None else [replace(u, tensors={}) for u in result.updates]
        failures = {**result.missing, **result.rejected}
        seconds = {"screen": result.screen_seconds, "exchange": result.exchange_seconds}
        return RoundExchange(updates=result.updates, reports=reports, failures=failures, seconds=seconds, row=self._row(result))

    def _row(self, result: RoundResult) -> dict[str, Any]:
        """The round's metrics-row fields: who took part, and what Flower moved."""
        return {
            "accepted": result.accepted,
            "missing": {str(k): v for k, v in result.missing.items()},
            "rejected": {str(k): v for k, v in result.rejected.items()},
            "flower": {
                "engine": "deployment",
                "secagg": self.settings.secagg,
                "message_bytes_down": sum(self.grid.sent.values()),
                "message_bytes_up": sum(self.grid.received.values()),
                **({"base_catchup_bytes": self.nodes.catchup_bytes} if self.chain is not None else {}),
                **result.flower,
            },
        }

    def after_round(self, run: RunContext, round_index: int, download: bytes) -> dict[str, Any]:
        if self.chain is not None:
            self.chain.advance(download, round_index + 1)
        self.party_eval.at = (round_index, download)
        extra = {"federated_eval": federated_eval(self.nodes, round_index, download)} if self.settings.federated_eval else {}
        log.warning("round %d/%d done", round_index + 1, self.config.federation.rounds)
        return extra

    def checkpoint_meta(self, download: bytes) -> dict[str, Any]:
        return {"rng": _rng_state(), **(self.chain.save(self.out_dir, download) if self.chain is not None else {})}

    def after_checkpoint(self, download: bytes) -> None:
        if self.chain is not None:
            self.chain.drop_old_downloads(self.out_dir, download)

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        nodes = self.nodes
        node_data = {
            "examples": {str(p): n for p, n in sorted(nodes.reported.items())},
            "tokens": {str(p): n for p, n in sorted(nodes.reported_tokens.items())},
            "weights_from": "node-reported counts, each capped at 4x their median",
        }
        return {
            "flower": {
                "engine": "deployment",
                "secagg": self.settings.secagg,
                "message_bytes_down": sum(r.get("flower", {}).get("message_bytes_down", 0) for r in rows),
                "message_bytes_up": sum(r.get("flower", {}).get("message_bytes_up", 0) for r in rows),
                "events": len(self.events.rows),
                **({"svd_fallback_nodes": nodes.svd_fallbacks} if self.config.init.method == "svd" else {}),
                **({"node_data": node_data} if self.settings.node_data else {}),
            }
        }


def run_server(grid: Grid, context: Context, settings: RunSettings) -> dict[str, Any]:
    """The ServerApp's run: the experiment driver over the Flower transport, in a results folder
    opened as the in-process engine opens it (`fedsb.rundir.open_run`): locked for the run (an
    in-process `--resume` of it is refused, and vice versa), refused if it holds results unless
    `resume` or `overwrite`, published atomically, and removed again if the run fails before
    its first round. `resume = true` on a folder that holds no run starts one; on a run that
    stopped before its first round completed it starts that run again (as `fedsb run --resume`)."""
    config = experiment_config(settings)
    check_supported(config, settings)
    out_dir = Path(settings.out_dir).expanduser().resolve()
    base_eval = json.loads(Path(settings.base_eval).read_text()) if settings.base_eval else None
    asked = settings.resume and (out_dir / "config.toml").is_file()
    with open_run(out_dir, resume=asked, overwrite=settings.overwrite):
        resume = asked and has_checkpoint(out_dir)  # checked under the lock
        if asked and not resume:
            if not failed_start(out_dir):
                raise RunDirError(f"{out_dir}: resume = true, but the folder holds no checkpoint to resume from; set overwrite = true to replace it")
            restart_failed_start(out_dir)
        transport = FlowerTransport(grid, context, settings, config, out_dir)
        try:
            # node-data mode: the nodes' counts first (the driver's model holds no client data),
            # and the evaluation on the nodes' own files
            counts = transport.discover() if settings.node_data else None
            remote_eval = (lambda run: transport.party_eval()) if settings.node_data else None
            return Experiment(config, out_dir, base_eval=base_eval).run(transport, resume=resume, counts=counts, remote_eval=remote_eval)
        except Exception as e:
            transport.events("failed", reason=str(e) if isinstance(e, FedsbError) else one_line(e))
            raise
