"""Screen client uploads before they reach a strategy: one rule set for every engine.

A federation that aggregates whatever arrives can be broken by one client: a NaN poisons the
mean, a wrong shape crashes the round, an oversized payload exhausts memory, a huge update
drags the global R anywhere. `validate_update` turns each of these into a `PayloadError` whose
message names the reason, so the server can log it, drop that client and finish the round.

Checks run cheapest first and never unpickle: size, then the safetensors header (keys, shapes,
dtypes), then the data (finite values), then the norm. The norm is measured on the *update*
(upload minus the global state the client started from) when that state is given, because
R itself is not small and only its change says how far a client moved. No flwr import here:
the in-process engine and the Flower apps share this module.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedsb.federated import comm
from fedsb.federated.comm import PayloadError

__all__ = ["PayloadError", "adamw_bound", "adamw_step_ratio", "validate_update", "update_norm", "check_norm", "expected_upload_bytes", "clip_to_norm"]

_ST_OF_WIRE = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}


def expected_upload_bytes(expected_shapes: Mapping[str, tuple[int, ...]], wire_dtype: str = "fp32") -> int:
    """The exact size of an honest upload: safetensors' layout is deterministic, so any other
    size is malformed and a larger one is refused before parsing."""
    return comm.encoded_size(expected_shapes, wire_dtype)


def update_norm(tensors: Mapping[str, Tensor], base: Mapping[str, Tensor] | None = None) -> float:
    """L2 norm over all tensors of (tensors - base), or of tensors when no base is given."""
    total = 0.0
    for key, value in tensors.items():
        delta = value.double()
        if base is not None and key in base:
            delta = delta - base[key].double()
        total += float(delta.pow(2).sum())
    return math.sqrt(total)


def clip_to_norm(tensors: Mapping[str, Tensor], bound: float, base: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Scale the update (tensors - base) down to L2 norm `bound`; unchanged if already within."""
    norm = update_norm(tensors, base)
    if norm <= bound or norm == 0.0:
        return dict(tensors)
    scale = bound / norm
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        ref = base[key].to(value.dtype) if base is not None and key in base else torch.zeros_like(value)
        out[key] = ref + (value - ref) * scale
    return out


def check_norm(
    norm: float,
    reference_norms: Sequence[float] | None,
    *,
    outlier_factor: float = 20.0,
    floor: float = 1e-8,
) -> None:
    """Reject a norm far above the others: more than `outlier_factor` x their median.

    The median (not the mean) is the reference so that one hostile client cannot raise the bar
    for itself or for a colluder. `floor` keeps a round of near-zero updates from flagging a
    client whose update is merely small but not zero.
    """
    if not math.isfinite(norm):
        raise PayloadError(f"update norm is {norm}")
    if not reference_norms or outlier_factor <= 0:
        return
    median = statistics.median(reference_norms)
    limit = outlier_factor * max(median, floor)
    if norm > limit:
        raise PayloadError(
            f"update norm {norm:.4g} is more than {outlier_factor:g}x the median {median:.4g} of the other clients"
        )


