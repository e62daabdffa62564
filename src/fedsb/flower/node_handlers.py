"""What a SuperNode does with each message: the ClientApp's handlers (`client_app` forwards
to them, in its own process or in the node's worker, `node_worker`).

Four message kinds:

- query "setup": the server's experiment config (TOML text) and, once, the frozen B, A. The node
  stores both in its content-addressed cache (`node_cache.NodeCache`) after checking the sha256 the
  server announced, and answers with its partition id and what it holds.
- train: the global R (safetensors bytes). The node builds the simulation's model and data
  from the cached config (`node_party.NodeParty`), trains its partition with the in-process engine's own client path
  (`transport.client_round`: plain or DP-SGD steps), and uploads R. What the client keeps
  between rounds (optimizer state, its DP accountant) lives in the node cache; a DP node
  reports its epsilon and accountant history with every update.
  FedEx/FLoRA: the node first restores its folded base weights and applies the download's fold
  (`node_party.round_party`, `base_chain.BaseChain.prepare`), or uses the server's catch-up base when one is attached.
  Under SecAgg+ (`fedsb_secagg_mod`) the same training runs, but the upload is Flower's masked,
  weighted vector instead of plain R. The reply is `codec.encode_update` of the round's
  `ClientUpdate` (the server's `codec.decode_update` reads it back).
- evaluate: the loss of the global adapter on the node's partition (node-data mode: the
  task's evaluation on the node's own eval file, counts only).
- query "init": one exchange of the federated init (`init.method = "federated"`): the node
  takes its gradient signs once (kept in its cache) and answers with its sketch message.
"""

from __future__ import annotations

import time
from dataclasses import replace
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

from fedsb.federated import comm
from fedsb.flower import codec, faults
from fedsb.flower.base_chain import MissingBase
from fedsb.flower.node_cache import CONFIG_KIND, FROZEN_KIND, MissingSetup, NodeCache, node_cache
from fedsb.flower.frozen import needs_frozen_broadcast
from fedsb.flower.node_party import NodeParty, build_party, init_party, party_for, round_party
from fedsb.flower.protocol import (
    BASE_ID,
    BASE_RECORD,
    CONFIG_RECORD,
    CONFIG_SHA,
    CONFIG_TOML,
    DOWNLOAD_RECORD,
    EVAL_BASE,
    EVAL_CORRECT,
    EVAL_LOSS_SUM,
    EVAL_N,
    EVAL_TOKENS,
    EVALUATE,
    FAULT_INJECTION,
    FROZEN_RECORD,
    FROZEN_SHA,
    HAS_FROZEN,
    INIT_ACTION,
    INIT_KIND,
    INIT_RECORD,
    LOSS,
    METRICS_RECORD,
    MISSING_BASE,
    MISSING_SETUP,
    NODE_RECORD,
    NUM_EXAMPLES,
    PARTITION_ID,
    PARTY_EVAL,
    ROUND,
    SECAGG_FITINS_RECORD,
    SETUP_ACTION,
    SETUP_RECORD,
    TENSOR_NAMES,
    TRAIN,
    UPDATE_RECORD,
    WEIGHT,
)
from fedsb.flower.settings import sha256

# the task's evaluation counts (`NodeParty.evaluate`) -> the party-eval reply's metrics
_EVAL_FIELDS = {"n": EVAL_N, "correct": EVAL_CORRECT, "loss_sum": EVAL_LOSS_SUM, "eval_tokens": EVAL_TOKENS}


def _partition_id(context: Context) -> int:
    if PARTITION_ID not in context.node_config:
        raise ValueError("this SuperNode has no partition: start it with --node-config 'partition-id=K'")
    return int(context.node_config[PARTITION_ID])


def _cache(context: Context) -> NodeCache:
    return node_cache(context.node_config)


def _fault(context: Context, pid: int, round_index: int) -> str | None:
    return faults.fault_for(str(context.run_config.get(FAULT_INJECTION, "")), pid, round_index)


def _missing(msg: Message, reason: str, prefix: str = MISSING_SETUP) -> Message:
    return Message(Error(code=0, reason=f"{prefix}: {reason}"), reply_to=msg)


