"""Issue 27: the paper's claims in the paper's own regime (one round of many local steps).

    python -m fedsb.sweep.paper_regime configs/paper-regime-steps.toml              # run, resumable
    python -m fedsb.sweep.paper_regime configs/paper-regime-steps.toml --report-only  # the report
    python -m fedsb.sweep.paper_regime configs/paper-regime-snli.toml               # experiment 3 (SNLI)

A sweep file (`fedsb.sweep.spec`) whose every method has exactly one learning rate: the rates
were chosen on validation elsewhere (docs/frontier.md), so there is no selection phase here and
each (method, rank) runs directly as test cells, seed-major, through the sweep's own resumable
cell machinery (claims, per-round checkpoints, `cell.json`). Beside each `cell.json` this writes
`paper.json`: the local-step count, the number of clients and the exactness meter's mean and max
error, read from the run's metrics.jsonl (the cell summary keeps only the max). The report
(`fedsb.sweep.paper_regime_report`) is rebuilt after every cell in a subprocess, so an edit of
the report code takes effect without restarting a long run.

Three optional keys of the sweep file, read here only (`fedsb.sweep.spec` ignores them):
`report` (the report's path, default docs/paper-regime.md; the rebuild after each cell writes
there too), `kind` ("steps": the arithmetic report; "privacy": the SNLI privacy report) and
`holdout` (default true: the sweep's validation/test holdout wrapper around the task; false: the
experiment's own task as it is, for a task such as SNLI whose held-out eval part is built in:
the cells then train on exactly what `fedsb privacy-table` trains on and score its eval part).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from fedsb.adapter.export import atomic_write_json
from fedsb.commands.workers import exit_on_sigterm
from fedsb.config import ConfigError, ExperimentConfig
from fedsb.sweep.cells import RUN, cell_dir, is_done
from fedsb.sweep.paper_regime_cells import EXTRA, cells_of, load_paper_sweep
from fedsb.sweep.paper_regime_report import write_privacy_report, write_report
from fedsb.sweep.runner import run_phase
from fedsb.sweep.spec import Cell, Sweep

def write_extra(sweep: Sweep, cell: Cell) -> dict[str, Any] | None:
    """paper.json beside the finished cell's cell.json, from its run's metrics (None if no run)."""
    metrics = cell_dir(sweep, cell) / RUN / "metrics.jsonl"
    if not metrics.exists():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    config = sweep.cell_config(cell)
    errs_max = [r["exactness_max"] for r in rows if r.get("exactness_max") is not None]
    errs_mean = [r["exactness_mean"] for r in rows if r.get("exactness_mean") is not None]
    extra = {
        "id": cell.id,
        "local_steps": config.train.local_steps,
        "num_clients": config.federation.num_clients,
        "batch_size": config.train.batch_size,
        "partition": config.federation.partition,
        "train_limit": config.task.train_limit,
        "exactness_max": max(errs_max) if errs_max else None,
        "exactness_mean": sum(errs_mean) / len(errs_mean) if errs_mean else None,
        "steps_per_round": [r.get("steps") for r in rows],
        "train_loss_per_round": [r.get("train_loss") for r in rows],
        "local_epochs": config.train.local_epochs,
        "rounds": config.federation.rounds,
        "privacy": _privacy_record(config, cell_dir(sweep, cell) / RUN / "summary.json"),
    }
    atomic_write_json(cell_dir(sweep, cell) / EXTRA, extra)
    return extra


def _privacy_record(config: ExperimentConfig, summary_path: Path) -> dict[str, Any] | None:
    """Sample-level DP as run: the target, the accountant's epsilon and each client's noise."""
    if not config.privacy.enabled:
        return None
    out: dict[str, Any] = {"target_epsilon": config.privacy.target_epsilon, "max_grad_norm": config.privacy.max_grad_norm}
    if summary_path.exists():
        priv = json.loads(summary_path.read_text()).get("privacy") or {}
        clients = priv.get("clients") or {}
        out["epsilon"] = priv.get("epsilon")
        out["delta"] = max((c.get("delta", 0.0) for c in clients.values()), default=None)
        out["noise_multiplier"] = [c.get("noise_multiplier") for _, c in sorted(clients.items())]
        out["sample_rate"] = [c.get("sample_rate") for _, c in sorted(clients.items())]
        out["planned_steps"] = [c.get("planned_steps") for _, c in sorted(clients.items())]
    return out


def regenerate_report(spec: Path) -> None:
    """Rebuild the report in a fresh interpreter (the newest report code); a failure is logged only."""
    done = subprocess.run([sys.executable, "-m", "fedsb.sweep.paper_regime", str(spec), "--report-only"], check=False)
    if done.returncode:
        print(f"[paper-regime] report failed (exit {done.returncode}); the cells are unaffected", file=sys.stderr, flush=True)


def run(spec: Path, *, threads: int = 1, report: bool = True) -> None:
    """Run every cell not finished, in order; paper.json and the report after each one."""
    sweep = load_paper_sweep(spec)
    exit_on_sigterm()
    torch.set_num_threads(threads)
    for cell in cells_of(sweep):
        if is_done(sweep, cell):
            if not (cell_dir(sweep, cell) / EXTRA).exists():
                write_extra(sweep, cell)
            continue
        run_phase(sweep, [cell], log=lambda m: print(m, file=sys.stderr, flush=True), wait=False)
        if is_done(sweep, cell):
            write_extra(sweep, cell)
            if report:
                regenerate_report(spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedsb.sweep.paper_regime", description=__doc__.splitlines()[0])
    p.add_argument("spec", type=Path, help="sweep TOML with one learning rate per method")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the finished cells; run nothing")
    p.add_argument("--out", type=Path, default=None, help="the report's path (default: the sweep file's `report`, else docs/paper-regime.md)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-report", action="store_true", help="do not rebuild the report after each cell")
    a = p.parse_args(argv)
    try:
        if a.report_only:
            sweep = load_paper_sweep(a.spec)
            write = write_privacy_report if sweep.kind == "privacy" else write_report
            path = write(sweep, a.out or sweep.report)
            print(f"[paper-regime] wrote {path}", file=sys.stderr)
        else:
            run(a.spec, threads=a.threads, report=not a.no_report)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
