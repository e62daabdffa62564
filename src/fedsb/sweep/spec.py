"""The sweep file: which experiment, which grid, how selection and testing are done.

    experiment = "arithmetic-small.toml"   # path relative to this file
    out = "results/frontier"               # cell folders (relative to the working directory)
    docs = "docs"                          # frontier.md / frontier.png go here
    set = ["federation.rounds=6"]          # overrides for every cell
    validation_size = 100                  # carved from the training data, never the test set
    selection_seed = 0
    seeds = [0, 1, 2]                      # the chosen setting is scored on test with these
    eval_every = 1                         # test runs: score every k rounds (the final round always)
    validation_every = 0                   # selection runs: likewise (0: the final round only)

    [[method]]
    name = "Fed-SB"
    strategy = "fedsb"
    ranks = [16, 64]
    lrs = [1e-3, 3e-3, 1e-2]
    set = ["init.method=\"central\""]      # overrides for this method only
    extra_lrs = { 16 = [3e-2] }            # rates for one rank only (e.g. past an edge of the grid)
"""

from __future__ import annotations

import copy
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsb.config import ConfigError, ExperimentConfig, config_from_dict, merge_overrides

PHASES = ("select", "test")


@dataclass(frozen=True)
class Method:
    """One line of the frontier: a strategy with its own overrides, at several ranks and lrs."""

    name: str
    strategy: str
    ranks: tuple[int, ...]
    lrs: tuple[float, ...]
    set: tuple[str, ...] = ()
    # Rates run at one rank only: when validation puts a rank's best rate at the edge of the
    # shared grid, the grid is extended for that rank alone rather than for every rank.
    extra_lrs: tuple[tuple[int, tuple[float, ...]], ...] = ()

    def lrs_at(self, rank: int) -> tuple[float, ...]:
        """The rates this rank is selected over, in increasing order."""
        extra = dict(self.extra_lrs).get(rank, ())
        return tuple(sorted({*self.lrs, *extra}))

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


@dataclass(frozen=True)
class Cell:
    """One run of the grid; `id` is its folder under the sweep's output folder."""

    phase: str
    method: Method
    rank: int
    lr: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.phase}/{self.method.slug}-r{self.rank}-lr{self.lr:g}-s{self.seed}"


@dataclass
class Sweep:
    path: Path
    experiment: dict[str, Any]
    methods: list[Method]
    out: Path
    docs: Path
    set: list[str] = field(default_factory=list)
    validation_size: int = 100
    validation_limit: int | None = None  # validation problems scored (default: all of them)
    selection_seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    title: str = "Accuracy against communication"
    experiment_name: str = "inline"  # the experiment file the sweep builds on
    note: str = ""  # printed at the top of the report (e.g. "reduced grid")
    eval_every: int = 1  # test cells are scored every k rounds (and at the final round)
    validation_every: int = 1  # selection cells likewise (0: the final round only)

    def selection_cells(self) -> list[Cell]:
        return [Cell("select", m, r, lr, self.selection_seed) for m in self.methods for r in m.ranks for lr in m.lrs_at(r)]

    def test_cells(self, chosen: dict[tuple[str, int], float]) -> list[Cell]:
        """The chosen lr of every (method, rank) that has one, with each test seed; seed-major, so
        that a sweep stopped part-way has scored every setting once before any twice."""
        return [
            Cell("test", m, r, chosen[(m.name, r)], s)
            for s in self.seeds for m in self.methods for r in m.ranks if (m.name, r) in chosen
        ]

    def cell_data(self, cell: Cell) -> dict[str, Any]:
        """The experiment's config table with the sweep's and the cell's settings applied."""
        data = merge_overrides(copy.deepcopy(self.experiment), [*self.set, *cell.method.set])
        data["seed"] = cell.seed
        data.setdefault("federation", {})["strategy"] = cell.method.strategy
        data.setdefault("adapter", {})["rank"] = cell.rank
        data.setdefault("train", {})["lr"] = cell.lr
        return data

    def cell_config(self, cell: Cell) -> ExperimentConfig:
        """The experiment with the cell's settings, its task wrapped in a validation/test holdout."""
        data = self.cell_data(cell)
        task = data.setdefault("task", {})
        train_limit = task.get("train_limit") or None
        task["options"] = {
            "task": task.get("name", "arith"),
            "options": task.get("options", {}),
            "role": "validation" if cell.phase == "select" else "test",
            "validation_size": self.validation_size,
            "pool": None if train_limit is None else train_limit + self.validation_size,
        }
        task["name"] = "holdout"
        task["eval_tasks"], task["eval_options"] = [], {}  # the frontier scores the training task
        task["eval_every"] = self.eval_every  # a point every k rounds: every test run is a curve
        if cell.phase == "select":
            task["eval_limit"] = self.validation_limit or self.validation_size
            task["eval_every"] = self.validation_every
        return config_from_dict(data)