def _round_party(msg: Message, context: Context) -> tuple[NodeParty, str, bytes] | Message:
    """The party for a train/evaluate message (base restored for FedEx/FLoRA), the base id
    and the download; or the error reply when the node lacks its setup or its base."""
    cfg = msg.content.config_records[CONFIG_RECORD]
    download = codec.payload_from_record(msg.content.array_records[DOWNLOAD_RECORD])
    catchup = codec.payload_from_record(msg.content.array_records[BASE_RECORD]) if BASE_RECORD in msg.content.array_records else None
    try:
        party, base_id = round_party(_cache(context), cfg, download, catchup)
    except MissingSetup as e:
        return _missing(msg, str(e))
    except MissingBase as e:
        return _missing(msg, str(e), MISSING_BASE)
    return party, base_id, download


def _identity(pid: int, base_id: str) -> ConfigRecord:
    return ConfigRecord({PARTITION_ID: pid, BASE_ID: base_id})


def setup(msg: Message, context: Context) -> Message:
    """Store the config and (if sent) the frozen B, A; report what this node holds."""
    cache = _cache(context)
    cfg = msg.content.config_records[SETUP_RECORD]
    text = str(cfg[CONFIG_TOML])
    if sha256(text) != cfg[CONFIG_SHA]:
        raise ValueError("config text does not match its announced sha256")
    cache.put(CONFIG_KIND, text.encode())
    frozen_sha = str(cfg[FROZEN_SHA])
    if FROZEN_RECORD in msg.content.array_records:
        data = codec.payload_from_record(msg.content.array_records[FROZEN_RECORD])
        if sha256(data) != frozen_sha:
            raise ValueError("frozen B, A do not match their announced sha256")
        comm.decode(data)  # parse fully (safetensors, finite) before caching it
        cache.put(FROZEN_KIND, data)
    pid = _partition_id(context)
    config = cache.config(str(cfg[CONFIG_SHA]))
    built: list[NodeParty] = []  # built at most once, only when needed

    def party() -> NodeParty:
        if not built:
            built.append(build_party(cache, config))
        return built[0]

    if frozen_sha and config.init.method == "svd" and needs_frozen_broadcast(config) and not cache.has(FROZEN_KIND, frozen_sha):
        party().local_factors(cache, frozen_sha)  # B, A computed here; sent only if they differ
    fields: dict[str, Any] = {PARTITION_ID: pid, HAS_FROZEN: bool(frozen_sha) and cache.has(FROZEN_KIND, frozen_sha)}
    if cache.party is not None:  # node-data mode: the server learns this party's counts from here alone
        fields.update(party().counts(pid))
    return Message(RecordDict({NODE_RECORD: ConfigRecord(fields)}), reply_to=msg)


