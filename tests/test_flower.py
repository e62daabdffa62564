"""Flower deployment on loopback: a real SuperLink and SuperNodes (separate processes) running
the fedsb apps with the tiny random model.

- equivalence: the deployment run ends with the same global R as `run_experiment` (<= 1e-6),
  and its payload bytes per round equal the CommLedger's; Flower's own message sizes are
  reported beside them;
- server killed mid-run (SIGKILL of the ServerApp process) -> `resume = true` finishes with
  the same result;
- a client killed mid-round and a hostile client (NaN update) in the same round -> the round
  completes with the honest client after the timeout, both logged;
- TLS with a generated CA + SuperNode authentication with registered key pairs;
- FedEx and FLoRA (folded base kept in each node's cache) match `run_experiment`: adapter and
  base weights within 1e-5, equal payload bytes per round;
- SecAgg+: the global R equals the plain run's within the quantization bound, and the server
  side is only ever handed the aggregate.

Every process is started by `LocalFederation` and stopped by pid. The multi-process tests are
skipped only if the Flower executables are missing from this environment.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import tomli_w
from safetensors.torch import load_file

from fedsb.adapter.inject import trainable_state
from fedsb.config import config_from_dict
from fedsb.federated.experiment import run_experiment
from fedsb.flower.launch import LocalFederation
from fixtures_flower import TINY, requires_flower, server_side

pytestmark = requires_flower

RUN_TIMEOUT = 900  # generous: a loaded 2-core machine runs each ClientApp process slowly


def write_config(path: Path, **federation) -> Path:
    data = json.loads(json.dumps(TINY))
    data["federation"].update(federation)
    path.write_text(tomli_w.dumps(data))
    return path


def max_r_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(a / "adapter" / "adapter.safetensors"), load_file(b / "adapter" / "adapter.safetensors")
    assert ta.keys() == tb.keys()
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def events(out: Path) -> list[dict]:
    path = out / "flower_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flower")


@pytest.fixture(scope="module")
def config_path(workdir) -> Path:
    return write_config(workdir / "tiny.toml")


@pytest.fixture(scope="module")
def simulation(workdir, config_path) -> Path:
    """The in-process engine's result for the same config: the reference."""
    from fedsb.config import load_config

    out = workdir / "sim"
    run_experiment(load_config(config_path), out)
    return out


@pytest.fixture(scope="module")
def cluster(workdir):
    with LocalFederation(workdir / "cluster", num_nodes=2) as fed:
        yield fed


@pytest.fixture(scope="module")
def deployment(cluster, workdir, config_path) -> tuple[Path, dict]:
    out = workdir / "dep"
    info = cluster.run({"config-path": str(config_path), "out-dir": str(out), "round-timeout": 600.0}, timeout=RUN_TIMEOUT)
    return out, info


def test_deployment_matches_simulation(deployment, simulation):
    out, info = deployment
    assert info["status"] == "finished:completed", info
    assert max_r_diff(out, simulation) <= 1e-6
    dep, sim = rows(out), rows(simulation)
    assert len(dep) == len(sim) == 2
    for d, s in zip(dep, sim):
        assert d["bytes_up"] == s["bytes_up"] and d["bytes_down"] == s["bytes_down"]
        assert d["upload_bytes_per_client"] == s["upload_bytes_per_client"]
        assert d["accepted"] == [0, 1] and not d["missing"] and not d["rejected"]
        # Flower's own message sizes are reported separately and include the payload
        assert d["flower"]["message_bytes_up"] > d["bytes_up"] and d["flower"]["message_bytes_down"] > d["bytes_down"]
    ds, ss = json.loads((out / "summary.json").read_text()), json.loads((simulation / "summary.json").read_text())
    assert ds["total_bytes"] == ss["total_bytes"] and ds["one_time_bytes"] == ss["one_time_bytes"] > 0
    assert ds["final_train_loss"] == pytest.approx(ss["final_train_loss"], abs=1e-6)
    assert info["network-traffic"]["total-bytes"] > ds["total_bytes"]  # Flower's count, headers included


