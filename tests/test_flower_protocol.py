"""The Flower protocol's names and its codec pair.

Every message type, record name and field key is named once, in `fedsb.flower.protocol`; the
rest of `fedsb.flower` uses the constants. The check reads the source (AST, docstrings and
f-string text excluded): a literal equal to a hyphenated or dotted protocol value anywhere, or a
literal used as a key (subscript, dict key, `.get`/`.pop`, `in`) that equals a protocol value
or looks like one (hyphenated), fails unless listed in ALLOWED with the reason the word means
something else there.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

FLOWER = Path(__file__).resolve().parents[1] / "src" / "fedsb" / "flower"

# the Flower CLI's JSON and the run config's keys (documented in docs/flower.md), not fedsb messages
SKIPPED_FILES = {"protocol.py", "launch.py"}

# (file, literal) -> why the same word is not a protocol key there
ALLOWED: dict[tuple[str, str], str] = {
    ("base_chain.py", "round"): "the checkpoint meta's base chain entry",
    ("server_loop.py", "round"): "the checkpoint meta's last round",
    ("server_loop.py", "secagg"): "the metrics row's and summary's flower.secagg",
    ("remote_eval.py", "loss"): "the metrics row's federated_eval.loss",
    ("codec.py", "epsilon"): "the driver's ClientUpdate.metrics",
    ("server_loop.py", "tokens"): "the summary's flower.node_data.tokens",
    ("settings.py", "init"): "the demo config's [init] section",
    ("settings.py", "train"): "the demo config's [train] section",
}


def protocol_values() -> set[str]:
    from fedsb.flower import protocol

    return {v for k, v in vars(protocol).items() if k.isupper() and isinstance(v, str)}


def _docstrings(tree: ast.AST) -> set[int]:
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def _is_key(node: ast.Constant, parent: ast.AST) -> bool:
    """`x["k"]`, `{"k": v}`, `x.get("k")` / `.pop` / `.setdefault`, `"k" in x`."""
    if isinstance(parent, ast.Subscript):
        return parent.slice is node
    if isinstance(parent, ast.Dict):
        return any(k is node for k in parent.keys)
    if isinstance(parent, ast.Call) and isinstance(parent.func, ast.Attribute) and parent.func.attr in ("get", "pop", "setdefault"):
        return bool(parent.args) and parent.args[0] is node
    if isinstance(parent, ast.Compare):
        return parent.left is node and any(isinstance(op, (ast.In, ast.NotIn)) for op in parent.ops)
    return False


def _looks_like_key(value: str) -> bool:
    parts = value.split("-")
    return len(parts) > 1 and all(p.isalnum() and p.islower() for p in parts)


def key_literals(path: Path, values: set[str]) -> list[str]:
    """The quoted protocol keys in one module: 'line: literal'."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstrings(tree)
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in skip:
            continue
        parent = parents.get(id(node))
        if isinstance(parent, ast.JoinedStr) or (path.name, node.value) in ALLOWED:
            continue
        distinctive = node.value in values and ("-" in node.value or "." in node.value)
        if distinctive or (_is_key(node, parent) and (node.value in values or _looks_like_key(node.value))):
            found.append(f"{node.lineno}: {node.value!r}")
    return found


def test_every_message_key_is_named_once_in_protocol():
    values = protocol_values()
    found = {p.name: hits for p in sorted(FLOWER.glob("*.py")) if p.name not in SKIPPED_FILES and (hits := key_literals(p, values))}
    assert not found, f"quoted protocol keys outside flower/protocol.py (use the constant, or list the file and word in ALLOWED with why): {found}"


def test_the_key_check_catches_a_quoted_key(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""doc "partition-id"."""\nx = {}\nx["partition-id"] = 1\ny = x.get("brand-new-key")\nz = f"partition-id {1}"\n')
    assert key_literals(module, protocol_values()) == ["3: 'partition-id'", "4: 'brand-new-key'"]


def test_protocol_names_each_value_once():
    from fedsb.flower import protocol

    names = {k: v for k, v in vars(protocol).items() if k.isupper() and isinstance(v, str)}
    shared = {v for v in names.values() if list(names.values()).count(v) > 1}
    # "kind" names both the init exchange's field and the worker frame's handler kind
    assert shared <= {"kind"}, shared


# --- the codec pair ----------------------------------------------------------------------------


def _update(history=None):
    from fedsb.federated.client import ClientState, ClientUpdate

    return ClientUpdate(client_id=3, num_examples=12, tensors={}, loss=0.75, steps=4, tokens=321, seconds=1.5, state=ClientState(privacy_history=history))


@pytest.mark.parametrize("dp", [False, True])
def test_encode_update_then_decode_update_gives_back_the_round(dp):
    """Node: `encode_update`; server: `reply_fields` -> `screen_reply` -> `decode_update`."""
    import torch

    from fedsb.federated import comm
    from fedsb.flower import codec, protocol, screening

    history = [[1.1, 0.25, 4]] if dp else None
    tensors = {"layers.0.R": torch.arange(4.0).reshape(2, 2)}
    payload = comm.encode(tensors)
    content = codec.encode_update(_update(history), payload, partition_id=3, base_id="", epsilon=0.5 if dp else None)
    assert set(content.config_records[protocol.NODE_RECORD]) == {protocol.PARTITION_ID, protocol.BASE_ID} | ({protocol.PRIVACY_HISTORY} if dp else set())
    fields = codec.reply_fields(content, 9, protocol.METRICS_RECORD, protocol.NODE_RECORD)
    info = screening.screen_reply(protocol.TRAIN, fields, screening.Expected(partitions=4, node=9, partition=3, num_examples=12, max_steps=4))
    got = codec.update_payload(content, max_bytes=None)
    assert got == payload
    update = codec.decode_update(info, comm.decode(got)[0], client_id=3, num_examples=12, payload_bytes=len(got))
    want = _update(history)
    assert (update.client_id, update.num_examples, update.loss, update.steps, update.tokens, update.seconds) == (3, 12, 0.75, 4, 321, 1.5)
    assert update.state.privacy_history == want.state.privacy_history and update.payload_bytes == len(payload)
    assert update.metrics == ({"epsilon": 0.5} if dp else {})
    assert torch.equal(update.tensors["layers.0.R"], tensors["layers.0.R"])


def test_a_lying_node_is_caught_by_the_screening_after_the_codec():
    from fedsb.flower import codec, faults, protocol, screening

    expected = screening.Expected(partitions=4, node=9, partition=3, num_examples=12, max_steps=4)
    for kind, field in (("claim-examples", "claims 120 examples"), ("claim-partition", "partition-id 99"), ("nan-loss", "loss"), ("nan-steps", "steps")):
        update, pid = faults.lie(kind, _update(), 3)
        content = codec.encode_update(update, b"", partition_id=pid, base_id="")
        with pytest.raises(screening.ReplyError, match=field):
            screening.screen_reply(protocol.TRAIN, codec.reply_fields(content, 9, protocol.METRICS_RECORD, protocol.NODE_RECORD), expected)


def test_secagg_fields_carry_the_weight_apart():
    from fedsb.flower import codec, protocol

    weight, metrics = codec.secagg_fields(_update(), 3)
    assert weight == 12 and metrics == {protocol.LOSS: 0.75, protocol.STEPS: 4.0, protocol.TOKENS: 321.0, protocol.SECONDS: 1.5, protocol.PARTITION_ID: 3}
    assert not any(isinstance(v, float) and math.isnan(v) for v in metrics.values())
