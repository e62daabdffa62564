"""A results folder that is never lost and never mixed.

- Every file is written atomically: a temporary file in the same folder, fsync, `os.replace`,
  then fsync of the folder; mode 0666 minus the umask (0644 usually), like any file a user writes.
- One run per folder: `.fedsb.lock` holds the writer's pid, host and start time. A second run
  stops with a message naming that pid; a lock whose process is gone is stale and is taken over.
- `open_run` refuses a folder that already holds results unless the run resumes it or was told
  to overwrite it, and removes the folder again when a run it created fails before leaving
  anything resumable.
- The final result (summary.json and adapter/) is published as a pair through a small journal
  (`.pending/` + a COMMIT mark): a kill at any instant leaves the old pair or the new pair once
  `recover` has run, which every `open_run` does first.
- `resume_changes` compares a resumed run's config with the stored one and refuses every change
  that is not known to be safe.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedsb.errors import FedsbError

LOCK_NAME = ".fedsb.lock"
PENDING = ".pending"  # the result being published (adapter/, summary.json, COMMIT)
OLD = ".old"  # the replaced result, deleted once the new one is in place
COMMIT = "COMMIT"
RESULT_FILES = ("adapter", "summary.json")  # published together, only at the end of a run


class RunDirError(FedsbError):
    """A results folder that cannot be used as asked (taken, not empty, not a run...)."""


# --- atomic files --------------------------------------------------------------------------


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Let `write(tmp_path)` fill a temporary file next to `path`, then fsync it and move it into
    place: readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(path: str | os.PathLike[str], tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file  # torch only where tensors are written

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))


# --- one run per folder --------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), to tell a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host (one we may not signal still counts; a zombie,
    dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (not Linux): it exists


class RunLock:
    """An exclusive lock on a results folder, held for the whole run."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _is_stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:  # a lock being written right now, or a crash between create and write
            try:
                return time.time() - self.path.stat().st_mtime > 30
            except FileNotFoundError:
                return True
        if holder.get("host") != socket.gethostname():
            return False  # another machine: nothing can be known about its process
        pid = int(holder.get("pid", -1))
        if pid <= 0 or not pid_alive(pid):
            return True
        started = holder.get("proc_start")
        return started is not None and _process_start(pid) not in (None, started)

    def acquire(self) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "proc_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._is_stale(holder):
                    who = f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}" if holder else "a process starting up"
                    raise RunDirError(
                        f"{self.folder} is being written by another fedsb run ({who}); wait for it to finish or use "
                        f"another --out (if that run is gone, delete {self.path})"
                    ) from None
                warnings.warn(f"{self.path}: stale lock of pid {holder.get('pid') if holder else '?'} (not running), taken over", stacklevel=2)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            self.held = True
            return
        raise RunDirError(f"{self.path}: could not take the lock (another run keeps taking it)")

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is None or holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --- publishing the result -----------------------------------------------------------------


def publish_result(folder: str | os.PathLike[str], summary: dict[str, Any], write_adapter: Callable[[Path], Any] | None) -> None:
    """Replace summary.json and adapter/ together: old pair or new pair, whatever happens.

    Both are written complete under `.pending/`; an atomic COMMIT mark then decides that the new
    pair wins, and `_roll_forward` moves it into place (again after a crash, via `recover`).
    """
    folder = Path(folder)
    pending = folder / PENDING
    shutil.rmtree(pending, ignore_errors=True)
    pending.mkdir(parents=True)
    if write_adapter is not None:
        write_adapter(pending / "adapter")
        fsync_dir(pending / "adapter")
    atomic_write_json(pending / "summary.json", summary)
    atomic_write_bytes(pending / COMMIT, b"")  # the commit point
    _roll_forward(folder)


