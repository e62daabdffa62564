"""The federated init's exchanges on the nodes (`init.method = "federated"`).

`federated_run.run_federated_init_exchanges` does the server's arithmetic and calls the
transport's `init_exchange` for each step; this sends it as `query.init` messages to every
partition's node and returns their screened sketch messages. The init needs every partition:
a missing or refused reply stops the run, logged.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict
from torch import Tensor

from fedsb.federated import comm
from fedsb.federated.validation import PayloadError
from fedsb.flower import codec, screening
from fedsb.flower.discovery import Nodes
from fedsb.flower.events import RoundFailed, one_line
from fedsb.flower.messaging import exchange
from fedsb.flower.protocol import CONFIG_SHA, DOWNLOAD_RECORD, INIT_ACTION, INIT_KIND, INIT_MESSAGE_TYPE, INIT_RECORD, NODE_RECORD, UPDATE_RECORD

INIT_MAX_BYTES = 1 << 30  # a federated-init reply (sketches of the adapted layers): refused above 1 GiB


def init_exchange(nodes: Nodes, kind: str, broadcast: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    """One exchange of the federated init: every partition's message for `kind`."""
    if not nodes.node_of:
        nodes.setup(nodes.wait_for_nodes(), with_frozen=False)  # the config; B, A do not exist yet
    n = nodes.config.federation.num_clients
    absent = [pid for pid in range(n) if pid not in nodes.node_of]
    if absent:
        raise RoundFailed(f"federated init: no SuperNode holds partitions {absent}; every client takes part in it")
    payload = comm.encode(broadcast, "fp32") if broadcast else None
    messages = []
    for pid in range(n):
        content = RecordDict({INIT_RECORD: ConfigRecord({CONFIG_SHA: nodes.config_sha, INIT_KIND: kind})})
        if payload is not None:
            content[DOWNLOAD_RECORD] = codec.payload_record(payload)
        messages.append(Message(content, dst_node_id=nodes.node_of[pid], message_type=INIT_MESSAGE_TYPE, ttl=nodes.settings.round_timeout + 60))
    ex = exchange(nodes.grid, messages, timeout=nodes.settings.round_timeout)
    pid_of = {nid: pid for pid, nid in nodes.node_of.items()}
    out: dict[int, dict[str, Tensor]] = {}
    for nid, reply in ex.replies:
        pid = pid_of[nid]
        if reply.has_error():
            raise _failed(nodes, kind, f"partition {pid} answered {reply.error.reason.strip().splitlines()[-1:]}")
        try:
            screening.screen_reply(INIT_ACTION, codec.reply_fields(reply.content, reply.metadata.src_node_id, NODE_RECORD), nodes.expected(None, nid))
            out[pid] = comm.decode(codec.payload_from_record(reply.content.array_records.get(UPDATE_RECORD)), max_bytes=INIT_MAX_BYTES)[0]
        except Exception as e:
            raise _failed(nodes, kind, f"partition {pid}'s reply is refused: {e if isinstance(e, PayloadError) else one_line(e)}") from None
    if ex.unanswered:
        raise _failed(nodes, kind, f"no reply from partitions {sorted(pid_of[n] for n in ex.unanswered)}")
    _check_layouts(nodes, kind, out)
    return out


def _check_layouts(nodes: Nodes, kind: str, out: dict[int, dict[str, Tensor]]) -> None:
    """Every node answers the same protocol step: the same tensors and shapes."""
    layouts = {pid: {k: tuple(v.shape) for k, v in t.items()} for pid, t in out.items()}
    common = max(layouts.values(), key=lambda lay: sum(other == lay for other in layouts.values()), default={})
    odd = sorted(pid for pid, lay in layouts.items() if lay != common)
    if odd:
        raise _failed(nodes, kind, f"partitions {odd} sent other tensors or shapes than the others")


def _failed(nodes: Nodes, kind: str, reason: str) -> RoundFailed:
    """The federated init needs every partition: a refused reply stops the run, logged."""
    nodes.events("init-failed", exchange=kind, reason=reason)
    return RoundFailed(f"federated init ({kind}): {reason}")
