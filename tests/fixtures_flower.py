"""What the Flower deployment tests share: the skip when Flower's executables are missing, and
the tiny experiment both `test_flower` and `test_engines` run (2 clients, 2 rounds, tiny-llama)."""

from __future__ import annotations

import pytest

from fedsb.flower.launch import BIN

requires_flower = pytest.mark.skipif(
    not all((BIN / exe).exists() for exe in ("flower-superlink", "flower-supernode", "flwr")),
    reason="Flower executables (flower-superlink, flower-supernode, flwr) are not installed in this environment",
)

TINY = {
    "seed": 5,
    "model": {"name": "tiny-llama"},
    "adapter": {"rank": 4, "targets": ["q_proj", "v_proj"]},
    "init": {"method": "central", "num_samples": 8, "batch_size": 4},
    "train": {"lr": 5e-3, "batch_size": 4, "local_steps": 2, "warmup_ratio": 0.1, "precision": "fp32", "max_length": 64},
    "federation": {"num_clients": 2, "rounds": 2, "partition": "iid"},
    "task": {
        "name": "arith",
        "options": {"generator": "chain_sum", "generator_kwargs": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}},
        "train_limit": 16,
        "eval_limit": 2,
        "max_new_tokens": 2,
        "eval_batch_size": 2,
    },
}


def server_side(monkeypatch, data: dict | None = None):
    """What a ServerApp holds before round 1 of `data` (default TINY), for calling the ClientApp's
    handlers without processes: (federation after init, frozen B/A bytes, config text, the two
    sha256 fields of every message, the round-1 download)."""
    import json

    from flwr.supercore.task_identity import TaskIdentity

    from fedsb.adapter.inject import trainable_state
    from fedsb.config import config_from_dict
    from fedsb.federated import comm
    from fedsb.federated.federation import build_federation, initialize_adapter
    from fedsb.flower.frozen import frozen_state
    from fedsb.flower.settings import config_text, sha256

    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):  # what a ServerApp process has
        monkeypatch.setattr(TaskIdentity, name, value)
    config = config_from_dict(json.loads(json.dumps(data or TINY)))
    server = build_federation(config)
    initialize_adapter(server, comm.CommLedger())
    frozen = comm.encode(frozen_state(server.model))
    text = config_text(config)
    shas = {"config-sha256": sha256(text), "frozen-sha256": sha256(frozen)}
    return server, frozen, text, shas, comm.encode(trainable_state(server.model, server.head_modules))
