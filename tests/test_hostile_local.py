"""Issue 29, the local half: commands that must not delete or mix what they do not own, a lock
two processes cannot both take, the node worker's folder, key and log, and one-line errors.

Numbers are the issue's findings; the Flower half (1-4, 6, 16) is in tests/test_hostile_clients.py.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tomli_w
from typer.testing import CliRunner

from fedsb.cli import app
from fedsb.config import config_from_dict
from tests.test_federation import TINY

runner = CliRunner()
SRC = str(Path(__file__).parent.parent / "src")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


from tests.test_reliability import one_line_error, write_config  # the same tiny config and check


def error_line(result) -> str:
    """The error of a command that failed mid-run (after progress lines): one line, no traceback."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output and errors[0] == result.output.strip().splitlines()[-1], result.output
    return errors[0]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"") for p in sorted(folder.rglob("*"))}


# --- 5. --overwrite deletes only what fedsb wrote ---------------------------------------------


def test_5_overwrite_refuses_a_project_folder_with_a_config_toml(tmp_path):
    cfg = write_config(tmp_path)
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "config.toml").write_text(cfg.read_text())
    (project / "src" / "main.py").write_text("print('mine')\n")
    (project / "notes.txt").write_text("keep me")
    before = tree(project)
    line = one_line_error(runner.invoke(app, ["run", str(cfg), "--out", str(project), "--overwrite"]))
    assert "did not write" in line and "not a fedsb results folder" in line
    assert tree(project) == before


