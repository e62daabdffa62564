"""A paper-regime sweep file (`PaperSweep`), its cells and where each keeps its extra record:
read by both the runner (`paper_regime`) and the report (`paper_regime_report`), so neither
imports the other."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedsb.config import ConfigError, ExperimentConfig, config_from_dict
from fedsb.sweep.spec import Cell, Sweep, load_sweep

EXTRA = "paper.json"


def fixed_rates(sweep: Sweep) -> dict[tuple[str, int], float]:
    """(method, rank) -> its one learning rate; a method with several rates is a config error."""
    out: dict[tuple[str, int], float] = {}
    for m in sweep.methods:
        for r in m.ranks:
            lrs = m.lrs_at(r)
            if len(lrs) != 1:
                raise ConfigError(f"{sweep.path}: method {m.name!r} rank {r}: paper-regime cells take exactly one lr, got {list(lrs)}")
            out[(m.name, r)] = lrs[0]
    return out


def cells_of(sweep: Sweep) -> list[Cell]:
    return sweep.test_cells(fixed_rates(sweep))


DEFAULT_REPORT = Path("docs/paper-regime.md")
KINDS = ("steps", "privacy")


@dataclass
class PaperSweep(Sweep):
    """A sweep file with the paper-regime keys (`report`, `kind`, `holdout`)."""

    report: Path = DEFAULT_REPORT
    kind: str = "steps"
    holdout: bool = True

    def cell_config(self, cell: Cell) -> ExperimentConfig:
        if self.holdout:
            return super().cell_config(cell)
        # The experiment's own task: its eval part is the test set (never trained on). A task in
        # tuning mode would score a validation slice instead, which is not what a test cell means.
        data = self.cell_data(cell)
        task = data.setdefault("task", {})
        if (task.get("options") or {}).get("tune"):
            raise ConfigError(f"{self.path}: holdout = false with task.options.tune = true would score the validation slice as the test")
        task["eval_tasks"], task["eval_options"] = [], {}  # the training task's own eval part
        task["eval_every"] = self.eval_every
        return config_from_dict(data)


def load_paper_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> PaperSweep:
    """`load_sweep` plus the paper-regime keys; a file without them reads as before."""
    path = Path(path)
    base = load_sweep(path, overrides)
    data = {**tomllib.loads(path.read_text()), **(overrides or {})}
    kind = str(data.get("kind", "steps"))
    if kind not in KINDS:
        raise ConfigError(f"{path}: kind = {kind!r}; allowed: {', '.join(KINDS)}")
    holdout = data.get("holdout", True)
    if not isinstance(holdout, bool):
        raise ConfigError(f"{path}: holdout must be true or false, got {holdout!r}")
    sweep = PaperSweep(**{f.name: getattr(base, f.name) for f in fields(Sweep)},
                       report=Path(data.get("report", DEFAULT_REPORT)), kind=kind, holdout=holdout)
    if not holdout:
        for m in sweep.methods:  # fail fast, as load_sweep does for the wrapped configs
            sweep.cell_config(Cell("test", m, m.ranks[0], m.lrs[0], sweep.seeds[0] if sweep.seeds else 0))
    return sweep
