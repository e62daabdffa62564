"""A results folder that is never lost and never mixed.

- Every file is written atomically: a temporary file in the same folder, fsync, `os.replace`,
  then fsync of the folder; mode 0666 minus the umask (0644 usually), like any file a user writes.
- One run per folder: the writer holds an `flock` on `.fedsb.lock` (the kernel drops it when
  the process dies, so two takers of a stale lock cannot both win); the file names the writer's
  pid, host and start time for the message a second run stops with.
- `open_run` refuses a folder that already holds results unless the run resumes it or was told
  to overwrite it, and removes the folder again when a run it created fails before leaving
  anything resumable. A folder it creates gets a `.fedsb-run` mark; `--overwrite` deletes only
  the files fedsb writes (`RUN_FILES`), and only in a marked folder or in one that holds nothing
  else (a results folder of a version before the mark).
- A write that fails for want of space or permission is one line naming the file (`WriteError`).
- The final result (summary.json and adapter/) is published as a pair through a small journal
  (`.pending/` + a COMMIT mark): a kill at any instant leaves the old pair or the new pair once
  `recover` has run, which every `open_run` does first.
- `resume_changes` compares a resumed run's config with the stored one and refuses every change
  that is not known to be safe.
"""

from __future__ import annotations

import errno
import fcntl
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

from fedsb.config_types import ConfigError
from fedsb.errors import FedsbError

LOCK_NAME = ".fedsb.lock"
PENDING = ".pending"  # the result being published (adapter/, summary.json, COMMIT)
OLD = ".old"  # the replaced result, deleted once the new one is in place
COMMIT = "COMMIT"
RESULT_FILES = ("adapter", "summary.json")  # published together, only at the end of a run
MARKER = ".fedsb-run"  # written in every results folder `open_run` creates: fedsb owns its RUN_FILES
# Everything fedsb writes in a results folder (both engines); `--overwrite` deletes these, nothing else.
RUN_FILES = frozenset(
    {"config.toml", "metrics.jsonl", "checkpoint", "eval_before.json", "flower_events.jsonl", "flower-workdir", "samples.md", PENDING, OLD, MARKER, *RESULT_FILES}
)


# Never results, never deleted by open_run: the lock, the mark, and `fedsb.flower.launch`'s
# working folder (its SuperLink's state and keys, in use while the ServerApp opens the folder).
NOT_RESULTS = (LOCK_NAME, MARKER, "flower-workdir")


class RunDirError(FedsbError):
    """A results folder that cannot be used as asked (taken, not empty, not a run...)."""


class WriteError(RunDirError, OSError):
    """A write refused by the system (disk full, read-only, no permission): one line, not a
    traceback; still an `OSError` for callers that catch those."""


# errno -> what to do about it
_AGAIN = "free some space and run again (--resume continues a run from its last completed round)"
_WRITE_HINTS = {errno.ENOSPC: _AGAIN, errno.EDQUOT: _AGAIN, errno.EROFS: "choose a writable --out", errno.EACCES: "choose a writable --out", errno.EPERM: "choose a writable --out"}


def write_error(path: str | os.PathLike[str], error: OSError) -> OSError:
    """The one-line `WriteError` for a refused write of `path` (any other error unchanged)."""
    if isinstance(error, FedsbError) or error.errno not in _WRITE_HINTS:
        return error
    out = WriteError(f"{path}: cannot write ({error.strerror or os.strerror(error.errno)}); {_WRITE_HINTS[error.errno]}")
    out.errno = error.errno
    return out


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
    place: readers see the old file or the new one, never a half-written one. A full disk or a
    read-only folder is a `WriteError` naming `path`."""
    path = Path(path)
    try:
        _atomic_write(path, write)
    except OSError as e:
        err = write_error(path, e)
        if err is e:
            raise
        raise err from None


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
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
    """An exclusive lock on a results folder, held for the whole run.

    The lock is an `flock` on `.fedsb.lock`, which the kernel releases when the holder exits
    however it exits: a lock file left by a dead run is simply locked again (with a warning naming
    its pid), and of several processes that find it at once exactly one gets it. The file's
    content (pid, host, start) only feeds the message of the runs that are refused.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False
        self._fd: int | None = None
        self._pid = os.getpid()

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RunDirError(f"{self.path} is a symlink; refusing to lock through it (delete it)") from None
            err = write_error(self.path, e)
            raise (err if err is not e else RunDirError(f"{self.path}: cannot open the lock file ({e.strerror or e})")) from None

    def _same_file(self, fd: int) -> bool:
        """Whether `fd` is still the file at `self.path`: a holder that released the lock
        unlinked it, and a lock on the unlinked file would exclude nobody."""
        try:
            now, mine = os.stat(self.path, follow_symlinks=False), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def acquire(self) -> None:
        if self.held:
            return
        for _ in range(20):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self._holder()
                who = f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}" if holder else "a process starting up"
                raise RunDirError(
                    f"{self.folder} is being written by another fedsb run ({who}); wait for it to finish or use another --out"
                ) from None
            except OSError as e:  # ENOLCK: a file system without locks
                os.close(fd)
                raise RunDirError(f"{self.path}: cannot lock ({e.strerror or e}); use an --out on a local file system") from None
            if not self._same_file(fd):
                os.close(fd)
                continue
            self._take(fd)
            return
        raise RunDirError(f"{self.path}: could not take the lock (another run keeps taking it)")

    def _take(self, fd: int) -> None:
        """We hold the lock: say so in the file, warning if it named a dead run."""
        old = os.read(fd, 4096)
        if old.strip():
            try:
                pid = json.loads(old).get("pid", "?")
            except (ValueError, AttributeError):
                pid = "?"
            warnings.warn(f"{self.path}: stale lock of pid {pid} (not running), taken over", stacklevel=3)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "proc_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd, self._pid, self.held = fd, os.getpid(), True

    def release(self) -> None:
        if not self.held or self._fd is None:
            return
        fd, self._fd, self.held = self._fd, None, False
        if os.getpid() != self._pid:  # a forked child's copy: the lock is its parent's
            os.close(fd)
            return
        try:
            if self._same_file(fd):
                self.path.unlink()  # while still locked: a waiter that opened it sees it is gone
        except OSError:
            pass  # a read-only folder: the lock file stays, unlocked, and is taken over next time
        os.close(fd)

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
    """What the folder holds besides `NOT_RESULTS`."""
    return sorted(p.name for p in folder.iterdir() if p.name not in NOT_RESULTS) if folder.is_dir() else []


