"""Issue 19: frozen tensors stored once (bf16 where training autocasts to bf16), R stays fp32,
and the grouped (lean) gradient-pass init gives the one-pass init's factors."""

import json

import pytest
import torch

from fedsb.adapter.inject import (
    adapter_layers,
    inject_adapters,
    mark_trainable,
    store_frozen,
)
from fedsb.config import config_from_dict
from fedsb.federated.federation import build_federation
from fedsb.federated.experiment import run_experiment
from fedsb.init import init_central, layer_groups
from fedsb.models import tiny_causal_lm
from fedsb.precision import frozen_dtype
from fedsb.training import make_optimizer

TARGETS = ["q_proj", "v_proj", "down_proj"]
TINY = {
    "seed": 2,
    "model": {"name": "tiny-llama"},
    "adapter": {"rank": 4, "targets": TARGETS},
    "init": {"method": "central", "num_samples": 8, "batch_size": 4},
    "train": {"lr": 5e-3, "batch_size": 2, "local_steps": 2, "warmup_ratio": 0.1, "precision": "bf16", "max_length": 64},
    "federation": {"num_clients": 2, "rounds": 1, "partition": "iid"},
    "task": {"name": "arith", "options": {"generator": "chain_sum", "generator_kwargs": {"min_terms": 2, "max_terms": 2}},
             "train_limit": 8, "eval_mode": "none"},
}


def _config(**sections):
    data = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


def test_frozen_dtype_rule():
    assert frozen_dtype("auto", "bf16") == torch.bfloat16
    assert frozen_dtype("auto", "fp32") == torch.float32
    assert frozen_dtype("auto", "bf16", folds_into_base=True) == torch.float32  # fedex / flora
    assert frozen_dtype("fp32", "bf16") == torch.float32
    with pytest.raises(ValueError, match="round the folded steps away"):
        frozen_dtype("bf16", "bf16", folds_into_base=True)


def _dtypes(model):
    frozen, trainable = {}, {}
    for name, layer in adapter_layers(model).items():
        frozen[f"{name}.weight"] = layer.base_layer.weight.dtype
        frozen.update({f"{name}.{k}": t.dtype for k, t in layer.frozen_tensors().items()})
        trainable.update({f"{name}.{k}": t.dtype for k, t in layer.trainable_tensors().items()})
    return frozen, trainable


@pytest.mark.parametrize("strategy,expect", [("fedsb", torch.bfloat16), ("ffa", torch.bfloat16), ("fedex", torch.float32)])
def test_bf16_mode_stores_frozen_tensors_in_bf16_and_trains_fp32(strategy, expect, tmp_path):
    cfg = _config(federation={"strategy": strategy})
    fed = build_federation(cfg)
    frozen, trainable = _dtypes(fed.model)
    assert frozen and set(frozen.values()) == {expect}
    assert trainable and set(trainable.values()) == {torch.float32}  # pitfall 6: R never bf16
    embed = fed.model.get_input_embeddings().weight
    assert embed.dtype == torch.float32  # read in fp32 by the lookup: not an adapted layer
    # a full run (init, a round, aggregation) keeps every dtype, and R trains in fp32 with fp32 moments
    summary = run_experiment(cfg, tmp_path / strategy)
    assert summary["final_train_loss"] is not None


def test_r_and_its_optimizer_state_stay_fp32_after_bf16_training():
    from fedsb.init import init_random
    from fedsb.training import train_steps

    model = tiny_causal_lm(seed=1)
    layers = inject_adapters(model, TARGETS, rank=4)
    init_random(layers, seed=1)
    for layer in layers.values():
        with torch.no_grad():
            layer.R.weight.copy_(torch.eye(4))
    params = mark_trainable(model)
    store_frozen(model, torch.bfloat16)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    opt = make_optimizer(params, lr=1e-4, weight_decay=0.0)
    train_steps(model, [batch], opt, params=params, grad_accum=1, lr_for_step=lambda s: 1e-4, first_step=0,
                max_grad_norm=1.0, precision="bf16", physical_batch=0)
    frozen, trainable = _dtypes(model)
    assert set(frozen.values()) == {torch.bfloat16} and set(trainable.values()) == {torch.float32}
    for p in params:
        assert p.dtype == torch.float32 and all(v.dtype == torch.float32 for v in opt.state[p].values() if v.dim())
    # a 1e-4 AdamW step lands on R = I in fp32: every diagonal entry moves (in bf16, 1 +- 1e-4 is 1)
    assert all(bool((p.detach().diagonal() != 1).all()) for p in params)
    with pytest.raises(TypeError, match="must be fp32"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.bfloat16))], lr=1e-4, weight_decay=0.0)


