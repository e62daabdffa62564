"""What a SuperNode does with each message: the ClientApp's handlers (`client_app` forwards
to them, in its own process or in the node's worker, `node_worker`).

Four message kinds:

- query "setup": the server's experiment config (TOML text) and, once, the frozen B, A. The node
  stores both in its content-addressed cache (`task.NodeCache`) after checking the sha256 the
  server announced, and answers with its partition id and what it holds.
- train: the global R (safetensors bytes). The node builds the simulation's `Federation` from
  the cached config, trains its partition with the in-process engine's own client path
  (`transport.client_round`: plain or DP-SGD steps), and uploads R. What the client keeps
  between rounds (optimizer state, its DP accountant) lives in the node cache; a DP node
  reports its epsilon and accountant history with every update.
  FedEx/FLoRA: the node first restores its folded base weights and applies the download's fold
  (`task.node_federation`), or uses the server's catch-up base when one is attached.
  Under SecAgg+ (`fedsb_secagg_mod`) the same training runs, but the upload is Flower's masked,
  weighted vector instead of plain R.
- evaluate: the loss of the global adapter on the node's partition.
- query "init": one exchange of the federated init (`init.method = "federated"`): the node
  takes its gradient signs once (kept in its cache) and answers with its sketch message.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat

from fedsb.adapter.inject import trainable_state
from fedsb.federated import comm
from fedsb.flower import codec, task
from fedsb.flower.protocol import (
    BASE_RECORD,
    CONFIG_RECORD,
    DOWNLOAD_RECORD,
    FROZEN_RECORD,
    INIT_RECORD,
    METRICS_RECORD,
    MISSING_BASE,
    MISSING_SETUP,
    NODE_RECORD,
    SETUP_RECORD,
    UPDATE_RECORD,
)


def _partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no partition: start it with --node-config 'partition-id=K'")
    return int(context.node_config["partition-id"])


def _missing(msg: Message, reason: str, prefix: str = MISSING_SETUP) -> Message:
    return Message(Error(code=0, reason=f"{prefix}: {reason}"), reply_to=msg)


def _round_federation(msg: Message, context: Context) -> tuple[task.Federation, str, bytes] | Message:
    """The federation for a train/evaluate message (base restored for FedEx/FLoRA), the base id
    and the download; or the error reply when the node lacks its setup or its base."""
    cfg = msg.content.config_records[CONFIG_RECORD]
    download = codec.payload_from_record(msg.content.array_records[DOWNLOAD_RECORD])
    catchup = codec.payload_from_record(msg.content.array_records[BASE_RECORD]) if BASE_RECORD in msg.content.array_records else None
    try:
        fed, base_id = task.node_federation(task.node_cache(context.node_config), cfg, download, catchup)
    except task.MissingSetup as e:
        return _missing(msg, str(e))
    except task.MissingBase as e:
        return _missing(msg, str(e), MISSING_BASE)
    return fed, base_id, download


def setup(msg: Message, context: Context) -> Message:
    """Store the config and (if sent) the frozen B, A; report what this node holds."""
    cache = task.node_cache(context.node_config)
    cfg = msg.content.config_records[SETUP_RECORD]
    text = str(cfg["config-toml"])
    if task.sha256(text) != cfg["config-sha256"]:
        raise ValueError("config text does not match its announced sha256")
    cache.put("config", text.encode())
    frozen_sha = str(cfg["frozen-sha256"])
    if FROZEN_RECORD in msg.content.array_records:
        data = codec.payload_from_record(msg.content.array_records[FROZEN_RECORD])
        if task.sha256(data) != frozen_sha:
            raise ValueError("frozen B, A do not match their announced sha256")
        comm.decode(data)  # parse fully (safetensors, finite) before caching it
        cache.put("frozen", data)
    pid = _partition_id(context)
    config = cache.config(str(cfg["config-sha256"]))
    built: list[task.Federation] = []  # built at most once, only when needed

    def fed() -> task.Federation:
        if not built:
            built.append(cache.build(config))
        return built[0]

    if frozen_sha and config.init.method == "svd" and task.needs_frozen_broadcast(config) and not cache.has("frozen", frozen_sha):
        task.local_factors(cache, fed(), frozen_sha)  # B, A computed here; sent only if they differ
    fields: dict[str, Any] = {"partition-id": pid, "has-frozen": bool(frozen_sha) and cache.has("frozen", frozen_sha)}
    if cache.party is not None:  # node-data mode: the server learns this party's counts from here alone
        fields.update(task.party_counts(fed(), pid))
    return Message(RecordDict({NODE_RECORD: ConfigRecord(fields)}), reply_to=msg)


def init(msg: Message, context: Context) -> Message:
    """One exchange of the federated init: this partition's sketch message (never its U_i)."""
    from fedsb.init.federated_run import client_init_message

    cfg = msg.content.config_records[INIT_RECORD]
    config_sha = str(cfg["config-sha256"])
    cache = task.node_cache(context.node_config)
    try:
        fed = task.init_federation(cache, config_sha)
    except task.MissingSetup as e:
        return _missing(msg, str(e))
    arrays = msg.content.array_records
    broadcast = comm.decode(codec.payload_from_record(arrays[DOWNLOAD_RECORD]))[0] if DOWNLOAD_RECORD in arrays else {}
    signs = task.init_signs(fed, cache, config_sha, _partition_id(context))
    message = client_init_message(fed, signs, str(cfg["kind"]), broadcast)
    return Message(RecordDict({UPDATE_RECORD: codec.payload_record(comm.encode(message, "fp32"))}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """One round of local training on this node's partition."""
    if "fitins.config" in msg.content.config_records:  # SecAgg+ (legacy FitIns layout)
        return _train_secagg(msg, context)
    cfg = msg.content.config_records[CONFIG_RECORD]
    round_index = int(cfg["round"])
    pid = _partition_id(context)
    ready = _round_federation(msg, context)
    if isinstance(ready, Message):
        return ready
    fed, base_id, download = ready
    global_state = task.global_state_from_download(fed, download)
    fault = task.fault_for(str(context.run_config.get("fault-injection", "")), pid, round_index)
    if fault == "crash":
        raise RuntimeError(f"injected crash in round {round_index + 1}")
    if fault == "hang":
        time.sleep(10**6)
    state, metrics, node = task.train_partition(fed, pid, round_index, global_state, task.node_cache(context.node_config), str(cfg["config-sha256"]))
    wire = fed.config.federation.wire_dtype
    lie = fault if fault in task.FIELD_FAULTS else None
    payload = task.faulty_payload(fault, state, wire) if fault and not lie else comm.encode(state, wire)
    node_fields = {"partition-id": pid, "base-id": base_id, **node}
    if lie:  # a node lying in its fields (tests): the same lies as under SecAgg+
        metrics = task.lying_metrics(lie, {**metrics, "partition-id": pid})
        node_fields["partition-id"] = metrics.pop("partition-id")
    content = RecordDict(
        {
            UPDATE_RECORD: codec.payload_record(payload),
            METRICS_RECORD: MetricRecord(metrics),
            NODE_RECORD: ConfigRecord(node_fields),
        }
    )
    return Message(content, reply_to=msg)


def _train_secagg(msg: Message, context: Context) -> Message:
    """Train, then hand w_i and R_i to `secaggplus_mod`, which uploads mask(w_i * R_i, w_i)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg = fitins.config
    round_index = int(cfg["round"])
    pid = _partition_id(context)
    fed = task.client_federation(task.node_cache(context.node_config), str(cfg["config-sha256"]), str(cfg["frozen-sha256"]))
    names = str(cfg["names"]).split("\n")
    shapes = {k: tuple(v.shape) for k, v in trainable_state(fed.model, fed.head_modules).items()}
    if sorted(names) != sorted(shapes):
        raise ValueError("the server's tensor names do not match this node's adapter")
    global_state = codec.ndarrays_to_state(parameters_to_ndarrays(fitins.parameters), names, shapes)
    state, metrics, _ = task.train_partition(fed, pid, round_index, global_state, task.node_cache(context.node_config), str(cfg["config-sha256"]))
    # the weight the server fixed for this partition (docs/flower.md "Example counts and weights")
    weight = cfg["weight"] if "weight" in cfg else fed.strategy.client_weight(fed.clients[pid].num_examples)
    fields = {"num-examples": int(weight), "loss": metrics["loss"], "steps": metrics["steps"], "tokens": metrics["tokens"], "seconds": metrics["seconds"], "partition-id": pid}
    lie = task.fault_for(str(context.run_config.get("fault-injection", "")), pid, round_index)
    if lie in task.FIELD_FAULTS:  # a node lying in its fields (tests)
        fields = task.lying_metrics(lie, fields)
    fitres = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters(codec.state_to_ndarrays(state, names)),
        num_examples=int(fields.pop("num-examples")),  # SecAgg+ multiplies R by this weight before masking
        metrics=fields,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _party_evaluate(msg: Message, context: Context) -> Message:
    """Node-data mode: the task's evaluation on this node's own eval file (the base model when
    the server asks for "base"); only counts go back (`task.party_evaluation`)."""
    pid = _partition_id(context)
    cfg = msg.content.config_records[CONFIG_RECORD]
    cache = task.node_cache(context.node_config)
    if cfg.get("base"):
        try:
            fed, base_id, state = task.init_federation(cache, str(cfg["config-sha256"])), "", None
        except task.MissingSetup as e:
            return _missing(msg, str(e))
    else:
        ready = _round_federation(msg, context)
        if isinstance(ready, Message):
            return ready
        fed, base_id, download = ready
        state = task.global_state_from_download(fed, download)
    result = task.party_evaluation(fed, state)
    names = {"n": "eval-n", "correct": "eval-correct", "loss_sum": "eval-loss-sum", "eval_tokens": "eval-tokens"}
    metrics = {names[k]: float(v) for k, v in result.items()}
    content = RecordDict({METRICS_RECORD: MetricRecord(metrics), NODE_RECORD: ConfigRecord({"partition-id": pid, "base-id": base_id})})
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Loss of the global adapter on this node's partition (no training, nothing uploaded)."""
    if msg.content.config_records[CONFIG_RECORD].get("party-eval"):
        return _party_evaluate(msg, context)
    pid = _partition_id(context)
    ready = _round_federation(msg, context)
    if isinstance(ready, Message):
        return ready
    fed, base_id, download = ready
    loss, n = task.partition_loss(fed, pid, task.global_state_from_download(fed, download))
    content = RecordDict(
        {
            METRICS_RECORD: MetricRecord({"loss": loss, "num-examples": float(n)}),
            NODE_RECORD: ConfigRecord({"partition-id": pid, "base-id": base_id}),
        }
    )
    return Message(content, reply_to=msg)


HANDLERS = {"setup": setup, "init": init, "train": train, "evaluate": evaluate}


def prewarm(kind: str, msg: Message, context: Context) -> None:
    """After a setup, build the node's federation (model, tokenized partition, B and A) so the
    first round finds it ready: only worth it in a process that outlives the message."""
    if kind != "setup":
        return
    cfg = msg.content.config_records[SETUP_RECORD]
    try:
        task.client_federation(task.node_cache(context.node_config), str(cfg["config-sha256"]), str(cfg["frozen-sha256"]))
    except task.MissingSetup:  # B and A come with a later setup
        pass


def handle(kind: str, msg: Message, context: Context) -> Message:
    """Answer `msg` with the handler `kind` ("setup", "init", "train", "evaluate")."""
    return HANDLERS[kind](msg, context)
