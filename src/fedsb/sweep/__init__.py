"""`fedsb sweep`: a resumable grid (method x rank x learning rate x seed) over one experiment,
with the learning rate chosen on a validation split and the choice scored on the test set.

    spec.py      the SWEEP.toml file -> a Sweep and its cells
    cells.py     one cell: claim, run (resumable), summary JSON written atomically
    runner.py    phases: select on validation -> choose -> test with seeds -> report
    select.py    the selection rule
    frontier.py  summaries -> docs/frontier.md (tables) and docs/frontier.png (two panels)
"""

from fedsb.sweep.spec import Cell, Method, Sweep, load_sweep

__all__ = ["Cell", "Method", "Sweep", "load_sweep"]
