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