def _owned(name: str) -> bool:
    """Whether fedsb writes a file of this name in a results folder (an atomic write's
    temporary file `.NAME.xxxx.tmp` included)."""
    if name in RUN_FILES:
        return True
    return name.startswith(".") and name.endswith(".tmp") and name[1:].split(".tmp")[0].rsplit(".", 1)[0] in RUN_FILES


def _resumable(folder: Path) -> bool:
    return (folder / "checkpoint" / "meta.json").exists() or (folder / "summary.json").exists()


def failed_start(folder: str | os.PathLike[str]) -> bool:
    """A run that stopped (kill -9, power cut) before its first round completed: a config.toml
    and nothing to resume from. `fedsb run --resume` starts it again from the first round."""
    folder = Path(folder)
    return (folder / "config.toml").is_file() and not _resumable(folder)


def _clear(folder: Path, *, best_effort: bool = False) -> None:
    """Delete what fedsb wrote in `folder` (`RUN_FILES`), nothing else."""
    for name in _contents(folder) + [MARKER]:
        p = folder / name
        if not _owned(name) or not (p.exists() or p.is_symlink()):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError as e:
            if not best_effort:
                err = write_error(p, e)
                raise (err if err is not e else RunDirError(f"{p}: cannot delete ({e.strerror or e})")) from None


def _shown(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def _check_overwrite(folder: Path, existing: list[str]) -> None:
    """`--overwrite` replaces a fedsb results folder: one with the mark, or (written by a
    version before the mark) one with a config.toml, another file fedsb writes, and nothing else."""
    foreign = [n for n in existing if not _owned(n)]
    if (folder / MARKER).is_file():
        if foreign:
            warnings.warn(f"{folder}: --overwrite keeps the files fedsb did not write: {_shown(foreign)}", stacklevel=4)
        return
    if existing == ["config.toml"]:  # as likely a user's own config as a run killed at its first write
        raise RunDirError(f"{folder} holds only a config.toml and no fedsb mark ({MARKER}); --overwrite deletes nothing there: choose another --out")
    if foreign or "config.toml" not in existing:
        raise RunDirError(
            f"{folder} holds files fedsb did not write ({_shown(foreign or existing)}); it is not a fedsb results folder, "
            f"so --overwrite deletes nothing there: choose another --out"
        )


def _mkdir(folder: Path) -> None:
    if folder.is_symlink() and not folder.exists():
        raise RunDirError(f"{folder} is a symlink to {os.readlink(folder)}, which does not exist; create the target or choose another --out")
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"{folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        err = write_error(folder, e)
        raise (err if err is not e else RunDirError(f"{folder}: cannot create the folder ({e.strerror or e})")) from None


@contextmanager
def open_run(folder: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """The results folder of one run, locked for its duration.

    A new run refuses a folder that already holds anything unless `overwrite` (then the files
    fedsb wrote there are deleted first, so old and new results never mix). A failed run that
    created the folder removes it again unless it left a round to resume from.
    """
    folder = Path(folder)
    if resume and not (folder / "config.toml").is_file():
        raise RunDirError(f"{folder}: not a results folder (no config.toml); nothing to resume")
    fresh = not folder.exists() or not _contents(folder)
    _mkdir(folder)
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
                if failed_start(folder) and all(_owned(n) for n in existing):
                    raise RunDirError(
                        f"{folder} holds a run that stopped before its first round completed ({_shown(existing)}); pass --resume "
                        f"to start it again with its config, --overwrite to replace it, or choose another --out"
                    )
                raise RunDirError(
                    f"{folder} already holds results ({_shown(existing)}); pass --resume to continue that run, "
                    f"--overwrite to replace it, or choose another --out"
                )
            _check_overwrite(folder, existing)
            _clear(folder)
            fresh = True
        if fresh or all(_owned(n) for n in _contents(folder)):  # a folder of an older version gets it on resume
            if not (folder / MARKER).exists():
                atomic_write_text(folder / MARKER, "fedsb results folder: `fedsb run --overwrite` deletes the files fedsb writes here, and only those\n")
        yield folder
        ok = True
    finally:
        if not ok and fresh and not _resumable(folder):
            _clear(folder, best_effort=True)
        lock.release()
        if not ok and fresh:
            _remove_if_empty(folder)


def restart_failed_start(folder: str | os.PathLike[str]) -> None:
    """Before `--resume` starts a `failed_start` run again: drop what its first attempt wrote
    besides its config (a base evaluation, a checkpoint killed before its commit point)."""
    folder = Path(folder)
    for name in _contents(folder):
        p = folder / name
        if name != "config.toml" and _owned(name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


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
    "model.device": "where the model runs (checkpoints are read on the host and copied to it)",
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
