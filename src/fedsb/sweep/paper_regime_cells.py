"""Which cells a paper-regime sweep has and where each keeps its extra record: read by both the
runner (`paper_regime`) and the report (`paper_regime_report`), so neither imports the other."""

from __future__ import annotations

from fedsb.config import ConfigError
from fedsb.sweep.spec import Cell, Sweep

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
