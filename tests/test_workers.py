"""Worker processes shared by `fedsb sweep --workers` and `fedsb privacy-table --workers`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedsb.commands import workers


class FakeProc:
    started: list[list[str]] = []
    terminated: list[int] = []

    def __init__(self, args, code=0):
        self.args, self.code, self.alive = args, code, True
        FakeProc.started.append(args)

    def poll(self):
        return None if self.alive else self.code

    def wait(self):
        self.alive = False
        return self.code

    def terminate(self):
        FakeProc.terminated.append(id(self))
        self.alive = False


@pytest.fixture
def fake_popen(monkeypatch):
    FakeProc.started, FakeProc.terminated = [], []
    monkeypatch.setattr(subprocess, "Popen", FakeProc)
    monkeypatch.setattr(workers, "exit_on_sigterm", lambda: None)  # leave pytest's handlers alone
    return FakeProc


def test_privacy_table_workers_rerun_the_command_without_workers(fake_popen):
    argv = ["privacy-table", "c.toml", "--workers", "2", "--seeds", "0,1", "--workers=2"]
    assert workers.run_workers([*workers.argv_without("--workers", argv), "--cells-only"], 2) == 0
    assert len(fake_popen.started) == 2
    assert fake_popen.started[0] == [sys.executable, "-m", "fedsb.cli", "privacy-table", "c.toml", "--seeds", "0,1", "--cells-only"]


def test_a_stop_while_waiting_terminates_every_worker(fake_popen, monkeypatch):
    """SIGTERM to the parent (raised here as SystemExit) must reach the workers, not orphan them."""
    def interrupted(self):
        raise SystemExit(143)

    monkeypatch.setattr(FakeProc, "wait", interrupted)
    with pytest.raises(SystemExit):
        workers.run_workers(["sweep", "s.toml"], 3)
    assert len(fake_popen.terminated) == 3
