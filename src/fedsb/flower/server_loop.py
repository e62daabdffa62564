"""The Flower transport: the experiment driver's rounds, with the network in the middle.

`fedsb.federated.experiment.Experiment` runs the experiment (setup, base evaluation, init,
round loop, evaluation schedule, privacy accounting, checkpoint, summary) exactly as in process;
`FlowerTransport` only moves a round's download to the SuperNodes and their updates back.
What the network adds is handled here:

- discovery: map SuperNodes to partitions (each reports its `partition-id`) and ship the config
  and, once, the frozen B, A;
- a deadline per round (`round-timeout`) and a quorum (`min-replies`): late, crashed and
  disconnected clients are logged as missing, the round goes on with the others;
- every field a node sends is screened before use (`fedsb.flower.screening.screen_reply`:
  identity, example counts, metrics) and every upload by `fedsb.federated.validation`, with an
  update bound that needs no other reply (`validation.adamw_bound`); a node that fails is
  dropped for the round and logged, never a crash;
- example counts and weights are fixed by the server before round 1, in both modes (under
  SecAgg+ each node is told its weight and the unmasked total weight is checked);
- the results folder is opened as the in-process engine opens it (`fedsb.rundir.open_run`:
  the lock, the refusal of a folder holding results, the clean-up of a run that fails before
  its first round);
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
import math
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
from fedsb.federated.experiment import Experiment
from fedsb.federated.transport import RoundExchange, RunContext
from fedsb.federated.federation import Federation
from fedsb.errors import FedsbError
from fedsb.federated.validation import PayloadError, adamw_bound, check_norm, clip_to_norm, expected_upload_bytes, update_norm, validate_update
from fedsb.flower import codec, screening, task
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
    NODE_RECORD,
    SETUP_MESSAGE_TYPE,
    SETUP_RECORD,
    UPDATE_RECORD,
)

log = logging.getLogger("fedsb.flower")

_INIT_MAX_BYTES = 1 << 30  # a federated-init reply (sketches of the adapted layers): refused above 1 GiB


class RoundFailed(FedsbError, RuntimeError):
    """A round that cannot be aggregated (fewer accepted updates than `min-replies`, a secure
    aggregate that fails its checks): the run stops at the last checkpoint, which stays good."""


def _fields(reply: Message, *records: str) -> dict[str, Any]:
    """A reply's metric and config record entries (the named records) and its sender, as the
    plain dict `screening.screen_reply` reads."""
    out: dict[str, Any] = {}
    for name in records:
        for group in (reply.content.metric_records, reply.content.config_records):
            if name in group:
                out.update(dict(group[name]))
    out["src-node"] = reply.metadata.src_node_id
    return out


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1][:300] if text else ''}"


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
    if settings.node_data:
        out.extend(node_data_refusals(config))
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


def node_data_refusals(config: ExperimentConfig) -> list[str]:
    """What `node-data = true` (every node reads its own data-path, the server none) refuses:
    anything that would read client data at the server, and what is not wired for it yet."""
    out: list[str] = []
    lorasb = get_strategy(config.federation.strategy).adapter_kind == "lorasb"
    if config.federation.client_data is not None:
        out.append("node-data = true with federation.client_data: the ServerApp would read the parties' files; remove it (each node names its own data-path)")
    given = [k for k in ("path", "eval_path") if config.task.options.get(k)]
    if given:
        out.append(f"node-data = true with task.options.{given[0]}: the ServerApp would read that file; each node reads its own data-path")
    if lorasb and config.init.method == "central" and not config.init.data.startswith("public:"):
        out.append('node-data = true with init.method = "central": that init reads a sample of the clients\' data at the server; use init.method = "svd" (data-free) or init.data = "public:<task>"')
    if lorasb and config.init.method == "federated":
        out.append('node-data = true with init.method = "federated": not wired for nodes with their own data yet; use init.method = "svd"')
    if config.privacy.enabled or config.privacy.user_level:
        out.append("node-data = true with privacy: the accountants are calibrated from every client's count at build time, not wired for node-reported counts yet")
    if config.task.eval_init:
        out.append("node-data = true with task.eval_init: the nodes evaluate after they hold B and A, which the init evaluation would precede")
    if config.task.eval_tasks:
        out.append("node-data = true with task.eval_tasks: each node evaluates on its own eval file; remove task.eval_tasks")
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
        self.reported: dict[int, int] = {}  # example counts nodes sent in their setup replies (screened)
        self.reported_tokens: dict[int, int] = {}  # node-data mode: their training tokens (the ledger's token counts)
        self.started = False  # transport.start ran: evaluations are of the global adapter, not the base
        self.eval_at: tuple[int, bytes] | None = None  # (round, download) the next party evaluation uses
        self.said_skipped = False
        self.svd_fallbacks = 0  # init.method = "svd": nodes whose own factors did not match (sent the server's)

    # --- logging -------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> None:
        """A line in the server log and in `flower_events.jsonl` (missing, rejected, ...)."""
        row = {"event": kind, "time": time.time(), **fields}
        self.events.append(row)
        log.warning("%s %s", kind, json.dumps(fields, default=str))
        with open(self.out_dir / "flower_events.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    # --- what the server fixes before reading replies -------------------------------------

    def counts(self) -> dict[int, int]:
        """Each partition's example count (`screening.fixed_counts`): the server's own in the
        simulation mode; in node-data mode the nodes' screened setup counts, capped."""
        own = {c.client_id: c.num_examples for c in self.fed.clients} if self.fed is not None and not self.settings.node_data else None
        return screening.fixed_counts(own, self.reported)

    def weights(self, fed: Federation) -> dict[int, int]:
        """Each partition's aggregation weight, from the fixed counts (integers: SecAgg+ ships them)."""
        return {pid: int(fed.strategy.client_weight(n)) for pid, n in self.counts().items()}

    def _expected(self, fed: Federation | None, pid: int | None, node: int | None) -> screening.Expected:
        counts = self.counts() if pid is not None else {}
        steps = fed.steps_per_round.get(pid) if fed is not None and pid is not None else None
        weight = int(fed.strategy.client_weight(counts[pid])) if fed is not None and pid in counts else None
        return screening.Expected(partitions=self.config.federation.num_clients, node=node, partition=pid, num_examples=counts.get(pid) if pid is not None else None, weight=weight, max_steps=steps)

    def update_bound(self, fed: Federation, pid: int, base: dict[str, Tensor]) -> float | None:
        """The largest update partition `pid` can send honestly (`validation.adamw_bound`); None: off."""
        if self.settings.update_bound <= 0:
            return None
        t = self.config.train
        return adamw_bound(
            lr=t.lr,
            steps=fed.steps_per_round[pid],
            numel=sum(v.numel() for v in base.values()),
            start_norm=update_norm(base),
            weight_decay=t.weight_decay,
            wire_dtype=self.config.federation.wire_dtype,
            factor=self.settings.update_bound,
        )

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
                self.ledger.record_one_time("init_broadcast_fallback" if self.config.init.method == "svd" else "init_rebroadcast", len(self.frozen))
        return Message(content, dst_node_id=node_id, message_type=SETUP_MESSAGE_TYPE, ttl=self.settings.discovery_timeout + 60)

    def _setup(self, node_ids: list[int], with_frozen: bool) -> None:
        """Send config (and frozen B, A) to nodes; learn which partition each node holds."""
        ex = exchange(self.grid, [self._setup_message(n, with_frozen) for n in node_ids], timeout=self.settings.discovery_timeout)
        lacking: list[int] = []
        for nid, reply in ex.replies:
            if reply.has_error():
                self._event("setup-failed", node=nid, reason=reply.error.reason)
                continue
            try:
                info = screening.screen_reply("setup", _fields(reply, NODE_RECORD), self._expected(self.fed, None, nid))
            except Exception as e:  # screening refuses with a reason; anything else is one too
                self._event("bad-setup", node=nid, reason=str(e) if isinstance(e, PayloadError) else _one_line(e))
                continue
            pid = int(info.partition)  # type: ignore[arg-type]  (required field)
            if self.settings.node_data and info.num_examples is None:
                self._event("bad-setup", node=nid, partition=pid, reason="node-data = true: the setup reply has no num-examples (start the node with --node-config 'data-path=...')")
                continue
            if info.num_examples is not None:
                # simulation: the server's own count; node-data: what the node reported first (fixed)
                own = self.reported.get(pid) if self.settings.node_data else self.counts().get(pid) if self.fed is not None else None
                if own is not None and info.num_examples != own:
                    self._event("bad-setup", node=nid, partition=pid, reason=f"claims {info.num_examples} examples, the server holds {own}")
                    continue
                self.reported[pid] = info.num_examples
                self.reported_tokens[pid] = info.tokens
            if pid in self.node_of and self.node_of[pid] != nid:
                self._event("duplicate-partition", node=nid, partition=pid, kept=self.node_of[pid])
                continue
            if pid in self.needs_setup:
                self.holds.pop(pid, None)  # it lost its cache: no folded base either
            self.node_of[pid] = nid
            self.needs_setup.discard(pid)
            if self.frozen is not None and not info.has_frozen:
                lacking.append(nid)
        for nid in ex.unanswered:
            self._event("setup-timeout", node=nid)
        self.resending = True
        if lacking and not with_frozen:
            if self.config.init.method == "svd":  # their own B, A hash differently: they get the server's
                self.svd_fallbacks += len(lacking)
                self._event("init-fallback", nodes=sorted(lacking), reason="the node's own svd factors do not match the server's sha256")
            self._setup(lacking, with_frozen=True)

    # --- one round -----------------------------------------------------------------------

    def _round_message(self, pid: int, round_index: int, download: bytes, message_type: str, **extra: Any) -> Message:
        fields: dict[str, Any] = {"round": round_index, "config-sha256": self.config_sha, "frozen-sha256": self.frozen_sha, **extra}
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

    def _note_base(self, pid: int, got: str) -> str:
        """Record which base a node answered from (its screened `base-id`); return it."""
        if self.folds and got == self.base_id:
            self.holds[pid] = got
        return got

    def _screen(self, fed: Federation, replies: dict[int, Message], shapes: dict[str, tuple[int, ...]], base: dict[str, Tensor], round_index: int) -> tuple[dict[int, dict[str, Tensor]], dict[int, screening.Reply], dict[int, str], dict[int, int]]:
        """Screen every reply (fields, then payload, then the update bound, then the outlier
        rule); return accepted updates, their screened fields, rejections, sizes."""
        wire = self.config.federation.wire_dtype
        max_bytes = expected_upload_bytes(shapes, wire)
        parsed: dict[int, dict[str, Tensor]] = {}
        infos: dict[int, screening.Reply] = {}
        rejected: dict[int, str] = {}
        sizes: dict[int, int] = {}
        for pid, reply in sorted(replies.items()):
            try:
                info = screening.screen_reply("train", _fields(reply, METRICS_RECORD, NODE_RECORD), self._expected(fed, pid, self.node_of.get(pid)))
                if self.folds and (got := self._note_base(pid, info.base_id)) != self.base_id:
                    raise PayloadError(f"trained on base {got[:12] or '(none)'}, the round's base is {self.base_id[:12]}")
                record = reply.content.array_records.get(UPDATE_RECORD)
                payload = codec.payload_from_record(record, max_bytes=max_bytes)
                sizes[pid] = len(payload)
                tensors = validate_update(payload, shapes, max_bytes, expected_dtype=wire, base=base)
                bound = self.update_bound(fed, pid, base)
                if bound is not None and (norm := update_norm(tensors, base)) > bound:
                    raise PayloadError(f"update norm {norm:.4g} exceeds {bound:.4g}, the most {fed.steps_per_round[pid]} AdamW steps at lr {self.config.train.lr:g} can move (update-bound)")
                parsed[pid], infos[pid] = tensors, info
            except PayloadError as e:
                rejected[pid] = str(e)
            except Exception as e:  # a reply the checks did not foresee: a rejection, never a crash
                rejected[pid] = f"rejected: {_one_line(e)}"
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
        return accepted, {p: infos[p] for p in accepted}, rejected, sizes

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
        accepted, infos, rejected, sizes = self._screen(fed, replies, shapes, base, round_index)
        for pid, nbytes in sizes.items():
            ledger.record_up(round_index, pid, nbytes)
        if len(accepted) < max(1, self.settings.min_replies):
            raise self._failed(round_index, f"{len(accepted)} accepted updates of {len(sampled)} sampled, min-replies = {self.settings.min_replies}")
        updates = [self._client_update(pid, self.counts()[pid], tensors, infos[pid], sizes[pid]) for pid, tensors in sorted(accepted.items())]  # `sampled` is sorted: the simulation's order
        return {"accepted": sorted(accepted), "missing": missing, "rejected": rejected, "updates": updates, "screen_seconds": time.perf_counter() - t0, "exchange_seconds": ex.seconds, "node_seconds": _node_seconds(infos)}

    @staticmethod
    def _client_update(pid: int, count: int, tensors: dict[str, Tensor], info: screening.Reply, size: int) -> ClientUpdate:
        """A screened reply as the driver's `ClientUpdate`: the example count the server fixed
        (never the client's claim); a DP node's accountant history and epsilon as it reported them."""
        return ClientUpdate(
            client_id=pid,
            num_examples=count,
            tensors=tensors,
            loss=info.loss,
            steps=info.steps,
            tokens=info.tokens,
            seconds=info.seconds,
            state=ClientState(privacy_history=info.privacy_history),
            payload_bytes=size,
            metrics={"epsilon": info.epsilon} if info.epsilon is not None else {},
        )

    def _secagg_round(self, fed: Federation, round_index: int, sampled: list[int], download: bytes, ledger: comm.CommLedger) -> dict[str, Any]:
        """One update, the secure weighted mean (one strategy `add` of weight 1), and the
        contributors' numbers apart. The weights are the server's: each node is told its own,
        its masked-vector reply is screened before it is summed (dropped: a SecAgg+ dropout),
        and the unmasked total weight and the mean are checked before the strategy sees them."""
        from fedsb.flower.secagg import quantized_weight, secagg_round

        base = task.global_state_from_download(fed, download)
        names = sorted(base)
        shapes = {k: tuple(v.shape) for k, v in base.items()}
        live = [pid for pid in sampled if pid in self.node_of and pid not in self.needs_setup]
        pid_of = {self.node_of[pid]: pid for pid in live}
        weights = self.weights(fed)
        max_weight = float(max(weights.values()))
        infos: dict[int, screening.Reply] = {}

        def screen(node_id: int, fitres: Any) -> str | None:
            pid = pid_of.get(node_id)
            if pid is None:
                return f"node {node_id} was not sampled"
            try:
                fields = {**dict(fitres.metrics), "num-examples": fitres.num_examples, "src-node": node_id}
                infos[pid] = screening.screen_reply("secagg", fields, self._expected(fed, pid, node_id))
            except PayloadError as e:
                return str(e)
            return None

        start = time.perf_counter()
        try:
            outcome = secagg_round(
                self.grid,
                self.context,
                round_index=round_index,
                node_ids=[self.node_of[pid] for pid in live],
                global_arrays=codec.state_to_ndarrays(base, names),
                fit_config={"round": round_index, "config-sha256": self.config_sha, "frozen-sha256": self.frozen_sha, "names": "\n".join(names)},
                weights={self.node_of[pid]: weights[pid] for pid in live},
                screen=screen,
                max_weight=max_weight,
                clipping_range=self.settings.secagg_clipping_range,
                quantization_range=self.settings.secagg_quantization_range,
                timeout=self.settings.round_timeout,
            )
        except Exception as e:  # a node that breaks Flower's protocol stops the round, not the ServerApp
            raise self._failed(round_index, f"secure aggregation failed: {_one_line(e)}") from None
        rejected = {pid_of[nid]: reason for nid, reason in outcome.dropped.items() if nid in pid_of}
        for pid, reason in sorted(rejected.items()):
            self._event("rejected", round=round_index + 1, partition=pid, reason=reason)
        contributors = sorted(pid_of[nid] for nid in outcome.nodes if nid in pid_of and pid_of[nid] in infos)
        if outcome.mean is None or len(contributors) < max(1, self.settings.min_replies):
            raise self._failed(round_index, f"secure aggregation ended with {len(contributors)} results (min-replies = {self.settings.min_replies})")
        levels = self.settings.secagg_quantization_range
        want = sum(quantized_weight(weights[pid], max_weight, levels) for pid in contributors)
        if outcome.total_weight != want:
            raise self._failed(round_index, f"the unmasked total weight is {outcome.total_weight}, the weights the server fixed for partitions {contributors} sum to {want}: a node applied another weight than it was given")
        try:
            mean = codec.ndarrays_to_state(outcome.mean, names, shapes)
        except PayloadError as e:
            raise self._failed(round_index, f"the secure aggregate is refused: {e}") from None
        bounds = [self.update_bound(fed, pid, base) for pid in contributors]
        if bounds and None not in bounds:
            ratios = sum(quantized_weight(weights[pid], max_weight, levels) for pid in contributors) / levels
            slack = len(contributors) * (2 * self.settings.secagg_clipping_range / levels) / max(ratios, 1e-12) * math.sqrt(sum(v.numel() for v in base.values()))
            limit = max(b for b in bounds if b is not None) + slack
            if (norm := update_norm(mean, base)) > limit:
                raise self._failed(round_index, f"the secure aggregate moved {norm:.4g} from the global state, more than {limit:.4g} (update-bound): not applied")
        aggregate = ClientUpdate(client_id=-1, num_examples=1, tensors=mean, loss=0.0, steps=0, tokens=0, seconds=0.0)
        # What the server side was handed: one distinct vector (the aggregate, in every FitRes),
        # never a client's own R; its fp32 payload's sha256 is that of the new global R.
        received = {"fit_results": len(outcome.received), "distinct_vectors": len(set(outcome.received)), "strategy_adds": 1, "aggregate_sha256": task.sha256(comm.encode(mean, "fp32"))}
        reports = [self._client_update(pid, self.counts()[pid], {}, infos[pid], 0) for pid in contributors]
        # Under SecAgg+ no safetensors payload exists: what each client sends and receives is
        # Flower's protocol traffic (keys, shares, masked vectors), so that is what is counted.
        for nid, nbytes in self.grid.sent.items():
            ledger.record_down(round_index, pid_of.get(nid, f"node{nid}"), nbytes)
        for nid, nbytes in self.grid.received.items():
            ledger.record_up(round_index, pid_of.get(nid, f"node{nid}"), nbytes)
        missing = {pid: "dropped out of secure aggregation" for pid in live if pid not in contributors and pid not in rejected}
        missing.update({pid: "no SuperNode holds this partition" for pid in sampled if pid not in live})
        for pid, reason in sorted(missing.items()):
            self._event("missing", round=round_index + 1, partition=pid, reason=reason)
        return {"accepted": contributors, "missing": missing, "rejected": rejected, "updates": [aggregate], "reports": reports, "screen_seconds": 0.0, "exchange_seconds": time.perf_counter() - start, "secagg_aggregate": received}

    def _failed(self, round_index: int, reason: str) -> RoundFailed:
        """The round cannot be aggregated: log it, and return the error that stops the run
        before anything of this round is applied or checkpointed."""
        self._event("round-failed", round=round_index + 1, reason=reason)
        return RoundFailed(f"round {round_index + 1}: {reason}; the run stops at its last checkpoint (resume = true continues from it)")

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
        total, count = 0.0, 0
        for nid, reply in ex.replies:
            if reply.has_error():
                continue
            pid = pid_of[nid]
            try:
                info = screening.screen_reply("evaluate", _fields(reply, METRICS_RECORD, NODE_RECORD), self._expected(self.fed, pid, nid))
            except Exception as e:
                self._event("rejected", round=round_index + 1, partition=pid, message="evaluate", reason=str(e) if isinstance(e, PayloadError) else _one_line(e))
                continue
            if self.folds and self._note_base(pid, info.base_id) != self.base_id:
                continue
            total += info.loss * int(info.num_examples)  # type: ignore[arg-type]  (required field)
            count += int(info.num_examples)  # type: ignore[arg-type]
        return {"loss": total / count if count else None, "nodes": len(ex.replies)}

    # --- node-data mode: discovery first, evaluation on the nodes' own files --------------

    def discover(self) -> dict[int, int]:
        """Node-data mode, before the server builds its (data-free) federation: send the config,
        learn which partition each node holds and its screened example count; every partition
        must answer (its count sets the weights and steps). Returns the fixed counts."""
        self._setup(self._wait_for_nodes(), with_frozen=False)
        absent = [pid for pid in range(self.config.federation.num_clients) if pid not in self.reported]
        if absent:
            raise RoundFailed(f"node-data = true: no SuperNode with its own data answered for partitions {absent} (each needs --node-config 'data-path=... partition-id=K')")
        counts = self.counts()
        capped = {pid: n for pid, n in self.reported.items() if counts[pid] != n}
        self._event("party-counts", examples=dict(sorted(self.reported.items())), tokens=dict(sorted(self.reported_tokens.items())), capped=capped)
        return counts

    def party_eval(self, fed: Federation) -> dict[str, Any]:
        """The driver's evaluation in node-data mode: each node evaluates the global adapter
        (before `start`: the base model) on its own eval file and sends counts only; per-node
        and example-weighted global figures (`parties.combine_evals`); nodes without an eval
        file are listed as skipped, nodes that fail as missing."""
        from fedsb.federated.parties import combine_evals

        nodes = [pid for pid in sorted(self.node_of) if pid not in self.needs_setup]
        if self.started and self.eval_at is not None:
            rnd, download = self.eval_at
            messages = [self._round_message(pid, rnd, download, "evaluate", **{"party-eval": True}) for pid in nodes]
        else:
            fields = {"round": -1, "config-sha256": self.config_sha, "frozen-sha256": self.frozen_sha, "party-eval": True, "base": True}
            messages = [Message(RecordDict({CONFIG_RECORD: ConfigRecord(fields)}), dst_node_id=self.node_of[pid], message_type="evaluate", ttl=self.settings.round_timeout + 60) for pid in nodes]
        ex = exchange(self.grid, messages, timeout=self.settings.round_timeout)
        pid_of = {self.node_of[pid]: pid for pid in nodes}
        per_party: dict[str, dict[str, Any]] = {}
        skipped: list[str] = []
        missing: dict[str, str] = {f"partition-{pid}": "no reply within round-timeout" for pid in (pid_of[n] for n in ex.unanswered)}
        for nid, reply in ex.replies:
            name = f"partition-{pid_of[nid]}"
            if reply.has_error():
                missing[name] = f"client error: {(reply.error.reason.strip().splitlines() or [''])[-1][:300]}"
                continue
            try:
                info = screening.screen_reply("party-eval", _fields(reply, METRICS_RECORD, NODE_RECORD), self._expected(None, pid_of[nid], nid))
            except Exception as e:
                missing[name] = f"rejected: {e if isinstance(e, PayloadError) else _one_line(e)}"
                continue
            if not info.eval_n:
                skipped.append(name)
                continue
            counts = {"n": info.eval_n, "correct": info.eval_correct, "loss_sum": info.eval_loss_sum, "eval_tokens": info.eval_tokens}
            counts = {k: v for k, v in counts.items() if v is not None}
            figures = combine_evals({name: counts})
            figures.pop("per_party")
            per_party[name] = {**counts, **figures}
        for name, reason in sorted(missing.items()):
            self._event("eval-missing", partition=name, reason=reason)
        if skipped and not self.said_skipped:
            self.said_skipped = True
            self._event("eval-skipped", partitions=sorted(skipped), reason="no eval file")
        out = combine_evals(dict(sorted(per_party.items())), skipped=sorted(skipped))
        if missing:
            out["missing"] = missing
        return out

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
        rebuilt = {k: state[k] if k in state and list(state[k].shape) == shape else torch.zeros(shape, device="cpu") for k, shape in meta["download_shapes"].items()}
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
        # "svd": the nodes compute B, A themselves and check the announced sha256; only a node
        # whose factors differ asks for them (`_setup`'s second pass, counted as a fallback)
        local = cfg.init.method == "svd"
        if self.node_of and meta is None:  # set up already (discovery, the federated init's exchanges): B, A now
            self.resending = False
            self._setup(sorted(self.node_of.values()), with_frozen=not local)
        else:
            self._setup(self._wait_for_nodes(), with_frozen=meta is None and not local)
        self.started = True
        return download

    def init_exchange(self, kind: str, broadcast: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:
        """One exchange of the federated init as `query.init` messages to every partition's
        node (`federated_run.run_federated_init_exchanges` does the server's arithmetic)."""
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
            pid = pid_of[nid]
            if reply.has_error():
                raise self._init_failed(kind, f"partition {pid} answered {reply.error.reason.strip().splitlines()[-1:]}")
            try:
                screening.screen_reply("init", _fields(reply, NODE_RECORD), self._expected(None, None, nid))
                out[pid] = comm.decode(codec.payload_from_record(reply.content.array_records.get(UPDATE_RECORD)), max_bytes=_INIT_MAX_BYTES)[0]
            except Exception as e:
                raise self._init_failed(kind, f"partition {pid}'s reply is refused: {e if isinstance(e, PayloadError) else _one_line(e)}") from None
        if ex.unanswered:
            raise self._init_failed(kind, f"no reply from partitions {sorted(pid_of[n] for n in ex.unanswered)}")
        layouts = {pid: {k: tuple(v.shape) for k, v in t.items()} for pid, t in out.items()}
        common = max(layouts.values(), key=lambda lay: sum(other == lay for other in layouts.values()), default={})
        odd = sorted(pid for pid, lay in layouts.items() if lay != common)
        if odd:  # every node answers the same protocol step: the same tensors and shapes
            raise self._init_failed(kind, f"partitions {odd} sent other tensors or shapes than the others")
        return out

    def _init_failed(self, kind: str, reason: str) -> RoundFailed:
        """The federated init needs every partition: a refused reply stops the run, logged."""
        self._event("init-failed", exchange=kind, reason=reason)
        return RoundFailed(f"federated init ({kind}): {reason}")

    def after_round(self, run: RunContext, round_index: int, download: bytes) -> dict[str, Any]:
        self._advance_base(download, round_index + 1)
        self.eval_at = (round_index, download)
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
                **({"svd_fallback_nodes": self.svd_fallbacks} if self.config.init.method == "svd" else {}),
                **({"node_data": {"examples": {str(p): n for p, n in sorted(self.reported.items())}, "tokens": {str(p): n for p, n in sorted(self.reported_tokens.items())}, "weights_from": "node-reported counts, each capped at 4x their median"}} if self.settings.node_data else {}),
            }
        }


