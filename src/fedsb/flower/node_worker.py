"""A SuperNode's long-lived worker: the model stays loaded between Flower messages.

Flower 1.42 starts a fresh `flwr-clientapp` process for every message a SuperNode receives.
Built naively, each one imports torch and transformers, loads the model and tokenizes its
partition before it trains a few steps: with 10 SuperNodes on a 2-core machine that start-up
was 80-85% of each node's message time, and a round took 10-11x the in-process round. So the ClientApp process only forwards: it hands the message to a worker
process that belongs to its SuperNode, which builds the node's party (`node_party.NodeParty`) once and keeps it
(the same per-process cache the handlers already use, `node_party.party_for`), and returns the
reply's content. The ClientApp process imports Flower and this module, nothing of torch.

The worker:
- is started by the first ClientApp process of a SuperNode that finds none, in its own
  session, and exits when that SuperNode process is gone (or after `IDLE_SECONDS` unused);
- listens on a Unix socket in a private (0700) folder, authenticated with a random key file
  (0600, made anew each time) by `multiprocessing.connection`'s HMAC challenge; frames are
  Flower's protobufs (`send_bytes`), never pickles. The folder lives under a private parent
  (`$XDG_RUNTIME_DIR`, else `<node cache>/workers`, else `/tmp/fedsb-<uid>`), each level
  created 0700 and checked with `lstat`: a symlink or a folder of another user is refused (the
  message is then handled in the ClientApp process);
- gives a peer `RECV_TIMEOUT` seconds per read, so one that connects and sends nothing cannot
  block it; a frame it cannot decode is logged and dropped, and the worker serves on. Its log
  (`worker.log` in its folder, named by every error the ClientApp reports) is kept whenever it
  holds a traceback;
- handles one message at a time. A ClientApp that finds the worker busy (another run's
  message, or a hung one) runs the handlers in its own process, as without a worker.

Used only inside a `flwr-clientapp` process, unless `--node-config node-worker=true|false`
says otherwise (`FEDSB_NODE_WORKER=0|1` likewise); handlers called directly (tests, Flower's
Ray simulation, whose processes persist anyway) run in the calling process.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedsb.flower.protocol import (
    METRICS_RECORD,
    NODE_CACHE_DIR,
    NODE_MESSAGE_METRIC,
    NODE_STARTUP_METRIC,
    NODE_WORKER,
    PARTITION_ID,
    SECONDS,
    WORKER_CODE,
    WORKER_KIND,
    WORKER_REASON,
    WORKER_STATUS,
)
from fedsb.rundir import pid_alive

IDLE_SECONDS = 1800.0  # a worker nobody used for this long exits (its SuperNode may live on)
SPAWN_TIMEOUT = 300.0  # seconds to wait for a new worker's socket (imports, on a loaded machine)
PARENT_POLL = 0.5
# Seconds a peer may leave the worker waiting on one read (handshake or frame); the worker
# reads the value when it starts (FEDSB_NODE_RECV_TIMEOUT).
RECV_TIMEOUT = float(os.environ.get("FEDSB_NODE_RECV_TIMEOUT", "60"))
MAX_SOCKET_PATH = 100  # AF_UNIX paths are at most 107 bytes


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc), None elsewhere."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def _truthy(value: Any) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def wanted(context: Context) -> bool:
    """Whether this message goes through the node's worker (see the module docstring)."""
    choice = _truthy(context.node_config.get(NODE_WORKER))
    if choice is None:
        choice = _truthy(os.environ.get("FEDSB_NODE_WORKER"))
    if choice is None:
        choice = Path(sys.argv[0]).name == "flwr-clientapp"
    return choice


