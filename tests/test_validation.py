"""Update screening (`fedsb.federated.validation`): every kind of bad upload is refused with
its reason, honest ones pass untouched, the norm bound clips; the Flower record codec refuses
anything but safetensors bytes."""

import pickle

import pytest
import torch

from fedsb.federated import comm
from fedsb.federated.validation import (
    PayloadError,
    check_norm,
    clip_to_norm,
    expected_upload_bytes,
    update_norm,
    validate_update,
)
from fedsb.flower.faults import fault_for, faulty_payload
from fedsb.flower.node_cache import NodeCache
from fedsb.flower.settings import RunSettings

SHAPES = {"layers.0.q.R": (4, 4), "layers.0.v.R": (4, 4)}


def honest(seed: int = 0, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) * scale for k, s in SHAPES.items()}


BASE = {k: torch.zeros(s) for k, s in SHAPES.items()}
MAX = expected_upload_bytes(SHAPES, "fp32")


def check(payload: bytes, **kw):
    return validate_update(payload, SHAPES, MAX, expected_dtype="fp32", base=BASE, **kw)


def test_honest_update_passes_bit_exact():
    state = honest()
    payload = comm.encode(state)
    assert len(payload) == MAX  # the exact-size rule does not refuse honest clients
    out = check(payload, reference_norms=[update_norm(honest(1))])
    assert all(torch.equal(out[k], state[k]) for k in state)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("nan", "NaN or Inf"),
        ("inf", "NaN or Inf"),
        ("wrong-key", "tensors"),
        ("wrong-shape", "exceeds the limit"),  # a bigger tensor is caught by size, before parsing
        ("wrong-dtype", "dtype F16, expected F32"),
        ("oversize", "exceeds the limit"),
        ("pickle", "exceeds the limit|unparsable payload"),
    ],
)
def test_each_malformed_kind_is_refused_with_its_reason(kind, reason):
    payload = faulty_payload(kind, honest(), "fp32")
    with pytest.raises(PayloadError, match=reason):
        check(payload)


def test_pickle_is_never_loaded(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (marker.write_text, ("x",))

    with pytest.raises(PayloadError):
        check(pickle.dumps(Evil()))
    assert not marker.exists()


def test_wrong_shape_of_same_size_is_refused_by_shape():
    state = honest()
    state["layers.0.q.R"] = state["layers.0.q.R"].reshape(2, 8)
    with pytest.raises(PayloadError, match=r"shape \(2, 8\), expected \(4, 4\)"):
        check(comm.encode(state))


def test_missing_tensor_is_refused():
    state = honest()
    del state["layers.0.v.R"]
    with pytest.raises(PayloadError, match="missing tensors"):
        check(comm.encode(state))


def test_norm_far_above_the_others_is_refused():
    others = [update_norm(honest(s), BASE) for s in (1, 2, 3)]
    payload = faulty_payload("huge-norm", honest(), "fp32")
    with pytest.raises(PayloadError, match="median"):
        check(payload, reference_norms=others)
    # the same update alone in its round has nothing to be compared with: it passes
    check(payload, reference_norms=[])


def test_outlier_rule_uses_the_median_so_one_client_cannot_lift_the_bar():
    check_norm(1.0, [1.0, 1.2, 1e9])  # an honest client next to a hostile one
    with pytest.raises(PayloadError):
        check_norm(1e9, [1.0, 1.2, 1e9 * 0.99])  # a colluder does not move the median of three


def test_norm_bound_clips_the_update_not_the_state():
    base = {k: torch.ones(s) for k, s in SHAPES.items()}
    state = {k: v + d for (k, v), d in zip(base.items(), honest(scale=1.0).values())}
    out = validate_update(comm.encode(state), SHAPES, MAX, norm_bound=0.5, base=base)
    assert update_norm(out, base) == pytest.approx(0.5, rel=1e-5)
    small = clip_to_norm(base, 0.5, base)  # a zero update stays zero
    assert all(torch.equal(small[k], base[k]) for k in base)


def test_payload_record_round_trip_and_refusals():
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedsb.flower import codec

    payload = comm.encode(honest())
    assert codec.payload_from_record(codec.payload_record(payload)) == payload
    with pytest.raises(PayloadError, match="exceeds"):
        codec.payload_from_record(codec.payload_record(payload), max_bytes=len(payload) - 1)
    with pytest.raises(PayloadError, match="stype"):
        codec.payload_from_record(ArrayRecord({"payload": Array(np.zeros(3, dtype=np.uint8))}))
    with pytest.raises(PayloadError, match="exactly"):
        codec.payload_from_record(ArrayRecord({"other": Array(np.zeros(3, dtype=np.float32))}))
    with pytest.raises(PayloadError, match="no payload"):
        codec.payload_from_record(None)


def test_ndarrays_codec_refuses_bad_arrays():
    import numpy as np

    from fedsb.flower import codec

    names = sorted(SHAPES)
    arrays = codec.state_to_ndarrays(honest(), names)
    back = codec.ndarrays_to_state(arrays, names, SHAPES)
    assert all(torch.equal(back[k], honest()[k]) for k in names)
    bad = [a.copy() for a in arrays]
    bad[0][0, 0] = np.nan
    with pytest.raises(PayloadError, match="NaN"):
        codec.ndarrays_to_state(bad, names, SHAPES)
    with pytest.raises(PayloadError, match="shape"):
        codec.ndarrays_to_state([arrays[0].reshape(2, 8), arrays[1]], names, SHAPES)
    with pytest.raises(PayloadError, match="expected 2 arrays"):
        codec.ndarrays_to_state(arrays[:1], names, SHAPES)


def test_fault_spec_parsing():
    assert fault_for("1:nan@2, 0:crash", 1, 1) == "nan"
    assert fault_for("1:nan@2", 1, 0) is None
    assert fault_for("1:nan@2, 0:crash", 0, 5) == "crash"
    with pytest.raises(ValueError, match="unknown fault"):
        fault_for("0:explode", 0, 0)


def test_node_cache_verifies_content(tmp_path):
    cache = NodeCache(tmp_path)
    digest = cache.put("frozen", b"abc")
    assert cache.get("frozen", digest) == b"abc"
    (tmp_path / f"frozen-{digest}").write_bytes(b"tampered")
    assert cache.get("frozen", digest) is None  # detected and dropped
    assert not (tmp_path / f"frozen-{digest}").exists()
    with pytest.raises(ValueError):
        cache.get("frozen", "../../etc/passwd")


def test_run_settings_from_run_config():
    s = RunSettings.from_run_config({"round-timeout": 5, "min-replies": 2, "secagg": "true", "other-app-key": 1})
    assert s.round_timeout == 5.0 and s.min_replies == 2 and s.secagg is True
