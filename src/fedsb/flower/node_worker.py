"""A SuperNode's long-lived worker: the model stays loaded between Flower messages.

Flower 1.42 starts a fresh `flwr-clientapp` process for every message a SuperNode receives.
Built naively, each one imports torch and transformers, loads the model and tokenizes its
partition before it trains a few steps: with 10 SuperNodes on a 2-core machine that start-up
was 80-85% of each node's message time, and a round took 10-11x the in-process round. So the ClientApp process only forwards: it hands the message to a worker
process that belongs to its SuperNode, which builds the node's `Federation` once and keeps it
(the same per-process cache the handlers already use, `task.client_federation`), and returns the
reply's content. The ClientApp process imports Flower and this module, nothing of torch.

The worker:
- is started by the first ClientApp process of a SuperNode that finds none, in its own
  session, and exits when that SuperNode process is gone (or after `IDLE_SECONDS` unused);
- listens on a Unix socket in a private (0700) folder, authenticated with a random key file
  (0600) by `multiprocessing.connection`'s HMAC challenge; frames are Flower's protobufs
  (`send_bytes`), never pickles;
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
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message

from fedsb.flower.protocol import METRICS_RECORD, NODE_MESSAGE_METRIC, NODE_STARTUP_METRIC

IDLE_SECONDS = 1800.0  # a worker nobody used for this long exits (its SuperNode may live on)
SPAWN_TIMEOUT = 300.0  # seconds to wait for a new worker's socket (imports, on a loaded machine)
PARENT_POLL = 0.5


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
    choice = _truthy(context.node_config.get("node-worker"))
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
        ident = json.dumps([str(context.node_config.get("cache-dir", "")), str(context.node_config.get("partition-id", "")), supernode_pid, sys.executable])
        name = hashlib.sha256(ident.encode()).hexdigest()[:20]
        return cls(Path(tempfile.gettempdir()) / f"fedsb-node-{os.getuid()}-{name}")  # short: AF_UNIX paths are <= 107 bytes

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
    """The worker is serving another message: handle this one in the calling process."""


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
        from fedsb.flower.node_handlers import handle

        reply = handle(kind, msg, context)
    return _with_timing(reply)


def _with_timing(reply: Message) -> Message:
    """A train reply also says how long this process lived and how much of it was not training
    (interpreter, imports, Flower's pull, model and data when built here, a new worker)."""
    age = process_age()
    if age is None or reply.has_error() or METRICS_RECORD not in reply.content.metric_records:
        return reply
    metrics = reply.content.metric_records[METRICS_RECORD]
    if "seconds" in metrics:
        metrics[NODE_MESSAGE_METRIC] = float(age)
        metrics[NODE_STARTUP_METRIC] = max(0.0, float(age) - float(metrics["seconds"]))
    return reply


def _via_worker(kind: str, msg: Message, context: Context) -> Message:
    from flwr.common.serde import context_to_proto, message_to_proto, recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    paths = WorkerPaths.for_node(context, os.getppid())
    paths.folder.mkdir(mode=0o700, exist_ok=True)
    info = paths.folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:  # not ours alone (a shared /tmp): do without
        raise WorkerBusy(f"{paths.folder} is not a private folder of this user")
    with _try_lock(paths.client_lock):
        if _is_locked(paths.busy_lock):  # a worker still busy with a message its ClientApp gave up on
            raise WorkerBusy("worker busy")
        with _connect(paths) as conn:
            conn.send_bytes(json.dumps({"kind": kind}).encode())
            conn.send_bytes(context_to_proto(context).SerializeToString())
            conn.send_bytes(message_to_proto(msg).SerializeToString())
            try:
                head = json.loads(conn.recv_bytes())
                body = conn.recv_bytes()
            except EOFError:
                raise RuntimeError(f"the node worker died while handling {kind!r}; see {paths.log}") from None
    if head["status"] == "error":
        return Message(Error(code=int(head.get("code", 0)), reason=str(head["reason"])), reply_to=msg)
    if head["status"] == "raised":
        raise RuntimeError(str(head["reason"]))
    return Message(recorddict_from_proto(ProtoRecordDict.FromString(body)), reply_to=msg)


def _connect(paths: WorkerPaths) -> Connection:
    """Connect to the node's worker, starting one if none answers."""
    if paths.socket.exists() and paths.key.exists():
        try:
            return Client(str(paths.socket), family="AF_UNIX", authkey=paths.key.read_bytes())
        except (OSError, EOFError):
            paths.socket.unlink(missing_ok=True)  # a dead worker's socket
    key = secrets.token_bytes(32)
    fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
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


# --- the worker process ----------------------------------------------------------------------


def _answer(conn: Connection, handle: Any) -> tuple[bytes, bytes, Any]:
    """Handle one forwarded message from `conn`; return the two reply frames (sent by the
    caller after it marked the worker free, so the next message never finds it busy) and what
    to do once they are sent."""
    from flwr.common.serde import context_from_proto, message_from_proto, recorddict_to_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    kind = json.loads(conn.recv_bytes())["kind"]
    context = context_from_proto(ProtoContext.FromString(conn.recv_bytes()))
    msg = message_from_proto(ProtoMessage.FromString(conn.recv_bytes()))
    try:
        reply = handle(kind, msg, context)
    except Exception as e:  # noqa: BLE001  # the ClientApp re-raises it: Flower turns it into an error reply
        traceback.print_exc()
        sys.stdout.flush()
        return json.dumps({"status": "raised", "reason": f"{type(e).__name__}: {e}"}).encode(), b"", None
    if reply.has_error():
        return json.dumps({"status": "error", "code": reply.error.code, "reason": reply.error.reason}).encode(), b"", None
    return json.dumps({"status": "ok"}).encode(), recorddict_to_proto(reply.content).SerializeToString(), (kind, msg, context)


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
    from fedsb.rundir import pid_alive

    while pid_alive(supernode_pid):
        time.sleep(PARENT_POLL)
    _clean_up(paths)
    os._exit(0)


def serve(folder: Path, supernode_pid: int) -> None:
    """Answer forwarded messages until the SuperNode is gone or nobody called for IDLE_SECONDS."""
    import socket
    import threading
    from multiprocessing.connection import answer_challenge, deliver_challenge

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
            sock.settimeout(None)
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
            except (EOFError, OSError):  # the ClientApp process went away: nobody to answer
                pass
            finally:
                fcntl.flock(busy_fd, fcntl.LOCK_UN)
                conn.close()
            if after is not None:  # not busy meanwhile: the next message waits for it, it needs it
                try:
                    prewarm(*after)
                except Exception:  # noqa: BLE001  # the next message will meet the same error, and report it
                    traceback.print_exc()
            last = time.monotonic()
    finally:
        server.close()
        _clean_up(paths)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
