"""One cell of the sweep: claimed by one process, run resumably, summarized atomically.

Folder layout under the sweep's `out`:

    <phase>/<method>-r<rank>-lr<lr>-s<seed>/
        claim        exists while a process runs the cell (pid, host); removed when done
        run/         the experiment's results folder (checkpoints: an interrupted run resumes)
        cell.json    the summary; its presence means "finished": the cell is never run again
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from fedsb.adapter.export import atomic_write_json
from fedsb.config import non_default_settings
from fedsb.federated.checkpoint import CHECKPOINT_DIR, has_checkpoint
from fedsb.federated.experiment import run_or_resume
from fedsb.rundir import pid_alive
from fedsb.sweep.spec import Cell, Sweep

CLAIM, SUMMARY, RUN = "claim", "cell.json", "run"


def cell_dir(sweep: Sweep, cell: Cell) -> Path:
    return sweep.out / cell.id


def fingerprint(sweep: Sweep, cell: Cell) -> str:
    """SHA-256 of the cell's settings that differ from the defaults: an edited sweep file
    invalidates old cells, a new option whose default keeps today's behaviour does not."""
    text = json.dumps(non_default_settings(sweep.cell_config(cell)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_summary(sweep: Sweep, cell: Cell) -> dict[str, Any] | None:
    """The finished cell's summary, None if absent or made with a different config."""
    path = cell_dir(sweep, cell) / SUMMARY
    if not path.exists():
        return None
    out = json.loads(path.read_text())
    return out if out.get("fingerprint") == fingerprint(sweep, cell) else None


def is_done(sweep: Sweep, cell: Cell) -> bool:
    return read_summary(sweep, cell) is not None


def try_claim(folder: Path) -> bool:
    """Create `folder/claim` exclusively; a claim left by a dead process on this host is taken over."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CLAIM
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                owner = None
            if not owner:  # being written right now, or left empty by a process that died
                try:
                    if time.time() - path.stat().st_mtime < 60:
                        return False
                except FileNotFoundError:
                    continue
                path.unlink(missing_ok=True)
                continue
            if owner.get("host") == socket.gethostname() and not pid_alive(int(owner.get("pid", -1))):
                path.unlink(missing_ok=True)  # stale: its process died
                continue
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
        return True
    return False


def release(folder: Path) -> None:
    (folder / CLAIM).unlink(missing_ok=True)


def is_claimed(folder: Path) -> bool:
    """Claimed by a live process (a stale claim does not count)."""
    path = folder / CLAIM
    if not path.exists():
        return False
    try:
        owner = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return True
    return owner.get("host") != socket.gethostname() or pid_alive(int(owner.get("pid", -1)))


def run_cell(sweep: Sweep, cell: Cell, base_eval: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Run `cell` unless it is finished or another live process holds it; returns its summary
    (None when someone else has it). An interrupted run continues from its last round."""
    folder = cell_dir(sweep, cell)
    if is_done(sweep, cell):
        return read_summary(sweep, cell)
    if not try_claim(folder):
        return None
    try:
        if is_done(sweep, cell):  # finished between the check and the claim
            return read_summary(sweep, cell)
        config = sweep.cell_config(cell)
        run = folder / RUN
        stamp = folder / "fingerprint"
        if run.exists() and (not stamp.exists() or stamp.read_text() != fingerprint(sweep, cell)):
            shutil.rmtree(run)  # a partial run of an older config: start over
            (folder / "attempts.jsonl").unlink(missing_ok=True)
        stamp.write_text(fingerprint(sweep, cell))
        resumed = has_checkpoint(run)  # what run_or_resume decides; before the run, as a checkpoint exists after it
        cpu0, wall0 = time.process_time(), time.perf_counter()
        finished = False
        try:
            summary = run_or_resume(config, run, base_eval=base_eval)
            finished = True
        finally:  # an interrupted attempt's CPU time counts too
            attempt = {"cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0,
                       "resumed": resumed, "finished": finished}
            with (folder / "attempts.jsonl").open("a") as f:
                f.write(json.dumps(attempt) + "\n")
        attempts = [json.loads(line) for line in (folder / "attempts.jsonl").read_text().splitlines() if line]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        out = {**cell_summary(cell, config.federation.num_clients, summary, rows, attempts), "fingerprint": fingerprint(sweep, cell)}
        atomic_write_json(folder / SUMMARY, out)
        # A finished cell never runs again: its round checkpoints (twice the adapter, 156 MB at
        # r = 64 on SmolLM2) only fill the disk; the final adapter stays in run/adapter.
        shutil.rmtree(run / CHECKPOINT_DIR, ignore_errors=True)
        return out
    finally:
        release(folder)


def _point(ev: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "ci95", "correct", "n", "by_bucket")
    return {k: ev[k] for k in keys if k in ev}


def cell_summary(
    cell: Cell, num_clients: int, summary: dict[str, Any], rows: list[dict[str, Any]], attempts: list[dict[str, Any]]
) -> dict[str, Any]:
    """What the report needs: the per-round curve with per-client cumulative bytes, the costs."""
    one_time = summary["one_time_bytes"] / num_clients
    curve = [{"round": 0, "upload_cum": 0, "total_cum": one_time, **_point(summary.get("eval_before") or {})}]
    up = total = 0.0
    for r in rows:
        n = max(len(r.get("clients") or []), 1)
        up += r["bytes_up"] / n
        total += (r["bytes_up"] + r["bytes_down"]) / n
        if r.get("eval"):
            curve.append({"round": r["round"], "upload_cum": up, "total_cum": total + one_time, **_point(r["eval"])})
    return {
        "id": cell.id, "phase": cell.phase, "method": cell.method.name, "strategy": cell.method.strategy,
        "rank": cell.rank, "lr": cell.lr, "seed": cell.seed, "rounds": len(rows),
        "curve": curve, "final": curve[-1],
        "upload_per_client_round": summary["upload_bytes_per_client_round"],
        "download_per_client_round": summary["download_bytes_per_client_round"],
        "one_time_per_client": one_time,
        "one_time_total": summary["one_time_bytes"],
        "init": {k: v for k, v in (summary.get("init") or {}).items() if k != "eval"},
        "max_exactness_error": summary.get("max_exactness_error"),
        "final_train_loss": summary.get("final_train_loss"),
        "cpu_s": sum(a["cpu_s"] for a in attempts),
        "wall_s": sum(a["wall_s"] for a in attempts),
    }
