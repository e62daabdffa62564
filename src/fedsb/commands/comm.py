"""`fedsb comm`: the communication table of Fed-SB against federated LoRA baselines.

Prints the paper-style parameter counts next to the exact bytes a run would send, including the
one-time costs (Fed-SB's B/A broadcast, federated-init sketches) that make the comparison fair.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedsb.aggregation.registry import get_strategy
from fedsb.federated.wire_size import WIRE_ST_DTYPES
from fedsb.federated.comm_table import BASELINE_RANK, INITS, METHODS, breakeven_rounds, comm_row, comm_table
from fedsb.federated.shapes import target_shapes


def human_bytes(n: int) -> str:
    """Decimal units (1 MB = 10^6 B), like bandwidth figures."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def human_count(n: int) -> str:
    """Parameter counts as the paper prints them: K below a million, M above."""
    if n >= 10**6:
        return f"{n / 1e6:.2f}M"
    if n >= 10**3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _render(rows: list[dict[str, Any]], rounds: int, console: Console) -> None:
    table = Table(title=f"{rows[0]['model']}: communication ({rows[0]['wire_dtype']} on the wire)")
    for col in ("method", "rank", "clients", "comm params", "up/client/round", "down/client/round",
                "one-time", f"total ({rounds} round{'' if rounds == 1 else 's'})"):  # fmt: skip
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        params = human_count(r["comm_params"])
        if r["comm_params_paper"] != r["comm_params"]:
            params += f" (paper {human_count(r['comm_params_paper'])})"
        table.add_row(
            r["method"], str(r["rank"]), str(r["clients"]), params,
            human_bytes(r["upload_bytes_per_client_round"]), human_bytes(r["download_bytes_per_client_round"]),
            human_bytes(r["one_time_bytes"]), human_bytes(r["total_bytes"]),
        )  # fmt: skip
    console.print(table)


def _breakeven_key(reference: str) -> str:
    return f"breakeven_rounds_vs_{reference}"


def _breakeven_line(row: dict[str, Any], ref: dict[str, Any]) -> str:
    k = row[_breakeven_key(ref["method"])]
    me, other = get_strategy(row["method"]).display_name, get_strategy(ref["method"]).display_name
    head = (
        f"{me} r={row['rank']} (init {row['init']}, one-time {human_bytes(row['one_time_bytes'])}) "
        f"vs {other} r={ref['rank']}: "
    )
    if k is None:
        return head + f"{me}'s total never drops below {other}'s (its per-round traffic is not smaller)."
    return head + f"{me}'s total drops below {other}'s after {k} round{'s' if k != 1 else ''}."


def _breakeven_references(
    rows: list[dict[str, Any]], shape: Any, b_rank: int, clients: int, rounds: int, options: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Each declared break-even reference's row (`Strategy.break_even_reference`): the table's
    own row when the table has it, else one computed at the baselines' rank."""
    refs: dict[str, dict[str, Any]] = {}
    for row in rows:
        ref = get_strategy(row["method"]).break_even_reference
        if ref is not None and ref not in refs:
            have = next((r for r in rows if r["method"] == ref), None)
            refs[ref] = have if have is not None else comm_row(shape, ref, b_rank, clients, rounds, **options)
    return refs


def comm(
    model_shape: Annotated[str, typer.Option("--model-shape", help="Built-in name or path to a config.json.")],
    *,
    method: Annotated[str, typer.Option("--method", help=f"One of {', '.join(METHODS)}, or all.")] = "all",
    rank: Annotated[list[int], typer.Option("--rank", help="Rank (repeat for several); with --method all, Fed-SB's rank.")],
    clients: Annotated[int, typer.Option("--clients", min=1, help="Number of clients N.")],
    rounds: Annotated[int, typer.Option("--rounds", min=0, help="K rounds for the total.")] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON list of rows, nothing else.")] = False,
    wire_dtype: Annotated[str, typer.Option("--wire-dtype", help="fp32, bf16 or fp16.")] = "fp32",
    init: Annotated[str, typer.Option("--init", help="Fed-SB init: central, federated or random.")] = "central",
    oversample: Annotated[int, typer.Option("--oversample", min=0, help="Federated-init sketch oversampling.")] = 10,
    power_iters: Annotated[int, typer.Option("--power-iters", min=0, help="Federated-init power iterations.")] = 0,
    baseline_rank: Annotated[
        int | None, typer.Option("--baseline-rank", min=1, help="Rank of the LoRA baselines (default 32).")
    ] = None,
    target: Annotated[
        list[str] | None, typer.Option("--target", help="Adapted module names (repeat; default per model).")
    ] = None,
) -> None:
    """Communication per method: paper parameter counts and exact bytes on the wire."""
    ranks = [rank] if isinstance(rank, int) else list(rank)
    if not ranks:
        raise typer.BadParameter("give at least one --rank")
    if method != "all" and method not in METHODS:
        raise typer.BadParameter(f"unknown method {method!r}; choose one of {', '.join(METHODS)} or all")
    if wire_dtype not in WIRE_ST_DTYPES:
        raise typer.BadParameter(f"unknown wire dtype {wire_dtype!r}; choose one of {', '.join(WIRE_ST_DTYPES)}")
    if init not in INITS:
        raise typer.BadParameter(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    try:
        shape = target_shapes(model_shape, target or None)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None

    options = dict(wire_dtype=wire_dtype, init=init, oversample=oversample, power_iters=power_iters)
    b_rank = baseline_rank or BASELINE_RANK
    if method == "all":
        rows = comm_table(shape, METHODS, ranks, clients, rounds, baseline_rank=b_rank, **options)
    else:  # a single method: --rank is its rank
        rows = [comm_row(shape, method, r, clients, rounds, **options) for r in ranks]

    refs = _breakeven_references(rows, shape, b_rank, clients, rounds, options)
    pairs = [(row, refs[ref]) for row in rows if (ref := get_strategy(row["method"]).break_even_reference)]
    for row, ref_row in pairs:
        row[_breakeven_key(ref_row["method"])] = breakeven_rounds(row, ref_row)

    if json_out:
        typer.echo(json.dumps(rows))
        return
    console = Console(width=max(Console().width, 140))
    _render(rows, rounds, console)
    for row, ref_row in pairs:
        console.print(_breakeven_line(row, ref_row))
