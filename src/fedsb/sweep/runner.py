"""The sweep's phases, in order; every phase can be interrupted and rerun.

    select: every (method, rank, lr) with the selection seed, scored on validation each round
    choose: the selection rule picks one lr per (method, rank)          (fedsb.sweep.select)
    test:   the chosen settings with every test seed, scored on test each round
    report: docs/frontier.md and docs/frontier.png                      (fedsb.sweep.frontier)

Several processes may run the same sweep: each claims a cell before running it, and a
process waits for cells that others still run before it chooses or reports.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsb.adapter.export import atomic_write_json
from fedsb.sweep.cells import RUN, cell_dir, is_claimed, is_done, read_summary, run_cell
from fedsb.sweep.frontier import write_report
from fedsb.sweep.select import choose_lrs
from fedsb.sweep.spec import Cell, Sweep

Log = Callable[[str], None]


def _base_path(sweep: Sweep, cell: Cell) -> Path:
    return sweep.out / "base" / f"{cell.phase}-s{cell.seed}.json"


def run_phase(sweep: Sweep, cells: list[Cell], log: Log, poll_s: float = 10.0, wait: bool = True) -> list[dict[str, Any]]:
    """Run every cell not finished and not held by another live process; then (wait=True) wait
    for the ones others hold. Returns the finished summaries in cell order."""
    while True:
        for cell in cells:
            if is_done(sweep, cell):
                continue
            base_file = _base_path(sweep, cell)  # the untrained model's score, shared by the phase's cells
            base = json.loads(base_file.read_text()) if base_file.exists() else None
            log(f"[sweep] {cell.id} ...")
            out = run_cell(sweep, cell, base_eval=base)
            if out is None:
                log(f"[sweep] {cell.id}: held by another process")
                continue
            log(f"[sweep] {cell.id}: accuracy {out['final'].get('accuracy')} cpu {out['cpu_s']:.0f} s")
            if base is None:
                run_summary = cell_dir(sweep, cell) / RUN / "summary.json"
                if run_summary.exists():
                    atomic_write_json(base_file, json.loads(run_summary.read_text())["eval_before"])
        pending = [c for c in cells if not is_done(sweep, c)]
        if not pending or not wait:
            break
        if not any(is_claimed(cell_dir(sweep, c)) for c in pending):
            continue  # a holder died: take its cells over
        time.sleep(poll_s)
    return [s for c in cells if (s := read_summary(sweep, c)) is not None]


def run_sweep(sweep: Sweep, *, phases: tuple[str, ...] = ("select", "test", "report"), log: Log = print, wait: bool = True) -> dict[str, Any]:
    """Run the chosen phases; returns {"selection": [...], "chosen": {...}, "test": [...]}."""
    result: dict[str, Any] = {}
    selection_cells = sweep.selection_cells()
    if "select" in phases:
        run_phase(sweep, selection_cells, log, wait=wait)
    selection = [s for c in selection_cells if (s := read_summary(sweep, c)) is not None]
    chosen = choose_lrs(selection) if len(selection) == len(selection_cells) else {}
    result.update(selection=selection, chosen=chosen)
    if chosen:
        atomic_write_json(sweep.out / "chosen.json", [{"method": m, "rank": r, "lr": lr} for (m, r), lr in sorted(chosen.items())])
    test_cells = sweep.test_cells(chosen)
    if "test" in phases and chosen:
        run_phase(sweep, test_cells, log, wait=wait)
    result["test"] = [s for c in test_cells if (s := read_summary(sweep, c)) is not None]
    if "report" in phases:
        paths = write_report(sweep, result["selection"], chosen, result["test"])
        log(f"[sweep] wrote {', '.join(str(p) for p in paths)}")
    return result