def test_5_overwrite_of_a_marked_folder_deletes_only_fedsb_files(tmp_path):
    from fedsb.rundir import MARKER, open_run

    out = tmp_path / "out"
    with open_run(out):  # a new run marks the folder it creates
        (out / "config.toml").write_text("seed = 0\n")
        (out / "checkpoint").mkdir()
        (out / "checkpoint" / "meta.json").write_text("{}")
        (out / "summary.json").write_text("{}")
    assert (out / MARKER).is_file()
    (out / "notes.txt").write_text("mine")  # the user's, added later
    with pytest.warns(UserWarning, match="keeps the files fedsb did not write: notes.txt"):
        with open_run(out, overwrite=True):
            assert sorted(p.name for p in out.iterdir()) == [".fedsb-run", ".fedsb.lock", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def test_5_folder_of_an_older_version_is_recognised_by_its_files_only(tmp_path):
    from fedsb.rundir import RunDirError, open_run

    old = tmp_path / "old"
    (old / "adapter").mkdir(parents=True)
    for name in ("config.toml", "metrics.jsonl", "summary.json", "eval_before.json", "adapter/adapter.safetensors"):
        (old / name).write_text("x")
    with open_run(old, overwrite=True):  # no mark, but only fedsb's files: replaced
        assert not (old / "summary.json").exists() and not (old / "adapter").exists()
    (old / "config.toml").write_text("x")
    (old / "thesis.tex").write_text("keep")
    (old / ".fedsb-run").unlink()
    with pytest.raises(RunDirError, match="thesis.tex"):
        with open_run(old, overwrite=True):
            pass
    assert (old / "thesis.tex").read_text() == "keep" and (old / "config.toml").exists()
    (old / "thesis.tex").unlink()
    with pytest.raises(RunDirError, match="only a config.toml"):  # a user's config alone is not taken for a run
        with open_run(old, overwrite=True):
            pass
    assert (old / "config.toml").read_text() == "x"


# --- 7. stale-lock takeover: exactly one winner ----------------------------------------------

CONTENDER = """
import os, sys, time
from pathlib import Path
from fedsb.rundir import RunDirError, RunLock
out, go, me, n = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
while not go.exists():
    time.sleep(0.001)
try:
    RunLock(out).acquire()
    won = "in"
except RunDirError:
    won = "out"
me.write_text(won)
deadline = time.monotonic() + 30  # a winner holds the lock until every contender has tried
while won == "in" and len(list(me.parent.glob("res-*"))) < n and time.monotonic() < deadline:
    time.sleep(0.01)
"""


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_7_processes_racing_for_a_stale_lock_exactly_one_enters(tmp_path):
    script = tmp_path / "contender.py"
    script.write_text(CONTENDER)
    dead, n = _dead_pid(), 6
    for trial in range(4):
        out, flags = tmp_path / f"out{trial}", tmp_path / f"flags{trial}"
        out.mkdir()
        flags.mkdir()
        (out / ".fedsb.lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
        procs = [
            subprocess.Popen([sys.executable, str(script), str(out), str(flags / "go"), str(flags / f"res-{i}"), str(n)], env=ENV, stderr=subprocess.DEVNULL)
            for i in range(n)
        ]
        time.sleep(0.5)  # most of them are waiting for the start
        (flags / "go").touch()
        for p in procs:
            p.wait(timeout=120)
        results = sorted(f.read_text() for f in flags.glob("res-*"))
        assert results.count("in") == 1 and len(results) == n, (trial, results)


def test_7_a_live_holder_keeps_the_lock_whatever_its_file_says(tmp_path):
    """The lock is the kernel's flock, not the pid written in the file: a file that looks stale
    (as it does to every contender of a race once one of them rewrote it) is not taken over."""
    from fedsb.rundir import RunDirError, RunLock

    out = tmp_path / "out"
    out.mkdir()
    with RunLock(out) as held:
        held.path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
        with pytest.raises(RunDirError, match="being written by another fedsb run"):
            RunLock(out).acquire()
    assert not (out / ".fedsb.lock").exists()


# --- 8. fedsb export ---------------------------------------------------------------------------


def _run_with_adapter(tmp_path: Path) -> tuple[Path, Path]:
    """A results folder (marked, config.toml) with a fedsb adapter on a saved tiny base."""
    from fedsb.adapter.export import save_adapter
    from fedsb.adapter.inject import inject_adapters
    from fedsb.init import init_random
    from fedsb.models import tiny_causal_lm

    base = tmp_path / "base"
    tiny_causal_lm("llama", seed=0).save_pretrained(base)
    model = tiny_causal_lm("llama", seed=0)
    init_random(inject_adapters(model, ["q_proj", "v_proj"], rank=4, alpha=4), seed=1)
    run = tmp_path / "run"
    save_adapter(model, run / "adapter", base_model=str(base))
    (run / "config.toml").write_text("seed = 0\n")
    (run / ".fedsb-run").write_text("")  # fedsb.rundir.MARKER
    return run, base


def _no_tokenizer(monkeypatch) -> None:
    import fedsb.models
    from fedsb.models import tiny_causal_lm

    monkeypatch.setattr(fedsb.models, "load_model", lambda *a, **k: (tiny_causal_lm("llama", seed=0), None))


def test_8_export_never_writes_into_the_runs_own_files(tmp_path, monkeypatch):
    run, base = _run_with_adapter(tmp_path)
    _no_tokenizer(monkeypatch)
    before = tree(run)
    line = one_line_error(runner.invoke(app, ["export", str(run), str(run / "adapter"), "--base", str(base)]))
    assert "is the adapter being exported" in line
    for target in (run, run / "checkpoint", run / "adapter" / "peft"):
        line = one_line_error(runner.invoke(app, ["export", str(run), str(target), "--base", str(base), "--force"]))
        assert str(target) in line and ("own files" in line or "being exported" in line)
    assert tree(run) == before  # fedsb's adapter_config.json is still fedsb's
    assert runner.invoke(app, ["export", str(run), str(run / "peft"), "--base", str(base)]).exit_code == 0  # a new folder of the user's


def test_8_export_refuses_a_non_empty_folder_and_force_replaces_a_previous_export(tmp_path, monkeypatch):
    run, base = _run_with_adapter(tmp_path)
    _no_tokenizer(monkeypatch)
    dest = tmp_path / "peft"
    dest.mkdir()
    (dest / "adapter_model.safetensors").write_bytes(b"stale")
    (dest / "notes.txt").write_text("mine")
    line = one_line_error(runner.invoke(app, ["export", str(run), str(dest), "--base", str(base)]))
    assert "not empty" in line and "--force" in line
    assert (dest / "adapter_model.safetensors").read_bytes() == b"stale"
    result = runner.invoke(app, ["export", str(run), str(dest), "--base", str(base), "--force"])
    assert result.exit_code == 0, result.output
    assert (dest / "adapter_model.safetensors").read_bytes() != b"stale"
    assert json.loads((dest / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (dest / "notes.txt").read_text() == "mine"  # not the export's: kept


def test_8_export_refuses_a_folder_holding_a_fedsb_adapter(tmp_path):
    run, base = _run_with_adapter(tmp_path)
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "adapter.safetensors").write_bytes(b"a fedsb adapter")
    line = one_line_error(runner.invoke(app, ["export", str(run), str(other), "--base", str(base), "--force"]))
    assert "holds a fedsb adapter" in line and (other / "adapter.safetensors").read_bytes() == b"a fedsb adapter"


# --- 9 and 14. the node worker's folder, key, timeout and log ---------------------------------


def _context(tmp_path: Path, name: str = "node"):
    from flwr.app import Context, RecordDict

    cfg = {"partition-id": 0, "cache-dir": str(tmp_path / name), "node-worker": True}
    return Context(run_id=1, node_id=7, node_config=cfg, state=RecordDict(), run_config={})


class _ExitsAtOnce:
    """Stands for the worker process: exits at start, so nothing heavy runs."""

    returncode = 1

    def __init__(self, *args, **kwargs) -> None:
        pass

    def poll(self) -> int:
        return 1


@pytest.fixture
def no_worker_process(monkeypatch):
    from fedsb.flower import node_worker

    monkeypatch.setattr(node_worker.subprocess, "Popen", _ExitsAtOnce)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return node_worker


def test_9_planted_symlink_is_refused_and_its_target_untouched(tmp_path, no_worker_process):
    node_worker = no_worker_process
    ctx = _context(tmp_path)
    paths = node_worker.WorkerPaths.for_node(ctx, os.getppid())
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    try:
        paths.folder.symlink_to(victim)  # what another user plants where the folder will be
        with pytest.raises(node_worker.WorkerBusy, match="symlink"):
            node_worker._via_worker("train", None, ctx)  # refused before the message is read
        assert list(victim.iterdir()) == []  # no key, pid or log written through the link
    finally:
        paths.folder.unlink(missing_ok=True)


def test_9_worker_folders_live_under_a_private_parent(tmp_path, no_worker_process, monkeypatch):
    node_worker = no_worker_process
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared))  # not private: passed over
    folder = node_worker.WorkerPaths.for_node(_context(tmp_path, "c"), os.getppid()).folder
    parent = os.lstat(folder.parent)
    assert folder.parent != shared and stat.S_ISDIR(parent.st_mode) and parent.st_uid == os.getuid()
    assert parent.st_mode & 0o077 == 0  # /tmp (1777) before
    import shutil
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="fx"))  # socket paths must stay short: not under tmp_path
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(short / "xdg"))
        (short / "xdg").mkdir(mode=0o700)
        assert node_worker.WorkerPaths.for_node(_context(tmp_path, "c"), os.getppid()).folder.parent == short / "xdg"
        monkeypatch.delenv("XDG_RUNTIME_DIR")
        folder = node_worker.WorkerPaths.for_node(_context(short, "cache"), os.getppid()).folder
        assert folder.parent == short / "cache" / "workers" and stat.S_IMODE(os.lstat(folder.parent).st_mode) == 0o700
    finally:
        shutil.rmtree(short)


