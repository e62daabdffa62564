"""The root of every error fedsb raises on purpose.

An expected failure (a bad config value, a missing data file, a hostile payload, a corrupted
checkpoint) is a `FedsbError` whose message already says what went wrong and where (file, line,
config key). The command line prints such an error as one plain line and exits; a traceback is
shown only with `--debug` or `FEDSB_DEBUG=1`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os

DEBUG_ENV = "FEDSB_DEBUG"


class FedsbError(Exception):
    """An expected failure; `str(error)` is the one line a user reads."""

    exit_code = 1


def debug_enabled() -> bool:
    """True when the user asked for full tracebacks (`--debug` or FEDSB_DEBUG=1)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
