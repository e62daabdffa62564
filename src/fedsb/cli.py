"""`fedsb`: the command line. Each command's implementation lives in `fedsb.commands.<name>`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedsb.commands.bench import bench
from fedsb.commands.comm import comm
from fedsb.commands.privacy_table import privacy_table
from fedsb.commands.evaluate import evaluate_command
from fedsb.commands.results import results
from fedsb.commands.sweep import sweep

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="experiment TOML (omit with --resume)")] = None,
    out: Annotated[Path | None, typer.Option(help="results folder (default results/<config name>)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set train.lr=1e-3")] = None,
    resume: Annotated[Path | None, typer.Option(help="resume the run in this results folder")] = None,
) -> None:
    """Run a federated (or centralized: federation.num_clients = 1) experiment from a TOML config."""
    from fedsb.config import ConfigError, load_config
    from fedsb.federated.server import run_experiment
    from fedsb.report import print_summary

    try:
        if resume is not None:
            cfg = load_config(resume / "config.toml", set_ or [])
            summary = run_experiment(cfg, resume, resume=True)
            out = resume
        else:
            if config is None:
                raise typer.BadParameter("give a CONFIG file or --resume DIR")
            cfg = load_config(config, set_ or [])
            out = out or Path("results") / config.stem
            summary = run_experiment(cfg, out)
    except ConfigError as e:
        console.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2) from None
    print_summary([summary], console=Console())
    console.print(f"results in {out}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="results folder")] = Path("results/demo"),
    quick: Annotated[bool, typer.Option(help="a much smaller run (a smoke test, not a result)")] = False,
) -> None:
    """The embedded default: 10 clients, non-IID, Fed-SB vs FedIT vs FFA-LoRA on generated arithmetic."""
    from fedsb.commands.demo import run_demo

    run_demo(out, quick=quick)


app.command("comm")(comm)
app.command("eval")(evaluate_command)
app.command("results")(results)
app.command("bench")(bench)
app.command("privacy-table")(privacy_table)
app.command("sweep")(sweep)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
