"""Issue #18, one test (or a few) per numbered finding: nothing lost, nothing mixed, no hostile
byte crashes the server, every expected error is one plain line. The hostile-payload fuzzing is
in tests/test_fuzz_payloads.py; the kill -9 test of the final write is at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomli_w
from typer.testing import CliRunner

from fedsb.cli import app
from fedsb.config import ConfigError, config_from_dict
from tests.test_federation import TINY

runner = CliRunner()


def write_config(tmp_path: Path, **sections) -> Path:
    data = json.loads(json.dumps(TINY))
    data["federation"]["rounds"] = 1
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def one_line_error(result) -> str:
    """The output of a failed command: exactly one line, no traceback."""
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


# --- 1. a hostile client crashes the Flower server ------------------------------------------


def test_1_deep_nesting_header_is_a_rejection_not_a_recursion_error():
    from fedsb.federated.validation import PayloadError, validate_update

    header = b"[" * 5000 + b"]" * 5000
    payload = len(header).to_bytes(8, "little") + header
    with pytest.raises(PayloadError, match="nests deeper"):
        validate_update(payload, {"a.R": (64, 64)}, 1_000_000, expected_dtype="fp32")


# --- 2. re-running into an existing results folder ------------------------------------------


def test_2_existing_results_folder_is_refused_without_resume_or_overwrite(tmp_path):
    cfg = write_config(tmp_path)
    out = tmp_path / "out"
    assert runner.invoke(app, ["run", str(cfg), "--out", str(out)]).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    line = one_line_error(runner.invoke(app, ["run", str(cfg), "--out", str(out), "--set", "train.lr=1e-3"]))
    assert "already holds results" in line and "--resume" in line and "--overwrite" in line
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # untouched
    other = tmp_path / "not-results"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    line = one_line_error(runner.invoke(app, ["run", str(cfg), "--out", str(other), "--overwrite"]))
    assert "not a fedsb results folder" in line and (other / "thesis.tex").read_text() == "keep me"


def test_2_overwrite_never_mixes_old_results_with_an_interrupted_new_run(tmp_path, monkeypatch):
    cfg = write_config(tmp_path)
    out = tmp_path / "out"
    assert runner.invoke(app, ["run", str(cfg), "--out", str(out)]).exit_code == 0
    assert (out / "summary.json").exists()

    import fedsb.federated.experiment as experiment

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C in the middle of the new run's first round

    monkeypatch.setattr(experiment, "play_round", interrupted)
    result = runner.invoke(app, ["run", str(cfg), "--out", str(out), "--overwrite", "--set", "train.lr=1e-3"])
    assert result.exit_code != 0
    # the old summary and adapter are gone, not mixed with the new config
    assert not (out / "summary.json").exists() and not (out / "adapter").exists()
    assert not out.exists() or "lr = 0.001" in (out / "config.toml").read_text()


# --- 3. two runs writing the same folder at once ---------------------------------------------


def test_3_second_run_on_a_locked_folder_stops_with_the_holder_named(tmp_path):
    from fedsb.rundir import RunLock

    cfg = write_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with RunLock(out):  # a run in progress (this very process: alive)
        line = one_line_error(runner.invoke(app, ["run", str(cfg), "--out", str(out)]))
    assert "being written by another fedsb run" in line and f"pid {os.getpid()}" in line


def test_3_a_run_in_another_process_blocks_this_one(tmp_path):
    cfg = write_config(tmp_path)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom fedsb.rundir import open_run\nwith open_run(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent / "src"), os.environ.get("PYTHONPATH", "")])},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_line_error(runner.invoke(app, ["run", str(cfg), "--out", str(out)]))
        assert f"pid {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()


def test_3_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    from fedsb.rundir import RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    import socket

    (out / ".fedsb.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with pytest.warns(UserWarning, match="stale lock"):
        with RunLock(out) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (out / ".fedsb.lock").exists()


# --- 4. --resume with a changed config --------------------------------------------------------


@pytest.mark.parametrize("override, key", [("train.lr=1e-3", "train.lr"), ("federation.num_clients=5", "federation.num_clients"), ("adapter.rank=8", "adapter.rank"), ("federation.strategy='fedit'", "federation.strategy")])
def test_4_resume_refuses_a_changed_config(tmp_path, override, key):
    cfg = write_config(tmp_path)
    out = tmp_path / "out"
    assert runner.invoke(app, ["run", str(cfg), "--out", str(out)]).exit_code == 0
    stored = (out / "config.toml").read_text()
    result = runner.invoke(app, ["run", "--resume", str(out), "--set", override])
    line = one_line_error(result)
    assert result.exit_code == 2 and f"--resume: {key} changed" in line
    assert (out / "config.toml").read_text() == stored


def test_4_resume_with_more_rounds_is_recorded_in_config_and_metrics(tmp_path):
    cfg = write_config(tmp_path)
    out = tmp_path / "out"
    assert runner.invoke(app, ["run", str(cfg), "--out", str(out)]).exit_code == 0
    result = runner.invoke(app, ["run", "--resume", str(out), "--set", "federation.rounds=2"])
    assert result.exit_code == 0, result.output
    text = (out / "config.toml").read_text()
    assert text.startswith("# resumed after round 1") and "federation.rounds: 1 -> 2" in text
    assert config_from_dict(__import__("tomllib").loads(text)).federation.rounds == 2
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["config_changes"] == {"federation.rounds": [1, 2]}
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


def test_4_more_rounds_under_dp_is_refused():
    from fedsb.rundir import resume_changes

    base = json.loads(json.dumps(TINY))
    base["privacy"] = {"user_level": True}
    old = config_from_dict(base)
    base["federation"]["rounds"] = 5
    with pytest.raises(ConfigError, match="calibrated for 2 rounds"):
        resume_changes(old, config_from_dict(base))


# --- 5. delta above 1/n ----------------------------------------------------------------------


def test_5_user_delta_at_or_above_one_over_clients_is_a_config_error():
    data = json.loads(json.dumps(TINY))
    data["privacy"] = {"user_level": True, "user_delta": 0.9}
    with pytest.raises(ConfigError, match=r"privacy.user_delta = 0.9: must be below 1/n = 0.333 with n = 3 clients"):
        config_from_dict(data)


def test_5_sample_delta_above_one_over_smallest_client_is_refused_once_data_is_known(tmp_path):
    cfg = write_config(tmp_path, privacy={"enabled": True, "delta": 0.5})  # 24 examples / 3 clients = 8 each
    result = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out")])
    line = one_line_error(result)
    assert result.exit_code == 2 and "privacy.delta = 0.5: must be below 1/n = 0.125 with n = 8" in line
    assert not (tmp_path / "out").exists()  # and the failed run left no folder behind


# --- 6. errors: one plain line, file/line/field named ----------------------------------------


def test_6_markup_in_a_message_prints_as_plain_text(tmp_path):
    cfg = write_config(tmp_path)
    line = one_line_error(runner.invoke(app, ["run", str(cfg), "--set", 'federation.strategy="[/x]"']))
    assert "federation.strategy = '[/x]'" in line
    line = one_line_error(runner.invoke(app, ["run", str(cfg), "--set", "train.lrr=1"]))
    assert "in [train]" in line


def test_6_debug_flag_and_env_show_the_traceback(tmp_path, monkeypatch):
    cfg = write_config(tmp_path)
    result = runner.invoke(app, ["run", str(cfg), "--debug", "--set", "train.lrr=1"])
    assert isinstance(result.exception, ConfigError)
    monkeypatch.setenv("FEDSB_DEBUG", "1")
    assert isinstance(runner.invoke(app, ["run", str(cfg), "--set", "train.lrr=1"]).exception, ConfigError)


def test_6_missing_data_file_and_too_many_clients_are_one_line(tmp_path):
    cfg = write_config(tmp_path, task={"name": "gsm8k", "options": {"path": str(tmp_path / "nope.jsonl")}})
    line = one_line_error(runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "a")]))
    assert "data file not found" in line and "nope.jsonl" in line
    cfg = write_config(tmp_path, federation={"num_clients": 50})
    line = one_line_error(runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "b")]))
    assert "federation.num_clients = 50: only 24 training examples" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_6_data_files_name_file_and_line(tmp_path):
    from fedsb.tasks.io import DataFormatError, load_records

    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(b'{"q": "a"}\n{"q": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=r"latin1.jsonl:2: not UTF-8"):
        load_records(bad_utf8, ("q",))
    bad_list = tmp_path / "latin1.json"
    bad_list.write_bytes(b'[\n{"q": "a"},\n{"q": "caf\xe9"}\n]')
    with pytest.raises(DataFormatError, match=r"latin1.json:3: not UTF-8"):
        load_records(bad_list, ("q",))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataFormatError, match=r"empty.jsonl: empty file"):
        load_records(empty, ("q",))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"q": "a"}\n{"q": \n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: invalid JSON"):
        load_records(bad_json, ("q",))
    from fedsb.errors import FedsbError

    assert issubclass(DataFormatError, FedsbError)


@pytest.mark.parametrize(
    "section, key, value, expected",
    [("privacy", "delta", "abc", "expected a number"), ("adapter", "targets", 5, "expected a list of strings or a string"),
     ("adapter", "targets", ["q_proj", 3], "expected a list of strings"), ("task", "eval_tasks", "gsm8k", "expected a list of strings"),
     ("model", "name", 3, "expected a string"), ("privacy", "init_noise_multiplier", "x", "expected a number")],
)
def test_6_type_checks_cover_optional_and_list_fields(section, key, value, expected):
    with pytest.raises(ConfigError, match=f"{section}.{key} = .*: {expected}"):
        config_from_dict({section: {key: value}})


# --- 7. integrity ------------------------------------------------------------------------------


def _run_two_rounds(tmp_path) -> Path:
    cfg = write_config(tmp_path, federation={"rounds": 2, "num_clients": 3})
    out = tmp_path / "out"
    assert runner.invoke(app, ["run", str(cfg), "--out", str(out)]).exit_code == 0
    return out


def test_7_truncated_latest_checkpoint_falls_back_to_the_previous_round(tmp_path):
    from fedsb.federated.checkpoint import CheckpointError, load_checkpoint
    from fedsb.federated.federation import build_federation
    from fedsb.config import load_config

    out = _run_two_rounds(tmp_path)
    ckpt = out / "checkpoint"
    assert sorted(p.name for p in ckpt.glob("state-*")) == ["state-round0.safetensors", "state-round1.safetensors"]
    latest = ckpt / "state-round1.safetensors"
    latest.write_bytes(latest.read_bytes()[:-100])  # truncated
    fed = build_federation(load_config(out / "config.toml"))
    with pytest.warns(UserWarning, match=r"state-round1.safetensors: checksum mismatch.*previous round 1"):
        meta, _ = load_checkpoint(out, fed.model, fed.head_modules)
    assert meta["round"] == 0
    # a resume then redoes round 2 and finishes
    result = runner.invoke(app, ["run", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert [json.loads(r)["round"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # both states bad: one line naming the files
    for p in ckpt.glob("state-*"):
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"state-round1.safetensors: checksum mismatch.*state-round0.safetensors"):
        load_checkpoint(out, fed.model, fed.head_modules)
    assert "state-round" in one_line_error(runner.invoke(app, ["run", "--resume", str(out)]))


def _saved_adapter(tmp_path, seed=0):
    from fedsb.adapter.export import save_adapter
    from fedsb.adapter.inject import inject_adapters
    from fedsb.init import init_random
    from fedsb.models import tiny_causal_lm

    model = tiny_causal_lm("llama", seed=seed)
    init_random(inject_adapters(model, ["q_proj", "v_proj"], rank=4, alpha=4), seed=1)
    save_adapter(model, tmp_path / "a", base_model="tiny-llama")
    return tmp_path / "a"


def test_7_flipped_bytes_in_an_adapter_are_refused(tmp_path):
    from fedsb.adapter.export import AdapterFileError, load_adapter
    from fedsb.models import tiny_causal_lm

    folder = _saved_adapter(tmp_path)
    weights = folder / "adapter.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0x01  # one bit of one R entry: still a valid file, silently different before
    weights.write_bytes(bytes(blob))
    with pytest.raises(AdapterFileError, match="checksum mismatch"):
        load_adapter(tiny_causal_lm("llama", seed=0), folder)


def test_7_adapter_on_another_base_with_the_same_shapes_needs_force(tmp_path):
    from fedsb.adapter.export import AdapterFileError, load_adapter
    from fedsb.models import tiny_causal_lm

    folder = _saved_adapter(tmp_path, seed=0)
    load_adapter(tiny_causal_lm("llama", seed=0), folder)  # the same base: fine
    with pytest.raises(AdapterFileError, match=r"saved on another base model .*weight model.embed_tokens.weight differs.*force=True"):
        load_adapter(tiny_causal_lm("llama", seed=1), folder)
    with pytest.warns(UserWarning, match="loaded anyway"):
        load_adapter(tiny_causal_lm("llama", seed=1), folder, force=True)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert {"class", "hidden_size", "frozen_sha256"} <= set(cfg["base_identity"])


def test_7_failed_run_leaves_no_folder_and_files_are_0644(tmp_path):
    cfg = write_config(tmp_path, task={"name": "gsm8k", "options": {"path": str(tmp_path / "nope.jsonl")}})
    out = tmp_path / "deep" / "out"
    assert runner.invoke(app, ["run", str(cfg), "--out", str(out)]).exit_code != 0
    assert not out.exists()
    old = os.umask(0o022)
    try:
        out = _run_two_rounds(tmp_path)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o644}, modes
    assert not (out / ".fedsb.lock").exists() and not (out / ".pending").exists()


# --- kill -9 during the final summary/adapter write ------------------------------------------

KILL_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import fedsb.rundir as rundir
    from pathlib import Path

    out, label, kill_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    calls = [0]

    def trap(fn):
        def wrapped(*a, **k):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)
        return wrapped

    # every filesystem step of a publication is a possible instant of death
    for mod, name in ((os, "replace"), (os, "fsync"), (os, "rmdir"), (os, "unlink"), (os, "mkdir")):
        setattr(mod, name, trap(getattr(mod, name)))

    def write_adapter(folder):
        weights = (label * 1000).encode()
        rundir.atomic_write_bytes(folder / "adapter.safetensors", weights)
        rundir.atomic_write_json(folder / "adapter_config.json", {"label": label})

    rundir.publish_result(out, {"label": label}, write_adapter)
    print("done", calls[0])
    """
)


