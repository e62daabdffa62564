"""Wire format: exact analytic sizes, lossless round trips, and every rejection reason."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsb.federated import comm
from fedsb.federated.comm import WIRE_DTYPES, CommLedger, PayloadError, decode, encode, encoded_size

# Any Unicode except lone surrogates (not encodable as UTF-8), including control characters,
# quotes, backslashes and astral-plane code points, which JSON escapes differently.
_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
_names = _text.filter(lambda s: s != "__metadata__")
_shape = st.lists(st.integers(0, 5), max_size=4).map(tuple)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.dictionaries(_names, _shape, max_size=6),
    dtype=st.sampled_from(sorted(WIRE_DTYPES)),
    metadata=st.none() | st.dictionaries(_text, _text, max_size=4),
)
def test_encoded_size_is_exact(shapes, dtype, metadata):
    tensors = {name: torch.ones(shape) for name, shape in shapes.items()}
    assert encoded_size(shapes, dtype, metadata) == len(encode(tensors, dtype, metadata))


def test_layout_order_matches_safetensors_for_mixed_dtypes():
    # Tensors are laid out by dtype then name; the offsets' digit counts depend on that order.
    dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64,
              torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]  # fmt: skip
    tensors = {f"{chr(122 - i)}{i}": torch.zeros(3 + 97 * i, dtype=dt) for i, dt in enumerate(dtypes)}
    entries = [(n, comm._ST_NAME[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    assert comm._layout_size(entries, {"k": "v"}) == len(safetensors.torch.save(tensors, {"k": "v"}))


def test_encode_keeps_integers_and_casts_floats():
    data = encode({"i": torch.arange(3), "f": torch.ones(2, dtype=torch.float64)}, "bf16")
    raw = safetensors.torch.load(data)
    assert raw["i"].dtype == torch.int64 and raw["f"].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_round_trip(dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    tensors = {"m.R": base, "m.view": base[:, :3], "m.T": base.T, "head.b": torch.randn(3, generator=g)}
    out, meta = decode(encode(tensors, dtype, {"round": "3"}), expected={k: v.shape for k, v in tensors.items()})
    assert meta == {"round": "3"}
    for name, t in tensors.items():
        assert out[name].dtype == torch.float32
        assert torch.equal(out[name], t.to(WIRE_DTYPES[dtype]).float())


def test_decode_never_unpickles(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(torch, "load", boom)
    out, _ = decode(encode({"x": torch.ones(2)}))
    assert torch.equal(out["x"], torch.ones(2))


def _good() -> bytes:
    return encode({"a": torch.ones(2, 3), "b": torch.zeros(4)})


def _with_header(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize(
    ("payload", "kwargs", "reason"),
    [
        (_good(), {"max_bytes": 100}, "exceeds the limit of 100 bytes"),
        (b"\x01\x02", {}, "shorter than the 8-byte header length"),
        (struct.pack("<Q", 10**6) + b"{}", {}, "header length 1000000 exceeds"),
        (struct.pack("<Q", 4) + b"{{{{", {}, "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", {}, "not a JSON object"),
        (pickle.dumps({"a": [1.0]}), {}, "unparsable"),
        (_with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), {}, "unparsable"),
        (_good(), {"expected": {"a": (2, 3), "b": (4,), "c": (1,)}}, r"missing tensors: \['c'\]"),
        (_good(), {"expected": {"a": (2, 3)}}, r"unexpected tensors: \['b'\]"),
        (_good(), {"expected": {"a": (3, 2), "b": (4,)}}, r"'a' has shape \(2, 3\), expected \(3, 2\)"),
        (encode({"i": torch.arange(3)}), {}, "'i' has non-float dtype I64"),
        (encode({"x": torch.tensor([1.0, float("nan")])}), {}, "'x' contains NaN or Inf"),
        (encode({"x": torch.tensor([float("-inf")])}, "bf16"), {}, "'x' contains NaN or Inf"),
    ],
    ids=["too-big", "truncated", "header-overrun", "bad-json", "not-object", "pickle", "short-data",
         "missing", "extra", "shape", "int", "nan", "inf"],  # fmt: skip
)
def test_payload_errors(payload, kwargs, reason):
    with pytest.raises(PayloadError, match=reason):
        decode(payload, **kwargs)


def test_payload_error_is_value_error_and_size_limit_inclusive():
    data = _good()
    assert issubclass(PayloadError, ValueError)
    decode(data, max_bytes=len(data))  # exactly at the limit is accepted
    with pytest.raises(PayloadError):
        decode(data, max_bytes=len(data) - 1)


def test_ledger_totals_and_json_round_trip():
    ledger = CommLedger()
    ledger.record_one_time("init_broadcast", 1000)
    ledger.record_up(0, "c0", 10)
    ledger.record_up(0, "c0", 5)
    ledger.record_up(1, 1, 7)
    ledger.record_down(1, "c0", 3)
    assert ledger.rounds == 2
    assert ledger.up == [{"c0": 15}, {"1": 7}] and ledger.down == [{}, {"c0": 3}]
    assert (ledger.total_up, ledger.total_down, ledger.total_one_time, ledger.total) == (22, 3, 1000, 1025)
    assert ledger.round_bytes(1) == 10
    d = json.loads(json.dumps(ledger.to_dict()))
    assert d["totals"]["total"] == 1025
    assert CommLedger.from_dict(d) == ledger
    with pytest.raises(ValueError):
        ledger.record_up(-1, "c0", 1)
