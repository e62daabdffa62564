"""Fault injection: nodes that crash, hang, send bad payloads or lie in their fields.

Testing and chaos drills only: the run config's `fault-injection = "PID:KIND[@ROUND],..."`
makes the named partition's node misbehave (`fault_for`), either in its upload
(`faulty_payload`) or in the fields of its reply (`lie`). The server must drop such a reply
with a logged reason, never crash (tests/test_hostile_clients.py, tests/test_validation.py).
"""

from __future__ import annotations

import pickle
from dataclasses import replace

import torch
from torch import Tensor

from fedsb.federated import comm
from fedsb.federated.client import ClientUpdate

FAULT_KINDS = ("crash", "hang", "nan", "inf", "wrong-key", "wrong-shape", "wrong-dtype", "huge-norm", "oversize", "pickle")
# lies in the reply's fields rather than its payload (`lie`)
FIELD_FAULTS = ("claim-examples", "claim-partition", "nan-loss", "nan-steps")
FAULT_KINDS += FIELD_FAULTS


def lie(kind: str, update: ClientUpdate, partition_id: int) -> tuple[ClientUpdate, int]:
    """The update and partition id a node that lies in its reply fields reports (tests and
    drills only): ten times its example count (or weight), partition-id 99, a NaN loss, NaN steps."""
    if kind == "claim-examples":
        return replace(update, num_examples=10 * update.num_examples), partition_id
    if kind == "claim-partition":
        return update, 99
    if kind == "nan-loss":
        return replace(update, loss=float("nan")), partition_id
    if kind == "nan-steps":
        return replace(update, steps=float("nan")), partition_id  # type: ignore[arg-type]  (the lie)
    return update, partition_id


def fault_for(spec: str, partition_id: int, round_index: int) -> str | None:
    """Parse "PID:KIND[@ROUND],..." (ROUND 1-based, any round if omitted) for this node."""
    for item in filter(None, (s.strip() for s in spec.split(","))):
        target, _, rest = item.partition(":")
        kind, _, rnd = rest.partition("@")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; allowed: {', '.join(FAULT_KINDS)}")
        if int(target) == partition_id and (not rnd or int(rnd) == round_index + 1):
            return kind
    return None


def faulty_payload(kind: str, state: dict[str, Tensor], wire_dtype: str) -> bytes:
    """A deliberately bad upload of the given kind, built from the honest state."""
    state = {k: v.clone() for k, v in state.items()}
    first = next(iter(state))
    if kind == "nan":
        state[first].view(-1)[0] = float("nan")
    elif kind == "inf":
        state[first].view(-1)[0] = float("inf")
    elif kind == "wrong-key":
        state["evil." + first] = state.pop(first)
    elif kind == "wrong-shape":
        state[first] = torch.zeros(*state[first].shape, 2, device="cpu")
    elif kind == "wrong-dtype":
        return comm.encode(state, "fp16" if wire_dtype != "fp16" else "bf16")
    elif kind == "huge-norm":
        state = {k: v * 1e6 for k, v in state.items()}
    elif kind == "oversize":
        return comm.encode(state, wire_dtype, metadata={"pad": "x" * 4096})
    elif kind == "pickle":
        return pickle.dumps(state)
    return comm.encode(state, wire_dtype)
