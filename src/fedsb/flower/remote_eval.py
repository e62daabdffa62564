"""Evaluation on the nodes: the federated loss, and node-data mode's party evaluations.

- `federated_eval` (`federated-eval = true`): every node's loss of the global adapter on its
  partition, example-weighted;
- `party_eval` (node-data mode, the driver's evaluation): each node evaluates the global adapter
  (before the first round: the base model) on its own eval file and sends counts only;
  per-node and example-weighted global figures (`parties.combine_evals`); nodes without an eval
  file are listed as skipped, nodes that fail as missing.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedsb.federated.parties import combine_evals
from fedsb.federated.validation import PayloadError
from fedsb.flower import codec, screening
from fedsb.flower.discovery import Nodes
from fedsb.flower.events import one_line
from fedsb.flower.messaging import exchange
from fedsb.flower.protocol import CONFIG_RECORD, EVAL_BASE, EVALUATE, METRICS_RECORD, NODE_RECORD, PARTY_EVAL


def federated_eval(nodes: Nodes, round_index: int, download: bytes) -> dict[str, float | None]:
    """The example-weighted loss of the global adapter over the nodes' partitions."""
    pids = nodes.live(sorted(nodes.node_of))
    ex = exchange(nodes.grid, [nodes.round_message(pid, round_index, download, EVALUATE) for pid in pids], timeout=nodes.settings.round_timeout)
    pid_of = nodes.pid_of(pids)
    total, count = 0.0, 0
    for nid, reply in ex.replies:
        if reply.has_error():
            continue
        pid = pid_of[nid]
        try:
            info = screening.screen_reply(EVALUATE, codec.reply_fields(reply.content, reply.metadata.src_node_id, METRICS_RECORD, NODE_RECORD), nodes.expected(pid, nid))
        except Exception as e:
            nodes.events("rejected", round=round_index + 1, partition=pid, message=EVALUATE, reason=str(e) if isinstance(e, PayloadError) else one_line(e))
            continue
        if nodes.chain is not None and not nodes.chain.note(pid, info.base_id):
            continue
        total += info.loss * int(info.num_examples)  # type: ignore[arg-type]  (required field)
        count += int(info.num_examples)  # type: ignore[arg-type]
    return {"loss": total / count if count else None, "nodes": len(ex.replies)}


class PartyEval:
    """Node-data mode's evaluation, asked of every node; `at` is the (round, download) of the
    global adapter to evaluate (None: the base model, before the first round)."""

    def __init__(self, nodes: Nodes) -> None:
        self.nodes = nodes
        self.at: tuple[int, bytes] | None = None
        self.said_skipped = False

    def _messages(self, pids: list[int]) -> list[Message]:
        nodes = self.nodes
        if self.at is not None:
            rnd, download = self.at
            return [nodes.round_message(pid, rnd, download, EVALUATE, **{PARTY_EVAL: True}) for pid in pids]
        fields = {**nodes.round_fields(-1), PARTY_EVAL: True, EVAL_BASE: True}
        return [Message(RecordDict({CONFIG_RECORD: ConfigRecord(fields)}), dst_node_id=nodes.node_of[pid], message_type=EVALUATE, ttl=nodes.settings.round_timeout + 60) for pid in pids]

    def __call__(self) -> dict[str, Any]:
        nodes = self.nodes
        pids = nodes.live(sorted(nodes.node_of))
        ex = exchange(nodes.grid, self._messages(pids), timeout=nodes.settings.round_timeout)
        pid_of = nodes.pid_of(pids)
        per_party: dict[str, dict[str, Any]] = {}
        skipped: list[str] = []
        missing: dict[str, str] = {f"partition-{pid}": "no reply within round-timeout" for pid in (pid_of[n] for n in ex.unanswered)}
        for nid, reply in ex.replies:
            name = f"partition-{pid_of[nid]}"
            if reply.has_error():
                missing[name] = f"client error: {(reply.error.reason.strip().splitlines() or [''])[-1][:300]}"
                continue
            try:
                info = screening.screen_reply(PARTY_EVAL, codec.reply_fields(reply.content, reply.metadata.src_node_id, METRICS_RECORD, NODE_RECORD), nodes.expected(pid_of[nid], nid))
            except Exception as e:
                missing[name] = f"rejected: {e if isinstance(e, PayloadError) else one_line(e)}"
                continue
            if not info.eval_n:
                skipped.append(name)
                continue
            per_party[name] = _figures(name, info)
        return self._combine(per_party, skipped, missing)

    def _combine(self, per_party: dict[str, dict[str, Any]], skipped: list[str], missing: dict[str, str]) -> dict[str, Any]:
        """The global figures; missing and (once) skipped nodes logged."""
        for name, reason in sorted(missing.items()):
            self.nodes.events("eval-missing", partition=name, reason=reason)
        if skipped and not self.said_skipped:
            self.said_skipped = True
            self.nodes.events("eval-skipped", partitions=sorted(skipped), reason="no eval file")
        out = combine_evals(dict(sorted(per_party.items())), skipped=sorted(skipped))
        if missing:
            out["missing"] = missing
        return out


def _figures(name: str, info: screening.Reply) -> dict[str, Any]:
    """One party's counts and the figures they give on their own."""
    counts = {"n": info.eval_n, "correct": info.eval_correct, "loss_sum": info.eval_loss_sum, "eval_tokens": info.eval_tokens}
    counts = {k: v for k, v in counts.items() if v is not None}
    figures = combine_evals({name: counts})
    figures.pop("per_party")
    return {**counts, **figures}
