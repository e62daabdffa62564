"""Screen every field a node sends before the server uses it: one function, every message kind.

A reply's fields (its metric and node records, and the id of the node it came from) are read by
`codec.reply_fields` into a plain dict and passed through `screen_reply` before anything else looks at
them: setup replies, train replies (plain), SecAgg+ FitRes fields, evaluate replies and the
federated init's replies. A field that is missing, of the wrong type, not finite, out of its
stated bound, or that contradicts what the server already knows (the partition this node holds,
the example count and weight the server fixed for it) raises `ReplyError` naming the field; the
server drops that node for the round and logs the reason. Unknown fields are ignored: nothing
reads them. No flwr and no torch import: the function is pure and tested on its own.

The example-count rule (docs/flower.md "Example counts and weights"): each partition's count is
fixed by the server before round 1 (`fixed_counts`), its weight follows from it
(`Strategy.client_weight`), and a reply must repeat the count (plain) or the weight (SecAgg+)
it was given; a claim never changes a weight.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedsb.federated.comm import PayloadError
from fedsb.flower import protocol as P

MAX_EXAMPLES = 10**8  # a partition's example count: 1 .. this
MAX_STEPS = 10**7  # optimizer steps one reply may report
MAX_TOKENS = 10**13
MAX_SECONDS = 10**7  # about 116 days
MAX_HISTORY_CHARS = 1_000_000  # a DP node's accountant history (JSON text)
COUNT_CAP = 4.0  # a node-reported count is capped at this x the median of the reported counts


class ReplyError(PayloadError):
    """A reply field the server refuses; the message names the field and why."""


@dataclass(frozen=True)
class Expected:
    """What the server knows before it reads a reply (None: not known, not checked)."""

    partitions: int  # valid partition ids: 0 .. partitions - 1
    node: int | None = None  # the node the message was sent to
    partition: int | None = None  # the partition the server mapped that node to
    num_examples: int | None = None  # the count the server fixed for that partition
    weight: int | None = None  # SecAgg+: the weight the server told the node to apply
    max_steps: int | None = None  # the optimizer steps that partition takes per round


@dataclass(frozen=True)
class Reply:
    """A screened reply: every field typed and within its bound."""

    partition: int | None = None
    num_examples: int | None = None
    has_frozen: bool = False
    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    epsilon: float | None = None
    startup_seconds: float | None = None
    message_seconds: float | None = None
    base_id: str = ""
    privacy_history: list[list[float | int]] | None = None
    # node-data mode: a party's evaluation on its own eval file (counts only; n = 0: no eval file)
    eval_n: int | None = None
    eval_correct: int | None = None
    eval_loss_sum: float | None = None
    eval_tokens: int | None = None


# --- one checker per field type: raise ValueError with the reason ---------------------------


def _integer(value: Any, low: int, high: int) -> int:
    """An integer (or an integral float: MetricRecords carry floats) in [low, high]; no bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {type(value).__name__}")
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        raise ValueError(f"must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{int(value)} is outside {low}..{high:g}")
    return int(value)


def _real(value: Any, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite number in [low, high]; no bool, no string."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"must be finite, got {out!r}")
    if not low <= out <= high:
        raise ValueError(f"{out!r} is outside [{low:g}, {high:g}]")
    return out


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be a bool, got {type(value).__name__}")
    return value


def _base_id(value: Any) -> str:
    if not isinstance(value, str) or not (value == "" or (len(value) == 64 and all(c in "0123456789abcdef" for c in value))):
        raise ValueError("must be '' or a sha256 hex digest")
    return value


def _history(value: Any) -> list[list[float | int]]:
    """A DP accountant's history: JSON [[noise multiplier, sample rate, steps], ...]."""
    if not isinstance(value, str) or len(value) > MAX_HISTORY_CHARS:
        raise ValueError(f"must be JSON text of at most {MAX_HISTORY_CHARS} characters")
    entries = json.loads(value)
    if not isinstance(entries, list):
        raise ValueError("must be a JSON list")
    out: list[list[float | int]] = []
    for e in entries:
        if not isinstance(e, list) or len(e) != 3:
            raise ValueError("every entry must be [noise multiplier, sample rate, steps]")
        out.append([_real(e[0], 0.0), _real(e[1], 0.0, 1.0), _integer(e[2], 0, MAX_STEPS * 10**4)])
    return out


# field name -> (Reply attribute, checker). `partition-id` and the counts are checked against
# `Expected` in `screen_reply` as well.
_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    P.PARTITION_ID: ("partition", lambda v: _integer(v, 0, MAX_EXAMPLES)),
    P.NUM_EXAMPLES: ("num_examples", lambda v: _integer(v, 1, MAX_EXAMPLES)),
    P.HAS_FROZEN: ("has_frozen", _flag),
    P.LOSS: ("loss", _real),
    P.STEPS: ("steps", lambda v: _integer(v, 0, MAX_STEPS)),
    P.TOKENS: ("tokens", lambda v: _integer(v, 0, MAX_TOKENS)),
    P.SECONDS: ("seconds", lambda v: _real(v, 0.0, MAX_SECONDS)),
    P.EPSILON: ("epsilon", lambda v: _real(v, 0.0)),
    P.NODE_STARTUP_METRIC: ("startup_seconds", lambda v: _real(v, 0.0, MAX_SECONDS)),
    P.NODE_MESSAGE_METRIC: ("message_seconds", lambda v: _real(v, 0.0, MAX_SECONDS)),
    P.BASE_ID: ("base_id", _base_id),
    P.PRIVACY_HISTORY: ("privacy_history", _history),
    P.EVAL_N: ("eval_n", lambda v: _integer(v, 0, MAX_EXAMPLES)),
    P.EVAL_CORRECT: ("eval_correct", lambda v: _integer(v, 0, MAX_EXAMPLES)),
    P.EVAL_LOSS_SUM: ("eval_loss_sum", lambda v: _real(v, 0.0, 1e6 * MAX_TOKENS)),
    P.EVAL_TOKENS: ("eval_tokens", lambda v: _integer(v, 0, MAX_TOKENS)),
}

