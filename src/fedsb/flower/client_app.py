"""The Flower ClientApp: one SuperNode = one data partition (`--node-config partition-id=K`).

Flower starts a fresh process for every message, so this module stays light (Flower and the
forwarding code, no torch): each handler passes its message to `node_worker.dispatch`, which
answers it in the SuperNode's long-lived worker (model loaded once) or, where there is none,
here. What each message kind does is in `node_handlers`.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedsb.flower.node_worker import dispatch
from fedsb.flower.protocol import EVALUATE, INIT_ACTION, SETUP_ACTION, TRAIN


def fedsb_secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Route only SecAgg+ traffic through Flower's `secaggplus_mod`; plain rounds pass by."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


app = ClientApp(mods=[fedsb_secagg_mod])


@app.query(SETUP_ACTION)
def setup(msg: Message, context: Context) -> Message:
    """Store the config and (if sent) the frozen B, A; report what this node holds."""
    return dispatch(SETUP_ACTION, msg, context)


@app.query(INIT_ACTION)
def init(msg: Message, context: Context) -> Message:
    """One exchange of the federated init: this partition's sketch message."""
    return dispatch(INIT_ACTION, msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on this node's partition (plain or under SecAgg+)."""
    return dispatch(TRAIN, msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss of the global adapter on this node's partition."""
    return dispatch(EVALUATE, msg, context)
