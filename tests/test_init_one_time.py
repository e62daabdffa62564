"""One-time costs of B and A: rounded broadcasts stay exact, local inits are hash-verified."""

from __future__ import annotations

import json

import pytest
import torch

from fedsb.adapter.inject import adapter_layers, inject_adapters
from fedsb.federated import comm
from fedsb.init import init_random
from fedsb.init.one_time import (
    DIGEST_BYTES,
    decode_factors,
    digest,
    distribute_factors,
    encode_factors,
    frozen_factors,
    init_svd,
    quantize_int8,
    dequantize_int8,
)
from fedsb.models import tiny_causal_lm
from test_federation import make_config

from fedsb.federated.experiment import run_experiment


def _model(rank: int = 4):
    torch.manual_seed(0)
    model = tiny_causal_lm(vocab_size=50, hidden=32, layers=1)
    inject_adapters(model, ["q_proj", "up_proj"], kind="lorasb", rank=rank)
    return model


def test_int8_per_row_roundtrip_and_size():
    x = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scales
    q, scale = quantize_int8(x)
    err = (dequantize_int8(q, scale) - x).abs().amax(dim=1)
    assert q.dtype == torch.int8 and bool((err <= scale / 2 + 1e-12).all())  # half a step per row
    factors = {"l.lora_A": x, "l.lora_B": x.T.contiguous()}
    sizes = {d: len(encode_factors(factors, d)) for d in ("fp32", "bf16", "int8")}
    assert sizes["int8"] < 0.3 * sizes["fp32"] and sizes["bf16"] < 0.55 * sizes["fp32"]
    decoded = decode_factors(encode_factors(factors, "int8"), "int8")
    assert torch.equal(decoded["l.lora_A"], dequantize_int8(q, scale))


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_rounded_broadcast_keeps_fedsb_exact(tmp_path, dtype):
    full = run_experiment(make_config(init={"method": "central", "num_samples": 8, "batch_size": 4, "broadcast_dtype": "fp32"}), tmp_path / "fp32")
    low = run_experiment(make_config(init={"method": "central", "num_samples": 8, "batch_size": 4, "broadcast_dtype": dtype}), tmp_path / dtype)
    assert low["max_exactness_error"] <= 1e-6
    assert 0 < low["ledger"]["one_time"] < 0.75 * full["ledger"]["one_time"]  # tiny layers: headers and scales weigh
    assert low["init"]["max_rounding_error"] > 0 and full["init"]["max_rounding_error"] == 0
    # The checkpointed factors are exactly the decoded broadcast: every party holds them.
    from safetensors.torch import load_file

    state = load_file(tmp_path / dtype / "adapter/adapter.safetensors")
    b = next(v for k, v in state.items() if k.endswith("lora_B"))
    if dtype == "bf16":
        assert torch.equal(b, b.to(torch.bfloat16).float())


def test_svd_init_is_local_and_hash_verified(tmp_path):
    summary = run_experiment(make_config(init={"method": "svd"}), tmp_path)
    ledger = json.loads((tmp_path / "checkpoint/meta.json").read_text())["ledger"]
    assert ledger["one_time"] == {"init_hash": 3 * DIGEST_BYTES}  # 3 clients, nothing broadcast
    assert summary["max_exactness_error"] <= 1e-6 and summary["init"]["fallback_clients"] == 0
    model = _model()
    init_svd(model, seed=0)
    for layer in adapter_layers(model).values():
        u, s, vh = torch.linalg.svd(layer.base_layer.weight.detach())
        r = layer.rank
        # Same top-r subspaces as the exact SVD, orthonormal factors, R0 = 0.
        assert torch.allclose(layer.lora_B @ layer.lora_B.T @ u[:, :r], u[:, :r], atol=1e-3)
        assert torch.allclose(layer.lora_A @ layer.lora_A.T, torch.eye(r), atol=1e-5)
        assert torch.count_nonzero(layer.R.weight) == 0


def test_hash_mismatch_falls_back_to_the_broadcast():
    model = _model()
    init_random(adapter_layers(model), seed=1)
    server = frozen_factors(model)
    ledger = comm.CommLedger()
    off = {k: v + 1e-7 for k, v in server.items()}  # a client whose BLAS rounds differently
    info = distribute_factors(model, ledger, 5, method="random", broadcast_dtype="bf16", client_factors=lambda: off)
    assert digest(off) != digest(server) and info["fallback_clients"] == 5
    assert ledger.one_time["init_hash"] == 5 * DIGEST_BYTES
    assert ledger.one_time["init_broadcast_fallback"] == 5 * info["broadcast_bytes"]
    now = frozen_factors(model)  # the server installed what the clients decoded
    assert all(torch.equal(now[k], server[k].to(torch.bfloat16).float()) for k in server)
    same = comm.CommLedger()
    info = distribute_factors(model, same, 5, method="random", client_factors=lambda: frozen_factors(model))
    assert info["fallback_clients"] == 0 and same.one_time == {"init_hash": 5 * DIGEST_BYTES}
