"""Bytes on the wire: every client/server message is a safetensors blob.

safetensors is used (not pickle) because a server must be able to parse untrusted client
payloads safely; `decode` validates a payload completely before anything touches the model.
`encoded_size` reproduces the safetensors layout analytically so that the communication table
(`fedsb.federated.comm_table`) reports the exact bytes a real run sends, without allocating
multi-gigabyte tensors; it lives in `fedsb.federated.wire_size`, which needs no torch.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from fedsb.errors import FedsbError
from fedsb.federated.wire_size import _ST_ITEMSIZE, _layout_size, encoded_size, header_limit  # noqa: F401  (this module's API)

WIRE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}  # the names and sizes without torch: fedsb.federated.wire_size.WIRE_ST_DTYPES

# safetensors' header names and element sizes of the torch dtypes we may put on the wire.
_ST_NAME: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FLOAT_ST = frozenset({"F64", "F32", "BF16", "F16"})
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
# A safetensors header is {name: {"dtype", "shape": [...], "data_offsets": [...]}}: depth 3.
# Anything much deeper is hostile (5,000 nested '[' overflow json's recursion).
_MAX_DEPTH = 8
_MAX_INT_DIGITS = 20  # a dimension or an offset fits in 64 bits; a 10^6-digit "number" does not
_MAX_NAME = 1024  # characters in one tensor name
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # unrolled: linear, no per-char alternation
_BRACKET = re.compile(r"[\[\]{}]")


class PayloadError(FedsbError, ValueError):
    """A received payload is rejected; the message says precisely why."""


def _short(items: list[str], keep: int = 5) -> str:
    """A list for an error message: a hostile payload may name 100,000 tensors."""
    head = ", ".join(repr(x[:80]) for x in items[:keep])
    return f"[{head}{f', ... ({len(items) - keep} more)' if len(items) > keep else ''}]"


def _wire_dtype(dtype: str) -> torch.dtype:
    try:
        return WIRE_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown wire dtype {dtype!r}; choose one of {sorted(WIRE_DTYPES)}") from None


def encode(
    tensors: Mapping[str, Tensor],
    dtype: str = "fp32",
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Serialize `tensors` as safetensors bytes, floats cast to the wire dtype, ints as they are.

    An empty metadata mapping is sent as no metadata (safetensors 0.8 writes invalid JSON for
    empty metadata with no tensors, and the two are equivalent for `decode`).
    """
    wire = _wire_dtype(dtype)
    prepared: dict[str, Tensor] = {}
    seen_storage: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}")
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(wire)
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen_storage:  # safetensors refuses tensors sharing storage
            t = t.clone()
        elif t.numel():
            seen_storage.add(ptr)
        prepared[name] = t
    md = dict(metadata) if metadata else None
    return safetensors.torch.save(prepared, metadata=md)


def _json_depth_exceeds(text: str, limit: int) -> bool:
    """True if arrays/objects nest deeper than `limit` (strings skipped); stops at the limit."""
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        if m.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise PayloadError(f"unparsable payload: duplicate key {key[:80]!r} in the header")
        out[key] = value
    return out


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise PayloadError(f"unparsable payload: a {len(text)}-digit number in the header")
    return int(text)


def _no_constant(name: str) -> Any:
    raise PayloadError(f"unparsable payload: {name} in the header")


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**62