def test_server_killed_mid_run_resumes_to_the_same_result(cluster, deployment, workdir, config_path, simulation):
    out = workdir / "restart"
    run_config = {"config-path": str(config_path), "out-dir": str(out), "round-timeout": 600.0}
    run_id = cluster.submit(run_config)
    meta = out / "checkpoint" / "meta.json"
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (meta.exists() and json.loads(meta.read_text())["round"] == 0):
        assert time.monotonic() < deadline, "round 1 never completed"
        time.sleep(0.2)
    pids = cluster.serverapp_pids()
    assert pids, "no ServerApp process to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # the server dies mid-run, after round 1's checkpoint
    cluster.flwr("stop", str(run_id), "local")
    assert len(rows(out)) == 1
    info = cluster.run({**run_config, "resume": True}, timeout=RUN_TIMEOUT)
    assert info["status"] == "finished:completed", info
    assert [r["round"] for r in rows(out)] == [1, 2]
    assert any(e["event"] == "resumed" and e["from_round"] == 1 for e in events(out))
    assert max_r_diff(out, simulation) <= 1e-6
    assert json.loads((out / "summary.json").read_text())["total_bytes"] == json.loads((simulation / "summary.json").read_text())["total_bytes"]


def checkpoint_tensors(out: Path, prefix: str) -> dict:
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    tensors = load_file(out / "checkpoint" / meta["state_file"])
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.mark.parametrize("strategy", ["fedex", "flora"])
def test_base_folding_strategies_match_simulation(strategy, cluster, workdir):
    """FedEx and FLoRA on 2 SuperNodes (stateless ClientApp processes, folded base kept in each
    node's cache) end where `run_experiment` ends: adapter and folded base weights within 1e-5,
    the same payload bytes per round (FedEx's residuals, FLoRA's stacks) and in total, and no
    catch-up in a run where no node misses a round."""
    config = write_config(workdir / f"tiny-{strategy}.toml", strategy=strategy)
    from fedsb.config import load_config

    sim, out = workdir / f"sim-{strategy}", workdir / f"dep-{strategy}"
    run_experiment(load_config(config), sim)
    info = cluster.run({"config-path": str(config), "out-dir": str(out), "round-timeout": 600.0}, timeout=RUN_TIMEOUT)
    assert info["status"] == "finished:completed", info
    assert max_r_diff(out, sim) <= 1e-5  # every adapter tensor (A, B), not only R
    base_dep, base_sim = checkpoint_tensors(out, "base."), checkpoint_tensors(sim, "base.")
    assert base_dep.keys() == base_sim.keys() and base_dep
    assert max(float((base_dep[k] - base_sim[k]).abs().max()) for k in base_sim) <= 1e-5
    dep, ref = rows(out), rows(sim)
    assert len(dep) == len(ref) == 2
    for d, s in zip(dep, ref):
        for key in ("bytes_up", "bytes_down", "upload_bytes_per_client", "download_bytes_per_client"):
            assert d[key] == s[key], (key, d[key], s[key])
        assert d["accepted"] == [0, 1] and not d["missing"] and not d["rejected"]
        assert d["flower"]["base_catchup_bytes"] == 0
    assert dep[1]["download_bytes_per_client"] > dep[0]["download_bytes_per_client"]  # round 2 carries the fold
    ds, ss = json.loads((out / "summary.json").read_text()), json.loads((sim / "summary.json").read_text())
    assert ds["total_bytes"] == ss["total_bytes"] and ds["ledger"] == ss["ledger"]
    assert ds["final_train_loss"] == pytest.approx(ss["final_train_loss"], abs=1e-5)
    assert not [e for e in events(out) if e["event"] in ("base-catchup", "rejected", "missing")]


