"""The exact size of a safetensors payload, from names and shapes alone (no torch).

`fedsb comm` and the payload limits need only sizes; keeping them out of `fedsb.federated.comm`
(which encodes and decodes real tensors) lets the command line start without torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

# Wire dtype name -> safetensors header name; `fedsb.federated.comm.WIRE_DTYPES` holds the torch dtypes.
WIRE_ST_DTYPES: dict[str, str] = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
_ST_ITEMSIZE: dict[str, int] = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4,
    "BF16": 2, "F16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
# Order in which safetensors 0.8 lays tensors out: by dtype in this order, then by name
# (bytewise, which equals Python's code-point order). Verified in tests/test_comm.py.
_ST_ORDER: tuple[str, ...] = (
    "U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "I8", "U8", "BOOL",
)  # fmt: skip
_HEADER_ALIGN = 8


def _st_dtype(dtype: str) -> str:
    try:
        return WIRE_ST_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown wire dtype {dtype!r}; choose one of {sorted(WIRE_ST_DTYPES)}") from None


def _header_json(entries: list[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None) -> bytes:
    """The JSON header safetensors writes for `entries` (name, st dtype, shape), unpadded."""
    ordered = sorted(entries, key=lambda e: (_ST_ORDER.index(e[1]), e[0]))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, st_dtype, shape in ordered:
        nbytes = math.prod(shape) * _ST_ITEMSIZE[st_dtype]
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    # serde_json's compact output == Python's compact json with raw (non-ASCII) UTF-8
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _layout_size(entries: list[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None) -> int:
    """Exact safetensors blob size: 8-byte length + space-padded header + raw data."""
    n = len(_header_json(entries, metadata))
    n += -n % _HEADER_ALIGN
    data = sum(math.prod(shape) * _ST_ITEMSIZE[dt] for _, dt, shape in entries)
    return 8 + n + data


def encoded_size(
    shapes: Mapping[str, tuple[int, ...]],
    dtype: str = "fp32",
    metadata: Mapping[str, str] | None = None,
) -> int:
    """The exact `len(encode(...))` for float tensors of these shapes, without allocating them."""
    st_dtype = _st_dtype(dtype)
    entries = [(name, st_dtype, tuple(int(d) for d in shape)) for name, shape in shapes.items()]
    return _layout_size(entries, metadata)


def header_limit(shapes: Mapping[str, tuple[int, ...]], dtype: str = "fp32") -> int:
    """A generous bound on the header of an upload of these tensors (4x the honest header plus
    64 kB for metadata): parse time stays proportional to what an honest client sends."""
    st_dtype = _st_dtype(dtype)
    honest = len(_header_json([(n, st_dtype, tuple(int(d) for d in s)) for n, s in shapes.items()], None))
    return 4 * honest + 65_536
