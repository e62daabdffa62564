"""Node-data mode: every SuperNode reads its own `data-path`, the ServerApp reads no client data.

The end-to-end test runs 3 SuperNodes, each told only its own party's folder, with the ServerApp
process unable to open anything under the parties' root (a `sitecustomize` hook in its
environment refuses and logs every such open), and compares the adapter with the in-process
run on the same folders (`federation.client_data`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsb.config import config_from_dict
from fedsb.flower import node_party, screening
from fedsb.flower.node_cache import node_cache
from fedsb.flower.settings import RunSettings
from fedsb.flower.screening import Expected, ReplyError, fixed_counts, screen_reply

from fixtures_flower import requires_flower
from test_client_data import three_parties, tiny_config

# A hook for the ServerApp's process: refuse (and log) every open of a path under FEDSB_FORBID.
FORBID_HOOK = '''
import builtins, io, os, sys
_root = os.environ.get("FEDSB_FORBID")
_log = os.environ.get("FEDSB_FORBID_LOG")
if _root and _log:
    with open(_log, "a") as f:
        f.write("loaded " + " ".join(sys.argv[:1]) + "\\n")
    _open, _os_open = builtins.open, os.open

    def _check(path):
        try:
            p = os.path.realpath(os.fspath(path))
        except TypeError:
            return
        if p.startswith(_root):
            with _open(_log, "a") as f:
                f.write("refused " + p + "\\n")
            raise PermissionError(f"the ServerApp may not read client data: {p}")

    def guarded_open(file, *a, **k):
        _check(file)
        return _open(file, *a, **k)

    def guarded_os_open(path, *a, **k):
        _check(path)
        return _os_open(path, *a, **k)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
'''


def forbid_env(tmp_path: Path, root: Path) -> tuple[dict[str, str], Path]:
    hook = tmp_path / "forbid-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FORBID_HOOK)
    log = tmp_path / "forbid.log"
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]), "FEDSB_FORBID": str(root.resolve()), "FEDSB_FORBID_LOG": str(log)}
    return env, log


def test_the_forbid_hook_can_fail(tmp_path):
    """The proof used below is not vacuous: a process with the hook cannot read a party file."""
    root = three_parties(tmp_path / "p")
    env, log = forbid_env(tmp_path, root)
    code = f"open({str(root / 'alpha' / 'train.jsonl')!r}).read()"
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
    assert res.returncode != 0 and "may not read client data" in res.stderr
    assert "refused" in log.read_text()


# --- a node lying about its example count --------------------------------------------------------


@pytest.mark.parametrize("claim", [0, -1, 10**9, 2.5, "7", float("nan")])
def test_a_refused_count_claim_takes_no_part(claim):
    with pytest.raises(ReplyError, match="num-examples"):
        screen_reply("setup", {"partition-id": 2, "has-frozen": False, "num-examples": claim}, Expected(partitions=3))


@pytest.mark.parametrize("claim", [1, 6, 12, 24, 10**8])
def test_an_accepted_count_claim_moves_the_global_r_at_most_by_the_cap(claim):
    """Honest parties hold 6 and 4 examples; the third claims `claim`. Its count is capped at
    4x the median of the claims, so its share of the weighted mean of R, and so how far it can
    pull the global R towards its own, is at most cap / (cap + 10) whatever it claims."""
    import torch

    from fedsb.aggregation import get_strategy

    reported = {0: 6, 1: 4, 2: screen_reply("setup", {"partition-id": 2, "has-frozen": False, "num-examples": claim}, Expected(partitions=3)).num_examples}
    counts = fixed_counts(None, reported)
    cap = screening.COUNT_CAP * sorted(reported.values())[1]
    assert counts[0] == 6 and counts[1] == 4 and counts[2] == min(claim, int(cap))
    strategy = get_strategy("fedsb")(weighted=True)
    weights = {p: strategy.client_weight(n) for p, n in counts.items()}
    r = {0: torch.zeros(3, dtype=torch.float64), 1: torch.zeros(3, dtype=torch.float64), 2: torch.ones(3, dtype=torch.float64)}  # the liar pulls towards 1
    global_r = sum(weights[p] * r[p] for p in r) / sum(weights.values())
    bound = min(claim, cap) / (min(claim, cap) + 10)
    assert float(global_r.max()) == pytest.approx(bound) and float(global_r.max()) <= 24 / 34 + 1e-12


def run_node_data_loopback(tmp: Path, monkeypatch, lie: int | None) -> tuple[Path, object]:
    """`run_server` in node-data mode over the in-process loopback grid (tests/test_hostile_clients):
    3 nodes, each with its own party folder; partition 2 reports `lie` examples at setup."""
    import tomli_w
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedsb.flower.server_loop import run_server
    from test_hostile_clients import LoopbackGrid

    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    monkeypatch.setattr(node_party, "_PARTIES", {})
    root = three_parties(tmp / "parties")
    data = tiny_config(None)
    del data["federation"]["client_data"]
    data["federation"].update(num_clients=3, rounds=1)
    data["task"]["options"]["answer_check"] = "none"
    (tmp / "server.toml").write_text(tomli_w.dumps(data))
    honest = node_party.NodeParty.counts

    def counts(party, cid):  # what partition 2's node claims at setup
        out = honest(party, cid)
        return {**out, "num-examples": lie} if cid == 2 and lie is not None else out

    monkeypatch.setattr(node_party.NodeParty, "counts", counts)
    out = tmp / "out"
    run_config = {"config-path": str(tmp / "server.toml"), "out-dir": str(out), "round-timeout": 600.0, "discovery-timeout": 5.0, "node-data": True}
    grid = LoopbackGrid(tmp, 3, run_config)
    for i, name in enumerate(("alpha", "beta", "gamma")):
        grid.contexts[100 + i].node_config["data-path"] = str(root / name)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    try:
        return out, run_server(grid, context, RunSettings.from_run_config(run_config))
    except Exception as e:
        return out, e


@requires_flower
@pytest.mark.parametrize("lie", [0, -5, 10**9])
def test_e2e_a_refused_count_stops_the_run_before_any_weight_is_fixed(tmp_path, monkeypatch, caplog, lie):
    out, result = run_node_data_loopback(tmp_path, monkeypatch, lie)
    assert isinstance(result, Exception) and "no SuperNode with its own data answered for partitions [2]" in str(result)
    bad = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bad-setup")]
    assert len(bad) == 1 and "field 'num-examples'" in bad[0] and '"node": 102' in bad[0]
    assert not (out / "adapter").exists()  # a run that failed before round 1 leaves no results (fedsb.rundir)


@requires_flower
def test_e2e_a_huge_count_is_capped_at_four_times_the_median(tmp_path, monkeypatch):
    out, summary = run_node_data_loopback(tmp_path, monkeypatch, 10**8)
    assert isinstance(summary, dict), summary
    counts = json.loads(next(line for line in (out / "flower_events.jsonl").read_text().splitlines() if "party-counts" in line))
    assert counts["examples"] == {"0": 6, "1": 4, "2": 10**8} and counts["capped"] == {"2": 10**8}
    # the weights the round used: 6, 4 and 4 x median(6, 4, 10^8) = 24, so the liar holds 24/34 of the mean
    assert summary["flower"]["node_data"]["examples"]["2"] == 10**8


# --- what refuses node-data mode -----------------------------------------------------------------


def test_node_data_refuses_what_reads_client_data_at_the_server(tmp_path):
    from fedsb.flower.refusals import refusals

    root = three_parties(tmp_path / "p")
    settings = RunSettings(node_data=True)
    data = tiny_config(None)
    del data["federation"]["client_data"]
    data["federation"]["num_clients"] = 3
    assert refusals(config_from_dict(data), settings) == []
    central = json.loads(json.dumps(data))
    central["init"] = {"method": "central"}
    (reason,) = refusals(config_from_dict(central), settings)
    assert 'init.method = "central": that init reads a sample of the clients\' data at the server' in reason
    central["init"]["data"] = "public:arith"
    assert refusals(config_from_dict(central), settings) == []
    with_files = tiny_config(str(root))
    assert any("the ServerApp would read the parties' files" in r for r in refusals(config_from_dict(with_files), settings))
    assert refusals(config_from_dict(with_files), RunSettings()) == []  # the simulation mode may


def test_a_data_free_federation_holds_no_examples(tmp_path):
    from fedsb.federated.federation import build_federation, init_batches

    data = tiny_config(None)
    del data["federation"]["client_data"]
    data["federation"]["num_clients"] = 3
    data["train"]["local_steps"] = 0
    data["train"]["local_epochs"] = 1.0
    fed = build_federation(config_from_dict(data), counts={0: 6, 1: 4, 2: 3})
    assert [c.num_examples for c in fed.clients] == [0, 0, 0] and fed.eval_examples == []
    assert fed.steps_per_round == {0: 3, 1: 2, 2: 2}  # from the counts (batch size 2)
    with pytest.raises(Exception, match="this server holds no client data"):
        init_batches(fed)


def test_a_node_reads_only_its_own_folder(tmp_path):
    root = three_parties(tmp_path / "p")
    data = tiny_config(None)
    del data["federation"]["client_data"]
    data["federation"]["num_clients"] = 3
    cache = node_cache({"data-path": str(root / "beta"), "partition-id": 1, "cache-dir": str(tmp_path / "c")})
    party = node_party.build_party(cache, config_from_dict(data))
    fed = party._fed  # noqa: SLF001  (what the party holds, looked at)
    assert [c.num_examples for c in fed.clients] == [0, 4, 0] and fed.clients[1].client_id == 1
    assert fed.party_eval[0][0] == "beta" and len(fed.party_eval[0][1]) == 2
    assert party.counts(1) == {"num-examples": 4, "tokens": sum(len(it) for it in fed.clients[1].items)}
    with pytest.raises(ValueError, match="data-path needs partition-id"):
        node_cache({"data-path": str(root / "beta")})


# --- the end-to-end run --------------------------------------------------------------------------


@requires_flower
def test_three_nodes_with_their_own_data_match_the_in_process_run(tmp_path):
    """3 SuperNodes, each told only its own folder; the ServerApp's config names no data and its
    process cannot open the parties' files; the adapter equals the in-process run's."""
    import tomli_w
    from safetensors.torch import load_file

    from fedsb.config import load_config
    from fedsb.federated.experiment import run_experiment
    from fedsb.flower.launch import LocalFederation

    root = three_parties(tmp_path / "parties")
    folders = [root / name for name in ("alpha", "beta", "gamma")]  # partition K = rank by name, as in process
    sim_data = tiny_config([str(f) for f in folders])
    sim_config = tmp_path / "sim.toml"
    sim_config.write_text(tomli_w.dumps(sim_data))
    sim = run_experiment(load_config(sim_config), tmp_path / "sim")

    dep_data = json.loads(json.dumps(sim_data))
    del dep_data["federation"]["client_data"]
    dep_data["federation"]["num_clients"] = 3
    dep_config = tmp_path / "server.toml"
    dep_config.write_text(tomli_w.dumps(dep_data))
    assert str(root) not in dep_config.read_text()  # the server is told no data path
    env, log = forbid_env(tmp_path, root)
    run_config = {"config-path": str(dep_config), "out-dir": str(tmp_path / "dep"), "round-timeout": 600.0, "node-data": True}
    with LocalFederation(tmp_path / "cluster", num_nodes=3, data_paths=[str(f) for f in folders], server_env=env) as cluster:
        info = cluster.run(run_config, timeout=900)
    events = [json.loads(line) for line in (tmp_path / "dep" / "flower_events.jsonl").read_text().splitlines()] if (tmp_path / "dep" / "flower_events.jsonl").exists() else []
    assert info["status"] == "finished:completed", (info, events)
    hook = log.read_text()
    assert "loaded" in hook and "flwr-serverapp" in hook, hook  # the hook ran in the ServerApp process
    assert "refused" not in hook, hook  # and it never tried to open a party's file

    ta, tb = (load_file(tmp_path / run / "adapter" / "adapter.safetensors") for run in ("dep", "sim"))
    diff = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    print(f"max abs diff of the adapters (deployment vs in process): {diff}")
    assert ta.keys() == tb.keys() and diff == 0.0

    dep = json.loads((tmp_path / "dep" / "summary.json").read_text())
    # every node computed B, A itself and matched the server's digest: nothing but 32 bytes each
    assert dep["init"]["method"] == "svd" and dep["flower"]["svd_fallback_nodes"] == 0
    assert dep["ledger"]["one_time"] == 3 * 32 == sim["ledger"]["one_time"]
    assert dep["flower"]["node_data"]["examples"] == {"0": 6, "1": 4, "2": 3}
    for when in ("eval_before", "eval_after"):
        ev, ref = dep[when], sim[when]
        assert set(ev["per_party"]) == {"partition-0", "partition-1"} and ev["skipped"] == {"partition-2": "no eval file"}
        assert ev["n"] == ref["n"] == 5 and ev["correct"] == ref["correct"] and ev["eval_tokens"] == ref["eval_tokens"]
        assert ev["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        for k, name in (("partition-0", "alpha"), ("partition-1", "beta")):
            assert ev["per_party"][k]["loss"] == pytest.approx(ref["per_party"][name]["loss"], rel=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "dep" / "metrics.jsonl").read_text().splitlines()]
    assert "per_party" in rows[-1]["eval"]
    assert any(e["event"] == "eval-skipped" and e["partitions"] == ["partition-2"] for e in events)