def _check_entry(name: Any, info: Any, data_len: int) -> None:
    """One tensor's header entry: exactly what safetensors writes, with sane numbers."""
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
        raise PayloadError(f"unparsable payload: bad tensor name {str(name)[:80]!r}")
    try:
        name.encode("utf-8")  # lone surrogates ("\ud800") parse as JSON but are no UTF-8 name
    except UnicodeEncodeError:
        raise PayloadError(f"unparsable payload: tensor name {name[:80]!r} is not valid Unicode") from None
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise PayloadError(f"unparsable payload: bad header entry for tensor {name[:80]!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_ITEMSIZE:
        raise PayloadError(f"unparsable payload: tensor {name[:80]!r} has unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_count(d) for d in shape):
        raise PayloadError(f"unparsable payload: tensor {name[:80]!r} has a bad shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise PayloadError(f"unparsable payload: tensor {name[:80]!r} has bad data_offsets")
    nbytes = math.prod(shape) * _ST_ITEMSIZE[dtype]
    begin, end = offsets
    if end - begin != nbytes or end > data_len:
        raise PayloadError(
            f"unparsable payload: tensor {name[:80]!r} declares {nbytes} bytes at offsets [{begin}, {end}] "
            f"of a {data_len}-byte data section"
        )


def _parse_header(data: bytes, max_header: int = _MAX_HEADER) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse and sanity-check the header without touching tensor data.

    Bounded in time and memory whatever the bytes: the length is checked before anything is
    read, nesting depth before `json.loads`, numbers and names as they are parsed. Every failure
    is a `PayloadError` naming the reason.
    """
    try:
        return _parse_header_unchecked(data, max_header)
    except PayloadError:
        raise
    except Exception as e:  # RecursionError, MemoryError, ValueError...: a rejection, never a crash
        raise PayloadError(f"unparsable payload: {type(e).__name__}: {str(e)[:200]}") from None


def _parse_header_unchecked(data: bytes, max_header: int) -> tuple[dict[str, Any], dict[str, str]]:
    if len(data) < 8:
        raise PayloadError(f"unparsable payload: {len(data)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise PayloadError(f"unparsable payload: header length {n} exceeds the {len(data) - 8} bytes that follow")
    if n > max_header:
        raise PayloadError(f"unparsable payload: header length {n} exceeds the limit of {max_header} bytes")
    try:
        text = bytes(data[8 : 8 + n]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise PayloadError(f"unparsable payload: header is not UTF-8 ({e.reason} at byte {e.start})") from None
    if _json_depth_exceeds(text, _MAX_DEPTH):
        raise PayloadError(f"unparsable payload: header nests deeper than {_MAX_DEPTH} levels")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_int=_bounded_int, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise PayloadError(f"unparsable payload: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise PayloadError("unparsable payload: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise PayloadError("unparsable payload: __metadata__ must map strings to strings")
    data_len = len(data) - 8 - n
    for name, info in header.items():
        _check_entry(name, info, data_len)
    return header, metadata


def decode(
    data: bytes,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    max_bytes: int | None = None,
    max_header: int | None = None,
    *,
    keys: Collection[str] | None = None,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Validate and parse a payload; return fp32 tensors and the metadata.

    Checks run cheapest first (size, header, keys, shapes, dtypes) so that an oversized or
    malformed upload is rejected before its tensor data is materialized. Never unpickles, and
    never raises anything but `PayloadError` on bad bytes.

    `keys`: materialize only the payload's tensors named there (names absent from the payload
    are ignored), e.g. a client that needs the trainable part of a FedEx download and not its
    residuals. The header and the data layout are validated as a whole as without `keys`; the
    finiteness check covers the returned tensors only. The values are equal to the full decode's.
    """
    try:
        if keys is not None:
            return _decode_some(data, keys, expected, max_bytes, max_header or _MAX_HEADER)
        return _decode_unchecked(data, expected, max_bytes, max_header or _MAX_HEADER)
    except PayloadError:
        raise
    except Exception as e:  # a parser bug or exhaustion is still only a rejected payload
        raise PayloadError(f"unparsable payload: {type(e).__name__}: {str(e)[:200]}") from None


def _check_header(
    data: bytes, expected: Mapping[str, tuple[int, ...]] | None, max_bytes: int | None, max_header: int
) -> tuple[dict[str, Any], dict[str, str]]:
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    header, metadata = _parse_header(data, max_header)
    if expected is not None:
        missing = sorted(set(expected) - set(header))
        extra = sorted(set(header) - set(expected))
        if missing:
            raise PayloadError(f"missing tensors: {_short(missing)}")
        if extra:
            raise PayloadError(f"unexpected tensors: {_short(extra)}")
        for name, shape in expected.items():
            got = tuple(header[name]["shape"])
            if got != tuple(shape):
                raise PayloadError(f"tensor {name!r} has shape {got}, expected {tuple(shape)}")
    for name, info in header.items():
        if info["dtype"] not in _FLOAT_ST:
            raise PayloadError(f"tensor {name[:80]!r} has non-float dtype {info['dtype']}")
    return header, metadata


def _decode_unchecked(
    data: bytes, expected: Mapping[str, tuple[int, ...]] | None, max_bytes: int | None, max_header: int
) -> tuple[dict[str, Tensor], dict[str, str]]:
    header, metadata = _check_header(data, expected, max_bytes, max_header)
    try:
        raw = safetensors.torch.load(bytes(data))
    except Exception as e:  # the Rust parser's errors: offsets, lengths, overlaps
        raise PayloadError(f"unparsable payload: {e}") from None
    out: dict[str, Tensor] = {}
    for name, t in raw.items():
        t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise PayloadError(f"tensor {name!r} contains NaN or Inf")
        out[name] = t
    return out, dict(metadata)


_TORCH_DTYPE = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _decode_some(
    data: bytes, keys: Collection[str], expected: Mapping[str, tuple[int, ...]] | None, max_bytes: int | None, max_header: int
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """`decode` of the tensors named in `keys` only: the others' bytes are never copied."""
    if sys.byteorder != "little":  # safetensors is little-endian; let it byte-swap everything
        full, metadata = _decode_unchecked(data, expected, max_bytes, max_header)
        return {k: v for k, v in full.items() if k in keys}, metadata
    header, metadata = _check_header(data, expected, max_bytes, max_header)
    # The layout rule safetensors' own parser enforces: the tensors tile the data section
    # exactly, in offset order, with no gap and no overlap.
    (n,) = struct.unpack("<Q", data[:8])
    start, data_len, end = 8 + n, len(data) - 8 - n, 0
    in_order = sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"]))  # layout order
    for name, info in in_order:
        begin, stop = info["data_offsets"]
        if begin != end:
            raise PayloadError(f"unparsable payload: tensor {name[:80]!r} starts at offset {begin}, expected {end}")
        end = stop
    if end != data_len:
        raise PayloadError(f"unparsable payload: the tensors cover {end} of the {data_len}-byte data section")
    out: dict[str, Tensor] = {}
    view = memoryview(data)
    for name, info in in_order:
        if name not in keys:
            continue
        begin, stop = info["data_offsets"]
        dtype, shape = _TORCH_DTYPE[info["dtype"]], info["shape"]
        if stop == begin:
            t = torch.empty(shape, dtype=dtype, device="cpu")
        else:  # a writable copy of this tensor's bytes only
            t = torch.frombuffer(bytearray(view[start + begin : start + stop]), dtype=dtype).reshape(shape)
        t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise PayloadError(f"tensor {name!r} contains NaN or Inf")
        out[name] = t
    return out, dict(metadata)


@dataclass
class CommLedger:
    """What actually crossed the wire, per round and per client, plus one-time transfers."""

    up: list[dict[str, int]] = field(default_factory=list)  # round -> client -> bytes
    down: list[dict[str, int]] = field(default_factory=list)
    one_time: dict[str, int] = field(default_factory=dict)  # label -> bytes

    def _round(self, rnd: int) -> None:
        if rnd < 0:
            raise ValueError(f"round must be >= 0, got {rnd}")
        while len(self.up) <= rnd:
            self.up.append({})
            self.down.append({})

    def record_up(self, rnd: int, client: str | int, nbytes: int) -> None:
        """Add `nbytes` uploaded by `client` in round `rnd` (accumulates)."""
        self._round(rnd)
        self.up[rnd][str(client)] = self.up[rnd].get(str(client), 0) + int(nbytes)

    def record_down(self, rnd: int, client: str | int, nbytes: int) -> None:
        """Add `nbytes` downloaded by `client` in round `rnd` (accumulates)."""
        self._round(rnd)
        self.down[rnd][str(client)] = self.down[rnd].get(str(client), 0) + int(nbytes)

    def record_one_time(self, label: str, nbytes: int) -> None:
        """Add bytes of a transfer outside the round loop (e.g. "init_broadcast")."""
        self.one_time[label] = self.one_time.get(label, 0) + int(nbytes)

    @property
    def rounds(self) -> int:
        return len(self.up)

    def round_bytes(self, rnd: int) -> int:
        return sum(self.up[rnd].values()) + sum(self.down[rnd].values())

    @property
    def total_up(self) -> int:
        return sum(sum(r.values()) for r in self.up)

    @property
    def total_down(self) -> int:
        return sum(sum(r.values()) for r in self.down)

    @property
    def total_one_time(self) -> int:
        return sum(self.one_time.values())

    @property
    def total(self) -> int:
        return self.total_up + self.total_down + self.total_one_time

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the raw records plus totals (totals are ignored by `from_dict`)."""
        return {
            "up": [dict(r) for r in self.up],
            "down": [dict(r) for r in self.down],
            "one_time": dict(self.one_time),
            "totals": {
                "up": self.total_up,
                "down": self.total_down,
                "one_time": self.total_one_time,
                "total": self.total,
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CommLedger:
        up = [{str(k): int(v) for k, v in r.items()} for r in d.get("up", [])]
        down = [{str(k): int(v) for k, v in r.items()} for r in d.get("down", [])]
        if len(up) != len(down):
            raise ValueError(f"ledger has {len(up)} upload rounds but {len(down)} download rounds")
        return cls(up=up, down=down, one_time={str(k): int(v) for k, v in d.get("one_time", {}).items()})
