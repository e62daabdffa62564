"""One plain (not SecAgg+) round on the nodes, and the screening of what comes back.

A round has a deadline (`round-timeout`) and a quorum (`min-replies`): late, crashed and
disconnected clients are logged as missing, the round goes on with the others. Every field a
node sends is screened before use (`screening.screen_reply`: identity, example counts,
metrics), every upload by `fedsb.federated.validation` with an update bound that needs no
other reply (`validation.adamw_bound`) and the outlier rule; a node that fails is dropped for
the round and logged, never a crash. What is accepted becomes `ClientUpdate`s
(`codec.decode_update`) with the example counts the server fixed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from torch import Tensor

from fedsb.federated.client import ClientUpdate
from fedsb.federated.transport import RunContext
from fedsb.federated.validation import PayloadError, adamw_bound, check_norm, clip_to_norm, expected_upload_bytes, update_norm, validate_update
from fedsb.flower import codec, screening
from fedsb.flower.discovery import Nodes
from fedsb.flower.events import one_line
from fedsb.flower.messaging import exchange
from fedsb.flower.protocol import METRICS_RECORD, MISSING_SETUP, NODE_RECORD, TRAIN


@dataclass
class RoundResult:
    """What one round's exchange ended with, plain or secure."""

    accepted: list[int]
    missing: dict[int, str]
    rejected: dict[int, str]
    updates: list[ClientUpdate]
    reports: list[ClientUpdate] | None = None  # None: the updates' numbers (SecAgg+: the contributors')
    screen_seconds: float = 0.0
    exchange_seconds: float = 0.0
    flower: dict[str, Any] = field(default_factory=dict)  # extra fields of the row's "flower" entry


def update_bound(nodes: Nodes, steps: int, base: dict[str, Tensor]) -> float | None:
    """The largest update a partition taking `steps` AdamW steps can send honestly
    (`validation.adamw_bound`); None: off."""
    if nodes.settings.update_bound <= 0:
        return None
    t = nodes.config.train
    return adamw_bound(
        lr=t.lr,
        steps=steps,
        numel=sum(v.numel() for v in base.values()),
        start_norm=update_norm(base),
        weight_decay=t.weight_decay,
        wire_dtype=nodes.config.federation.wire_dtype,
        factor=nodes.settings.update_bound,
    )


def _send(nodes: Nodes, run: RunContext, round_index: int, sampled: list[int], download: bytes) -> tuple[dict[int, Message], dict[int, str], float]:
    """Send the round to the live sampled nodes; their replies, the missing (logged), the seconds."""
    live = nodes.live(sampled)
    missing: dict[int, str] = {pid: "no SuperNode holds this partition" for pid in sampled if pid not in live}
    messages = [nodes.round_message(pid, round_index, download, TRAIN) for pid in live]
    pid_of = nodes.pid_of(live)
    for pid in live:
        run.ledger.record_down(round_index, pid, len(download))
    ex = exchange(nodes.grid, messages, timeout=nodes.settings.round_timeout)
    replies: dict[int, Message] = {}
    for nid, reply in ex.replies:
        pid = pid_of[nid]
        if reply.has_error():
            reason = reply.error.reason
            if MISSING_SETUP in reason:
                nodes.lost_setup(pid)
            missing[pid] = f"client error: {reason.strip().splitlines()[-1] if reason.strip() else reason}"
        else:
            replies[pid] = reply
    for nid in ex.unanswered:
        missing[pid_of[nid]] = f"no reply within round-timeout = {nodes.settings.round_timeout:g} s"
    for pid, reason in sorted(missing.items()):
        nodes.events("missing", round=round_index + 1, partition=pid, reason=reason)
    return replies, missing, ex.seconds


def plain_round(nodes: Nodes, run: RunContext, round_index: int, sampled: list[int], download: bytes) -> RoundResult:
    """Send the round, screen the replies, return the accepted updates in the simulation's order."""
    base = codec.start_state(run.strategy, run.model, download)
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    replies, missing, seconds = _send(nodes, run, round_index, sampled, download)
    t0 = time.perf_counter()
    accepted, infos, rejected, sizes = screen_updates(nodes, run, replies, shapes, base, round_index)
    for pid, nbytes in sizes.items():
        run.ledger.record_up(round_index, pid, nbytes)
    if len(accepted) < max(1, nodes.settings.min_replies):
        raise nodes.events.round_failed(round_index, f"{len(accepted)} accepted updates of {len(sampled)} sampled, min-replies = {nodes.settings.min_replies}")
    counts = nodes.counts()
    updates = [codec.decode_update(infos[pid], tensors, client_id=pid, num_examples=counts[pid], payload_bytes=sizes[pid]) for pid, tensors in sorted(accepted.items())]  # `sampled` is sorted: the simulation's order
    node_seconds = _node_seconds(infos)
    return RoundResult(sorted(accepted), missing, rejected, updates, screen_seconds=time.perf_counter() - t0, exchange_seconds=seconds, flower={"node_seconds": node_seconds} if node_seconds else {})


