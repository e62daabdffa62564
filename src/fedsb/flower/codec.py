"""Translate between Flower records and fedsb's wire payloads.

A fedsb payload (safetensors bytes, see `fedsb.federated.comm`) rides inside a Flower
`ArrayRecord` as one raw `Array` with `stype="safetensors"`: Flower chunks and hashes it like
any array, and the receiver gets back exactly the bytes the CommLedger counted. Nothing on this
path uses pickle: the payload is parsed by safetensors' header-first reader, and the SecAgg+
path (`state_to_ndarrays`) uses Flower's `.npy` arrays, which are loaded with
`allow_pickle=False`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from torch import Tensor

from fedsb.federated.comm import PayloadError

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