def test_secagg_matches_plain_run_and_server_sees_only_the_sum(cluster, workdir):
    """Fed-SB with `secagg = true` on 2 SuperNodes, 1 round (SecAgg+'s four exchanges).

    (a) The global R equals the plain run's within SecAgg+'s quantization bound. Flower's
    `secaggplus_mod` scales R_i by r_i = w_i / w_max (w_max = the largest weight, so r_i <= 1),
    maps each entry to a grid of step 2 c / L (c = clipping range 8.0, L = quantization range
    2^22: 3.81e-6) and rounds it *stochastically* to the grid point below or above: an error
    below one step per client. The server divides the sum by sum_i r_i, so the mean moves by
    less than n * step / sum_i r_i (one step with equal weights), plus 1e-7 for fp32 arithmetic.
    One round keeps the bound rigorous: after it, training would carry the error on.
    (b) What the server side was handed is only the aggregate: every FitRes the bridge
    strategy received carried the same vector, whose fp32 payload is the new global R, and that
    vector is far (> 100 x the bound) from every client's own R."""
    from fedsb.config import load_config
    from fedsb.federated import comm
    from fedsb.federated.client import ClientState
    from fedsb.federated.federation import build_federation, initialize_adapter
    from fedsb.federated.experiment import client_round
    from fedsb.flower import codec
    from fedsb.flower.settings import sha256

    config = write_config(workdir / "tiny-secagg.toml", rounds=1)
    cfg = load_config(config)
    plain = workdir / "secagg-plain"
    run_experiment(cfg, plain)
    # every client's own R after round 1, as the plain run computes it (same start, same data)
    fed = build_federation(cfg)
    initialize_adapter(fed, comm.CommLedger())
    start = codec.start_state(fed.strategy, fed.model, comm.encode(trainable_state(fed.model, fed.head_modules), cfg.federation.wire_dtype))
    own = {}
    for client in fed.clients:
        own[client.client_id] = client_round(fed, client.client_id, 0, start, ClientState()).tensors
    weights = [fed.strategy.client_weight(c.num_examples) for c in fed.clients]
    ratios = [w / max(weights) for w in weights]

    out = workdir / "secagg"
    info = cluster.run({"config-path": str(config), "out-dir": str(out), "secagg": True, "round-timeout": 600.0}, timeout=RUN_TIMEOUT)
    assert info["status"] == "finished:completed", info
    clip, levels = 8.0, 4194304  # the run-config defaults
    bound = len(ratios) * (2 * clip / levels) / sum(ratios) + 1e-7
    r_secagg = {k: v for k, v in load_file(out / "adapter" / "adapter.safetensors").items() if k.endswith(".R")}
    r_plain = {k: v for k, v in load_file(plain / "adapter" / "adapter.safetensors").items() if k.endswith(".R")}
    assert r_secagg.keys() == r_plain.keys() == {k for k in own[0] if k.endswith(".R")}
    assert max(float(v.abs().max()) * max(ratios) for v in r_plain.values()) < clip  # nothing was clipped
    error = max(float((r_secagg[k] - r_plain[k]).abs().max()) for k in r_plain)
    assert error <= bound, (error, bound)

    (row,) = rows(out)
    assert row["accepted"] == [0, 1] and row["flower"]["secagg"]
    seen = row["flower"]["secagg_aggregate"]
    assert seen["fit_results"] == 2 and seen["distinct_vectors"] == 1 and seen["strategy_adds"] == 1
    assert seen["aggregate_sha256"] == sha256(comm.encode(r_secagg, "fp32"))
    for state in own.values():
        assert max(float((r_secagg[k] - state[k]).abs().max()) for k in r_secagg) > 100 * bound


def test_killed_and_hostile_clients_do_not_stop_the_round(cluster, deployment, workdir):
    """3 parties: node 1 is killed while it trains, node 2 uploads NaN; node 0 carries the round."""
    out = workdir / "faults"
    config = write_config(workdir / "tiny3.toml", num_clients=3, rounds=1)
    # the timeout must outlast an honest round on this machine: scale it from the measured one
    honest = max(r["seconds"]["round_wall"] for r in rows(deployment[0]))
    timeout = max(30.0, 2.5 * honest)
    cluster.partition_ids = [0, 1, 2]
    cluster.start_node(2)
    run_id = cluster.submit(
        {"config-path": str(config), "out-dir": str(out), "round-timeout": timeout, "min-replies": 1, "min-nodes": 3, "fault-injection": "2:nan@1"}
    )
    log = cluster.logs / "supernode1.log"
    deadline = time.monotonic() + RUN_TIMEOUT
    while f"[RUN {run_id}, ROUND 1]" not in log.read_text(errors="replace"):  # its train message arrived
        assert time.monotonic() < deadline, "node 1 never received its round"
        time.sleep(0.1)
    cluster.kill_node(1)  # disconnect mid-round
    info = cluster.wait(run_id, RUN_TIMEOUT)
    assert info["status"] == "finished:completed", info
    (row,) = rows(out)
    assert row["accepted"] == [0]
    # the round ends at the timeout, or earlier when the SuperLink declares the node gone
    assert re.search("no reply within round-timeout|Node Unavailable", row["missing"]["1"]), row["missing"]
    assert "NaN or Inf" in row["rejected"]["2"]
    kinds = {(e["event"], e.get("partition")) for e in events(out)}
    assert ("missing", 1) in kinds and ("rejected", 2) in kinds
    assert (out / "adapter" / "adapter.safetensors").exists()


