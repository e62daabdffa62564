"""The federated LoRA-SB init's message plan: which tensors each exchange sends, and its bytes.

Shapes only, no torch: `fedsb comm --init federated` counts this traffic without loading a model
(the protocol itself is `fedsb.init.federated`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fedsb.federated.wire_size import encoded_size

Shapes = dict[str, tuple[int, ...]]


def sketch_width(shape: tuple[int, int], rank: int, oversample: int) -> int:
    """k = min(r + p, d_out, d_in), exactly as `svd.randomized_svd` chooses it."""
    m, n = shape
    if rank < 1 or rank > min(m, n):
        raise ValueError(f"rank {rank} must be in [1, min(d_out, d_in) = {min(m, n)}] for {m}x{n}")
    if oversample < 0:
        raise ValueError(f"oversample must be >= 0, got {oversample}")
    return min(rank + oversample, m, n)


@dataclass(frozen=True)
class Exchange:
    """One protocol round trip: what the server broadcasts, then what each client uploads."""

    name: str
    download: Shapes
    upload: Shapes


def protocol_exchanges(
    layer_shapes: Mapping[str, tuple[int, int]], *, rank: int, oversample: int, power_iters: int
) -> list[Exchange]:
    """The message plan, with tensor names "<layer>.Y|W|Z" (uploads) and "<layer>.Q|P" (downloads).

    The first exchange downloads nothing: Omega comes from the shared seed, not the wire.
    """
    if power_iters < 0:
        raise ValueError(f"power_iters must be >= 0, got {power_iters}")
    widths = {layer: sketch_width(shape, rank, oversample) for layer, shape in layer_shapes.items()}

    def shapes(suffix: str, pick: Callable[[int, int, int], tuple[int, int]]) -> Shapes:
        return {f"{layer}.{suffix}": pick(*layer_shapes[layer], k) for layer, k in widths.items()}

    def col_basis(m: int, n: int, k: int) -> tuple[int, int]:
        return (m, k)

    def row_basis(m: int, n: int, k: int) -> tuple[int, int]:
        return (n, k)

    def projection(m: int, n: int, k: int) -> tuple[int, int]:
        return (k, n)

    plan = [Exchange("sketch", {}, shapes("Y", col_basis))]
    for i in range(power_iters):
        plan.append(Exchange(f"power{i}_left", shapes("Q", col_basis), shapes("W", row_basis)))
        plan.append(Exchange(f"power{i}_right", shapes("P", row_basis), shapes("Y", col_basis)))
    plan.append(Exchange("project", shapes("Q", col_basis), shapes("Z", projection)))
    return plan


def _message_bytes(shapes: Shapes, dtype: str) -> int:
    """Bytes of one safetensors message; an empty message is not sent at all."""
    return encoded_size(shapes, dtype) if shapes else 0


@dataclass(frozen=True)
class CommunicationCost:
    """Per-client traffic of the whole protocol (every client sends and receives the same)."""

    upload_bytes_per_client: int
    download_bytes_per_client: int
    rounds: int


def communication_cost(
    layer_shapes: Mapping[str, tuple[int, int]],
    *,
    rank: int,
    oversample: int = 10,
    power_iters: int = 0,
    dtype: str = "fp32",
) -> CommunicationCost:
    """Bytes each client uploads and downloads, from shapes alone (no tensors needed).

    Upload payload per layer is (d_out + d_in) * k * (1 + power_iters) numbers, against
    d_out * d_in for sending U_i itself.
    """
    plan = protocol_exchanges(layer_shapes, rank=rank, oversample=oversample, power_iters=power_iters)
    return CommunicationCost(
        upload_bytes_per_client=sum(_message_bytes(x.upload, dtype) for x in plan),
        download_bytes_per_client=sum(_message_bytes(x.download, dtype) for x in plan),
        rounds=len(plan),
    )
