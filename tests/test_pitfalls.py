"""One test per bug of the paper's code (../shared/REFERENCE-PITFALLS.md) that fedsb must not have."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fedsb.federated.client as client_path
from fedsb.adapter.inject import adapter_layers, inject_adapters, mark_trainable, trainable_state
from fedsb.data import IGNORE_INDEX, tokenize_example
from fedsb.federated.federation import build_federation
from fedsb.federated.experiment import run_experiment
from fedsb.init import init_random
from fedsb.init.svd import effective_lr
from fedsb.models import char_tokenizer, tiny_causal_lm
from fedsb.tasks.base import Example
from fedsb.training import lr_at, make_optimizer, train_steps, warmup_steps_for
from tests.conftest import lm_batch
from tests.test_federation import make_config


def record_training(monkeypatch):
    """Record, for every local training call, the starting trainable state and learning rates."""
    calls = []
    real = client_path.train_steps

    def spy(model, batches, optimizer, **kw):
        calls.append({"state": trainable_state(model), "first_lr": kw["lr_for_step"](kw["first_step"]), "first_step": kw["first_step"]})
        return real(model, batches, optimizer, **kw)

    monkeypatch.setattr(client_path, "train_steps", spy)
    return calls


# 1. multi-round: the schedule runs across rounds instead of restarting (aggregation: test_aggregation)
def test_schedule_does_not_restart_each_round(monkeypatch, tmp_path):
    calls = record_training(monkeypatch)
    cfg = make_config(federation={"rounds": 3}, train={"warmup_ratio": 0.3, "local_steps": 2})
    run_experiment(cfg, tmp_path)
    per_round = [calls[i * 3]["first_step"] for i in range(3)]
    assert per_round == [0, 2, 4]
    assert calls[3]["first_lr"] != calls[0]["first_lr"]  # round 2 is not back in warm-up


# 2 + 3. every client of a round starts from the same broadcast adapter (FFA's A, FedIT's A and B)
@pytest.mark.parametrize("strategy", ["fedit", "ffa", "fedsb"])
def test_all_clients_start_from_the_same_adapter(strategy, monkeypatch, tmp_path):
    calls = record_training(monkeypatch)
    run_experiment(make_config(federation={"strategy": strategy, "rounds": 2}), tmp_path)
    for r in range(2):
        states = [c["state"] for c in calls[3 * r : 3 * r + 3]]
        for s in states[1:]:
            assert all(torch.equal(s[k], states[0][k]) for k in s)


def test_ffa_a_is_frozen_and_shared(tmp_path):
    fed = build_federation(make_config(federation={"strategy": "ffa"}))
    layers = adapter_layers(fed.model)
    before = {n: layer.lora_A.clone() for n, layer in layers.items()}
    assert all(not layer.lora_A.requires_grad for layer in layers.values())
    assert len({float(a.sum()) for a in before.values()}) == len(before)  # not all seeded alike


# 4. FedEx-LoRA: the residual is folded in at alpha/r, as training used (exactness would show it)
def test_fedex_residual_uses_training_scaling(tmp_path):
    cfg = make_config(federation={"strategy": "fedex"}, adapter={"alpha": 32.0})
    summary = run_experiment(cfg, tmp_path)
    assert summary["max_exactness_error"] <= 1e-6


# 6. bf16: R, its gradient and the optimizer state stay fp32; small steps are not lost
def test_r_stays_fp32_and_tiny_steps_survive_under_bf16():
    model = tiny_causal_lm("llama")
    layers = inject_adapters(model, ["q_proj", "v_proj"], rank=4)
    init_random(layers, seed=0)
    for layer in layers.values():
        layer.R.weight.data = torch.eye(4) * 3.0  # bf16 spacing at 3.0 is 0.0156
    params = mark_trainable(model)
    before = [p.detach().clone() for p in params]
    opt = make_optimizer(params, lr=1e-4, weight_decay=0.0)
    train_steps(model, [lm_batch()], opt, params=params, grad_accum=1, lr_for_step=lambda s: 1e-4, first_step=0, max_grad_norm=0, precision="bf16")
    for p, b in zip(params, before):
        assert p.dtype == torch.float32
        assert torch.count_nonzero(torch.diag(p - b)) == 4  # every diagonal entry moved
    with pytest.raises(TypeError, match="fp32"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], 1e-3, 0.0)


# 7. the init: step size from the training schedule, SVD once (not per client)
def test_init_uses_schedule_lr_and_runs_svd_once_per_layer(monkeypatch, tmp_path):
    import fedsb.init as init

    calls = []
    real = init.randomized_svd
    monkeypatch.setattr(init, "randomized_svd", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = make_config(federation={"rounds": 2}, train={"warmup_ratio": 0.25, "local_steps": 4})
    summary = run_experiment(cfg, tmp_path)
    assert len(calls) == 6  # 6 adapted layers, 3 clients, 2 rounds: one SVD per layer
    assert summary["init"]["lr_eff"] == pytest.approx(effective_lr(cfg.train.lr, 0.25, 2 * 4))


# 8. every optimizer step that exists gets a non-zero learning rate
@given(total=st.integers(1, 500), ratio=st.floats(0.0, 0.99), schedule=st.sampled_from(["linear", "cosine", "constant"]))
def test_every_step_has_positive_lr(total, ratio, schedule):
    warm = warmup_steps_for(total, ratio)
    assert all(lr_at(s, base_lr=1e-4, total_steps=total, warmup_steps=warm, schedule=schedule) > 0 for s in range(total))


def test_few_examples_with_large_accumulation_still_train(tmp_path):
    # 8 examples per client, accumulation 32: one optimizer step per client, inside the warm-up.
    # With random init R starts at exactly 0, so any non-zero R proves that step trained.
    cfg = make_config(
        init={"method": "random"},
        train={"local_steps": 0, "grad_accum": 32, "batch_size": 1, "warmup_ratio": 0.5},
        federation={"rounds": 1},
    )
    summary = run_experiment(cfg, tmp_path)
    assert summary["ledger"]["up"] > 0
    from safetensors.torch import load_file

    after = load_file(tmp_path / "adapter" / "adapter.safetensors")
    assert all(torch.count_nonzero(v) > 0 for k, v in after.items() if k.endswith(".R"))


# 9. pad == EOS: the final EOS stays in the loss
def test_final_eos_is_supervised_when_pad_is_eos():
    tok = char_tokenizer()
    tok.pad_token = tok.eos_token
    item = tokenize_example(Example("2+2=", "4"), tok, "plain", 64)
    assert item.input_ids[-1] == tok.eos_token_id and item.labels[-1] == tok.eos_token_id
    assert item.labels[: len(item.labels) - 2] == [IGNORE_INDEX] * (len(item.labels) - 2)
