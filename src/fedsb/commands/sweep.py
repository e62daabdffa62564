"""`fedsb sweep SWEEP.toml`: the accuracy-vs-communication frontier (see `fedsb.sweep`).

Resumable: rerun the same command after an interruption; finished cells are never run again.
`--workers N` starts N processes that share the cells (each claims a cell before running it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedsb.commands.workers import exit_on_sigterm, run_workers
from fedsb.config import ConfigError
from fedsb.sweep import load_sweep

PHASE_NAMES = ("select", "test", "report")


def sweep(
    spec: Annotated[Path, typer.Argument(help="sweep TOML (grid, experiment, seeds)")],
    out: Annotated[Optional[Path], typer.Option(help="cell folders (default: the file's `out`)")] = None,
    docs: Annotated[Optional[Path], typer.Option(help="where frontier.md / frontier.png go (default: the file's `docs`)")] = None,
    phase: Annotated[Optional[list[str]], typer.Option(help="run only these phases (repeatable): select, test, report")] = None,
    workers: Annotated[int, typer.Option(min=1, help="processes sharing the cells")] = 1,
    threads: Annotated[int, typer.Option(min=1, help="torch threads per process")] = 1,
) -> None:
    """Run the grid (strategy x rank x lr x seed), select lrs on validation, score on test, report."""
    from fedsb.sweep.runner import run_sweep  # imports torch (fedsb.sweep.runner): the CLI stays torch-free

    phases = tuple(phase or PHASE_NAMES)
    bad = [p for p in phases if p not in PHASE_NAMES]
    if bad:
        raise typer.BadParameter(f"unknown phase(s) {bad}; allowed: {', '.join(PHASE_NAMES)}", param_hint="--phase")
    overrides = {k: str(v) for k, v in (("out", out), ("docs", docs)) if v is not None}
    try:
        spec_obj = load_sweep(spec, overrides)
    except ConfigError as e:
        typer.echo(f"sweep config error: {e}", err=True)
        raise typer.Exit(2) from None

    if workers > 1:
        args = ["sweep", str(spec), "--threads", str(threads)]
        args += [a for k, v in overrides.items() for a in (f"--{k}", v)]
        args += [a for p in phases for a in ("--phase", p)]
        if code := run_workers(args, workers):
            raise typer.Exit(code)
        return
    import torch  # slow dependency (torch): the CLI stays torch-free

    # A stop (SIGTERM, e.g. the end of a session) unwinds like Ctrl-C: the running cell records
    # its attempt's CPU time and releases its claim; its checkpoints let it resume later.
    exit_on_sigterm()
    torch.set_num_threads(threads)
    run_sweep(spec_obj, phases=phases, log=lambda m: typer.echo(m, err=True))