def _result_label(out: Path) -> str | None:
    """The label of the complete result in `out`; fails on a mix or a partial result."""
    files = [out / "summary.json", out / "adapter" / "adapter_config.json", out / "adapter" / "adapter.safetensors"]
    if not any(f.exists() for f in files):
        return None
    summary = json.loads(files[0].read_text())["label"]
    config = json.loads(files[1].read_text())["label"]
    weights = files[2].read_bytes()
    assert summary == config and weights == (summary * 1000).encode(), f"mixed result: {summary}, {config}"
    return summary


def test_kill_9_during_the_final_write_leaves_old_or_new_complete_result(tmp_path):
    from fedsb.rundir import recover

    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "publish.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent / "src"), os.environ.get("PYTHONPATH", "")])}

    def publish(label: str, kill_at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(out), label, str(kill_at)], env=env, capture_output=True, text=True, timeout=60)

    assert publish("old", 0).returncode == 0
    assert _result_label(out) == "old"
    outcomes = []
    kill_at = 1
    while True:
        proc = publish("new", kill_at)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        recover(out)  # what the next `fedsb run` on this folder does first
        label = _result_label(out)
        assert label in ("old", "new")
        outcomes.append(label)
        if label == "new":  # restore the old result for the next instant
            publish("old", 0)
        kill_at += 1
    assert _result_label(out) == "new"
    print(f"{len(outcomes)} kill instants: {outcomes.count('old')} left the old result, {outcomes.count('new')} the new one")
    assert "old" in outcomes and "new" in outcomes and len(outcomes) >= 8  # every step was hit
    assert not (out / ".pending").exists() and not (out / ".old").exists()


def test_publish_result_replaces_a_finished_runs_result_in_process(tmp_path):
    """The same in one process: a second publication replaces the pair, nothing left behind."""
    from fedsb.rundir import publish_result

    for label in ("a", "b"):
        publish_result(tmp_path, {"label": label}, lambda d, label=label: (d.mkdir(), (d / "adapter_config.json").write_text(json.dumps({"label": label})), (d / "adapter.safetensors").write_bytes((label * 1000).encode())))
    assert _result_label(tmp_path) == "b" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "summary.json"]