def test_tls_and_supernode_authentication(workdir, config_path):
    out = workdir / "tls"
    with LocalFederation(workdir / "tls-cluster", num_nodes=2, tls=True, auth=True) as fed:
        info = fed.run({"config-path": str(config_path), "out-dir": str(out), "num-server-rounds": 1, "round-timeout": 600.0}, timeout=RUN_TIMEOUT)
        listed = fed.flwr("supernode", "list", "local", "--format", "json")
    assert info["status"] == "finished:completed", info
    assert (fed.certs["ca"]).exists() and all(priv.exists() for priv, _ in fed.node_keys)
    nodes = json.loads(listed.stdout[listed.stdout.index("{") :])["nodes"]
    assert len(nodes) == 2  # both registered by public key
    (row,) = rows(out)
    assert row["accepted"] == [0, 1]
    sim = run_experiment(config_from_dict({**json.loads(json.dumps(TINY)), "federation": {**TINY["federation"], "rounds": 1}}), workdir / "sim1")
    assert sim["total_bytes"] == json.loads((out / "summary.json").read_text())["total_bytes"]
    assert max_r_diff(out, workdir / "sim1") <= 1e-6


def test_flower_simulation_engine_matches(workdir, config_path, simulation):
    """`flwr run` on Flower's simulation runtime (virtual SuperNodes, Ray backend): same R."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        pytest.skip("Flower's simulation runtime needs ray (pip install 'flwr[simulation]==1.42.0'); not installed here")
    out = workdir / "flower-sim"
    with LocalFederation(workdir / "sim-cluster", num_nodes=2, simulation=True) as fed:
        info = fed.run({"config-path": str(config_path), "out-dir": str(out)}, timeout=RUN_TIMEOUT)
    assert info["status"] == "finished:completed", info
    assert max_r_diff(out, simulation) <= 1e-6
    assert json.loads((out / "summary.json").read_text())["total_bytes"] == json.loads((simulation / "summary.json").read_text())["total_bytes"]


def test_client_handlers_in_process(tmp_path, monkeypatch):
    """The ClientApp's handlers called directly (no processes): setup caches what the server
    announced, train reproduces the simulation's first-round client update, evaluate reports
    a loss, and a node without setup answers `missing-setup` instead of training."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedsb.federated import comm
    from fedsb.federated.client import ClientState
    from fedsb.federated.experiment import client_round

    from fedsb.flower import client_app, codec, protocol

    server, frozen, text, shas, download = server_side(monkeypatch)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "cache-dir": str(tmp_path / "cache")}, state=RecordDict(), run_config={})

    def message(content: RecordDict, kind: str) -> Message:
        return Message(content, dst_node_id=7, message_type=kind, group_id="1")

    round_content = lambda: RecordDict({protocol.DOWNLOAD_RECORD: codec.payload_record(download), protocol.CONFIG_RECORD: ConfigRecord({"round": 0, **shas})})  # noqa: E731
    early = client_app.train(message(round_content(), "train"), ctx)
    assert early.has_error() and protocol.MISSING_SETUP in early.error.reason

    setup = RecordDict({protocol.SETUP_RECORD: ConfigRecord({"config-toml": text, **shas}), protocol.FROZEN_RECORD: codec.payload_record(frozen)})
    reply = client_app.setup(message(setup, protocol.SETUP_MESSAGE_TYPE), ctx)
    assert reply.content.config_records[protocol.NODE_RECORD]["partition-id"] == 1
    assert reply.content.config_records[protocol.NODE_RECORD]["has-frozen"] is True

    reply = client_app.train(message(round_content(), "train"), ctx)
    upload, _ = comm.decode(codec.payload_from_record(reply.content.array_records[protocol.UPDATE_RECORD]))
    start = codec.start_state(server.strategy, server.model, download)
    expected = client_round(server, 1, 0, start, ClientState()).tensors  # the in-process engine's client 1
    assert upload.keys() == expected.keys()
    assert max(float((upload[k] - expected[k]).abs().max()) for k in upload) <= 1e-6

    reply = client_app.evaluate(message(round_content(), "evaluate"), ctx)
    metrics = reply.content.metric_records[protocol.METRICS_RECORD]
    assert metrics["num-examples"] == server.clients[1].num_examples and metrics["loss"] > 0