_ROUND_NUMBERS = (P.PARTITION_ID, P.NUM_EXAMPLES, P.LOSS, P.STEPS, P.TOKENS, P.SECONDS)

# message kind -> (required fields, optional fields)
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    P.SETUP_ACTION: ((P.PARTITION_ID, P.HAS_FROZEN), (P.NUM_EXAMPLES, P.TOKENS)),
    P.TRAIN: (_ROUND_NUMBERS, (P.BASE_ID, P.EPSILON, P.PRIVACY_HISTORY, P.NODE_STARTUP_METRIC, P.NODE_MESSAGE_METRIC)),
    P.SECAGG: (_ROUND_NUMBERS, ()),
    P.EVALUATE: ((P.PARTITION_ID, P.NUM_EXAMPLES, P.LOSS), (P.BASE_ID,)),
    P.PARTY_EVAL: ((P.PARTITION_ID, P.EVAL_N), (P.EVAL_CORRECT, P.EVAL_LOSS_SUM, P.EVAL_TOKENS, P.BASE_ID)),
    P.INIT_ACTION: ((), ()),
}


def screen_reply(kind: str, fields: Mapping[str, Any], expected: Expected) -> Reply:
    """Check every field of one reply of `kind` ("setup", "train", "secagg", "evaluate",
    "party-eval", "init"); return them typed, or raise `ReplyError` naming the first bad field.

    `fields` holds the reply's metric and node record entries and, under "src-node", the node
    the reply came from. Identity: the sender must be the node the message went to, and its
    partition id must be in range and equal the one the server mapped that node to. Counts: a
    positive integer <= `MAX_EXAMPLES`, equal to the count the server fixed (plain, evaluate)
    or, under SecAgg+, to the weight it told the node to apply. Metrics: finite numbers of the
    right type within their bounds; steps at most the partition's steps per round.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown reply kind {kind!r}")
    required, optional = KINDS[kind]
    if expected.node is not None and P.SRC_NODE in fields and fields[P.SRC_NODE] != expected.node:
        raise ReplyError(f"the reply came from node {fields[P.SRC_NODE]!r}, the message went to node {expected.node}")
    values: dict[str, Any] = {}
    for name in required + optional:
        if name not in fields:
            if name in required:
                raise ReplyError(f"{kind} reply: field {name!r} is missing")
            continue
        attr, check = _FIELDS[name]
        try:
            values[attr] = check(fields[name])
        except (ValueError, TypeError, RecursionError, OverflowError) as e:
            raise ReplyError(f"{kind} reply: field {name!r} {str(e)[:200]}") from None
    reply = Reply(**values)
    if reply.partition is not None:
        if not reply.partition < expected.partitions:
            raise ReplyError(f"{kind} reply: partition-id {reply.partition} is outside 0..{expected.partitions - 1}")
        if expected.partition is not None and reply.partition != expected.partition:
            raise ReplyError(f"{kind} reply: partition-id {reply.partition}, but this node holds partition {expected.partition}")
    claim = reply.num_examples
    want = expected.weight if kind == P.SECAGG else expected.num_examples
    if claim is not None and want is not None and claim != want:
        what = "weight" if kind == P.SECAGG else "examples"
        raise ReplyError(f"{kind} reply: claims {claim} {what}, the server fixed {want} for partition {expected.partition}")
    if reply.eval_correct is not None and reply.eval_correct > (reply.eval_n or 0):
        raise ReplyError(f"{kind} reply: eval-correct {reply.eval_correct} is more than eval-n {reply.eval_n}")
    if expected.max_steps is not None and reply.steps > expected.max_steps:
        raise ReplyError(f"{kind} reply: {reply.steps} steps, a round has {expected.max_steps}")
    return reply


# --- example counts and weights --------------------------------------------------------------


def fixed_counts(own: Mapping[int, int] | None, reported: Mapping[int, int] | None = None, *, cap: float = COUNT_CAP) -> dict[int, int]:
    """Each partition's example count, fixed before round 1 (the one rule of both modes).

    - `own`: the counts the server holds itself (simulation mode: the ServerApp builds every
      partition of the shared data set): used as they are; a reported count may only repeat
      them (checked by `screen_reply`).
    - otherwise `reported` (node-data mode: the server holds no client data), the counts the
      nodes sent in their setup replies (already screened: integers 1..MAX_EXAMPLES, so 0, a
      negative count or 10**9 is refused before it gets here), each capped at `cap` x
      their median, so that one node's claim cannot take more than a bounded share of the
      weight however large it is.
    """
    if own is not None:
        return {int(p): int(n) for p, n in own.items()}
    reported = dict(reported or {})
    if not reported:
        return {}
    limit = max(1, math.floor(cap * statistics.median(reported.values())))
    return {int(p): min(int(n), limit) for p, n in reported.items()}


__all__ = ["COUNT_CAP", "Expected", "KINDS", "MAX_EXAMPLES", "Reply", "ReplyError", "fixed_counts", "screen_reply"]