def _node_seconds(infos: dict[int, screening.Reply]) -> dict[str, dict[str, float]]:
    """Per accepted partition: the ClientApp process's start-up and its whole message time, as reported."""
    return {
        str(pid): {"startup": info.startup_seconds, "message": info.message_seconds}
        for pid, info in sorted(infos.items())
        if info.startup_seconds is not None and info.message_seconds is not None
    }


def run_server(grid: Grid, context: Context, settings: task.RunSettings) -> dict[str, Any]:
    """The ServerApp's run: the experiment driver over the Flower transport, in a results folder
    opened as the in-process engine opens it (`fedsb.rundir.open_run`): locked for the run (an
    in-process `--resume` of it is refused, and vice versa), refused if it holds results unless
    `resume` or `overwrite`, published atomically, and removed again if the run fails before
    its first round. `resume = true` on a folder that holds no run starts one; on a run that
    stopped before its first round completed it starts that run again (as `fedsb run --resume`)."""
    from fedsb.rundir import RunDirError, failed_start, open_run, restart_failed_start

    config = task.experiment_config(settings)
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
            fed = None
            if settings.node_data:  # the nodes' counts first, then a federation with no client data
                from fedsb.federated.federation import build_federation

                fed = build_federation(config, counts=transport.discover())
                fed.remote_eval = transport.party_eval
            return Experiment(config, out_dir, base_eval=base_eval).run(transport, resume=resume, fed=fed)
        except Exception as e:
            transport._event("failed", reason=str(e) if isinstance(e, FedsbError) else _one_line(e))
            raise