@dataclass(frozen=True)
class WorkerPaths:
    """Where one SuperNode's worker listens: named by the node's cache, partition and the
    SuperNode's pid, so a restarted SuperNode gets a fresh worker (and fresh code)."""

    folder: Path

    @classmethod
    def for_node(cls, context: Context, supernode_pid: int) -> WorkerPaths:
        """The node's folder under `private_parent` (created); WorkerBusy if there is none."""
        cache = str(context.node_config.get(NODE_CACHE_DIR, "") or os.environ.get("FEDSB_FLOWER_CACHE", ""))
        ident = json.dumps([cache, str(context.node_config.get(PARTITION_ID, "")), supernode_pid, sys.executable])
        name = f"fedsb-node-{hashlib.sha256(ident.encode()).hexdigest()[:20]}"
        return cls(private_parent(cache, len(name) + len("/sock")) / name)

    @property
    def socket(self) -> Path:
        return self.folder / "sock"

    @property
    def key(self) -> Path:
        return self.folder / "key"

    @property
    def log(self) -> Path:
        return self.folder / "worker.log"

    @property
    def pid(self) -> Path:
        return self.folder / "pid"

    @property
    def client_lock(self) -> Path:
        return self.folder / "client.lock"

    @property
    def busy_lock(self) -> Path:
        return self.folder / "busy.lock"


class WorkerBusy(RuntimeError):
    """The worker is serving another message (or has no safe folder): handle this one in the
    calling process."""


def private_dir(path: Path) -> Path:
    """`path` as a folder only this user can enter: created 0700 if missing, and checked with
    `lstat` (never through a symlink) to be a folder of ours that nobody else can write or read."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise WorkerBusy(f"{path}: cannot create ({e.strerror or e})") from None
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise WorkerBusy(f"{path} is a symlink; refusing to use it for the node worker")
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise WorkerBusy(f"{path} is not a private folder of this user (owner uid {info.st_uid}, mode {oct(info.st_mode & 0o777)})")
    return path


def private_parent(cache: str, tail: int) -> Path:
    """Where node workers' folders go: the first private place whose socket paths stay short
    enough (`tail` bytes below it): `$XDG_RUNTIME_DIR` (made private by the login manager), a
    0700 `workers` folder in the node's cache, a 0700 `fedsb-<uid>` folder in the temp dir."""
    candidates: list[tuple[Path, bool]] = []  # (folder, create it)
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):
        candidates.append((Path(xdg), False))
    if cache:
        candidates.append((Path(cache).expanduser().absolute() / "workers", True))
    candidates.append((Path(tempfile.gettempdir()) / f"fedsb-{os.getuid()}", True))
    reasons = []
    for folder, create in candidates:
        if len(str(folder)) + 1 + tail > MAX_SOCKET_PATH:
            continue
        try:
            if create:
                folder.parent.mkdir(parents=True, exist_ok=True)
            elif not folder.is_dir():
                continue
            return private_dir(folder)
        except (WorkerBusy, OSError) as e:
            reasons.append(str(e))
    raise WorkerBusy("no private folder for the node worker: " + ("; ".join(reasons) or "paths too long"))


