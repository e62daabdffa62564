"""The SuperNode's worker (`fedsb.flower.node_worker`): a message answered through it equals the
same message answered in the calling process; a busy worker is bypassed, not waited for; a
caller without the node's key is refused; the worker exits when its SuperNode does."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import pytest
from fixtures_flower import server_side
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedsb.federated import comm
from fedsb.flower import client_app, codec, node_party, node_worker, protocol


def _wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _kill_worker(paths: node_worker.WorkerPaths) -> None:
    if paths.pid.exists():
        try:
            os.kill(int(paths.pid.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A server-side federation, the messages of its first round, and two contexts for the same
    partition (one through a worker, one in this process), each with its own cache."""
    _, frozen, text, shas, download = server_side(monkeypatch)

    def message(kind: str) -> Message:
        if kind == "setup":
            content = RecordDict({protocol.SETUP_RECORD: ConfigRecord({"config-toml": text, **shas}), protocol.FROZEN_RECORD: codec.payload_record(frozen)})
            return Message(content, dst_node_id=7, message_type=protocol.SETUP_MESSAGE_TYPE, group_id="1")
        content = RecordDict({protocol.DOWNLOAD_RECORD: codec.payload_record(download), protocol.CONFIG_RECORD: ConfigRecord({"round": 0, **shas})})
        return Message(content, dst_node_id=7, message_type=kind, group_id="1")

    def context(name: str, worker: bool, partition: int = 1) -> Context:
        cfg = {"partition-id": partition, "cache-dir": str(tmp_path / name), "node-worker": worker}
        return Context(run_id=1, node_id=7, node_config=cfg, state=RecordDict(), run_config={})

    made: list[node_worker.WorkerPaths] = []

    def paths(ctx: Context) -> node_worker.WorkerPaths:
        p = node_worker.WorkerPaths.for_node(ctx, os.getppid())
        made.append(p)
        return p

    yield message, context, paths
    node_party.forget_parties()  # the handlers' per-process cache: what this test built stays here
    for p in made:
        _kill_worker(p)
        shutil.rmtree(p.folder, ignore_errors=True)


def _upload(reply: Message) -> dict:
    assert not reply.has_error(), reply.error.reason
    return comm.decode(codec.payload_from_record(reply.content.array_records[protocol.UPDATE_RECORD]))[0]


def test_worker_answers_like_the_calling_process(node):
    message, context, paths = node
    local, remote = context("local", False), context("remote", True)
    worker = paths(remote)
    assert client_app.setup(message("setup"), local).content.config_records[protocol.NODE_RECORD]["has-frozen"] is True
    reply = client_app.setup(message("setup"), remote)
    assert reply.content.config_records[protocol.NODE_RECORD]["has-frozen"] is True
    assert worker.pid.exists() and worker.socket.exists()  # the first message started the worker
    assert oct(worker.folder.stat().st_mode & 0o777) == "0o700" and oct(worker.key.stat().st_mode & 0o777) == "0o600"
    pid = int(worker.pid.read_text())
    for _ in range(2):  # the second train message reuses the worker's federation
        expected, got = _upload(client_app.train(message("train"), local)), _upload(client_app.train(message("train"), remote))
        assert expected.keys() == got.keys()
        assert all(bool((expected[k] == got[k]).all()) for k in expected)  # bit-identical
    assert int(worker.pid.read_text()) == pid  # one worker served them all
    metrics = client_app.train(message("train"), remote).content.metric_records[protocol.METRICS_RECORD]
    assert 0 < metrics[protocol.NODE_STARTUP_METRIC] <= metrics[protocol.NODE_MESSAGE_METRIC]
    loss = client_app.evaluate(message("evaluate"), remote).content.metric_records[protocol.METRICS_RECORD]["loss"]
    assert loss == client_app.evaluate(message("evaluate"), local).content.metric_records[protocol.METRICS_RECORD]["loss"]


def test_worker_errors_reach_the_caller(node):
    message, context, paths = node
    bad = context("bad", True, partition=9)  # TINY has 2 partitions
    paths(bad)
    early = client_app.train(message("train"), bad)  # no setup yet: the handler's own error reply
    assert early.has_error() and protocol.MISSING_SETUP in early.error.reason
    client_app.setup(message("setup"), bad)
    with pytest.raises(RuntimeError, match="partition-id 9 is outside"):  # raised in the worker
        client_app.train(message("train"), bad)


def test_busy_worker_is_bypassed(node):
    """A message that finds the worker busy is answered in the calling process at once."""
    import fcntl

    message, context, paths = node
    ctx = context("busy", True)
    worker = paths(ctx)
    worker.folder.mkdir(mode=0o700, exist_ok=True)
    with open(worker.busy_lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        reply = client_app.setup(message("setup"), ctx)
    assert reply.content.config_records[protocol.NODE_RECORD]["has-frozen"] is True
    assert not worker.socket.exists()  # no worker was started for it


def test_worker_refuses_a_wrong_key_and_exits_with_its_supernode(tmp_path):
    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    folder = tmp_path / "w"
    folder.mkdir(mode=0o700)
    paths = node_worker.WorkerPaths(folder)
    paths.key.write_bytes(b"k" * 32)
    worker = subprocess.Popen([sys.executable, "-m", "fedsb.flower.node_worker", str(folder), str(supernode.pid)])
    try:
        _wait(paths.pid.exists, timeout=120)
        with pytest.raises(AuthenticationError):
            Client(str(paths.socket), family="AF_UNIX", authkey=b"x" * 32)
        with Client(str(paths.socket), family="AF_UNIX", authkey=b"k" * 32):
            pass  # still serving, and the right key is let in
        supernode.kill()
        supernode.wait()
        worker.wait(timeout=30)  # gone without being told
        assert not paths.socket.exists() and not paths.key.exists()
    finally:
        for proc in (supernode, worker):
            proc.kill()
