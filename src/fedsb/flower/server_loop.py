"""The Flower transport: the experiment driver's rounds, with the network in the middle.

`fedsb.federated.experiment.Experiment` runs the experiment (setup, base evaluation, init,
round loop, evaluation schedule, privacy accounting, checkpoint, summary) exactly as in process;
`FlowerTransport` only moves a round's download to the SuperNodes and their updates back.
What the network adds is handled here:

- discovery: map SuperNodes to partitions (each reports its `partition-id`) and ship the config
  and, once, the frozen B, A;
- a deadline per round (`round-timeout`) and a quorum (`min-replies`): late, crashed and
  disconnected clients are logged as missing, the round goes on with the others;
- every upload is screened by `fedsb.federated.validation` before it reaches the strategy;
- the checkpoint (written by the driver) gets the server's RNG state and the base chain;
  `resume = true` continues from it and ends with the same result as an uninterrupted run;
- FedEx/FLoRA change the base weights every round: each message names the base a node must
  start from (a hash chain over the downloads, `task.next_base_id`), the server tracks which
  base each node holds, and a node that missed a fold gets the server's base attached (a
  "catch-up", counted in the ledger as `base_catchup` and logged).
"""

from __future__ import annotations

import base64
import json
import logging
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from fedsb.adapter.export import atomic_write_bytes
from fedsb.adapter.inject import trainable_state
from fedsb.aggregation import get_strategy
from fedsb.config import ConfigError, ExperimentConfig
from fedsb.federated import comm
from fedsb.federated.checkpoint import has_checkpoint
from fedsb.federated.client import ClientState, ClientUpdate
from fedsb.federated.experiment import Experiment, RoundExchange, RunContext
from fedsb.federated.server import Federation
from fedsb.federated.validation import PayloadError, check_norm, clip_to_norm, expected_upload_bytes, update_norm, validate_update
from fedsb.flower import codec, task
from fedsb.flower.messaging import CountingGrid, exchange
from fedsb.flower.protocol import (
    BASE_RECORD,
    CONFIG_RECORD,
    DOWNLOAD_RECORD,
    FROZEN_RECORD,
    INIT_MESSAGE_TYPE,
    INIT_RECORD,
    METRICS_RECORD,
    MISSING_SETUP,
    NODE_MESSAGE_METRIC,
    NODE_RECORD,
    NODE_STARTUP_METRIC,
    SETUP_MESSAGE_TYPE,
    SETUP_RECORD,
    UPDATE_RECORD,
)

log = logging.getLogger("fedsb.flower")

class RoundFailed(RuntimeError):
    """Fewer accepted updates than `min-replies`: the run stops at the last checkpoint."""


def refusals(config: ExperimentConfig, settings: task.RunSettings) -> list[str]:
    """What this config asks of the Flower engine that it cannot do, each with the reason.

    The one place where the deployment engine refuses a feature; everything else runs as in
    process (the same `Experiment` drives both). Read from the strategy's declarations.
    """
    strategy = get_strategy(config.federation.strategy)
    out: list[str] = []
    if config.privacy.enabled and strategy.adapter_kind == "lorasb" and config.init.method == "central" and not config.init.data.startswith("public:"):
        out.append(
            "privacy.enabled with a private init on client data: the init's Gaussian mechanism would run in the "
            "ServerApp on every partition (and the nodes' accountants would not see it); use init.data = 'public:<task>' "
            "or init.method = 'random'"
        )
    if strategy.adapter_kind == "lorasb" and config.init.method == "svd":
        out.append('init.method = "svd": the nodes would need the digest exchange of fedsb.init.one_time, which the ServerApp does not send yet (it broadcasts B and A)')
    if strategy.adapter_kind == "lorasb" and config.init.broadcast_dtype == "int8":
        out.append('init.broadcast_dtype = "int8": the ServerApp\'s setup message carries B and A in a safetensors wire dtype (fp32, bf16, fp16), not int8 with row scales')
    if settings.secagg:
        if not strategy.supports_secagg:
            out.append(f"secagg = true: {strategy.secagg_note}")
        if config.privacy.enabled:
            out.append("secagg = true with privacy.enabled: SecAgg+'s FitRes carries no accountant history, so no node's epsilon could be reported")
        if strategy.adapter_kind == "lorasb" and config.init.method == "federated":
            out.append('secagg = true with init.method = "federated": the init\'s sketch exchanges are plain messages, not SecAgg+')
        if config.privacy.user_level:
            out.append("secagg = true with privacy.user_level: each client's update is clipped by the server before the sum, which SecAgg+ hides from it")
    return out