@contextmanager
def _try_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path`, or raise WorkerBusy at once (released on exit, also
    when the holding process dies)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkerBusy(str(path)) from None
        yield
    finally:
        os.close(fd)


def _is_locked(path: Path) -> bool:
    try:
        with _try_lock(path):
            return False
    except WorkerBusy:
        return True


# --- the ClientApp process's side ------------------------------------------------------------


def dispatch(kind: str, msg: Message, context: Context) -> Message:
    """Answer `msg` with the node's handler `kind`: through the worker when wanted, else here."""
    reply = None
    if wanted(context):
        try:
            reply = _via_worker(kind, msg, context)
        except WorkerBusy:
            pass
    if reply is None:
        from fedsb.flower.node_handlers import handle  # imports torch (fedsb.flower.node_handlers): the ClientApp process stays torch-free

        reply = handle(kind, msg, context)
    return _with_timing(reply)


def _with_timing(reply: Message) -> Message:
    """A train reply also says how long this process lived and how much of it was not training
    (interpreter, imports, Flower's pull, model and data when built here, a new worker)."""
    age = process_age()
    if age is None or reply.has_error() or METRICS_RECORD not in reply.content.metric_records:
        return reply
    metrics = reply.content.metric_records[METRICS_RECORD]
    if SECONDS in metrics:
        metrics[NODE_MESSAGE_METRIC] = float(age)
        metrics[NODE_STARTUP_METRIC] = max(0.0, float(age) - float(metrics[SECONDS]))
    return reply


def _via_worker(kind: str, msg: Message, context: Context) -> Message:
    paths = WorkerPaths.for_node(context, os.getppid())
    private_dir(paths.folder)  # a symlink or someone else's folder: do without the worker
    with _try_lock(paths.client_lock):
        if _is_locked(paths.busy_lock):  # a worker still busy with a message its ClientApp gave up on
            raise WorkerBusy("worker busy")
        with _connect(paths) as conn:
            conn.send_bytes(json.dumps({WORKER_KIND: kind}).encode())
            conn.send_bytes(context_to_proto(context).SerializeToString())
            conn.send_bytes(message_to_proto(msg).SerializeToString())
            try:
                head = json.loads(conn.recv_bytes())
                body = conn.recv_bytes()
            except (EOFError, OSError):
                raise RuntimeError(f"the node worker dropped the message {kind!r} (died, or could not read it); see {paths.log}") from None
    if head[WORKER_STATUS] == "error":
        return Message(Error(code=int(head.get(WORKER_CODE, 0)), reason=str(head[WORKER_REASON])), reply_to=msg)
    if head[WORKER_STATUS] == "raised":
        raise RuntimeError(str(head[WORKER_REASON]))
    return Message(recorddict_from_proto(ProtoRecordDict.FromString(body)), reply_to=msg)


def _connect(paths: WorkerPaths) -> Connection:
    """Connect to the node's worker, starting one if none answers."""
    if paths.socket.exists() and paths.key.exists():
        try:
            return Client(str(paths.socket), family="AF_UNIX", authkey=paths.key.read_bytes())
        except (OSError, EOFError):
            paths.socket.unlink(missing_ok=True)  # a dead worker's socket
    key = write_key(paths.key)
    with open(paths.log, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedsb.flower.node_worker", str(paths.folder), str(os.getppid())],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this process; exits with the SuperNode
        )
    deadline = time.monotonic() + SPAWN_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the node worker exited at start (code {proc.returncode}); see {paths.log}")
        if paths.socket.exists():
            try:
                return Client(str(paths.socket), family="AF_UNIX", authkey=key)
            except (OSError, EOFError):
                pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the node worker did not start within {SPAWN_TIMEOUT:.0f} s; see {paths.log}")


def write_key(path: Path) -> bytes:
    """A new random key in a new 0600 file: an existing file (whatever its mode) is replaced,
    not truncated, since O_TRUNC would keep its old mode."""
    key = secrets.token_bytes(32)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(key)
    return key


# --- the worker process ----------------------------------------------------------------------


def _set_timeouts(sock: socket.socket, seconds: float) -> None:
    """Blocking socket whose every read or write gives up after `seconds` (EAGAIN, an OSError),
    so a silent or stalled peer is dropped instead of blocking the worker."""
    sock.settimeout(None)
    timeval = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _answer(conn: Connection, handle: Any) -> tuple[bytes, bytes, Any]:
    """Handle one forwarded message from `conn`; return the two reply frames (sent by the
    caller after it marked the worker free, so the next message never finds it busy) and what
    to do once they are sent."""
    kind = json.loads(conn.recv_bytes())[WORKER_KIND]
    context = context_from_proto(ProtoContext.FromString(conn.recv_bytes()))
    msg = message_from_proto(ProtoMessage.FromString(conn.recv_bytes()))
    try:
        reply = handle(kind, msg, context)
    except Exception as e:  # noqa: BLE001  # the ClientApp re-raises it: Flower turns it into an error reply
        traceback.print_exc()
        sys.stdout.flush()
        return json.dumps({WORKER_STATUS: "raised", WORKER_REASON: f"{type(e).__name__}: {e}"}).encode(), b"", None
    if reply.has_error():
        return json.dumps({WORKER_STATUS: "error", WORKER_CODE: reply.error.code, WORKER_REASON: reply.error.reason}).encode(), b"", None
    return json.dumps({WORKER_STATUS: "ok"}).encode(), recorddict_to_proto(reply.content).SerializeToString(), (kind, msg, context)


def _clean_up(paths: WorkerPaths) -> None:
    """Remove what the worker leaves behind; the folder too, unless its log holds a traceback."""
    for path in (paths.socket, paths.pid, paths.key, paths.client_lock, paths.busy_lock):
        path.unlink(missing_ok=True)
    try:
        if b"Traceback" not in paths.log.read_bytes():
            paths.log.unlink()
    except OSError:
        pass
    try:
        paths.folder.rmdir()
    except OSError:
        pass


def _watch_supernode(supernode_pid: int, paths: WorkerPaths) -> None:
    """Exit the moment the SuperNode is gone, even in the middle of a (hung) message."""
    while pid_alive(supernode_pid):
        time.sleep(PARENT_POLL)
    _clean_up(paths)
    os._exit(0)


def serve(folder: Path, supernode_pid: int) -> None:
    """Answer forwarded messages until the SuperNode is gone or nobody called for IDLE_SECONDS."""
    from fedsb.flower.node_handlers import handle, prewarm  # the heavy imports, once

    paths = WorkerPaths(folder)
    threading.Thread(target=_watch_supernode, args=(supernode_pid, paths), daemon=True).start()
    key = paths.key.read_bytes()
    busy_fd = os.open(paths.busy_lock, os.O_RDWR | os.O_CREAT, 0o600)
    paths.socket.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(paths.socket))
    os.chmod(paths.socket, 0o600)
    server.listen(4)
    paths.pid.write_text(str(os.getpid()))
    server.settimeout(PARENT_POLL)
    last = time.monotonic()
    try:
        while time.monotonic() - last < IDLE_SECONDS:
            try:
                sock, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            _set_timeouts(sock, RECV_TIMEOUT)
            conn = Connection(sock.detach())
            try:
                deliver_challenge(conn, key)  # the caller proves it holds the node's key ...
                answer_challenge(conn, key)  # ... and we prove the same to it
            except Exception:  # noqa: BLE001  # a stranger, or a caller that gave up: drop it
                conn.close()
                continue
            fcntl.flock(busy_fd, fcntl.LOCK_EX)
            after = None
            try:
                head, body, after = _answer(conn, handle)
                fcntl.flock(busy_fd, fcntl.LOCK_UN)
                conn.send_bytes(head)
                conn.send_bytes(body)
            except (EOFError, OSError):  # the ClientApp process went away (or stalled): nobody to answer
                pass
            except Exception:  # noqa: BLE001  # a frame a ClientApp does not send: logged, dropped; serve on
                print(f"dropped a message that could not be decoded ({time.strftime('%Y-%m-%d %H:%M:%S')}):", flush=True)
                traceback.print_exc()
                sys.stdout.flush()
            finally:
                fcntl.flock(busy_fd, fcntl.LOCK_UN)
                conn.close()
            if after is not None:  # not busy meanwhile: the next message waits for it, it needs it
                try:
                    prewarm(*after)
                except Exception:  # noqa: BLE001  # the next message will meet the same error, and report it
                    traceback.print_exc()
            last = time.monotonic()
    except Exception:  # a bug: its traceback goes to the log first, so the log is kept
        traceback.print_exc()
        sys.stdout.flush()
        raise SystemExit(1) from None
    finally:
        server.close()
        _clean_up(paths)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
