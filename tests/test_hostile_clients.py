"""A hostile party cannot steer or stop a Flower federation (issue 29, items 1-4, 6, 16).

- `screen_reply`, the one function every field a node sends passes through: identity, example
  counts (10^9, 0, negative, string, bool, fractional, NaN), metrics (NaN, inf, strings, bools);
- the example-count rule (`fixed_counts`) and the AdamW update bound (`adamw_bound`), which
  needs no other reply;
- the real ServerApp code (`run_server`: the driver, `FlowerTransport`, Flower's SecAgg+
  workflow, the ClientApp with `secaggplus_mod`) over a loopback grid that delivers each
  message to the ClientApp in this process, one node lying in its reply (`fault-injection`);
- the results-folder rules of the Flower engine (lock, refusal, clean-up before round 1);
- and, in the deployment mode of tests/test_flower.py (SuperLink + SuperNodes on loopback),
  SecAgg+ with a node that claims ten times its weight.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from uuid import uuid4

import pytest
import tomli_w
import torch

from fedsb.flower.screening import MAX_EXAMPLES, Expected, ReplyError, fixed_counts, screen_reply
from fixtures_flower import TINY, requires_flower

# --- the screening function ----------------------------------------------------------------

HONEST = {"partition-id": 1, "num-examples": 8.0, "loss": 2.5, "steps": 2.0, "tokens": 300.0, "seconds": 0.4, "base-id": "", "src-node": 11}
EXPECT = Expected(partitions=2, node=11, partition=1, num_examples=8, weight=8, max_steps=2)


def test_honest_train_reply_is_typed():
    r = screen_reply("train", HONEST, EXPECT)
    assert (r.partition, r.num_examples, r.loss, r.steps, r.tokens) == (1, 8, 2.5, 2, 300)
    assert isinstance(r.steps, int) and isinstance(r.num_examples, int)


@pytest.mark.parametrize("count", [10**9, 0, -4, "8", True, 8.5, float("nan"), float("inf"), None, [8.0]])
def test_bad_example_counts_are_refused(count):
    with pytest.raises(ReplyError, match="num-examples"):
        screen_reply("train", {**HONEST, "num-examples": count}, EXPECT)


@pytest.mark.parametrize(
    "field,value",
    [("loss", float("nan")), ("loss", float("inf")), ("loss", "2.5"), ("loss", True), ("steps", float("nan")), ("steps", 1.5), ("steps", -1),
     ("tokens", "many"), ("seconds", -1.0), ("seconds", float("inf")), ("epsilon", float("nan")), ("base-id", "../../etc"), ("privacy-history", "[[1, 2]]"),
     ("privacy-history", "[[1.0, 2.0, 3]]"), ("node-startup-seconds", float("nan"))],
)
def test_bad_metrics_are_refused(field, value):
    with pytest.raises(ReplyError, match=field):
        screen_reply("train", {**HONEST, field: value}, EXPECT)


@pytest.mark.parametrize("field", ["partition-id", "num-examples", "loss", "steps", "tokens", "seconds"])
def test_missing_fields_are_refused(field):
    with pytest.raises(ReplyError, match=f"{field}.*missing"):
        screen_reply("train", {k: v for k, v in HONEST.items() if k != field}, EXPECT)


def test_identity_is_checked_against_the_sender_and_the_partition_range():
    with pytest.raises(ReplyError, match="outside 0..1"):
        screen_reply("secagg", {**HONEST, "partition-id": 99}, EXPECT)
    with pytest.raises(ReplyError, match="holds partition 1"):
        screen_reply("train", {**HONEST, "partition-id": 0}, EXPECT)
    with pytest.raises(ReplyError, match="came from node 12"):
        screen_reply("train", {**HONEST, "src-node": 12}, EXPECT)
    with pytest.raises(ReplyError, match="outside 0..1"):  # a setup reply: no partition known yet, the range is
        screen_reply("setup", {"partition-id": 2, "has-frozen": False}, Expected(partitions=2))
    with pytest.raises(ReplyError, match="has-frozen"):
        screen_reply("setup", {"partition-id": 1, "has-frozen": "yes"}, Expected(partitions=2))


def test_claims_must_repeat_what_the_server_fixed():
    with pytest.raises(ReplyError, match="claims 80 examples, the server fixed 8"):
        screen_reply("train", {**HONEST, "num-examples": 80.0}, EXPECT)
    with pytest.raises(ReplyError, match="claims 40 weight, the server fixed 8"):
        screen_reply("secagg", {**HONEST, "num-examples": 40}, EXPECT)
    with pytest.raises(ReplyError, match="3 steps, a round has 2"):
        screen_reply("train", {**HONEST, "steps": 3.0}, EXPECT)
    ok = screen_reply("train", {**HONEST, "privacy-history": "[[1.1, 0.25, 2]]", "epsilon": 0.7}, EXPECT)
    assert ok.privacy_history == [[1.1, 0.25, 2]] and ok.epsilon == 0.7


def test_fixed_counts_rule():
    assert fixed_counts({0: 4, 1: 400}) == {0: 4, 1: 400}  # the server's own counts are facts
    # node-reported counts (issue 30): capped at 4 x the median, whatever the claim
    assert fixed_counts(None, {0: 10, 1: 12, 2: MAX_EXAMPLES}) == {0: 10, 1: 12, 2: 48}
    assert fixed_counts(None, {0: 4, 1: 40}) == {0: 4, 1: 40}  # two nodes: the median is 22, nothing capped
    assert fixed_counts(None, {}) == {}


# --- the update bound ----------------------------------------------------------------------


def test_adamw_step_ratio_bounds_every_step_of_a_hostile_gradient_sequence():
    """The gradients that make Adam's step largest: a long quiet stretch (the second moment
    decays) and then a burst of one sign (the first moment catches up faster). The largest
    step comes close to `adamw_step_ratio()` x lr (6.2 of 7.27) and never passes it."""
    from fedsb.federated.validation import adamw_step_ratio

    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.0)
    worst = 0.0
    for step in range(2600):
        before = p.detach().clone()
        p.grad = torch.full((4,), 1e-6 if step < 2500 else 1.0)
        opt.step()
        worst = max(worst, float((p.detach() - before).abs().max()) / 1e-2)
    assert 6.0 < worst <= adamw_step_ratio(), worst


def test_adamw_bound_passes_honest_updates_and_refuses_a_huge_one():
    """Honest Fed-SB and FFA-LoRA updates (FFA's trainable B starts at zero: no help from the
    global norm) on the tiny model, from the start state a Flower client gets, stay far below
    the bound; 1e30 times one does not."""
    from fedsb.adapter.inject import trainable_state
    from fedsb.config import config_from_dict
    from fedsb.federated import comm
    from fedsb.federated.client import ClientState
    from fedsb.federated.federation import build_federation, initialize_adapter
    from fedsb.federated.experiment import client_round
    from fedsb.federated.validation import adamw_bound, update_norm
    from fedsb.flower import codec

    for strategy in ("fedsb", "ffa"):
        data = json.loads(json.dumps(TINY))
        data["federation"]["strategy"] = strategy
        cfg = config_from_dict(data)
        fed = build_federation(cfg)
        initialize_adapter(fed, comm.CommLedger())
        start = codec.start_state(fed.strategy, fed.model, comm.encode(trainable_state(fed.model, fed.head_modules), cfg.federation.wire_dtype))
        numel = sum(v.numel() for v in start.values())
        bound = adamw_bound(lr=cfg.train.lr, steps=fed.steps_per_round[0], numel=numel, start_norm=update_norm(start))
        update = client_round(fed, 0, 0, start, ClientState()).tensors
        assert update_norm(update, start) < bound / 5, strategy  # measured: 0.53-0.80 of lr S sqrt(n), bound 7.27
        assert update_norm({k: v * 1e30 for k, v in update.items()}, start) > bound


# --- the ServerApp over a loopback grid ------------------------------------------------------


class LoopbackGrid:
    """A Flower `Grid` whose nodes are ClientApp calls in this process (no SuperLink): the
    ServerApp's own code runs unchanged, Flower's SecAgg+ workflow and `secaggplus_mod` included."""

    def __init__(self, tmp: Path, num_nodes: int, run_config: dict, partition_ids: list | None = None) -> None:
        from flwr.app import Context, RecordDict

        ids = partition_ids or list(range(num_nodes))
        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": ids[i], "cache-dir": str(tmp / f"cache{i}"), "node-worker": "false"}, state=RecordDict(), run_config=dict(run_config))
            for i in range(num_nodes)
        }
        self.replies: dict[str, object] = {}

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        return SimpleNamespace(run_id=1)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        from flwr.app import Message

        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        from flwr.app import Error, Message
        from flwr.common.serde import message_from_proto, message_to_proto, recorddict_from_proto, recorddict_to_proto

        from fedsb.flower.client_app import app

        ids = []
        for msg in messages:
            mid = str(uuid4())
            msg.metadata.__dict__["_message_id"] = mid  # what Flower's in-memory grid does
            try:  # through Flower's serialization each way, as on the wire (its mods edit records in place)
                reply = app(message_from_proto(message_to_proto(msg)), self.contexts[msg.metadata.dst_node_id])
                if not reply.has_error():
                    reply = Message(recorddict_from_proto(recorddict_to_proto(reply.content)), reply_to=msg)
            except Exception as e:  # a raising ClientApp answers with an error, as in a deployment
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        ids = self.push_messages(list(messages))
        return self.pull_messages(ids)


def write_config(path: Path, **federation) -> Path:
    data = json.loads(json.dumps(TINY))
    data["federation"].update(federation)
    path.write_text(tomli_w.dumps(data))
    return path


def run_loopback(tmp: Path, out: Path, monkeypatch, *, rounds: int = 1, nodes: int = 2, fault: str = "", partition_ids: list | None = None, **settings):
    """`run_server` (the ServerApp's main) on `nodes` loopback nodes; returns its summary."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedsb.flower import node_party
    from fedsb.flower.server_loop import run_server
    from fedsb.flower.settings import RunSettings

    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):  # what a ServerApp process has
        monkeypatch.setattr(TaskIdentity, name, value)
    monkeypatch.setattr(node_party, "_PARTIES", {})  # the nodes' per-process party: fresh per run
    config = write_config(tmp / f"tiny-{nodes}-{rounds}.toml", rounds=rounds, num_clients=nodes)
    run_config = {"config-path": str(config), "out-dir": str(out), "round-timeout": 600.0, "fault-injection": fault, **settings}
    grid = LoopbackGrid(tmp, nodes, run_config, partition_ids)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    return run_server(grid, context, RunSettings.from_run_config(run_config))


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def events(out: Path) -> list[dict]:
    path = out / "flower_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_loopback_honest_run_matches_the_in_process_engine(tmp_path, monkeypatch):
    """The harness itself: an honest 1-round run equals `run_experiment` and logs no event."""
    from fedsb.config import load_config
    from fedsb.federated.experiment import run_experiment
    from safetensors.torch import load_file

    out = tmp_path / "honest"
    summary = run_loopback(tmp_path, out, monkeypatch)
    sim = run_experiment(load_config(tmp_path / "tiny-2-1.toml"), tmp_path / "sim")
    a, b = load_file(out / "adapter" / "adapter.safetensors"), load_file(tmp_path / "sim" / "adapter" / "adapter.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert summary["total_bytes"] == sim["total_bytes"]
    assert rows(out)[0]["accepted"] == [0, 1] and not events(out)


def strict_rows(out: Path) -> list[dict]:
    """metrics.jsonl read as strict JSON: a bare NaN or Infinity fails."""
    def refuse(name):
        raise AssertionError(f"metrics.jsonl holds a bare {name}")

    return [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "fault,reason",
    [("1:nan-loss", "'loss' must be finite"), ("1:nan-steps", "'steps' must be an integer"), ("1:claim-examples", "claims 80 examples, the server fixed 8"), ("1:claim-partition", "outside 0..1")],
)
def test_plain_round_drops_a_lying_node_and_logs_it(fault, reason, tmp_path, monkeypatch):
    """Items 1 and 3: a node that lies in its reply fields is dropped with the reason in
    metrics.jsonl and flower_events.jsonl; the run finishes on the honest node (before: a NaN
    loss was written as a bare NaN, NaN steps ended the run with a traceback)."""
    out = tmp_path / "out"
    run_loopback(tmp_path, out, monkeypatch, fault=fault)
    (row,) = strict_rows(out)
    assert row["accepted"] == [0] and reason in row["rejected"]["1"], row["rejected"]
    assert math.isfinite(row["train_loss"])
    assert [(e["event"], e["partition"]) for e in events(out)] == [("rejected", 1)]
    assert reason in events(out)[0]["reason"]
    assert (out / "summary.json").exists()


@pytest.mark.parametrize("fault,reason", [("1:claim-examples", "claims 50 weight, the server fixed 5"), ("1:claim-partition", "partition-id 99 is outside 0..2"), ("1:nan-loss", "'loss' must be finite")])
def test_secagg_drops_a_lying_node_before_its_vector_is_summed(fault, reason, tmp_path, monkeypatch):
    """Items 1 and 2 under SecAgg+ (3 nodes: SecAgg+ needs 2 survivors): a node claiming ten
    times its weight, partition-id 99 or a NaN loss is dropped from the secure sum (a SecAgg+
    dropout: its masks are removed with the others' shares) with an event, and the aggregate is
    the other two nodes' weighted mean (before: the claim set the node's weight, and partition
    99 crashed the ServerApp)."""
    from safetensors.torch import load_file

    out = tmp_path / "lying"
    run_loopback(tmp_path, out, monkeypatch, nodes=3, fault=fault, secagg=True)
    (row,) = strict_rows(out)
    assert row["accepted"] == [0, 2] and reason in row["rejected"]["1"], row
    assert ("rejected", 1) in {(e["event"], e.get("partition")) for e in events(out)}
    plain = tmp_path / "plain"  # the same round in plain mode, node 1 absent
    run_loopback(tmp_path, plain, monkeypatch, nodes=3, fault="1:crash")
    a, b = load_file(out / "adapter" / "adapter.safetensors"), load_file(plain / "adapter" / "adapter.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5  # SecAgg+'s quantization: < 4e-6 here


def test_secagg_with_two_nodes_and_a_liar_stops_cleanly(tmp_path, monkeypatch):
    """SecAgg+ cannot unmask one survivor (its threshold is 2): the round fails with the reason
    logged, and the folder of a run that never completed a round is removed (item 16)."""
    from fedsb.flower.server_loop import RoundFailed

    out = tmp_path / "two"
    with pytest.raises(RoundFailed, match="secure aggregation ended with 0 results"):
        run_loopback(tmp_path, out, monkeypatch, fault="1:claim-partition", secagg=True)
    assert not out.exists()


def test_secagg_node_applying_another_weight_than_it_claims_fails_the_round(tmp_path, monkeypatch):
    """Item 1, the deeper lie: node 1's FitRes claims its fixed weight but its `secaggplus_mod`
    applies ten times that. Only the unmasked total weight shows it: it differs from the sum
    the server fixed, so the aggregate is refused, nothing is applied or checkpointed."""
    import importlib

    from fedsb.flower.server_loop import RoundFailed

    mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")  # the module, not its same-named function
    honest = mod._collect_masked_vectors

    def lying(state, configs, num_examples, parameters):
        return honest(state, configs, num_examples * (10 if state.nid == 101 else 1), parameters)

    monkeypatch.setattr(mod, "_collect_masked_vectors", lying)
    out = tmp_path / "secret"
    with pytest.raises(RoundFailed, match="unmasked total weight is .* a node applied another weight"):
        run_loopback(tmp_path, out, monkeypatch, nodes=3, secagg=True)
    assert not out.exists()  # failed before round 1 completed: removed (item 16)


def test_one_huge_reply_is_refused_and_resume_starts_from_the_last_good_round(tmp_path, monkeypatch):
    """Item 4: round 2 has a single reply, R x 1e6 (node 0 crashed). No other reply to compare
    with, but the AdamW bound refuses it; the round fails, the checkpoint stays at round 1 and a
    resume ends with the honest run's adapter (before: aggregated, checkpointed, poisoned)."""
    from safetensors.torch import load_file

    from fedsb.federated.checkpoint import checkpoint_round
    from fedsb.flower.server_loop import RoundFailed

    out = tmp_path / "huge"
    with pytest.raises(RoundFailed, match="round 2: 0 accepted updates"):
        run_loopback(tmp_path, out, monkeypatch, rounds=2, fault="0:crash@2,1:huge-norm@2", min_replies=1)
    assert checkpoint_round(out) == 0 and len(strict_rows(out)) == 1
    kinds = [(e["event"], e.get("partition")) for e in events(out)]
    assert ("rejected", 1) in kinds and ("round-failed", None) in kinds and kinds[-1] == ("failed", None)
    assert "update-bound" in next(e["reason"] for e in events(out) if e["event"] == "rejected")
    run_loopback(tmp_path, out, monkeypatch, rounds=2, resume=True)
    honest = tmp_path / "honest"
    run_loopback(tmp_path, honest, monkeypatch, rounds=2)
    a, b = load_file(out / "adapter" / "adapter.safetensors"), load_file(honest / "adapter" / "adapter.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_non_finite_aggregate_is_never_checkpointed(tmp_path, monkeypatch):
    """Item 4, the driver's own check (both engines): an aggregate with NaN stops the run before
    it is evaluated or checkpointed."""
    from fedsb.aggregation.fedsb import FedSB
    from fedsb.federated.experiment import AggregateError

    finish = FedSB.finish

    def poisoned(self, model, round_index):
        out = finish(self, model, round_index)
        return {k: v * float("nan") if round_index == 1 else v for k, v in out.items()}

    monkeypatch.setattr(FedSB, "finish", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(AggregateError, match="round 2: the aggregate has NaN"):
        run_loopback(tmp_path, out, monkeypatch, rounds=2)
    from fedsb.federated.checkpoint import checkpoint_round

    assert checkpoint_round(out) == 0 and len(strict_rows(out)) == 1


@pytest.mark.parametrize("bad_id", [99, -1])
def test_setup_reply_with_a_bad_partition_id_is_dropped(bad_id, tmp_path, monkeypatch):
    """Identity at setup: a node whose setup reply names partition 99 or -1 is not
    mapped to any partition (an event naming the field), and the run goes on with the honest node."""
    out = tmp_path / "setup"
    run_loopback(tmp_path, out, monkeypatch, partition_ids=[0, bad_id], min_replies=1)
    (row,) = strict_rows(out)
    assert row["accepted"] == [0] and "no SuperNode holds this partition" in row["missing"]["1"]
    bad = [e for e in events(out) if e["event"] == "bad-setup"]
    assert len(bad) == 1 and bad[0]["node"] == 101 and "partition-id" in bad[0]["reason"]


@pytest.mark.parametrize("lie", ["shape", "nan"])
def test_federated_init_reply_that_lies_stops_the_run_cleanly(lie, tmp_path, monkeypatch):
    """The federated init needs every partition: node 1's sketch message with an extra row, or
    with a NaN, stops the run with a one-line reason and an `init-failed` event, before round 1
    (its folder removed) -- not a traceback from deep inside the init's arithmetic."""
    from fedsb.init import federated_run
    from fedsb.flower.server_loop import RoundFailed

    honest = federated_run.client_init_message
    calls = []

    def lying(fed, signs, kind, broadcast):
        out = honest(fed, signs, kind, broadcast)
        calls.append(kind)
        if len(calls) % 2 == 0:  # every second call: node 1 (the nodes answer in order 0, 1)
            key = next(iter(out))
            out[key] = torch.cat([out[key], out[key][:1]]) if lie == "shape" else out[key] * float("nan")
        return out

    monkeypatch.setattr(federated_run, "client_init_message", lying)
    out = tmp_path / "init"
    with pytest.raises(RoundFailed, match="federated init .*(other tensors or shapes|NaN or Inf)"):
        run_loopback(tmp_path, out, monkeypatch, config_overrides="init.method='federated' init.power_iters=1")
    assert not out.exists()


# --- the results folder (items 6 and 16) -----------------------------------------------------


def test_failure_before_round_one_removes_what_the_run_wrote(tmp_path, monkeypatch):
    """Item 16: both nodes crash in round 1; config.toml and eval_before.json go with the folder."""
    from fedsb.flower.server_loop import RoundFailed

    out = tmp_path / "early"
    with pytest.raises(RoundFailed):
        run_loopback(tmp_path, out, monkeypatch, fault="0:crash@1,1:crash@1")
    assert not out.exists()


def test_flower_engine_takes_the_lock_and_refuses_a_folder_with_results(tmp_path, monkeypatch):
    """Item 6: a folder holding a finished run is refused (untouched); a folder locked by another
    run is refused; and while the Flower engine writes a folder, an in-process `--resume` of it
    is refused by the lock."""
    from fedsb.flower import server_loop
    from fedsb.rundir import RunDirError, RunLock, open_run

    done = tmp_path / "done"
    run_loopback(tmp_path, done, monkeypatch)
    before = sorted(p.name for p in done.iterdir())
    summary = (done / "summary.json").read_bytes()
    with pytest.raises(RunDirError, match="already holds results"):
        run_loopback(tmp_path, done, monkeypatch)
    assert sorted(p.name for p in done.iterdir()) == before and (done / "summary.json").read_bytes() == summary

    busy = tmp_path / "busy"
    busy.mkdir()
    with RunLock(busy), pytest.raises(RunDirError, match="being written by another fedsb run"):
        run_loopback(tmp_path, busy, monkeypatch)

    seen: list[str] = []
    after_round = server_loop.FlowerTransport.after_round

    def try_in_process_resume(self, run, round_index, download):
        try:
            with open_run(self.out_dir, resume=True):
                seen.append("entered")
        except RunDirError as e:
            seen.append(str(e))
        return after_round(self, run, round_index, download)

    monkeypatch.setattr(server_loop.FlowerTransport, "after_round", try_in_process_resume)
    run_loopback(tmp_path, tmp_path / "live", monkeypatch)
    assert len(seen) == 1 and "being written by another fedsb run" in seen[0]


# --- the deployment mode of tests/test_flower.py: SuperLink and SuperNodes on loopback ---------


@requires_flower
def test_deployment_secagg_liar_is_dropped_and_a_finished_folder_is_refused(tmp_path):
    """Real processes (3 SuperNodes, one lying through `fault-injection`). (a) Items 1-2: under
    SecAgg+ node 1 claims ten times its weight; it is dropped from the secure sum with an event
    and the run completes on nodes 0 and 2. (b) Item 6: a second Flower run into that finished
    folder fails at once and leaves every file as it was."""
    from fedsb.flower.launch import LocalFederation

    config = write_config(tmp_path / "tiny3.toml", rounds=1, num_clients=3)
    out = tmp_path / "secagg"
    with LocalFederation(tmp_path / "cluster", num_nodes=3) as fed:
        info = fed.run({"config-path": str(config), "out-dir": str(out), "secagg": True, "round-timeout": 600.0, "fault-injection": "1:claim-examples"}, timeout=900)
        assert info["status"] == "finished:completed", info
        (row,) = strict_rows(out)
        assert row["accepted"] == [0, 2] and "claims 50 weight, the server fixed 5" in row["rejected"]["1"], row
        assert ("rejected", 1) in {(e["event"], e.get("partition")) for e in events(out)}
        before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        again = fed.run({"config-path": str(config), "out-dir": str(out), "round-timeout": 600.0}, timeout=600)
    assert again["status"] != "finished:completed", again
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
