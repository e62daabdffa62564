"""Translate between Flower records and fedsb's wire payloads and updates.

A fedsb payload (safetensors bytes, see `fedsb.federated.comm`) rides inside a Flower
`ArrayRecord` as one raw `Array` with `stype="safetensors"`: Flower chunks and hashes it like
any array, and the receiver gets back exactly the bytes the CommLedger counted. Nothing on this
path uses pickle: the payload is parsed by safetensors' header-first reader, and the SecAgg+
path (`state_to_ndarrays`) uses Flower's `.npy` arrays, which are loaded with
`allow_pickle=False`.

One codec pair carries a client's round: `encode_update` (node: a `ClientUpdate` into the train
reply's records) and `decode_update` (server: the screened fields and the validated tensors
back into a `ClientUpdate`); `reply_fields` reads a reply's fields into the plain dict
`screening.screen_reply` checks first. Every key is named in `fedsb.flower.protocol`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from torch import Tensor, nn

from fedsb.aggregation.base import Strategy
from fedsb.federated import comm, transport
from fedsb.federated.client import ClientState, ClientUpdate
from fedsb.federated.comm import PayloadError
from fedsb.flower.protocol import (
    BASE_ID,
    EPSILON,
    LOSS,
    METRICS_RECORD,
    NODE_RECORD,
    NUM_EXAMPLES,
    PARTITION_ID,
    PRIVACY_HISTORY,
    SECONDS,
    SRC_NODE,
    STEPS,
    TOKENS,
    UPDATE_RECORD,
)
from fedsb.flower.screening import Reply

PAYLOAD_STYPE = "safetensors"
PAYLOAD_KEY = "payload"


def payload_record(payload: bytes) -> ArrayRecord:
    """Wrap safetensors bytes as a one-array record (no copy into numpy, no re-encoding)."""
    return ArrayRecord({PAYLOAD_KEY: Array(dtype="uint8", shape=(len(payload),), stype=PAYLOAD_STYPE, data=bytes(payload))})


def payload_from_record(record: ArrayRecord | None, max_bytes: int | None = None) -> bytes:
    """The safetensors bytes of a record built by `payload_record`; anything else is refused."""
    if record is None:
        raise PayloadError("the reply carries no payload record")
    if list(record.keys()) != [PAYLOAD_KEY]:
        raise PayloadError(f"payload record must hold exactly {PAYLOAD_KEY!r}, got {sorted(record.keys())}")
    array = record[PAYLOAD_KEY]
    if array.stype != PAYLOAD_STYPE or array.dtype != "uint8":
        raise PayloadError(f"payload array has stype {array.stype!r} and dtype {array.dtype!r}, expected safetensors bytes")
    data = array.data
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    if tuple(array.shape) != (len(data),):
        raise PayloadError(f"payload array declares shape {tuple(array.shape)} for {len(data)} bytes")
    return data


def message_nbytes(message: Message) -> int:
    """Flower's own size of a message: every object it stores and ships (message, records,
    array chunks), headers included. Reported beside the payload, never mixed with it."""
    if message.has_error():
        return len(message.deflate())
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def start_state(strategy: Strategy, model: nn.Module, download: bytes) -> dict[str, Tensor]:
    """What a client starts from, decoded from the round's download exactly as in process."""
    return transport.start_state(strategy, model, download)


# --- a client's round: ClientUpdate <-> records ------------------------------------------------


def update_metrics(update: ClientUpdate) -> dict[str, float]:
    """A round's numbers as the reply's metrics (plain) or FitRes metrics (SecAgg+)."""
    return {
        NUM_EXAMPLES: float(update.num_examples),
        LOSS: float(update.loss),
        STEPS: float(update.steps),
        TOKENS: float(update.tokens),
        SECONDS: float(update.seconds),
    }


def encode_update(update: ClientUpdate, payload: bytes, *, partition_id: int, base_id: str, epsilon: float | None = None) -> RecordDict:
    """The node's train reply: the upload (`payload`, the encoded tensors), its numbers, and
    who sent it from which base; a DP node (`epsilon` given) adds its accountant history."""
    metrics = update_metrics(update)
    node: dict[str, Any] = {PARTITION_ID: partition_id, BASE_ID: base_id}
    if epsilon is not None and update.state.privacy_history is not None:
        metrics[EPSILON] = float(epsilon)
        node[PRIVACY_HISTORY] = json.dumps(update.state.privacy_history)
    return RecordDict({UPDATE_RECORD: payload_record(payload), METRICS_RECORD: MetricRecord(metrics), NODE_RECORD: ConfigRecord(node)})


def reply_fields(content: RecordDict, src_node: int, *records: str) -> dict[str, Any]:
    """A reply's metric and config record entries (the named records) and its sender, as the
    plain dict `screening.screen_reply` reads."""
    out: dict[str, Any] = {}
    for name in records:
        for group in (content.metric_records, content.config_records):
            if name in group:
                out.update(dict(group[name]))
    out[SRC_NODE] = src_node
    return out


def update_payload(content: RecordDict, max_bytes: int | None) -> bytes:
    """The upload of a train reply (its size is counted even if it is refused later)."""
    return payload_from_record(content.array_records.get(UPDATE_RECORD), max_bytes=max_bytes)


def decode_update(info: Reply, tensors: dict[str, Tensor], *, client_id: int, num_examples: int, payload_bytes: int) -> ClientUpdate:
    """A screened reply as the driver's `ClientUpdate`: the example count the server fixed
    (never the client's claim); a DP node's accountant history and epsilon as it reported them."""
    return ClientUpdate(
        client_id=client_id,
        num_examples=num_examples,
        tensors=tensors,
        loss=info.loss,
        steps=info.steps,
        tokens=info.tokens,
        seconds=info.seconds,
        state=ClientState(privacy_history=info.privacy_history),
        payload_bytes=payload_bytes,
        metrics={"epsilon": info.epsilon} if info.epsilon is not None else {},
    )


def secagg_fields(update: ClientUpdate, partition_id: int) -> tuple[int, dict[str, Any]]:
    """A SecAgg+ FitRes's weight (`update.num_examples`: the weight the server fixed, which
    `secaggplus_mod` applies before masking) and its metrics."""
    metrics: dict[str, Any] = update_metrics(update)
    weight = int(metrics.pop(NUM_EXAMPLES))
    return weight, {**metrics, PARTITION_ID: partition_id}


# --- SecAgg+: Flower's secure aggregation works on lists of numpy arrays ---------------------


def state_to_ndarrays(state: Mapping[str, Tensor], names: Sequence[str]) -> list[np.ndarray]:
    """The tensors in `names` order as fp32 numpy arrays (SecAgg+ masks them element-wise)."""
    return [state[name].detach().to("cpu", torch.float32).numpy() for name in names]


def ndarrays_to_state(arrays: Sequence[np.ndarray], names: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Inverse of `state_to_ndarrays`, checking count, shapes and finiteness."""
    if len(arrays) != len(names):
        raise PayloadError(f"expected {len(names)} arrays, got {len(arrays)}")
    out: dict[str, Tensor] = {}
    for name, arr in zip(names, arrays):
        if tuple(arr.shape) != tuple(shapes[name]):
            raise PayloadError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(shapes[name])}")
        if arr.dtype.kind != "f":
            raise PayloadError(f"tensor {name!r} has non-float dtype {arr.dtype}")
        t = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
        if not bool(torch.isfinite(t).all()):
            raise PayloadError(f"tensor {name!r} contains NaN or Inf")
        out[name] = t
    return out