def _roll_forward(folder: Path) -> None:
    """Move a committed `.pending/` result into place; idempotent, so a crash can resume it."""
    pending, old = folder / PENDING, folder / OLD
    for name in RESULT_FILES:
        src, dst = pending / name, folder / name
        if not src.exists():
            continue  # moved already (or not part of this result)
        if dst.is_dir():
            old.mkdir(exist_ok=True)
            shutil.rmtree(old / name, ignore_errors=True)
            os.replace(dst, old / name)
        os.replace(src, dst)
    fsync_dir(folder)
    shutil.rmtree(pending, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def recover(folder: str | os.PathLike[str]) -> str | None:
    """Finish or undo a publication interrupted by a crash; returns what was done, if anything."""
    folder = Path(folder)
    pending = folder / PENDING
    if (pending / COMMIT).exists():
        _roll_forward(folder)
        return "finished publishing the new result"
    done = None
    if pending.exists():
        shutil.rmtree(pending)
        done = "dropped an unfinished result; the previous one stays"
    shutil.rmtree(folder / OLD, ignore_errors=True)
    for tmp in folder.glob(".*.tmp"):  # an atomic write killed before its rename
        tmp.unlink(missing_ok=True)
    return done


# --- opening a run -------------------------------------------------------------------------


def _contents(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME) if folder.is_dir() else []


def _resumable(folder: Path) -> bool:
    return (folder / "checkpoint" / "meta.json").exists() or (folder / "summary.json").exists()


def _clear(folder: Path) -> None:
    for name in _contents(folder):
        p = folder / name
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


@contextmanager
def open_run(folder: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """The results folder of one run, locked for its duration.

    A new run refuses a folder that already holds anything unless `overwrite` (then the old
    content is deleted first, so old and new results never mix). A failed run that created the
    folder removes it again unless it left a round to resume from.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"{folder}: exists and is not a folder")
    if resume and not (folder / "config.toml").is_file():
        raise RunDirError(f"{folder}: not a results folder (no config.toml); nothing to resume")
    fresh = not folder.exists() or not _contents(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock(folder)
    try:
        lock.acquire()
    except BaseException:
        if fresh:
            _remove_if_empty(folder)
        raise
    ok = False
    try:
        recover(folder)
        existing = _contents(folder)
        if existing and not resume:
            if not overwrite:
                shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
                raise RunDirError(
                    f"{folder} already holds results ({shown}); pass --resume to continue that run, "
                    f"--overwrite to replace it, or choose another --out"
                )
            if not (folder / "config.toml").is_file():  # --out ~ --overwrite must not empty a home folder
                raise RunDirError(f"{folder} holds files but is not a fedsb results folder (no config.toml); refusing to delete them")
            _clear(folder)
            fresh = True
        yield folder
        ok = True
    finally:
        if not ok and fresh and not _resumable(folder):
            _clear(folder)
        lock.release()
        if not ok and fresh:
            _remove_if_empty(folder)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


# --- resuming with a changed config --------------------------------------------------------

# Changes a resumed run accepts: they do not alter what the finished rounds mean.
SAFE_CHANGES: dict[str, str] = {
    "federation.rounds": "more rounds (the learning-rate schedule is stretched over the new total from here on)",
    "task.eval_every": "evaluation frequency",
    "task.eval_limit": "evaluation subset size",
    "task.eval_batch_size": "evaluation batch size",
    "task.max_new_tokens": "generation length at evaluation",
    "task.eval_options": "per-task evaluation options",
}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value and not name.startswith("task.eval_options"):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def resume_changes(stored: Any, new: Any) -> dict[str, list[Any]]:
    """{key: [old, new]} of the allowed changes between two `ExperimentConfig`s; a `ConfigError`
    naming the first forbidden one (a rank or strategy change would otherwise fail deep inside
    the checkpoint as a shape or key error)."""
    from fedsb.config import ConfigError

    a, b = _flatten(stored.to_dict()), _flatten(new.to_dict())
    changes = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    allowed = ", ".join(SAFE_CHANGES)
    for key, (old, value) in changes.items():
        if key not in SAFE_CHANGES:
            raise ConfigError(
                f"--resume: {key} changed from {old!r} to {value!r}; a resumed run keeps its config "
                f"(changes allowed: {allowed}). Start a new run with another --out (or --overwrite) instead"
            )
    if "federation.rounds" in changes:
        old, value = changes["federation.rounds"]
        if value < old:
            raise ConfigError(f"--resume: federation.rounds = {value} is fewer than the {old} rounds the run was started with")
        if new.privacy.enabled or new.privacy.user_level:
            raise ConfigError(
                f"--resume: federation.rounds changed from {old} to {value}, but the DP noise was calibrated for {old} "
                f"rounds; more rounds would exceed privacy.target_epsilon. Start a new run instead"
            )
    return changes


def record_changes(folder: str | os.PathLike[str], config_text: str, changes: dict[str, list[Any]], after_round: int | None) -> None:
    """Write the resumed run's config.toml with a comment per resume, so the file says what ran."""
    path = Path(folder) / "config.toml"
    history = [line for line in path.read_text().splitlines() if line.startswith("# resumed")] if path.exists() else []
    what = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
    history.append(f"# resumed after round {after_round if after_round is not None else '?'} ({time.strftime('%Y-%m-%d %H:%M:%S')}): {what}")
    atomic_write_text(path, "\n".join(history) + "\n" + config_text)
