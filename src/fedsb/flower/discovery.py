"""The server's view of its SuperNodes: discovery, setup, and the messages a round sends them.

Discovery maps SuperNodes to partitions (each reports its `partition-id`); setup ships the
config text and, once, the frozen B, A (a node that computes them itself, `init.method = "svd"`,
gets them only if its own hash differently from the server's). A node that lost its cache (`missing-setup`) is set
up again before its next round. Example counts are fixed here before round 1, in both modes
(`screening.fixed_counts`): the server's own, or in node-data mode the nodes' screened setup
counts, capped. Every round message names the config, B, A and, for FedEx/FLoRA, the base
chain; a node that missed a fold gets the server's base attached (a catch-up).
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedsb.config import ExperimentConfig
from fedsb.federated import comm
from fedsb.federated.transport import RunContext
from fedsb.federated.validation import PayloadError
from fedsb.flower import codec, screening
from fedsb.flower.base_chain import BaseChain
from fedsb.flower.events import EventLog, RoundFailed, one_line
from fedsb.flower.frozen import frozen_state, needs_frozen_broadcast
from fedsb.flower.messaging import CountingGrid, exchange
from fedsb.flower.protocol import (
    BASE_RECORD,
    BASE_SHA,
    CONFIG_RECORD,
    CONFIG_SHA,
    CONFIG_TOML,
    DOWNLOAD_RECORD,
    FROZEN_RECORD,
    FROZEN_SHA,
    NODE_RECORD,
    ROUND,
    SETUP_ACTION,
    SETUP_MESSAGE_TYPE,
    SETUP_RECORD,
)
from fedsb.flower.settings import RunSettings, config_text, sha256


class Nodes:
    """Which SuperNode holds which partition, what it was sent, and what it reported."""

    def __init__(self, grid: CountingGrid, settings: RunSettings, config: ExperimentConfig, events: EventLog, chain: BaseChain | None) -> None:
        self.grid = grid
        self.settings = settings
        self.config = config
        self.events = events
        self.chain = chain  # FedEx/FLoRA: the run's base chain (None: the base never changes)
        self.config_text = config_text(config)
        self.config_sha = sha256(self.config_text)
        self.run: RunContext | None = None  # set by the transport's `start`
        self.ledger = comm.CommLedger()  # the run's, once it starts
        self.node_of: dict[int, int] = {}  # partition id -> node id
        self.needs_setup: set[int] = set()  # partitions whose node must get setup again
        self.frozen_sha = ""
        self.frozen: bytes | None = None
        self.resending = False  # True once the first setup is done: later B, A sends are re-sends
        self.reported: dict[int, int] = {}  # example counts nodes sent in their setup replies (screened)
        self.reported_tokens: dict[int, int] = {}  # node-data mode: their training tokens (the ledger's token counts)
        self.svd_fallbacks = 0  # init.method = "svd": nodes whose own factors did not match (sent the server's)
        self.catchup_bytes = 0  # this round's catch-up bytes (metrics)

    def attach(self, run: RunContext) -> None:
        """The run has started: its ledger, counts and model (B, A for the setup broadcast)."""
        self.run, self.ledger = run, run.ledger
        if needs_frozen_broadcast(self.config):
            self.frozen = comm.encode(frozen_state(run.model), self.config.init.broadcast_dtype)
            self.frozen_sha = sha256(self.frozen)

    # --- counts, weights and what a reply must say -----------------------------------------

    def counts(self) -> dict[int, int]:
        """Each partition's example count (`screening.fixed_counts`): the server's own in the
        simulation mode; in node-data mode the nodes' screened setup counts, capped."""
        own = dict(self.run.counts) if self.run is not None and not self.settings.node_data else None
        return screening.fixed_counts(own, self.reported)

    def weights(self) -> dict[int, int]:
        """Each partition's aggregation weight, from the fixed counts (integers: SecAgg+ ships them)."""
        assert self.run is not None
        return {pid: int(self.run.strategy.client_weight(n)) for pid, n in self.counts().items()}

    def expected(self, pid: int | None, node: int | None) -> screening.Expected:
        """What the server knows of a reply from `node` for partition `pid` before reading it."""
        run = self.run
        counts = self.counts() if pid is not None else {}
        steps = run.steps_per_round.get(pid) if run is not None and pid is not None else None
        weight = int(run.strategy.client_weight(counts[pid])) if run is not None and pid in counts else None
        return screening.Expected(partitions=self.config.federation.num_clients, node=node, partition=pid, num_examples=counts.get(pid) if pid is not None else None, weight=weight, max_steps=steps)

    def live(self, pids: list[int]) -> list[int]:
        """The partitions of `pids` a set-up node holds."""
        return [pid for pid in pids if pid in self.node_of and pid not in self.needs_setup]

    def pid_of(self, pids: list[int]) -> dict[int, int]:
        """Node id -> partition, for the given partitions."""
        return {self.node_of[pid]: pid for pid in pids}

    # --- discovery and setup -------------------------------------------------------------

    def wait_for_nodes(self) -> list[int]:
        want = self.settings.min_nodes or self.config.federation.num_clients
        deadline = time.perf_counter() + self.settings.discovery_timeout
        nodes = sorted(self.grid.get_node_ids())
        while len(nodes) < want and time.perf_counter() < deadline:
            time.sleep(0.5)
            nodes = sorted(self.grid.get_node_ids())
        if not nodes:
            raise RoundFailed(f"no SuperNode connected within {self.settings.discovery_timeout:.0f} s")
        if len(nodes) < want:
            self.events("few-nodes", connected=len(nodes), wanted=want)
        return nodes

    def _setup_message(self, node_id: int, with_frozen: bool) -> Message:
        content = RecordDict({SETUP_RECORD: ConfigRecord({CONFIG_TOML: self.config_text, CONFIG_SHA: self.config_sha, FROZEN_SHA: self.frozen_sha})})
        if with_frozen and self.frozen is not None:
            content[FROZEN_RECORD] = codec.payload_record(self.frozen)
            if self.resending:  # the first broadcast is counted by initialize_adapter, as in simulation
                self.ledger.record_one_time("init_broadcast_fallback" if self.config.init.method == "svd" else "init_rebroadcast", len(self.frozen))
        return Message(content, dst_node_id=node_id, message_type=SETUP_MESSAGE_TYPE, ttl=self.settings.discovery_timeout + 60)

    def setup(self, node_ids: list[int], with_frozen: bool) -> None:
        """Send config (and frozen B, A) to nodes; learn which partition each node holds."""
        ex = exchange(self.grid, [self._setup_message(n, with_frozen) for n in node_ids], timeout=self.settings.discovery_timeout)
        lacking: list[int] = []
        for nid, reply in ex.replies:
            if reply.has_error():
                self.events("setup-failed", node=nid, reason=reply.error.reason)
                continue
            info = self._screen_setup(nid, reply)
            if info is None or not self._map(nid, info):
                continue
            if self.frozen is not None and not info.has_frozen:
                lacking.append(nid)
        for nid in ex.unanswered:
            self.events("setup-timeout", node=nid)
        self.resending = True
        if lacking and not with_frozen:
            if self.config.init.method == "svd":  # their own B, A hash differently: they get the server's
                self.svd_fallbacks += len(lacking)
                self.events("init-fallback", nodes=sorted(lacking), reason="the node's own svd factors do not match the server's sha256")
            self.setup(lacking, with_frozen=True)

    def _screen_setup(self, nid: int, reply: Message) -> screening.Reply | None:
        """A setup reply's screened fields and its example count's check; None (logged) if refused."""
        try:
            info = screening.screen_reply(SETUP_ACTION, codec.reply_fields(reply.content, reply.metadata.src_node_id, NODE_RECORD), self.expected(None, nid))
        except Exception as e:  # screening refuses with a reason; anything else is one too
            self.events("bad-setup", node=nid, reason=str(e) if isinstance(e, PayloadError) else one_line(e))
            return None
        pid = int(info.partition)  # type: ignore[arg-type]  (required field)
        if self.settings.node_data and info.num_examples is None:
            self.events("bad-setup", node=nid, partition=pid, reason="node-data = true: the setup reply has no num-examples (start the node with --node-config 'data-path=...')")
            return None
        if info.num_examples is not None:
            # simulation: the server's own count; node-data: what the node reported first (fixed)
            own = self.reported.get(pid) if self.settings.node_data else self.counts().get(pid) if self.run is not None else None
            if own is not None and info.num_examples != own:
                self.events("bad-setup", node=nid, partition=pid, reason=f"claims {info.num_examples} examples, the server holds {own}")
                return None
            self.reported[pid] = info.num_examples
            self.reported_tokens[pid] = info.tokens
        return info

    def _map(self, nid: int, info: screening.Reply) -> bool:
        """Map the node to the partition it reported, unless another node holds it."""
        pid = int(info.partition)  # type: ignore[arg-type]
        if pid in self.node_of and self.node_of[pid] != nid:
            self.events("duplicate-partition", node=nid, partition=pid, kept=self.node_of[pid])
            return False
        if pid in self.needs_setup and self.chain is not None:
            self.chain.forget(pid)  # it lost its cache: no folded base either
        self.node_of[pid] = nid
        self.needs_setup.discard(pid)
        return True

    def lost_setup(self, pid: int) -> None:
        """The node answered `missing-setup`: set it up again before its next round."""
        self.needs_setup.add(pid)
        if self.chain is not None:
            self.chain.forget(pid)

    def setup_again(self) -> None:
        """Before a round: set up the nodes that lost their cache (with B, A)."""
        if self.needs_setup:
            self.setup([self.node_of[p] for p in sorted(self.needs_setup) if p in self.node_of], with_frozen=True)

    def discover(self) -> dict[int, int]:
        """Node-data mode, before the server builds its (data-free) model: send the config,
        learn which partition each node holds and its screened example count; every partition
        must answer (its count sets the weights and steps). Returns the fixed counts."""
        self.setup(self.wait_for_nodes(), with_frozen=False)
        absent = [pid for pid in range(self.config.federation.num_clients) if pid not in self.reported]
        if absent:
            raise RoundFailed(f"node-data = true: no SuperNode with its own data answered for partitions {absent} (each needs --node-config 'data-path=... partition-id=K')")
        counts = self.counts()
        capped = {pid: n for pid, n in self.reported.items() if counts[pid] != n}
        self.events("party-counts", examples=dict(sorted(self.reported.items())), tokens=dict(sorted(self.reported_tokens.items())), capped=capped)
        return counts

    # --- round messages ------------------------------------------------------------------

    def round_fields(self, round_index: int) -> dict[str, Any]:
        return {ROUND: round_index, CONFIG_SHA: self.config_sha, FROZEN_SHA: self.frozen_sha}

    def round_message(self, pid: int, round_index: int, download: bytes, message_type: str, **extra: Any) -> Message:
        """A train or evaluate message for partition `pid`'s node (with a catch-up base if it
        holds neither the round's base nor its predecessor)."""
        fields: dict[str, Any] = {**self.round_fields(round_index), **extra}
        content = RecordDict({DOWNLOAD_RECORD: codec.payload_record(download)})
        if self.chain is not None:
            fields.update(self.chain.fields())
            if self.chain.needs_catchup(pid):
                fields[BASE_SHA] = self._attach_catchup(content, pid, round_index, message_type)
        content[CONFIG_RECORD] = ConfigRecord(fields)
        return Message(content, dst_node_id=self.node_of[pid], message_type=message_type, group_id=str(round_index + 1), ttl=self.settings.round_timeout + 60)

    def _attach_catchup(self, content: RecordDict, pid: int, round_index: int, message_type: str) -> str:
        """Attach the server's base, count and log it; return its sha256."""
        assert self.chain is not None and self.run is not None
        payload, digest = self.chain.catchup(self.run.model)
        content[BASE_RECORD] = codec.payload_record(payload)
        self.ledger.record_one_time("base_catchup", len(payload))
        self.catchup_bytes += len(payload)
        self.events("base-catchup", round=round_index + 1, partition=pid, message=message_type, bytes=len(payload), held=self.chain.held(pid)[:12], needed=self.chain.prev[:12])
        return digest