def test_14_a_key_file_that_existed_0644_is_made_anew_0600(tmp_path, no_worker_process):
    node_worker = no_worker_process
    paths = node_worker.WorkerPaths.for_node(_context(tmp_path), os.getppid())
    paths.folder.mkdir(mode=0o700)
    try:
        paths.key.write_bytes(b"old")
        paths.key.chmod(0o644)
        with pytest.raises(RuntimeError, match="exited at start"):
            node_worker._connect(paths)
        assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600 and paths.key.read_bytes() != b"old"
    finally:
        for p in paths.folder.iterdir():
            p.unlink()
        paths.folder.rmdir()


def test_14_worker_outlives_a_silent_peer_and_a_bad_frame_and_keeps_its_log(tmp_path):
    from multiprocessing.connection import Client

    from fedsb.flower import node_worker

    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    folder = tmp_path / "w"
    folder.mkdir(mode=0o700)
    paths = node_worker.WorkerPaths(folder)
    paths.key.write_bytes(b"k" * 32)
    with open(paths.log, "ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "fedsb.flower.node_worker", str(folder), str(supernode.pid)],
            stdout=log, stderr=subprocess.STDOUT, env={**ENV, "FEDSB_NODE_RECV_TIMEOUT": "1"},
        )
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        deadline = time.monotonic() + 180
        while not paths.pid.exists():
            assert time.monotonic() < deadline and worker.poll() is None, paths.log.read_text()
            time.sleep(0.1)
        silent.connect(str(paths.socket))  # connects, sends nothing, never leaves

        outcome: list[str] = []

        def bad_frame() -> None:
            with Client(str(paths.socket), family="AF_UNIX", authkey=b"k" * 32) as conn:
                try:
                    for frame in (b"\xff not a frame", b"", b""):
                        conn.send_bytes(frame)
                    conn.recv_bytes()
                    outcome.append("answered")
                except (EOFError, ConnectionError) as e:
                    outcome.append("dropped")
                except BaseException as e:
                    outcome.append(repr(e))

        caller = threading.Thread(target=bad_frame, daemon=True)
        caller.start()
        caller.join(timeout=60)
        assert outcome == ["dropped"], "the worker was blocked by a silent peer"
        assert worker.poll() is None  # a bad frame did not kill it
        with Client(str(paths.socket), family="AF_UNIX", authkey=b"k" * 32):
            pass  # still serving
        supernode.kill()
        supernode.wait()
        worker.wait(timeout=60)
        log = paths.log.read_text()
        assert "Traceback" in log and "could not be decoded" in log  # kept, with the reason
        assert not paths.key.exists() and not paths.socket.exists()
    finally:
        silent.close()
        for proc in (supernode, worker):
            proc.kill()
            proc.wait()