def test_merge_of_a_bf16_weight_is_undone_exactly():
    model = tiny_causal_lm(seed=1)
    layers = inject_adapters(model, TARGETS, rank=4)
    mark_trainable(model)
    store_frozen(model, torch.bfloat16)
    layer = next(iter(layers.values()))
    with torch.no_grad():
        layer.set_factors(torch.randn(layer.out_features, 4), torch.randn(4, 4), torch.randn(4, layer.in_features))
    before = layer.base_layer.weight.clone()
    expected = before.float() + layer.delta_weight()
    layer.merge()
    assert layer.base_layer.weight.dtype == torch.float32  # bf16 would round most of a small delta away
    assert torch.equal(layer.base_layer.weight, expected)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, before) and layer.base_layer.weight.dtype == torch.bfloat16


def _init(group_size, *, bf16=False, seed=4):
    model = tiny_causal_lm(layers=3, seed=seed)
    layers = inject_adapters(model, TARGETS, rank=4)
    mark_trainable(model)
    if bf16:
        store_frozen(model, torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(3):  # several batches: the accumulation across them is part of what is compared
        ids = torch.randint(3, 100, (2, 10), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    timings = {}
    init_central(model, layers, batches, lr=1e-4, warmup_ratio=0.1, total_steps=10, seed=seed, group_size=group_size,
                 precision="bf16" if bf16 else "fp32", timings=timings)
    assert requires == {n: p.requires_grad for n, p in model.named_parameters()}  # flags restored
    assert all(p.grad is None for p in model.parameters())
    assert timings["gradient pass"] > 0 and timings["svd"] > 0
    return {n: (l.lora_B.float().clone(), l.R.weight.clone(), l.lora_A.float().clone()) for n, l in layers.items()}


@pytest.mark.parametrize("group_size", [1, 4])
def test_grouped_init_gives_the_one_pass_factors(group_size):
    one = _init(0)
    grouped = _init(group_size)
    assert len(layer_groups(dict.fromkeys(one), group_size)) > 1
    for name in one:
        for a, b in zip(one[name], grouped[name]):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), name


def test_grouped_init_on_bf16_weights_accumulates_in_fp32():
    one = _init(0, bf16=True)
    grouped = _init(3, bf16=True)
    for name in one:
        for a, b in zip(one[name], grouped[name]):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), name
        assert torch.linalg.matrix_rank(one[name][0]) == 4


@pytest.mark.parametrize("budget", [12, 25])
def test_init_gradient_pass_under_a_token_budget_gives_the_same_gradient(budget):
    from fedsb.init import estimate_gradients

    model = tiny_causal_lm(layers=2, seed=7)
    layers = inject_adapters(model, TARGETS, rank=4)
    mark_trainable(model)
    g = torch.Generator().manual_seed(7)
    batches = []
    for lengths in ([9, 5, 12], [7, 10]):  # right-padded, partly labelled rows
        ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, n in enumerate(lengths):
            ids[r, :n] = torch.randint(3, 100, (n,), generator=g)
            mask[r, :n] = 1
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        labels[:, :3] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    plain = estimate_gradients(model, layers, batches)
    packed = estimate_gradients(model, layers, batches, physical_tokens=budget)
    for name in plain:
        assert torch.allclose(plain[name], packed[name], atol=1e-7, rtol=1e-5), name
    assert max(float(v.abs().max()) for v in plain.values()) > 1e-4


def test_bf16_storage_lets_the_checkpoint_go_and_keeps_values():
    model = tiny_causal_lm(seed=3)
    inject_adapters(model, TARGETS, rank=4)
    mark_trainable(model)
    embed = model.get_input_embeddings().weight
    before_ptr, before = embed.data_ptr(), embed.detach().clone()
    store_frozen(model, torch.bfloat16)
    assert embed.data_ptr() != before_ptr and torch.equal(embed, before)  # copied, not converted
