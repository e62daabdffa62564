"""Server-side message exchange with a deadline, and Flower's own byte counts.

`Grid.send_and_receive` polls every 3 s and gives no way to tell "late" from "lost"; a round
needs both: wait for every reply up to `timeout`, then go on with what arrived. `exchange`
does that with a short poll, and `CountingGrid` records the size Flower itself ships for every
message (records, array chunks, headers), so reports can set it beside the fedsb payload.
Its `reply_filter` lets SecAgg+ screen a node's masked vector before Flower's workflow adds it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from fedsb.flower.codec import message_nbytes

POLL_SECONDS = 0.25


class CountingGrid(Grid):
    """A `Grid` that counts Flower message bytes per node, in both directions."""

    def __init__(self, inner: Grid) -> None:
        self._inner = inner
        self.sent: dict[int, int] = defaultdict(int)
        self.received: dict[int, int] = defaultdict(int)
        # (destination node id, reply) -> keep it? Applied by `send_and_receive` (the path Flower's
        # SecAgg+ workflow uses) to replies without an error; None keeps every reply.
        self.reply_filter: Callable[[int, Message], bool] | None = None

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()

    # --- Grid interface, delegated ---
    def set_run(self, run) -> None:  # type: ignore[no-untyped-def]
        self._inner.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for m in messages:
            self.sent[m.metadata.dst_node_id] += message_nbytes(m)
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._inner.pull_messages(message_ids))
        for m in replies:
            self.received[m.metadata.src_node_id] += message_nbytes(m)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        keep = self.reply_filter
        replies = exchange(self, list(messages), timeout=timeout).replies
        return [reply for dst, reply in replies if keep is None or reply.has_error() or keep(dst, reply)]


@dataclass
class Exchange:
    replies: list[tuple[int, Message]] = field(default_factory=list)  # (destination node id, reply)
    unanswered: set[int] = field(default_factory=set)  # destination node ids without a reply
    seconds: float = 0.0


def exchange(grid: Grid, messages: list[Message], *, timeout: float | None) -> Exchange:
    """Push all messages, then pull until every one is answered or `timeout` passes."""
    start = time.perf_counter()
    if not messages:
        return Exchange()
    ids = list(grid.push_messages(messages))
    dst_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}
    pending = set(ids)
    out = Exchange()
    deadline = None if timeout is None else start + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            # keyed by the message it answers: an error reply made by the SuperLink itself
            # (node unavailable, TTL expired) does not carry the node's id as its source
            mid = reply.metadata.reply_to_message_id
            if mid in pending:
                pending.discard(mid)
                out.replies.append((dst_of[mid], reply))
        if not pending or (deadline is not None and time.perf_counter() >= deadline):
            break
        time.sleep(POLL_SECONDS)
    out.unanswered = {dst_of[mid] for mid in pending}
    out.seconds = time.perf_counter() - start
    return out
