"""Several processes sharing one command's cells (`fedsb sweep` and `fedsb privacy-table`).

Each worker claims a cell before running it, so the processes need no other coordination; this
module only starts them, waits, and passes a stop on so that each worker unwinds its running cell
(records its attempt, releases its claim) instead of being orphaned.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence


def exit_on_sigterm() -> None:
    """Make SIGTERM (e.g. the end of a session) unwind like Ctrl-C: `finally` blocks run."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def run_workers(cli_args: Sequence[str], n: int) -> int:
    """Run `fedsb CLI_ARGS` in `n` processes; the highest exit status among them."""
    exit_on_sigterm()
    procs = [subprocess.Popen([sys.executable, "-m", "fedsb.cli", *cli_args]) for _ in range(n)]
    try:
        return max(p.wait() for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()


def argv_without(option: str, argv: Sequence[str]) -> list[str]:
    """`argv` minus `option` and its value (either `--opt V` or `--opt=V`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(f"{option}="):
            out.append(a)
    return out