def check_supported(config: ExperimentConfig, settings: task.RunSettings) -> None:
    """Raise a `ConfigError` listing every refusal (see `refusals`)."""
    reasons = refusals(config, settings)
    if reasons:
        raise ConfigError("the Flower engine cannot run this config: " + "; ".join(reasons))


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
    """The Flower side of a run: discovery, setup, round messages, screening, SecAgg+, the base chain."""

    engine = "deployment"

    def __init__(self, grid: Grid, context: Context, settings: task.RunSettings, config: ExperimentConfig, out_dir: Path) -> None:
        self.grid = CountingGrid(grid)
        self.context = context
        self.settings = settings
        self.config = config
        self.per_client = not settings.secagg  # under SecAgg+ the server sees only the aggregate
        self.config_text = task.config_text(self.config)
        self.config_sha = task.sha256(self.config_text)
        self.out_dir = out_dir
        self.node_of: dict[int, int] = {}  # partition id -> node id
        self.needs_setup: set[int] = set()  # partitions whose node must get setup again
        self.frozen_sha = ""
        self.frozen: bytes | None = None
        self.events: list[dict[str, Any]] = []
        self.ledger = comm.CommLedger()
        self.resending = False  # True once the first setup is done: later B, A sends are re-sends
        # FedEx/FLoRA: the base chain (see task.next_base_id). The current download applies to
        # base `base_prev` and yields `base_id`, the server's own base; `holds` is the base each
        # partition's node is known to hold (every node can rebuild the root from the config).
        self.folds = get_strategy(self.config.federation.strategy).modifies_base
        self.base_root = task.base_root(self.config_sha)
        self.base_prev = self.base_id = self.base_root
        self.base_round = 0
        self.holds: dict[int, str] = {}
        self.catchup_bytes = 0  # this round's catch-up bytes (metrics)
        self._catchup: tuple[str, bytes, str] | None = None  # (base id, payload, sha256)
        self.fed: Federation | None = None

    # --- logging -------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> None:
        """A line in the server log and in `flower_events.jsonl` (missing, rejected, ...)."""
        row = {"event": kind, "time": time.time(), **fields}
        self.events.append(row)
        log.warning("%s %s", kind, json.dumps(fields, default=str))
        with open(self.out_dir / "flower_events.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    # --- discovery and setup -------------------------------------------------------------

    def _wait_for_nodes(self) -> list[int]:
        want = self.settings.min_nodes or self.config.federation.num_clients
        deadline = time.perf_counter() + self.settings.discovery_timeout
        nodes = sorted(self.grid.get_node_ids())
        while len(nodes) < want and time.perf_counter() < deadline:
            time.sleep(0.5)
            nodes = sorted(self.grid.get_node_ids())
        if not nodes:
            raise RoundFailed(f"no SuperNode connected within {self.settings.discovery_timeout:.0f} s")
        if len(nodes) < want:
            self._event("few-nodes", connected=len(nodes), wanted=want)
        return nodes

    def _setup_message(self, node_id: int, with_frozen: bool) -> Message:
        content = RecordDict(
            {SETUP_RECORD: ConfigRecord({"config-toml": self.config_text, "config-sha256": self.config_sha, "frozen-sha256": self.frozen_sha})}
        )
        if with_frozen and self.frozen is not None:
            content[FROZEN_RECORD] = codec.payload_record(self.frozen)
            if self.resending:  # the first broadcast is counted by initialize_adapter, as in simulation
                self.ledger.record_one_time("init_rebroadcast", len(self.frozen))
        return Message(content, dst_node_id=node_id, message_type=SETUP_MESSAGE_TYPE, ttl=self.settings.discovery_timeout + 60)

    def _setup(self, node_ids: list[int], with_frozen: bool) -> None:
        """Send config (and frozen B, A) to nodes; learn which partition each node holds."""
        ex = exchange(self.grid, [self._setup_message(n, with_frozen) for n in node_ids], timeout=self.settings.discovery_timeout)
        lacking: list[int] = []
        for nid, reply in ex.replies:
            if reply.has_error():
                self._event("setup-failed", node=nid, reason=reply.error.reason)
                continue
            info = reply.content.config_records[NODE_RECORD]
            pid = int(info["partition-id"])
            if not 0 <= pid < self.config.federation.num_clients:
                self._event("bad-partition", node=nid, partition=pid)
                continue
            if pid in self.node_of and self.node_of[pid] != nid:
                self._event("duplicate-partition", node=nid, partition=pid, kept=self.node_of[pid])
                continue
            if pid in self.needs_setup:
                self.holds.pop(pid, None)  # it lost its cache: no folded base either
            self.node_of[pid] = nid
            self.needs_setup.discard(pid)
            if self.frozen is not None and not bool(info["has-frozen"]):
                lacking.append(nid)
        for nid in ex.unanswered:
            self._event("setup-timeout", node=nid)
        self.resending = True
        if lacking and not with_frozen:
            self._setup(lacking, with_frozen=True)

    # --- one round -----------------------------------------------------------------------

    def _round_message(self, pid: int, round_index: int, download: bytes, message_type: str) -> Message:
        fields: dict[str, Any] = {"round": round_index, "config-sha256": self.config_sha, "frozen-sha256": self.frozen_sha}
        content = RecordDict({DOWNLOAD_RECORD: codec.payload_record(download)})
        if self.folds:
            fields.update({"base-from": self.base_prev, "base-id": self.base_id, "base-round": self.base_round})
            held = self.holds.get(pid, self.base_root)
            if held not in (self.base_prev, self.base_id):
                payload, digest = self._catchup_payload()
                content[BASE_RECORD] = codec.payload_record(payload)
                fields["base-sha256"] = digest
                self.ledger.record_one_time("base_catchup", len(payload))
                self.catchup_bytes += len(payload)
                self._event("base-catchup", round=round_index + 1, partition=pid, message=message_type, bytes=len(payload), held=held[:12], needed=self.base_prev[:12])
        content[CONFIG_RECORD] = ConfigRecord(fields)
        return Message(content, dst_node_id=self.node_of[pid], message_type=message_type, group_id=str(round_index + 1), ttl=self.settings.round_timeout + 60)

    def _catchup_payload(self) -> tuple[bytes, str]:
        """The server's own base weights, which are the base `base_id` names (built once per base)."""
        if self._catchup is None or self._catchup[0] != self.base_id:
            assert self.fed is not None
            payload = task.encode_base(self.fed)
            self._catchup = (self.base_id, payload, task.sha256(payload))
        return self._catchup[1], self._catchup[2]

    def _advance_base(self, download: bytes, round_index: int) -> None:
        """The next download (used in round `round_index`) applies to the current base."""
        if self.folds:
            self.base_prev, self.base_round = self.base_id, round_index
            self.base_id = task.next_base_id(self.base_prev, download, round_index)

    def _note_base(self, pid: int, reply: Message) -> str:
        """Record which base a node answered from; return it ("" if it named none)."""
        if not self.folds:
            return ""
        got = str(reply.content.config_records[NODE_RECORD].get("base-id", "")) if NODE_RECORD in reply.content.config_records else ""
        if got == self.base_id:
            self.holds[pid] = got
        return got

    def _screen(self, fed: Federation, replies: dict[int, Message], shapes: dict[str, tuple[int, ...]], base: dict[str, Tensor], round_index: int) -> tuple[dict[int, dict[str, Tensor]], dict[int, dict[str, float]], dict[int, str], dict[int, int]]:
        """Parse and check every reply; return accepted updates, their metrics, rejections, sizes."""
        wire = self.config.federation.wire_dtype
        max_bytes = expected_upload_bytes(shapes, wire)
        parsed: dict[int, dict[str, Tensor]] = {}
        metrics: dict[int, dict[str, float]] = {}
        rejected: dict[int, str] = {}
        sizes: dict[int, int] = {}
        for pid, reply in sorted(replies.items()):
            try:
                if self.folds and (got := self._note_base(pid, reply)) != self.base_id:
                    raise PayloadError(f"trained on base {got[:12] or '(none)'}, the round's base is {self.base_id[:12]}")
                record = reply.content.array_records.get(UPDATE_RECORD)
                payload = codec.payload_from_record(record, max_bytes=max_bytes)
                sizes[pid] = len(payload)
                parsed[pid] = validate_update(payload, shapes, max_bytes, expected_dtype=wire, base=base)
                metrics[pid] = dict(reply.content.metric_records[METRICS_RECORD])
            except (PayloadError, KeyError) as e:
                rejected[pid] = str(e)
        norms = {pid: update_norm(t, base) for pid, t in parsed.items()}
        for pid in list(parsed):
            others = [n for q, n in norms.items() if q != pid]
            try:
                check_norm(norms[pid], others, outlier_factor=self.settings.outlier_factor)
            except PayloadError as e:
                rejected[pid] = str(e)
        accepted = {pid: t for pid, t in parsed.items() if pid not in rejected}
        if self.settings.norm_bound > 0:
            accepted = {pid: clip_to_norm(t, self.settings.norm_bound, base) for pid, t in accepted.items()}
        for pid, reason in sorted(rejected.items()):
            self._event("rejected", round=round_index + 1, partition=pid, reason=reason)
        return accepted, {p: metrics[p] for p in accepted}, rejected, sizes

    def _plain_round(self, fed: Federation, round_index: int, sampled: list[int], download: bytes, ledger: comm.CommLedger) -> dict[str, Any]:
        base = task.global_state_from_download(fed, download)
        shapes = {k: tuple(v.shape) for k, v in base.items()}
        live = [pid for pid in sampled if pid in self.node_of and pid not in self.needs_setup]
        missing: dict[int, str] = {pid: "no SuperNode holds this partition" for pid in sampled if pid not in live}
        messages = [self._round_message(pid, round_index, download, "train") for pid in live]
        pid_of = {self.node_of[pid]: pid for pid in live}
        for pid in live:
            ledger.record_down(round_index, pid, len(download))
        ex = exchange(self.grid, messages, timeout=self.settings.round_timeout)
        replies: dict[int, Message] = {}
        for nid, reply in ex.replies:
            pid = pid_of[nid]
            if reply.has_error():
                reason = reply.error.reason
                if MISSING_SETUP in reason:
                    self.needs_setup.add(pid)
                    self.holds.pop(pid, None)
                missing[pid] = f"client error: {reason.strip().splitlines()[-1] if reason.strip() else reason}"
            else:
                replies[pid] = reply
        for nid in ex.unanswered:
            missing[pid_of[nid]] = f"no reply within round-timeout = {self.settings.round_timeout:g} s"
        for pid, reason in sorted(missing.items()):
            self._event("missing", round=round_index + 1, partition=pid, reason=reason)
        t0 = time.perf_counter()
        accepted, metrics, rejected, sizes = self._screen(fed, replies, shapes, base, round_index)
        for pid, nbytes in sizes.items():
            ledger.record_up(round_index, pid, nbytes)
        if len(accepted) < max(1, self.settings.min_replies):
            raise RoundFailed(
                f"round {round_index + 1}: {len(accepted)} accepted updates of {len(sampled)} sampled, min-replies = {self.settings.min_replies}"
            )
        updates = [self._client_update(fed, pid, tensors, metrics[pid], replies[pid], sizes[pid]) for pid, tensors in sorted(accepted.items())]  # `sampled` is sorted: the simulation's order
        return {"accepted": sorted(accepted), "missing": missing, "rejected": rejected, "updates": updates, "screen_seconds": time.perf_counter() - t0, "exchange_seconds": ex.seconds, "node_seconds": _node_seconds(replies)}

    @staticmethod
    def _client_update(fed: Federation, pid: int, tensors: dict[str, Tensor], metrics: dict[str, float], reply: Message | None, size: int) -> ClientUpdate:
        """A screened upload as the driver's `ClientUpdate`: the server's own example count (not
        the client's claim); a DP node's accountant history from its reply."""
        history = None
        node = reply.content.config_records.get(NODE_RECORD) if reply is not None else None
        if node is not None and "privacy-history" in node:
            history = [list(map(float, e[:2])) + [int(e[2])] for e in json.loads(str(node["privacy-history"]))]
        return ClientUpdate(
            client_id=pid,
            num_examples=fed.clients[pid].num_examples,
            tensors=tensors,
            loss=float(metrics["loss"]),
            steps=int(metrics["steps"]),
            tokens=int(metrics["tokens"]),
            seconds=float(metrics["seconds"]),
            state=ClientState(privacy_history=history),
            payload_bytes=size,
            metrics={k: float(v) for k, v in metrics.items() if k == "epsilon"},
        )

    def _secagg_round(self, fed: Federation, round_index: int, sampled: list[int], download: bytes, ledger: comm.CommLedger) -> dict[str, Any]:
        """One update, the secure weighted mean (one strategy `add` of weight 1), and the
        contributors' numbers apart."""
        from fedsb.flower.secagg import secagg_round

        base = task.global_state_from_download(fed, download)
        names = sorted(base)
        shapes = {k: tuple(v.shape) for k, v in base.items()}
        live = [pid for pid in sampled if pid in self.node_of and pid not in self.needs_setup]
        pid_of = {self.node_of[pid]: pid for pid in live}
        weights = {pid: fed.strategy.client_weight(fed.clients[pid].num_examples) for pid in range(len(fed.clients))}
        start = time.perf_counter()
        outcome = secagg_round(
            self.grid,
            self.context,
            round_index=round_index,
            node_ids=[self.node_of[pid] for pid in live],
            global_arrays=codec.state_to_ndarrays(base, names),
            fit_config={"round": round_index, "config-sha256": self.config_sha, "frozen-sha256": self.frozen_sha, "names": "\n".join(names)},
            max_weight=float(max(weights.values())),
            clipping_range=self.settings.secagg_clipping_range,
            quantization_range=self.settings.secagg_quantization_range,
            timeout=self.settings.round_timeout,
        )
        if outcome.mean is None or len(outcome.results) < max(1, self.settings.min_replies):
            raise RoundFailed(f"round {round_index + 1}: secure aggregation ended with {len(outcome.results)} results (min-replies = {self.settings.min_replies})")
        mean = codec.ndarrays_to_state(outcome.mean, names, shapes)
        aggregate = ClientUpdate(client_id=-1, num_examples=1, tensors=mean, loss=0.0, steps=0, tokens=0, seconds=0.0)
        # What the server side was handed: one distinct vector (the aggregate, in every FitRes),
        # never a client's own R; its fp32 payload's sha256 is that of the new global R.
        received = {"fit_results": len(outcome.received), "distinct_vectors": len(set(outcome.received)), "strategy_adds": 1, "aggregate_sha256": task.sha256(comm.encode(mean, "fp32"))}
        contributors = sorted(int(r.metrics["partition-id"]) for r in outcome.results)
        reports = sorted((self._client_update(fed, int(r.metrics["partition-id"]), {}, dict(r.metrics), None, 0) for r in outcome.results), key=lambda u: u.client_id)
        # Under SecAgg+ no safetensors payload exists: what each client sends and receives is
        # Flower's protocol traffic (keys, shares, masked vectors), so that is what is counted.
        for nid, nbytes in self.grid.sent.items():
            ledger.record_down(round_index, pid_of.get(nid, f"node{nid}"), nbytes)
        for nid, nbytes in self.grid.received.items():
            ledger.record_up(round_index, pid_of.get(nid, f"node{nid}"), nbytes)
        missing = {pid: "dropped out of secure aggregation" for pid in live if pid not in contributors}
        missing.update({pid: "no SuperNode holds this partition" for pid in sampled if pid not in live})
        for pid, reason in sorted(missing.items()):
            self._event("missing", round=round_index + 1, partition=pid, reason=reason)
        return {"accepted": contributors, "missing": missing, "rejected": {}, "updates": [aggregate], "reports": reports, "screen_seconds": 0.0, "exchange_seconds": time.perf_counter() - start, "secagg_aggregate": received}

    def exchange(self, run: RunContext, round_index: int, download: bytes, sampled: list[int]) -> RoundExchange:
        """Send the round to the sampled partitions' nodes; return the screened updates."""
        fed, ledger = run.fed, run.ledger
        if self.needs_setup:
            self._setup([self.node_of[p] for p in sorted(self.needs_setup) if p in self.node_of], with_frozen=True)
        self.grid.reset()
        self.catchup_bytes = 0
        if self.settings.secagg:
            info = self._secagg_round(fed, round_index, sampled, download, ledger)
        else:
            info = self._plain_round(fed, round_index, sampled, download, ledger)
        updates: list[ClientUpdate] = info["updates"]
        reports = info.get("reports") or [replace(u, tensors={}) for u in updates]
        row = {
            "accepted": info["accepted"],
            "missing": {str(k): v for k, v in info["missing"].items()},
            "rejected": {str(k): v for k, v in info["rejected"].items()},
            "flower": {
                "engine": "deployment",
                "secagg": self.settings.secagg,
                "message_bytes_down": sum(self.grid.sent.values()),
                "message_bytes_up": sum(self.grid.received.values()),
                **({"base_catchup_bytes": self.catchup_bytes} if self.folds else {}),
                **({"secagg_aggregate": info["secagg_aggregate"]} if "secagg_aggregate" in info else {}),
                **({"node_seconds": info["node_seconds"]} if info.get("node_seconds") else {}),
            },
        }
        failures = {**info["missing"], **info["rejected"]}
        seconds = {"screen": info["screen_seconds"], "exchange": info["exchange_seconds"]}
        return RoundExchange(updates=updates, reports=reports, failures=failures, seconds=seconds, row=row)

    # --- federated evaluation ------------------------------------------------------------

    def federated_eval(self, round_index: int, download: bytes) -> dict[str, float]:
        nodes = [pid for pid in sorted(self.node_of) if pid not in self.needs_setup]
        ex = exchange(self.grid, [self._round_message(pid, round_index, download, "evaluate") for pid in nodes], timeout=self.settings.round_timeout)
        pid_of = {self.node_of[pid]: pid for pid in nodes}
        total, count = 0.0, 0.0
        for nid, reply in ex.replies:
            if reply.has_error() or (self.folds and self._note_base(pid_of[nid], reply) != self.base_id):
                continue
            m = reply.content.metric_records[METRICS_RECORD]
            total += float(m["loss"]) * float(m["num-examples"])
            count += float(m["num-examples"])
        return {"loss": total / count if count else float("nan"), "nodes": len(ex.replies)}

    # --- FedEx/FLoRA across a server restart ----------------------------------------------

    def _download_path(self, digest: str) -> Path:
        return self.out_dir / "checkpoint" / f"flower-download-{digest}.safetensors"

    def _save_base_chain(self, download: bytes) -> dict[str, Any]:
        """Keep the next download's exact bytes (FedEx residuals, FLoRA stacks: the checkpoint's
        folded base holds them only as a sum) and the chain state, for `resume`."""
        if not self.folds:
            return {}
        digest = task.sha256(download)
        atomic_write_bytes(self._download_path(digest), download)
        holds = {str(pid): base for pid, base in self.holds.items()}
        return {"flower_base": {"prev": self.base_prev, "id": self.base_id, "round": self.base_round, "holds": holds, "download_sha256": digest}}

    def _drop_old_downloads(self, download: bytes) -> None:
        if self.folds:
            keep = self._download_path(task.sha256(download)).name
            for path in (self.out_dir / "checkpoint").glob("flower-download-*.safetensors"):
                if path.name != keep:
                    path.unlink(missing_ok=True)

    def _restore_base_chain(self, meta: dict[str, Any], fed: Federation, start_round: int) -> bytes:
        """The download and base chain of the interrupted run; if its saved download is gone,
        a download of the same shapes (zeros where the fold was) and a catch-up for every node."""
        chain = meta.get("flower_base") or {}
        digest = str(chain.get("download_sha256", ""))
        path = self._download_path(digest) if len(digest) == 64 else None
        data = path.read_bytes() if path is not None and path.exists() else b""
        if data and task.sha256(data) == digest:
            self.base_prev, self.base_id, self.base_round = chain["prev"], chain["id"], int(chain["round"])
            self.holds = {int(pid): base for pid, base in chain["holds"].items()}
            return data
        state = trainable_state(fed.model, fed.head_modules)
        rebuilt = {k: state[k] if k in state and list(state[k].shape) == shape else torch.zeros(shape) for k, shape in meta["download_shapes"].items()}
        download = comm.encode(rebuilt, self.config.federation.wire_dtype)
        self.base_id = chain.get("id") or task.sha256(f"resync\n{self.base_root}\n{start_round}")
        self._advance_base(download, start_round)
        self.holds = {}
        self._event("base-resync", round=start_round + 1, reason="the checkpoint's download is missing: every node gets the server's base")
        return download

    # --- the driver's hooks -------------------------------------------------------------

    def start(self, run: RunContext, download: bytes, meta: dict[str, Any] | None) -> bytes:
        """Discovery and setup (config, and B, A once); on resume the RNG state and base chain."""
        cfg = self.config
        fed = self.fed = run.fed
        self.ledger = run.ledger
        if meta is not None:
            # the nodes cache the config by hash: a resumed deployment must run the same one
            # (in process, `fedsb run --resume --set federation.rounds=...` may extend a run)
            if meta.get("config_sha256") not in (None, self.config_sha):
                raise ConfigError(f"{self.out_dir}: the checkpoint was written with another config; refusing to resume")
            self.resending = True  # every node got B, A in the interrupted run
            if "rng" in meta:
                _restore_rng(meta["rng"])
            self._event("resumed", from_round=int(meta["round"]) + 1)
        if task.needs_frozen_broadcast(cfg):
            self.frozen = comm.encode(task.frozen_state(fed), cfg.init.broadcast_dtype)
            self.frozen_sha = task.sha256(self.frozen)
        if meta is not None and self.folds:
            download = self._restore_base_chain(meta, fed, int(meta["round"]) + 1)
        if self.node_of and meta is None:  # set up already (the federated init's exchanges): B, A now
            self.resending = False
            self._setup(sorted(self.node_of.values()), with_frozen=True)
        else:
            self._setup(self._wait_for_nodes(), with_frozen=meta is None)
        return download

    def init_exchange(self, kind: str, broadcast: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:
        """One exchange of the federated init as `query.init` messages to every partition's
        node (`federated_init.run_federated_init_exchanges` does the server's arithmetic)."""
        if not self.node_of:
            self._setup(self._wait_for_nodes(), with_frozen=False)  # the config; B, A do not exist yet
        n = self.config.federation.num_clients
        absent = [pid for pid in range(n) if pid not in self.node_of]
        if absent:
            raise RoundFailed(f"federated init: no SuperNode holds partitions {absent}; every client takes part in it")
        payload = comm.encode(broadcast, "fp32") if broadcast else None
        messages = []
        for pid in range(n):
            content = RecordDict({INIT_RECORD: ConfigRecord({"config-sha256": self.config_sha, "kind": kind})})
            if payload is not None:
                content[DOWNLOAD_RECORD] = codec.payload_record(payload)
            messages.append(Message(content, dst_node_id=self.node_of[pid], message_type=INIT_MESSAGE_TYPE, ttl=self.settings.round_timeout + 60))
        ex = exchange(self.grid, messages, timeout=self.settings.round_timeout)
        pid_of = {nid: pid for pid, nid in self.node_of.items()}
        out: dict[int, dict[str, Tensor]] = {}
        for nid, reply in ex.replies:
            if reply.has_error():
                raise RoundFailed(f"federated init ({kind}): partition {pid_of[nid]} answered {reply.error.reason.strip().splitlines()[-1:]}")
            out[pid_of[nid]] = comm.decode(codec.payload_from_record(reply.content.array_records[UPDATE_RECORD]))[0]
        if ex.unanswered:
            raise RoundFailed(f"federated init ({kind}): no reply from partitions {sorted(pid_of[n] for n in ex.unanswered)}")
        return out

    def after_round(self, run: RunContext, round_index: int, download: bytes) -> dict[str, Any]:
        self._advance_base(download, round_index + 1)
        extra = {"federated_eval": self.federated_eval(round_index, download)} if self.settings.federated_eval else {}
        log.warning("round %d/%d done", round_index + 1, self.config.federation.rounds)
        return extra

    def checkpoint_meta(self, download: bytes) -> dict[str, Any]:
        return {"rng": _rng_state(), **self._save_base_chain(download)}

    def after_checkpoint(self, download: bytes) -> None:
        self._drop_old_downloads(download)

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "flower": {
                "engine": "deployment",
                "secagg": self.settings.secagg,
                "message_bytes_down": sum(r.get("flower", {}).get("message_bytes_down", 0) for r in rows),
                "message_bytes_up": sum(r.get("flower", {}).get("message_bytes_up", 0) for r in rows),
                "events": len(self.events),
            }
        }


def _node_seconds(replies: dict[int, Message]) -> dict[str, dict[str, float]]:
    """Per partition: the ClientApp process's start-up and its whole message time, as reported."""
    out = {}
    for pid, reply in sorted(replies.items()):
        m = reply.content.metric_records.get(METRICS_RECORD)
        if m is not None and NODE_STARTUP_METRIC in m and NODE_MESSAGE_METRIC in m:
            out[str(pid)] = {"startup": float(m[NODE_STARTUP_METRIC]), "message": float(m[NODE_MESSAGE_METRIC])}
    return out


def run_server(grid: Grid, context: Context, settings: task.RunSettings) -> dict[str, Any]:
    """The ServerApp's run: the experiment driver over the Flower transport."""
    config = task.experiment_config(settings)
    check_supported(config, settings)
    out_dir = Path(settings.out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    resume = settings.resume and has_checkpoint(out_dir)
    base_eval = json.loads(Path(settings.base_eval).read_text()) if settings.base_eval else None
    if not resume:
        (out_dir / "flower_events.jsonl").unlink(missing_ok=True)
    transport = FlowerTransport(grid, context, settings, config, out_dir)
    return Experiment(config, out_dir, base_eval=base_eval).run(transport, resume=resume)