def _tiny_config(strategy: str, **federation):
    data = json.loads(json.dumps(TINY))
    data["federation"].update({"strategy": strategy, **federation})
    return config_from_dict(data)


@pytest.mark.parametrize("strategy", ["fedex", "flora"])
def test_folded_base_on_stateless_nodes_in_process(strategy, tmp_path, monkeypatch):
    """FedEx/FLoRA on the ClientApp's handlers (no processes; the per-process federation cache is
    dropped before every message, as a fresh `flwr-clientapp` would be): a node that follows
    the base chain rebuilds the server's folded base from its cache every round; a node that
    missed round 2 (the first whose download folds something) refuses to train in round 3
    (`missing-base`) until the server's base is attached, then uploads exactly what the
    up-to-date node uploads; a download that does not match the chain is refused."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedsb.federated import comm
    from fedsb.federated.federation import build_federation, initialize_adapter
    from fedsb.federated.experiment import run_round
    from fedsb.flower import client_app, codec, node_party, protocol
    from fedsb.flower.base_chain import BASE_KIND, base_root, base_state, encode_base, next_base_id
    from fedsb.flower.node_cache import node_cache
    from fedsb.flower.settings import config_text, sha256

    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    config = _tiny_config(strategy, rounds=3)
    server = build_federation(config)
    ledger = comm.CommLedger()
    initialize_adapter(server, ledger)
    text = config_text(config)
    shas = {"config-sha256": sha256(text), "frozen-sha256": ""}
    root = base_root(shas["config-sha256"])

    def context(name: str) -> Context:
        return Context(run_id=1, node_id=7, node_config={"partition-id": 1, "cache-dir": str(tmp_path / name)}, state=RecordDict(), run_config={})

    def send(handler, ctx, content: RecordDict, kind: str) -> Message:
        node_party.forget_parties()  # a fresh ClientApp process per message
        return handler(Message(content, dst_node_id=7, message_type=kind, group_id="1"), ctx)

    def round_message(r: int, download: bytes, prev: str, base_id: str, catchup: bytes | None = None) -> RecordDict:
        fields = {"round": r, **shas, "base-from": prev, "base-id": base_id, "base-round": r}
        content = RecordDict({protocol.DOWNLOAD_RECORD: codec.payload_record(download)})
        if catchup is not None:
            content[protocol.BASE_RECORD] = codec.payload_record(catchup)
            fields["base-sha256"] = sha256(catchup)
        content[protocol.CONFIG_RECORD] = ConfigRecord(fields)
        return content

    def upload(reply: Message) -> dict:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        return comm.decode(codec.payload_from_record(reply.content.array_records[protocol.UPDATE_RECORD]))[0]

    follower, late = context("follower"), context("late")
    setup = RecordDict({protocol.SETUP_RECORD: ConfigRecord({"config-toml": text, **shas})})
    for ctx in (follower, late):
        send(client_app.setup, ctx, setup, protocol.SETUP_MESSAGE_TYPE)

    download = comm.encode(trainable_state(server.model, server.head_modules))
    prev, base_id = root, root
    for r in range(3):
        if r:
            prev, base_id = base_id, next_base_id(base_id, download, r)
        reply = send(client_app.train, follower, round_message(r, download, prev, base_id), "train")
        assert reply.content.config_records[protocol.NODE_RECORD]["base-id"] == base_id
        follower_upload = upload(reply)
        if r:
            # the follower folded the download into its cached base: exactly the server's base
            cached, _ = comm.decode(node_cache(follower.node_config).get_named(BASE_KIND, base_id))
            server_base = base_state(server.model)
            assert max(float((cached[k] - server_base[k]).abs().max()) for k in server_base) <= 1e-6
        if r == 2:  # the late node never saw round 2's download (index 1): it must not train on the root base
            refused = send(client_app.train, late, round_message(r, download, prev, base_id), "train")
            assert refused.has_error() and protocol.MISSING_BASE in refused.error.reason
            caught_up = upload(send(client_app.train, late, round_message(r, download, prev, base_id, encode_base(server.model)), "train"))
            assert max(float((caught_up[k] - follower_upload[k]).abs().max()) for k in follower_upload) <= 1e-6
            with pytest.raises(ValueError, match="base chain"):  # a download the chain does not name
                send(client_app.train, late, round_message(r, download + b" ", prev, base_id), "train")
        _, download = run_round(server, r, download, ledger, None)  # the simulation's round (server side)


def test_engine_runs_every_strategy_and_refuses_the_rest_with_a_reason():
    from fedsb.aggregation import strategy_names
    from fedsb.config import ConfigError
    from fedsb.flower.refusals import check_supported
    from fedsb.flower.settings import RunSettings

    plain, secagg = RunSettings(), RunSettings(secagg=True)
    data = json.loads(json.dumps(TINY))
    for strategy in strategy_names():
        check_supported(_tiny_config(strategy), plain)
    # what used to be refused runs now: the optimizer state and the DP accountant live on the node
    check_supported(config_from_dict({**data, "train": {**data["train"], "keep_optimizer_state": True}}), plain)
    check_supported(config_from_dict({**data, "init": {**data["init"], "method": "federated"}}), plain)  # sketch rounds as messages
    private = {**data, "init": {**data["init"], "method": "random"}, "privacy": {"enabled": True}}
    check_supported(config_from_dict(json.loads(json.dumps(private))), plain)
    refused = {
        "sketch exchanges are plain messages": ({**data, "init": {**data["init"], "method": "federated"}}, secagg),
        "Fed-SB": ({**data, "federation": {**data["federation"], "strategy": "fedex"}}, secagg),
        "accountant history": (private, secagg),
        "private init on client data": ({**private, "init": data["init"]}, plain),
    }
    for reason, (raw, settings) in refused.items():
        with pytest.raises(ConfigError, match=reason):
            check_supported(config_from_dict(json.loads(json.dumps(raw))), settings)


def test_node_keeps_client_state_by_round(tmp_path):
    """What a node keeps between rounds (optimizer state, DP accountant) is keyed by round, so a
    round replayed after a server restart starts from the state before it, not after it."""
    import torch

    from fedsb.federated.client import ClientState
    from fedsb.flower.node_cache import NodeCache, load_client_state, save_client_state
    from fedsb.flower.settings import sha256

    cache = NodeCache(tmp_path)
    sha = sha256("config")

    def state(r: int) -> ClientState:
        return ClientState(optimizer={"state": {0: {"step": torch.tensor(float(r))}}, "param_groups": [{"lr": 0.1, "params": [0]}]}, privacy_history=[[1.0, 0.5, r + 1]])

    assert load_client_state(cache, sha, 0, 0) == ClientState()
    for r in range(3):
        save_client_state(cache, sha, 0, r, state(r))
    got = load_client_state(cache, sha, 0, 3)
    assert got.privacy_history == [[1.0, 0.5, 3]] and float(got.optimizer["state"][0]["step"]) == 2.0
    save_client_state(cache, sha, 0, 2, state(2))  # round 2 replayed: same state again
    assert load_client_state(cache, sha, 0, 2).privacy_history == [[1.0, 0.5, 2]]  # the state after round 1
    assert load_client_state(cache, sha, 1, 3) == ClientState()  # another partition has its own