def _method(d: dict[str, Any]) -> Method:
    try:
        m = Method(
            name=str(d["name"]),
            strategy=str(d.get("strategy", d["name"])),
            ranks=tuple(int(r) for r in d["ranks"]),
            lrs=tuple(float(x) for x in d["lrs"]),
            set=tuple(d.get("set", [])),
            extra_lrs=tuple(sorted((int(r), tuple(float(x) for x in xs)) for r, xs in d.get("extra_lrs", {}).items())),
        )
    except KeyError as e:
        raise ConfigError(f"[[method]] needs {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"method {d.get('name')!r}: extra_lrs must map ranks to lists of rates ({e})") from None
    if not m.ranks or not m.lrs:
        raise ConfigError(f"method {m.name!r}: ranks and lrs must not be empty")
    if stray := sorted({r for r, _ in m.extra_lrs} - set(m.ranks)):
        raise ConfigError(f"method {m.name!r}: extra_lrs names ranks {stray} that are not in ranks {list(m.ranks)}")
    return m


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> Sweep:
    """Read SWEEP.toml; `overrides` replace top-level keys (e.g. out) for tests and reruns."""
    path = Path(path)
    data = {**tomllib.loads(path.read_text()), **(overrides or {})}
    if "experiment" not in data:
        raise ConfigError(f"{path}: 'experiment' (an experiment TOML path, or a table) is required")
    exp = data["experiment"]
    experiment = exp if isinstance(exp, dict) else tomllib.loads((path.parent / exp).read_text())
    methods = [_method(m) for m in data.get("method", [])]
    if not methods:
        raise ConfigError(f"{path}: at least one [[method]] is required")
    if len({m.slug for m in methods}) != len(methods):
        raise ConfigError(f"{path}: method names must differ")
    sweep = Sweep(
        path=path, experiment=experiment, methods=methods,
        out=Path(data.get("out", "results/sweep")), docs=Path(data.get("docs", "docs")),
        set=list(data.get("set", [])), validation_size=int(data.get("validation_size", 100)),
        validation_limit=data.get("validation_limit"), selection_seed=int(data.get("selection_seed", 0)),
        seeds=[int(s) for s in data.get("seeds", [0, 1, 2])], title=str(data.get("title", Sweep.title)),
        note=str(data.get("note", "")), experiment_name=exp if isinstance(exp, str) else "inline",
        eval_every=int(data.get("eval_every", 1)),
    )
    sweep.validation_every = int(data.get("validation_every", sweep.eval_every))
    if sweep.eval_every < 1 or sweep.validation_every < 0:
        raise ConfigError(f"{path}: eval_every must be >= 1 and validation_every >= 0")
    for m in methods:  # fail fast on a bad experiment or override
        sweep.cell_config(Cell("select", m, m.ranks[0], m.lrs[0], sweep.selection_seed))
    return sweep
