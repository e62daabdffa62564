"""`fedsb`: the command line. Each command's implementation lives in `fedsb.commands.<name>`.

An expected error prints as one plain line; add --debug (anywhere) or set FEDSB_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

# Importing this module, `fedsb --help`, `fedsb comm` and argument errors need no torch: the
# commands import it (and transformers) inside their functions (tests/test_architecture.py).
from fedsb.commands.bench import bench
from fedsb.commands.comm import comm
from fedsb.commands.demo import run_demo
from fedsb.commands.privacy_table import privacy_table
from fedsb.commands.evaluate import evaluate_command
from fedsb.commands.export import export_command
from fedsb.commands.results import results
from fedsb.commands.sweep import sweep
from fedsb.config import dump_config, load_config
from fedsb.errors import FedsbError, debug_enabled
from fedsb.report import print_summary
from fedsb.rundir import RunDirError, failed_start, open_run, record_changes, restart_failed_start, resume_changes


class FedsbGroup(TyperGroup):
    """Every command's expected errors (`FedsbError`) become one plain line and an exit code.

    Plain: the message is never parsed as rich markup, so "in [train]" keeps its brackets and a
    value holding "[/x]" cannot crash the printer. `--debug` anywhere on the line, or
    FEDSB_DEBUG=1, re-raises instead, with the full traceback.
    """

    debug = False

    def main(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        FedsbGroup.debug = "--debug" in args or debug_enabled()
        args = [a for a in args if a != "--debug"]
        return super().main(args, *rest, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FedsbError as e:
            if FedsbGroup.debug or debug_enabled():
                raise
            message = " ".join(str(e).split("\n")) or type(e).__name__
            click.echo(click.style("error:", fg="red", bold=True) + f" {message}", err=True)
            raise click.exceptions.Exit(e.exit_code) from None


app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, cls=FedsbGroup, pretty_exceptions_show_locals=False)
console = Console(stderr=True, highlight=False)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="experiment TOML (omit with --resume)")] = None,
    out: Annotated[Path | None, typer.Option(help="results folder (default results/<config name>)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set train.lr=1e-3")] = None,
    resume: Annotated[Path | None, typer.Option(help="resume the run in this results folder")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace the results already in --out (deleted before the run starts)")] = False,
    device: Annotated[str | None, typer.Option(help="model.device: auto, cpu, cuda or cuda:N (as --set model.device=...)")] = None,
) -> None:
    """Run a federated (or centralized: federation.num_clients = 1) experiment from a TOML config.

    A folder that already holds results is refused unless --resume or --overwrite is given; a
    resumed run refuses any config change except a few safe ones (more rounds, evaluation settings).
    A run that stopped before its first round completed has nothing to resume: --resume starts it
    again from the first round, with its config.
    """
    changes: dict[str, Any] = {}
    if device is not None:
        set_ = [*(set_ or []), f'model.device="{device}"']
    if resume is not None:
        if out is not None and out.resolve() != resume.resolve():
            raise typer.BadParameter("--out and --resume name different folders; give only --resume DIR")
        if overwrite:
            raise typer.BadParameter("--overwrite and --resume exclude each other")
        out = resume
        stored_path = resume / "config.toml"
        if not stored_path.is_file():
            raise RunDirError(f"{resume}: not a results folder (no config.toml); nothing to resume")
        stored = load_config(stored_path)
        cfg = load_config(config or stored_path, set_ or [])
        changes = resume_changes(stored, cfg)
    else:
        if config is None:
            raise typer.BadParameter("give a CONFIG file or --resume DIR")
        cfg = load_config(config, set_ or [])
        out = out or Path("results") / config.stem
    # Slow dependencies (torch, transformers), imported once the arguments and the config are known good.
    from fedsb.federated.checkpoint import checkpoint_round  # slow dependency (torch): the CLI stays torch-free
    from fedsb.federated.experiment import run_experiment  # slow dependency (torch, transformers)

    with open_run(out, resume=resume is not None, overwrite=overwrite):
        restart = resume is not None and failed_start(out)  # checked under the lock
        if restart:
            console.print(f"{out}: no round completed before the run stopped; starting it again from the first round", markup=False)
            restart_failed_start(out)
            summary = run_experiment(cfg, out)
        else:
            if changes:
                done = checkpoint_round(out)
                record_changes(out, dump_config(cfg), changes, None if done is None else done + 1)
            summary = run_experiment(cfg, out, resume=resume is not None, config_changes=changes or None)
    print_summary([summary], console=Console())
    console.print(f"results in {out}", markup=False)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="results folder")] = Path("results/demo"),
    quick: Annotated[bool, typer.Option(help="a much smaller run (a smoke test, not a result)")] = False,
) -> None:
    """The embedded default: 10 clients, non-IID, Fed-SB vs FedIT vs FFA-LoRA on generated arithmetic."""
    run_demo(out, quick=quick)


app.command("comm")(comm)
app.command("eval")(evaluate_command)
app.command("export")(export_command)
app.command("results")(results)
app.command("bench")(bench)
app.command("privacy-table")(privacy_table)
app.command("sweep")(sweep)


def main() -> None:  # pragma: no cover
    app()



if __name__ == "__main__":  # pragma: no cover
    main()