def adamw_step_ratio(betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """The most an AdamW step can move one entry, in units of the learning rate, over any
    gradient history: |m_t| / sqrt(v_t) <= (1 - b1) / sqrt((1 - b2) (1 - b1^2 / b2)) by
    Cauchy-Schwarz on the two moving averages (7.27 for the default betas; bias correction only
    lowers it, and eps only shrinks the step). Honest steps measure 0.5-0.9 (docs/flower.md)."""
    b1, b2 = betas
    return (1 - b1) / math.sqrt((1 - b2) * (1 - b1 * b1 / b2))


_WIRE_REL = {"fp32": 2.0**-23, "bf16": 2.0**-8, "fp16": 2.0**-10}  # rounding of one entry, relative


def adamw_bound(*, lr: float, steps: int, numel: int, start_norm: float, weight_decay: float = 0.0, wire_dtype: str = "fp32", factor: float = 1.0) -> float:
    """The largest L2 norm an honest client's update (upload minus the state it started from)
    can have after `steps` AdamW steps at a peak learning rate `lr`: every entry moves at most
    `adamw_step_ratio()` x lr per step, plus the decoupled weight decay (lr x wd x |theta|) and
    the rounding of the wire dtype. Needs no other reply: the server knows all of it from the
    config and the count it fixed. `factor` scales it (the run-config's `update-bound`)."""
    drift = adamw_step_ratio() * lr * steps * math.sqrt(numel)
    decay = lr * steps * weight_decay * (start_norm + drift) * (1 + lr * weight_decay) ** steps
    moved = drift + decay
    return factor * (moved * 1.001 + _WIRE_REL.get(wire_dtype, 2.0**-8) * (start_norm + moved) + 1e-6 * math.sqrt(numel))


def _check_dtypes(payload: bytes, expected_dtype: str, max_header: int) -> None:
    header, _ = comm._parse_header(payload, max_header)  # noqa: SLF001  (header-only parse, no data touched)
    want = _ST_OF_WIRE.get(expected_dtype, expected_dtype)
    for name, info in header.items():
        if info["dtype"] != want:
            raise PayloadError(f"tensor {name[:80]!r} has dtype {info['dtype']}, expected {want}")


def validate_update(
    payload: bytes,
    expected_shapes: Mapping[str, tuple[int, ...]],
    max_bytes: int | None,
    norm_bound: float | None = None,
    reference_norms: Sequence[float] | None = None,
    *,
    expected_dtype: str | None = None,
    base: Mapping[str, Tensor] | None = None,
    outlier_factor: float = 20.0,
) -> dict[str, Tensor]:
    """Parse and check one client upload; return its fp32 tensors or raise `PayloadError`.

    - `max_bytes`: refuse larger payloads before parsing (`expected_upload_bytes` is exact).
    - `expected_shapes`: exactly these tensor names with these shapes, nothing more or less.
    - `expected_dtype`: the wire dtype ("fp32", "bf16", "fp16"); any other float is refused.
    - NaN or Inf anywhere: refused.
    - `reference_norms`: the update norms of the round's other clients; an update more than
      `outlier_factor` x their median is refused (see `check_norm`).
    - `norm_bound`: an accepted update is clipped (not refused) to this L2 norm, measured
      against `base` (the global state the client started from) when given.

    Any failure, whatever the bytes, is a `PayloadError` with a reason: a server that catches
    `PayloadError` drops the client and finishes the round (tests/test_fuzz_payloads.py).
    """
    try:
        return _validate(payload, expected_shapes, max_bytes, norm_bound, reference_norms, expected_dtype, base, outlier_factor)
    except PayloadError:
        raise
    except Exception as e:  # RecursionError, MemoryError, a parser bug: a rejection, never a crash
        raise PayloadError(f"rejected: {type(e).__name__}: {str(e)[:200]}") from None


def _validate(
    payload: bytes,
    expected_shapes: Mapping[str, tuple[int, ...]],
    max_bytes: int | None,
    norm_bound: float | None,
    reference_norms: Sequence[float] | None,
    expected_dtype: str | None,
    base: Mapping[str, Tensor] | None,
    outlier_factor: float,
) -> dict[str, Tensor]:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if max_bytes is not None and len(payload) > max_bytes:
        raise PayloadError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes} bytes")
    max_header = comm.header_limit(expected_shapes)  # parse time bounded by what an honest client sends
    if expected_dtype is not None:
        _check_dtypes(payload, expected_dtype, max_header)
    tensors, _ = comm.decode(payload, expected=expected_shapes, max_bytes=max_bytes, max_header=max_header)
    norm = update_norm(tensors, base)
    check_norm(norm, reference_norms, outlier_factor=outlier_factor)
    if norm_bound is not None and norm_bound > 0:
        tensors = clip_to_norm(tensors, norm_bound, base)
    return tensors
