"""What went wrong in a deployment run, said once: the server log and `flower_events.jsonl`.

Every piece of the server side (discovery, rounds, evaluation) reports a missing, rejected or
failed node here, with its reason; a round that cannot be aggregated raises `RoundFailed`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from fedsb.errors import FedsbError

log = logging.getLogger("fedsb.flower")

EVENTS_FILE = "flower_events.jsonl"


class RoundFailed(FedsbError, RuntimeError):
    """A round that cannot be aggregated (fewer accepted updates than `min-replies`, a secure
    aggregate that fails its checks): the run stops at the last checkpoint, which stays good."""


def one_line(e: BaseException) -> str:
    """An unforeseen error as a one-line reason (its type and last line)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1][:300] if text else ''}"


class EventLog:
    """The run's events: kept in memory (counted in the summary) and appended to the file."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.rows: list[dict[str, Any]] = []

    def __call__(self, kind: str, **fields: Any) -> None:
        """A line in the server log and in `flower_events.jsonl` (missing, rejected, ...)."""
        row = {"event": kind, "time": time.time(), **fields}
        self.rows.append(row)
        log.warning("%s %s", kind, json.dumps(fields, default=str))
        with open(self.out_dir / EVENTS_FILE, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    def round_failed(self, round_index: int, reason: str) -> RoundFailed:
        """The round cannot be aggregated: log it, and return the error that stops the run
        before anything of this round is applied or checkpointed."""
        self("round-failed", round=round_index + 1, reason=reason)
        return RoundFailed(f"round {round_index + 1}: {reason}; the run stops at its last checkpoint (resume = true continues from it)")
