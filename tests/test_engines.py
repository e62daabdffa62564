"""Both engines, one driver: the same tiny config through `run_experiment` (in process) and
through a Flower deployment on loopback (a real SuperLink and 2 SuperNodes, as in
test_flower.py), feature by feature. For each: the adapters (max abs diff), the per-round
metrics that must agree (loss, bytes, epsilon, exactness) and the summary.

A feature the Flower engine refuses is listed in `REFUSED_ON_FLOWER` with the reason the engine
gives; the test checks that the refusal is exactly that (and that the in-process run works), so
no feature passes in one engine and silently fails in the other.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from safetensors.torch import load_file

from fedsb.config import load_config
from fedsb.federated.experiment import run_experiment
from fedsb.flower.launch import LocalFederation
from fixtures_flower import TINY, requires_flower

pytestmark = requires_flower

BASE = {**TINY, "task": {**TINY["task"], "eval_init": True}}
FEATURES: dict[str, dict[str, dict[str, Any]]] = {
    "fedsb": {},
    "fedex": {"federation": {"strategy": "fedex"}},
    "dp-sample": {"init": {"method": "random"}, "privacy": {"enabled": True, "target_epsilon": 4.0}},
    "dp-user": {"init": {"method": "random"}, "privacy": {"user_level": True, "user_clip_norm": 0.05, "user_noise_multiplier": 1.0}},
    "federated-init": {"init": {"method": "federated", "power_iters": 1}},
    "keep-optimizer": {"train": {"keep_optimizer_state": True}},
    "resume": {"train": {"keep_optimizer_state": True}, "privacy": {"user_level": True, "user_clip_norm": 0.05, "user_noise_multiplier": 1.0}, "init": {"method": "random"}},
}
REFUSED_ON_FLOWER: dict[str, str] = {}  # feature -> the reason the Flower engine gives (none today)
RUN_TIMEOUT = 900
ROW_KEYS = ("train_loss", "steps", "tokens", "bytes_up", "bytes_down", "upload_bytes_per_client", "download_bytes_per_client",
            "exactness_max", "epsilon", "epsilon_per_client", "user_epsilon", "user_noise_std")  # fmt: skip
SUMMARY_KEYS = ("accuracy_before", "accuracy_after", "total_bytes", "one_time_bytes", "final_train_loss", "max_exactness_error",
                "epsilon", "user_epsilon", "upload_bytes_per_client_round", "download_bytes_per_client_round")  # fmt: skip


def feature_config(path: Path, feature: str) -> Path:
    data = json.loads(json.dumps(BASE))
    for section, values in FEATURES[feature].items():
        data.setdefault(section, {}).update(values)
    path.write_text(tomli_w.dumps(data))
    return path


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def max_adapter_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(a / "adapter" / "adapter.safetensors"), load_file(b / "adapter" / "adapter.safetensors")
    assert ta.keys() == tb.keys()
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def same(a: Any, b: Any, tol: float = 1e-6) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
    return a == b


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalFederation(tmp_path_factory.mktemp("engines-cluster"), num_nodes=2) as fed:
        yield fed


def run_killed_and_resumed(cluster: LocalFederation, run_config: dict[str, Any], out: Path) -> dict[str, Any]:
    """SIGKILL the ServerApp after round 1's checkpoint, then `resume = true` to the end."""
    run_id = cluster.submit(run_config)
    meta = out / "checkpoint" / "meta.json"
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (meta.exists() and json.loads(meta.read_text())["round"] == 0):
        assert time.monotonic() < deadline, "round 1 never completed"
        time.sleep(0.2)
    pids = cluster.serverapp_pids()
    assert pids, "no ServerApp process to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    cluster.flwr("stop", str(run_id), "local")
    assert len(rows(out)) == 1
    return cluster.run({**run_config, "resume": True}, timeout=RUN_TIMEOUT)


@pytest.mark.parametrize("feature", list(FEATURES))
def test_both_engines_agree(feature, cluster, tmp_path):
    config = feature_config(tmp_path / f"{feature}.toml", feature)
    sim = tmp_path / "in-process"
    sim_summary = run_experiment(load_config(config), sim)
    dep = tmp_path / "flower"
    run_config = {"config-path": str(config), "out-dir": str(dep), "round-timeout": 600.0}
    if feature in REFUSED_ON_FLOWER:
        from fedsb.config import ConfigError
        from fedsb.flower.refusals import check_supported
        from fedsb.flower.settings import RunSettings

        with pytest.raises(ConfigError, match=REFUSED_ON_FLOWER[feature]):
            check_supported(load_config(config), RunSettings())
        assert sim_summary["accuracy_after"] is not None
        return
    if feature == "resume":
        info = run_killed_and_resumed(cluster, run_config, dep)
    else:
        info = cluster.run(run_config, timeout=RUN_TIMEOUT)
    assert info["status"] == "finished:completed", info
    diff = max_adapter_diff(dep, sim)
    assert diff <= 1e-6, diff
    d_rows, s_rows = rows(dep), rows(sim)
    assert [r["round"] for r in d_rows] == [r["round"] for r in s_rows] == [1, 2]
    for d, s in zip(d_rows, s_rows):
        assert d["accepted"] == [0, 1] and not d["missing"] and not d["rejected"]
        for key in ROW_KEYS:
            assert (key in d) == (key in s), key
            assert same(d.get(key), s.get(key)), (key, d.get(key), s.get(key))
        assert same(d["eval"]["accuracy"], s["eval"]["accuracy"]) if "eval" in s else "eval" not in d
    ds = json.loads((dep / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert same(ds.get(key), sim_summary.get(key)), (key, ds.get(key), sim_summary.get(key))
    assert ds["init"].get("eval", {}).get("accuracy") == sim_summary["init"].get("eval", {}).get("accuracy")
    if feature.startswith("dp") or feature == "resume":
        assert (ds.get("epsilon") or ds.get("user_epsilon")) and ds.get("privacy") == sim_summary.get("privacy")
        meta = json.loads((dep / "checkpoint" / "meta.json").read_text())
        assert meta["privacy"] == json.loads((sim / "checkpoint" / "meta.json").read_text())["privacy"]
    if feature == "resume":
        assert any(json.loads(line)["event"] == "resumed" for line in (dep / "flower_events.jsonl").read_text().splitlines())
