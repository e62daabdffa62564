"""The Flower ServerApp: `flwr run .` runs a fedsb experiment on a Flower federation.

Run-config keys (`[tool.flwr.app.config]` in pyproject.toml, `--run-config` to override) are
those of `fedsb.flower.settings.RunSettings`, documented in docs/flower.md. The experiment itself
(model, task, strategy, rounds, ...) is an ordinary fedsb TOML config (`config-path`).
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsb.flower.server_loop import run_server
from fedsb.flower.settings import RunSettings

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The experiment driver over the Flower transport, to the end (or resumed)."""
    logging.basicConfig(level=logging.INFO)
    settings = RunSettings.from_run_config(dict(context.run_config))
    run_server(grid, context, settings)