def _screen_one(nodes: Nodes, run: RunContext, pid: int, reply: Message, shapes: dict[str, tuple[int, ...]], base: dict[str, Tensor], max_bytes: int, sizes: dict[int, int]) -> tuple[dict[str, Tensor], screening.Reply]:
    """One reply's fields, then its base, payload and update bound; raises the rejection."""
    fields = codec.reply_fields(reply.content, reply.metadata.src_node_id, METRICS_RECORD, NODE_RECORD)
    info = screening.screen_reply(TRAIN, fields, nodes.expected(pid, nodes.node_of.get(pid)))
    chain = nodes.chain
    if chain is not None and not chain.note(pid, info.base_id):
        raise PayloadError(f"trained on base {info.base_id[:12] or '(none)'}, the round's base is {chain.id[:12]}")
    payload = codec.update_payload(reply.content, max_bytes)
    sizes[pid] = len(payload)
    wire = nodes.config.federation.wire_dtype
    tensors = validate_update(payload, shapes, max_bytes, expected_dtype=wire, base=base)
    steps = run.steps_per_round[pid]
    bound = update_bound(nodes, steps, base)
    if bound is not None and (norm := update_norm(tensors, base)) > bound:
        raise PayloadError(f"update norm {norm:.4g} exceeds {bound:.4g}, the most {steps} AdamW steps at lr {nodes.config.train.lr:g} can move (update-bound)")
    return tensors, info


def screen_updates(
    nodes: Nodes, run: RunContext, replies: dict[int, Message], shapes: dict[str, tuple[int, ...]], base: dict[str, Tensor], round_index: int
) -> tuple[dict[int, dict[str, Tensor]], dict[int, screening.Reply], dict[int, str], dict[int, int]]:
    """Screen every reply (fields, then payload, then the update bound, then the outlier
    rule); return accepted updates, their screened fields, rejections, sizes."""
    max_bytes = expected_upload_bytes(shapes, nodes.config.federation.wire_dtype)
    parsed: dict[int, dict[str, Tensor]] = {}
    infos: dict[int, screening.Reply] = {}
    rejected: dict[int, str] = {}
    sizes: dict[int, int] = {}
    for pid, reply in sorted(replies.items()):
        try:
            parsed[pid], infos[pid] = _screen_one(nodes, run, pid, reply, shapes, base, max_bytes, sizes)
        except PayloadError as e:
            rejected[pid] = str(e)
        except Exception as e:  # a reply the checks did not foresee: a rejection, never a crash
            rejected[pid] = f"rejected: {one_line(e)}"
    norms = {pid: update_norm(t, base) for pid, t in parsed.items()}
    for pid in list(parsed):
        others = [n for q, n in norms.items() if q != pid]
        try:
            check_norm(norms[pid], others, outlier_factor=nodes.settings.outlier_factor)
        except PayloadError as e:
            rejected[pid] = str(e)
    accepted = {pid: t for pid, t in parsed.items() if pid not in rejected}
    if nodes.settings.norm_bound > 0:
        accepted = {pid: clip_to_norm(t, nodes.settings.norm_bound, base) for pid, t in accepted.items()}
    for pid, reason in sorted(rejected.items()):
        nodes.events("rejected", round=round_index + 1, partition=pid, reason=reason)
    return accepted, {p: infos[p] for p in accepted}, rejected, sizes


def _node_seconds(infos: dict[int, screening.Reply]) -> dict[str, dict[str, float]]:
    """Per accepted partition: the ClientApp process's start-up and its whole message time, as reported."""
    return {
        str(pid): {"startup": info.startup_seconds, "message": info.message_seconds}
        for pid, info in sorted(infos.items())
        if info.startup_seconds is not None and info.message_seconds is not None
    }
