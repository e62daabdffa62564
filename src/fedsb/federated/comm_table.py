"""Analytic communication of Fed-SB and the federated LoRA baselines.

Two numbers per method:
- `comm_params`: the parameter count the Fed-SB paper's tables use (per client and round for
  Fed-SB/FedIT/FFA-LoRA; summed over clients for FedEx-LoRA and FLoRA).
- bytes: what a real run puts on the wire, computed with `encoded_size` from the very tensor
  names the engine sends (`payload_names`/`payload_shapes`), plus the one-time transfers
  (Fed-SB's B/A broadcast, the federated-init sketches) that the paper leaves out.

Convention: a round's download is the global trainable state the client starts the round from,
so the initial R0 (or A, B of a baseline) travels in the first round's download.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from fedsb.aggregation import Strategy, get_strategy, table_order
from fedsb.aggregation.base import lora_names
from fedsb.federated.wire_size import WIRE_ST_DTYPES, encoded_size
from fedsb.sketch_protocol import communication_cost
from fedsb.federated.shapes import ModelShape

Direction = Literal["up", "down"]
Init = Literal["central", "federated", "random"]
Module = tuple[str, int, int]  # (name, d_out, d_in)

METHODS: tuple[str, ...] = tuple(table_order())  # every registered strategy, in table order
INITS: tuple[str, ...] = ("central", "federated", "random")
BASELINE_RANK = 32


def _strategy(method: str) -> type[Strategy]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    return get_strategy(method)


def payload_names(
    module_name: str,
    method: str,
    d_out: int,
    d_in: int,
    rank: int,
    direction: Direction = "up",
    clients: int = 1,
) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors one module contributes to one message, as the strategy declares them
    (`Strategy.wire_names`: the single source of wire names)."""
    cls = _strategy(method)
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
    return cls.wire_names(module_name, d_out, d_in, rank, direction, clients)


def payload_shapes(
    modules: Sequence[Module],
    method: str,
    rank: int,
    clients: int = 1,
    head_shapes: Mapping[str, tuple[int, ...]] | None = None,
    direction: Direction = "up",
) -> dict[str, tuple[int, ...]]:
    """Name -> shape of one client's upload (or download) in one round; head as "head.<param>"."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, d_out, d_in in modules:
        shapes.update(payload_names(name, method, d_out, d_in, rank, direction, clients))
    for pname, shape in (head_shapes or {}).items():
        shapes[f"head.{pname}"] = tuple(shape)
    return shapes


def init_broadcast_shapes(modules: Sequence[Module], rank: int) -> dict[str, tuple[int, ...]]:
    """LoRA-SB's frozen factors sent once to every client ("<m>.lora_A", "<m>.lora_B")."""
    return {n: shape for name, d_out, d_in in modules for n, shape in lora_names(name, d_out, d_in, rank)}


def one_time_bytes(
    modules: Sequence[Module],
    rank: int,
    clients: int,
    init: str,
    *,
    wire_dtype: str = "fp32",
    oversample: int = 10,
    power_iters: int = 0,
) -> dict[str, int]:
    """The one-time traffic of a data-driven LoRA-SB init over all clients, by label (empty for a seeded random init).

    "federated" adds the sketch protocol of `fedsb.init.federated`: per client and module,
    (d_out + d_in) * k numbers up and d_out * k down (the basis Q), k = min(r + p, d_out, d_in),
    plus (d_out + d_in) * k each way per power iteration.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {list(INITS)}")
    if init == "random":
        return {}
    out = {"init_broadcast": clients * encoded_size(init_broadcast_shapes(modules, rank), wire_dtype)}
    if init == "federated":
        cost = communication_cost(
            {name: (d_out, d_in) for name, d_out, d_in in modules},
            rank=rank, oversample=oversample, power_iters=power_iters, dtype=wire_dtype,
        )  # fmt: skip
        out["init_sketch_up"] = clients * cost.upload_bytes_per_client
        out["init_sketch_down"] = clients * cost.download_bytes_per_client
    return out


def comm_params(shape: ModelShape, method: str, rank: int, clients: int) -> tuple[int, int]:
    """(count, paper count): trainable numbers communicated, as the Fed-SB paper tabulates them
    (`Strategy.comm_params`)."""
    return _strategy(method).comm_params(list(shape.modules), shape.head_params, rank, clients)


def comm_row(
    shape: ModelShape,
    method: str,
    rank: int,
    clients: int,
    rounds: int = 1,
    *,
    wire_dtype: str = "fp32",
    init: str = "central",
    oversample: int = 10,
    power_iters: int = 0,
) -> dict[str, Any]:
    """One table row: paper-style parameter counts and exact wire bytes for `rounds` rounds."""
    if wire_dtype not in WIRE_ST_DTYPES:
        raise ValueError(f"unknown wire dtype {wire_dtype!r}; choose one of {sorted(WIRE_ST_DTYPES)}")
    if rank < 1 or clients < 1 or rounds < 0:
        raise ValueError(f"need rank >= 1, clients >= 1, rounds >= 0; got {rank}, {clients}, {rounds}")
    n, n_paper = comm_params(shape, method, rank, clients)
    up, down = (
        encoded_size(payload_shapes(shape.modules, method, rank, clients, shape.head_shapes, d), wire_dtype)
        for d in ("up", "down")
    )
    data_init = _strategy(method).one_time_init()
    row_init = init if data_init else "random"  # baselines draw A from a shared seed
    once = (
        one_time_bytes(shape.modules, rank, clients, init, wire_dtype=wire_dtype,
                       oversample=oversample, power_iters=power_iters)
        if data_init else {}
    )  # fmt: skip
    one = sum(once.values())
    return {
        "model": shape.name,
        "method": method,
        "rank": rank,
        "clients": clients,
        "rounds": rounds,
        "init": row_init,
        "wire_dtype": wire_dtype,
        "modules": len(shape.modules),
        "head_params": shape.head_params,
        "comm_params": n,
        "comm_params_paper": n_paper,
        "upload_bytes_per_client_round": up,
        "download_bytes_per_client_round": down,
        "one_time_bytes": one,
        "one_time": once,
        "total_bytes": one + rounds * clients * (up + down),
    }


def comm_table(
    shape: ModelShape,
    methods: Sequence[str],
    ranks: Sequence[int],
    clients: int,
    rounds: int = 1,
    *,
    baseline_rank: int = BASELINE_RANK,
    **row_options: Any,
) -> list[dict[str, Any]]:
    """Rows for `methods`: Fed-SB (LoRA-SB adapters) once per rank in `ranks`, each LoRA
    baseline at `baseline_rank`."""
    rows = []
    for method in methods:
        for r in ranks if _strategy(method).adapter_kind == "lorasb" else [baseline_rank]:
            rows.append(comm_row(shape, method, r, clients, rounds, **row_options))
    return rows


def breakeven_rounds(fedsb_row: Mapping[str, Any], fedit_row: Mapping[str, Any]) -> int | None:
    """The fewest rounds K >= 1 after which Fed-SB's total bytes (one-time included) are below
    FedIT's; None if Fed-SB never catches up (its per-round traffic is not smaller)."""
    c = fedsb_row["clients"]
    per_round_fedsb = c * (fedsb_row["upload_bytes_per_client_round"] + fedsb_row["download_bytes_per_client_round"])
    per_round_fedit = fedit_row["clients"] * (
        fedit_row["upload_bytes_per_client_round"] + fedit_row["download_bytes_per_client_round"]
    )
    saving = per_round_fedit - per_round_fedsb
    if saving <= 0:
        return None
    return int(fedsb_row["one_time_bytes"]) // saving + 1