# --- 10. --set of a table merges ---------------------------------------------------------------


def test_10_set_of_a_table_merges_into_it():
    cfg = config_from_dict(json.loads(json.dumps(TINY)), ["train={lr=1e-3}", "task={options={generator_kwargs={max_digits=2}}}"])
    assert cfg.train.lr == 1e-3
    assert (cfg.train.local_steps, cfg.train.batch_size, cfg.train.max_length) == (2, 4, 128)  # TINY's, not the defaults
    assert cfg.task.options["generator"] == "chain_sum" and cfg.task.options["generator_kwargs"]["min_terms"] == 2
    assert cfg.task.options["generator_kwargs"]["max_digits"] == 2
    assert config_from_dict({}, ["train={lr=1e-3}"]).train.lr == 1e-3  # a table the file lacks is still set


# --- 11 and 12. refused values and one-line errors ---------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [("seed=-1", "seed"), ("task.train_limit=-1", "task.train_limit"), ("task.eval_limit=-1", "task.eval_limit"),
     ("task.max_new_tokens=-1", "task.max_new_tokens"), ("train.max_length=1", "train.max_length"),
     ("task.eval_options={arith={eval_limit=-2}}", "task.eval_options.arith.eval_limit")],
)
def test_11_12_negative_limits_and_tiny_lengths_are_one_line_naming_the_key(tmp_path, override, key):
    cfg = write_config(tmp_path)
    line = one_line_error(runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out"), "--set", override]))
    assert f"{key} = " in line
    assert not (tmp_path / "out").exists()


def test_11_zero_and_unset_keep_their_meaning():
    data = json.loads(json.dumps(TINY))
    data["task"].update(train_limit=0, eval_limit=0, max_new_tokens=0)
    data["train"]["max_length"] = 2
    cfg = config_from_dict(data)
    assert (cfg.task.train_limit, cfg.task.eval_limit, cfg.task.max_new_tokens, cfg.train.max_length) == (0, 0, 0, 2)
    del data["task"]["max_new_tokens"], data["task"]["train_limit"]
    assert config_from_dict(data).task.max_new_tokens is None


def test_12_config_path_that_is_a_folder_or_not_utf8_is_one_line(tmp_path):
    line = one_line_error(runner.invoke(app, ["run", str(tmp_path), "--out", str(tmp_path / "out")]))
    assert "is a folder" in line
    bad = tmp_path / "latin1.toml"
    bad.write_bytes("# réglages\nseed = 1\n".encode("latin-1"))
    line = one_line_error(runner.invoke(app, ["run", str(bad), "--out", str(tmp_path / "out")]))
    assert "not UTF-8" in line and "0xe9" in line and str(bad) in line


def test_12_rank_larger_than_a_layer_names_the_layer_and_both_sizes(tmp_path):
    cfg = write_config(tmp_path)
    line = one_line_error(runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out"), "--set", "adapter.rank=1000"]))
    assert "rank 1000" in line and "q_proj" in line and "32x32" in line and "at most 32" in line
    assert not (tmp_path / "out").exists()


def test_12_dangling_symlink_out_is_one_line(tmp_path):
    cfg = write_config(tmp_path)
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    line = one_line_error(runner.invoke(app, ["run", str(cfg), "--out", str(link)]))
    assert "symlink" in line and "does not exist" in line
    assert link.is_symlink() and not (tmp_path / "gone").exists()


def test_12_read_only_results_folder_is_one_line(tmp_path, monkeypatch):
    cfg = write_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def read_only(fn):
        def wrapped(path, *args, **kwargs):
            if str(path).startswith(str(out)) and (fn is real_mkdir or (args and args[0] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return fn(path, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(os, "open", read_only(real_open))
    monkeypatch.setattr(os, "mkdir", read_only(real_mkdir))
    line = one_line_error(runner.invoke(app, ["run", str(cfg), "--out", str(out)]))
    assert "Read-only file system" in line and str(out) in line


def test_12_full_disk_is_one_line_and_leaves_no_half_run(tmp_path, monkeypatch):
    cfg = write_config(tmp_path)
    out = tmp_path / "out"
    real = Path.write_bytes

    def full(self, data):
        if self.name.startswith(".metrics.jsonl."):  # the first round's checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    line = error_line(runner.invoke(app, ["run", str(cfg), "--out", str(out)]))
    assert "metrics.jsonl: cannot write (No space left on device)" in line and "--resume" in line
    assert not out.exists()  # a run that left no round to resume removes what it wrote


# --- 13. killed before the first checkpoint ----------------------------------------------------


def test_13_a_run_killed_before_its_first_round_is_restarted_by_resume(tmp_path, monkeypatch):
    import fedsb.federated.experiment as experiment
    import fedsb.rundir as rundir

    cfg = write_config(tmp_path)
    out, clean = tmp_path / "out", tmp_path / "clean"
    with monkeypatch.context() as m:  # kill -9 in round 1: no clean-up runs
        m.setattr(experiment, "play_round", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        m.setattr(rundir, "_clear", lambda *a, **k: None)
        m.setattr(rundir, "_remove_if_empty", lambda *a, **k: None)
        assert runner.invoke(app, ["run", str(cfg), "--out", str(out)]).exit_code != 0
    assert (out / "config.toml").is_file() and not (out / "checkpoint").exists()
    line = one_line_error(runner.invoke(app, ["run", str(cfg), "--out", str(out)]))
    assert "stopped before its first round" in line and "--resume" in line
    result = runner.invoke(app, ["run", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert "starting it again from the first round" in result.output
    assert runner.invoke(app, ["run", str(cfg), "--out", str(clean)]).exit_code == 0
    weights = "adapter/adapter.safetensors"
    assert (out / weights).read_bytes() == (clean / weights).read_bytes()  # as if never killed
