"""The physical batch is fedsb's choice: same loss, same update, whatever rows share a forward."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedsb.config import config_from_dict
from fedsb.federated.experiment import run_experiment
from fedsb.physical_batch import plan_physical_batches


def _micro(lengths, labelled_from=2, pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(3, 50, (n,), generator=g)
        mask[r, :n] = 1
        labels[r, labelled_from:n] = ids[r, labelled_from:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_plan_keeps_every_row_and_weights_by_its_micro_batch():
    group = [_micro([5, 9]), _micro([7], seed=1), _micro([4, 6, 8], seed=2)]
    plan = plan_physical_batches(group, max_rows=0, max_tokens=0)
    assert len(plan) == 1 and plan[0].batch["input_ids"].shape == (6, 9)
    # labels from position 2, counted from position 1: micro-batch 0 supervises 3+7 = 10 tokens,
    # 1: 5, 2: 2+4+6 = 12; G = 3
    expected = sorted([(5, 1 / 30), (9, 1 / 30), (7, 1 / 15), (4, 1 / 36), (6, 1 / 36), (8, 1 / 36)])
    lengths = plan[0].batch["attention_mask"].sum(1).tolist()
    assert lengths == [n for n, _ in expected]
    assert torch.allclose(plan[0].row_weight, torch.tensor([w for _, w in expected]))


def test_plan_respects_row_and_token_budgets():
    group = [_micro([10, 10, 10, 10]), _micro([30], seed=1)]
    by_rows = plan_physical_batches(group, max_rows=2, max_tokens=0)
    assert [p.batch["input_ids"].shape[0] for p in by_rows] == [2, 2, 1]
    by_tokens = plan_physical_batches(group, max_rows=0, max_tokens=40)
    assert [tuple(p.batch["input_ids"].shape) for p in by_tokens] == [(4, 10), (1, 30)]
    assert all(int(p.batch["attention_mask"].sum()) for p in by_tokens)


def test_packed_plan_lays_rows_end_to_end():
    group = [_micro([5, 9]), _micro([7], seed=1)]
    plan = plan_physical_batches(group, max_rows=0, max_tokens=0, pack=True)
    assert len(plan) == 1
    batch, weight = plan[0].batch, plan[0].token_weight
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape == (1, 21)
    assert batch["position_ids"][0].tolist() == [*range(5), *range(7), *range(9)]  # sorted by length
    starts = (batch["position_ids"][0] == 0).nonzero().squeeze(1)
    assert (batch["labels"][0, starts] == -100).all()  # never predicted from the previous row
    # micro-batch 0 supervises 3 + 7 tokens, 1 supervises 5; G = 2
    assert torch.allclose(weight[0], torch.tensor([1 / 20] * 5 + [1 / 10] * 7 + [1 / 20] * 9))
    by_tokens = plan_physical_batches(group, max_rows=0, max_tokens=12, pack=True)
    assert [p.batch["input_ids"].shape[1] for p in by_tokens] == [12, 9]  # 5 + 7 fit, 9 more would not


def test_plan_refuses_a_micro_batch_without_supervised_tokens():
    with pytest.raises(FloatingPointError, match="no supervised token"):
        plan_physical_batches([_micro([5], labelled_from=5)], max_rows=0, max_tokens=0)


TINY = {
    "seed": 5,
    "model": {"name": "tiny-llama"},
    "adapter": {"rank": 4, "targets": ["q_proj", "v_proj", "down_proj"]},
    "init": {"method": "central", "num_samples": 8, "batch_size": 4},
    "train": {"lr": 5e-3, "batch_size": 1, "grad_accum": 4, "local_steps": 2, "warmup_ratio": 0.1,
              "schedule": "cosine", "precision": "fp32", "max_length": 128},
    "federation": {"num_clients": 2, "rounds": 1, "partition": "iid"},
    "task": {
        "name": "arith",
        "options": {"generator": "chain_sum", "generator_kwargs": {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 3}},
        "train_limit": 16, "eval_mode": "none",
    },
}


def _round_r(tmp_path, name, **train):
    data = json.loads(json.dumps(TINY))
    data["train"].update(train)
    summary = run_experiment(config_from_dict(data), tmp_path / name)
    state = load_file(str(tmp_path / name / "adapter" / "adapter.safetensors"))
    return summary, {k: v for k, v in state.items() if k.endswith(".R")}


@pytest.mark.parametrize("micro", [{"batch_size": 1, "grad_accum": 4}, {"batch_size": 2, "grad_accum": 2}])
def test_same_r_after_a_round_whichever_physical_batch_ran(tmp_path, micro):
    before, r_one = _round_r(tmp_path, "one", physical_batch=1, **micro)
    after, r_all = _round_r(tmp_path, "all", physical_batch=0, physical_tokens=0, pack_sequences=False, **micro)
    _, r_small = _round_r(tmp_path, "tok", physical_batch=0, physical_tokens=60, pack_sequences=False, **micro)
    _, r_packed = _round_r(tmp_path, "pack", physical_batch=0, physical_tokens=0, pack_sequences=True, **micro)
    assert r_one.keys() == r_all.keys() == r_packed.keys() and r_one
    off_diagonal = max(float((v - torch.diag(torch.diag(v))).abs().max()) for v in r_one.values())
    assert off_diagonal > 1e-4  # R0 from the init is diagonal: training did change R
    for key in r_one:
        assert torch.allclose(r_one[key], r_all[key], atol=1e-6, rtol=0), key
        assert torch.allclose(r_one[key], r_small[key], atol=1e-6, rtol=0), key
        assert torch.allclose(r_one[key], r_packed[key], atol=1e-6, rtol=0), key
    assert before["final_train_loss"] == pytest.approx(after["final_train_loss"], rel=1e-5)


def _tiny_lorasb(seed=0):
    from fedsb.adapter.inject import inject_adapters, mark_trainable
    from fedsb.init import init_random
    from fedsb.models import tiny_causal_lm

    model = tiny_causal_lm(seed=seed)
    layers = inject_adapters(model, ["q_proj", "v_proj", "down_proj"], rank=4)
    init_random(layers, seed=seed)
    return model, mark_trainable(model)


@pytest.mark.parametrize("physical", [(1, 0, False), (0, 0, False), (0, 30, False), (3, 0, False), (0, 0, True), (0, 30, True)])
def test_repacked_step_gives_the_micro_batch_gradient(physical):
    """Against the plain path (each micro-batch's mean loss / G, no re-cutting), with SGD so that
    any error in the normalization shows (Adam would hide a uniform scale)."""
    from fedsb.training import supports_packing, train_steps

    micro = [_micro([7, 12], seed=0), _micro([9], seed=1), _micro([5, 11], seed=2), _micro([6], seed=3)]
    results = []
    for rows in (None, physical):
        model, params = _tiny_lorasb()
        assert supports_packing(model)
        opt = torch.optim.SGD(params, lr=1.0)
        kwargs = {} if rows is None else {"physical_batch": rows[0], "physical_tokens": rows[1], "pack": rows[2]}
        res = train_steps(model, micro, opt, params=params, grad_accum=4, lr_for_step=lambda s: 1.0, first_step=0,
                          max_grad_norm=0.0, precision="fp32", **kwargs)
        results.append((res, [p.detach().clone() for p in params]))
    (plain, p_plain), (packed, p_packed) = results
    assert plain.mean_loss == pytest.approx(packed.mean_loss, rel=1e-6)
    assert plain.tokens == packed.tokens
    assert max(float((a - b).abs().max()) for a, b in zip(p_plain, p_packed)) < 1e-6
    assert max(float(p.abs().max()) for p in p_plain) > 1e-3  # the SGD step moved R


def test_packed_rows_do_not_see_each_other():
    """The packed loss equals the rows' separate losses only because the restarting positions
    keep the rows apart: the same packed row without them (one long sequence) gives another loss."""
    from fedsb.training import causal_lm_packed_loss

    model, _ = _tiny_lorasb()
    model.eval()
    part = plan_physical_batches([_micro([7, 12], seed=0), _micro([9], seed=1)], max_rows=0, max_tokens=0, pack=True)[0]
    padded = plan_physical_batches([_micro([7, 12], seed=0), _micro([9], seed=1)], max_rows=0, max_tokens=0)[0]
    from fedsb.training import causal_lm_row_losses

    with torch.no_grad():
        packed = causal_lm_packed_loss(model, part.batch, part.token_weight)
        separate = (causal_lm_row_losses(model, padded.batch) * padded.row_weight).sum()
        joined = {k: v for k, v in part.batch.items() if k != "position_ids"}
        leaky = causal_lm_packed_loss(model, joined, part.token_weight)
    assert float(packed) == pytest.approx(float(separate), rel=1e-5)
    assert abs(float(leaky) - float(separate)) > 1e-3


def test_packed_init_gradients_match_the_plain_pass():
    from fedsb.adapter.inject import adapter_layers
    from fedsb.init.gradients import estimate_gradients

    model, _ = _tiny_lorasb()
    batches = [_micro([7, 12], seed=0), _micro([9, 4], seed=1)]
    layers = adapter_layers(model)
    plain = estimate_gradients(model, layers, batches)
    packed = estimate_gradients(model, layers, batches, physical_tokens=64, pack=True)
    for name in plain:
        assert torch.allclose(plain[name], packed[name], atol=1e-6, rtol=1e-4), name