def init(msg: Message, context: Context) -> Message:
    """One exchange of the federated init: this partition's sketch message (never its U_i)."""
    cfg = msg.content.config_records[INIT_RECORD]
    config_sha = str(cfg[CONFIG_SHA])
    cache = _cache(context)
    try:
        party = init_party(cache, config_sha)
    except MissingSetup as e:
        return _missing(msg, str(e))
    arrays = msg.content.array_records
    broadcast = comm.decode(codec.payload_from_record(arrays[DOWNLOAD_RECORD]))[0] if DOWNLOAD_RECORD in arrays else {}
    signs = party.init_signs(cache, config_sha, _partition_id(context))
    message = party.init_message(signs, str(cfg[INIT_KIND]), broadcast)
    return Message(RecordDict({UPDATE_RECORD: codec.payload_record(comm.encode(message, "fp32"))}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """One round of local training on this node's partition."""
    if SECAGG_FITINS_RECORD in msg.content.config_records:  # SecAgg+ (legacy FitIns layout)
        return _train_secagg(msg, context)
    cfg = msg.content.config_records[CONFIG_RECORD]
    round_index = int(cfg[ROUND])
    pid = _partition_id(context)
    ready = _round_party(msg, context)
    if isinstance(ready, Message):
        return ready
    party, base_id, download = ready
    global_state = party.start_state(download)
    fault = _fault(context, pid, round_index)
    if fault == "crash":
        raise RuntimeError(f"injected crash in round {round_index + 1}")
    if fault == "hang":
        time.sleep(10**6)
    update, epsilon = party.train(pid, round_index, global_state, _cache(context), str(cfg[CONFIG_SHA]))
    wire = party.wire_dtype
    lie = fault if fault in faults.FIELD_FAULTS else None
    payload = faults.faulty_payload(fault, update.tensors, wire) if fault and not lie else comm.encode(update.tensors, wire)
    if lie:  # a node lying in its fields (tests): the same lies as under SecAgg+
        update, pid = faults.lie(lie, update, pid)
    return Message(codec.encode_update(update, payload, partition_id=pid, base_id=base_id, epsilon=epsilon), reply_to=msg)


def _train_secagg(msg: Message, context: Context) -> Message:
    """Train, then hand w_i and R_i to `secaggplus_mod`, which uploads mask(w_i * R_i, w_i)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg = fitins.config
    round_index = int(cfg[ROUND])
    pid = _partition_id(context)
    cache = _cache(context)
    party = party_for(cache, str(cfg[CONFIG_SHA]), str(cfg[FROZEN_SHA]))
    names = str(cfg[TENSOR_NAMES]).split("\n")
    shapes = party.trainable_shapes()
    if sorted(names) != sorted(shapes):
        raise ValueError("the server's tensor names do not match this node's adapter")
    global_state = codec.ndarrays_to_state(parameters_to_ndarrays(fitins.parameters), names, shapes)
    update, _ = party.train(pid, round_index, global_state, cache, str(cfg[CONFIG_SHA]))
    # the weight the server fixed for this partition (docs/flower.md "Example counts and weights")
    weight = cfg[WEIGHT] if WEIGHT in cfg else party.weight(pid)
    update = replace(update, num_examples=int(weight))
    lie = _fault(context, pid, round_index)
    if lie in faults.FIELD_FAULTS:  # a node lying in its fields (tests)
        update, pid = faults.lie(lie, update, pid)
    num_examples, metrics = codec.secagg_fields(update, pid)
    fitres = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters(codec.state_to_ndarrays(update.tensors, names)),
        num_examples=num_examples,  # SecAgg+ multiplies R by this weight before masking
        metrics=metrics,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _party_evaluate(msg: Message, context: Context) -> Message:
    """Node-data mode: the task's evaluation on this node's own eval file (the base model when
    the server asks for "base"); only counts go back (`NodeParty.evaluate`)."""
    pid = _partition_id(context)
    cfg = msg.content.config_records[CONFIG_RECORD]
    if cfg.get(EVAL_BASE):
        try:
            party, base_id, state = init_party(_cache(context), str(cfg[CONFIG_SHA])), "", None
        except MissingSetup as e:
            return _missing(msg, str(e))
    else:
        ready = _round_party(msg, context)
        if isinstance(ready, Message):
            return ready
        party, base_id, download = ready
        state = party.start_state(download)
    metrics = {_EVAL_FIELDS[k]: float(v) for k, v in party.evaluate(state).items()}
    return Message(RecordDict({METRICS_RECORD: MetricRecord(metrics), NODE_RECORD: _identity(pid, base_id)}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Loss of the global adapter on this node's partition (no training, nothing uploaded)."""
    if msg.content.config_records[CONFIG_RECORD].get(PARTY_EVAL):
        return _party_evaluate(msg, context)
    pid = _partition_id(context)
    ready = _round_party(msg, context)
    if isinstance(ready, Message):
        return ready
    party, base_id, download = ready
    loss, n = party.loss(pid, party.start_state(download))
    content = RecordDict({METRICS_RECORD: MetricRecord({LOSS: loss, NUM_EXAMPLES: float(n)}), NODE_RECORD: _identity(pid, base_id)})
    return Message(content, reply_to=msg)


HANDLERS = {SETUP_ACTION: setup, INIT_ACTION: init, TRAIN: train, EVALUATE: evaluate}


def prewarm(kind: str, msg: Message, context: Context) -> None:
    """After a setup, build the node's party (model, tokenized partition, B and A) so the
    first round finds it ready: only worth it in a process that outlives the message."""
    if kind != SETUP_ACTION:
        return
    cfg = msg.content.config_records[SETUP_RECORD]
    try:
        party_for(_cache(context), str(cfg[CONFIG_SHA]), str(cfg[FROZEN_SHA]))
    except MissingSetup:  # B and A come with a later setup
        pass


def handle(kind: str, msg: Message, context: Context) -> Message:
    """Answer `msg` with the handler `kind` ("setup", "init", "train", "evaluate")."""
    return HANDLERS[kind](msg, context)
