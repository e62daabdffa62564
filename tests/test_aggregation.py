"""Aggregation: exactness over random shapes/ranks/clients/weights; bytes equal the analytic count."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedsb.adapter.inject import adapter_layers, inject_adapters, load_state, mark_trainable, trainable_state
from fedsb.aggregation import get_strategy, strategy_names
from fedsb.federated import comm
from fedsb.federated.comm_table import payload_shapes
from fedsb.federated.exactness import ExactnessMeter
from fedsb.init import init_random


class Stack(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out, bias=False) for d_out, d_in in shapes)


def federate(strategy_name, shapes, rank, weights, seed, alpha=None, probes=32):
    """One round with random client updates; returns (strategy, model, exactness errors, payloads)."""
    cls = get_strategy(strategy_name)
    model = Stack(shapes)
    inject_adapters(model, "all-linear", kind=cls.adapter_kind, rank=rank, alpha=alpha, train_a=cls.train_a)
    strategy = cls(seed=seed)
    strategy.prepare(model)
    if cls.adapter_kind == "lorasb":
        init_random(adapter_layers(model), seed=seed)
    mark_trainable(model)
    g = torch.Generator().manual_seed(seed)
    global_state = trainable_state(model)
    meter = ExactnessMeter(probes=probes)
    strategy.begin_round(model)
    meter.begin_round(model, snapshot_base=cls.modifies_base)
    payloads = []
    for w in weights:
        client_state = {k: v + torch.randn(v.shape, generator=g) for k, v in global_state.items()}
        load_state(model, client_state, strict_keys=False)
        payload = comm.encode(trainable_state(model))
        payloads.append(payload)
        update, _ = comm.decode(payload)
        meter.add_client(model, strategy.client_weight(w))
        strategy.add(model, update, w)
    strategy.finish(model, 0)
    return strategy, model, meter.finish(model), payloads


shape = st.tuples(st.integers(2, 24), st.integers(2, 24))


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(shape, min_size=1, max_size=3),
    rank_frac=st.floats(0.1, 1.0),
    weights=st.lists(st.integers(1, 500), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
    weighted=st.booleans(),
)
def test_fedsb_is_exact(shapes, rank_frac, weights, seed, weighted):
    rank = max(1, int(rank_frac * min(min(s) for s in shapes)))
    strategy, model, errors, _ = federate("fedsb", shapes, rank, weights, seed)
    assert max(errors.values()) <= 1e-6


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(["ffa", "fedex", "flora"]),
    shapes=st.lists(shape, min_size=1, max_size=2),
    weights=st.lists(st.integers(1, 100), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_exact_baselines_are_exact(name, shapes, weights, seed):
    rank = max(1, min(min(s) for s in shapes) // 2)
    _, _, errors, _ = federate(name, shapes, rank, weights, seed, alpha=16)  # alpha/r != 1: scaling matters
    assert max(errors.values()) <= 1e-5


def test_fedit_is_inexact_and_says_so():
    _, _, errors, _ = federate("fedit", [(16, 12)], 4, [10, 20, 30], seed=0)
    assert max(errors.values()) > 1e-2


@pytest.mark.parametrize("name", ["fedit", "fedsb", "fedex"])
def test_probe_estimate_matches_full_matrices(name):
    shapes = [(40, 30), (24, 36)]
    _, _, full, _ = federate(name, shapes, 4, [10, 20, 30], seed=1, probes=0)
    _, _, probed, _ = federate(name, shapes, 4, [10, 20, 30], seed=1, probes=32)
    for k in full:
        if full[k] > 1e-3:
            assert 0.6 < probed[k] / full[k] < 1.6
        else:
            assert probed[k] <= 1e-5


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(strategy_names()),
    shapes=st.lists(shape, min_size=1, max_size=3),
    weights=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    seed=st.integers(0, 100),
)
def test_measured_bytes_equal_analytic_count(name, shapes, weights, seed):
    rank = max(1, min(min(s) for s in shapes) // 2)
    _, model, _, payloads = federate(name, shapes, rank, weights, seed)
    modules = [(n, layer.out_features, layer.in_features) for n, layer in adapter_layers(model).items()]
    analytic = comm.encoded_size(payload_shapes(modules, name, rank))
    assert all(len(p) == analytic for p in payloads)


def test_rounds_do_not_accumulate_old_updates():
    """The paper's code averaged over every client of rounds 1..t; each round must start empty."""
    cls = get_strategy("fedsb")
    model = Stack([(8, 8)])
    inject_adapters(model, "all-linear", rank=4)
    init_random(adapter_layers(model), seed=0)
    mark_trainable(model)
    strategy = cls()
    key = next(iter(trainable_state(model)))
    for round_index, values in enumerate(([1.0, 3.0], [10.0, 20.0])):
        strategy.begin_round(model)
        for v in values:
            strategy.add(model, {key: torch.full((4, 4), v)}, 1)
        strategy.finish(model, round_index)
    assert torch.allclose(trainable_state(model)[key], torch.full((4, 4), 15.0))


def test_unweighted_mode_is_the_plain_mean():
    cls = get_strategy("fedsb")
    model = Stack([(8, 8)])
    inject_adapters(model, "all-linear", rank=2)
    mark_trainable(model)
    key = next(iter(trainable_state(model)))
    for weighted, expected in ((True, (1 * 1 + 3 * 99) / 100), (False, 2.0)):
        strategy = cls(weighted=weighted)
        strategy.begin_round(model)
        strategy.add(model, {key: torch.full((2, 2), 1.0)}, 1)
        strategy.add(model, {key: torch.full((2, 2), 3.0)}, 99)
        strategy.finish(model, 0)
        assert torch.allclose(trainable_state(model)[key], torch.full((2, 2), expected))


@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
@pytest.mark.parametrize("probes", [0, 256])
def test_meter_sees_factors_changed_in_place(factor, probes):
    """The meter caches fp64 factors (and sums Fed-SB's R A V before meeting B) between
    clients; a factor changed in place must still be measured."""
    model = Stack([(12, 10)])
    inject_adapters(model, "all-linear", kind="lorasb", rank=4)
    init_random(adapter_layers(model), seed=0)
    layer = next(iter(adapter_layers(model).values()))
    with torch.no_grad():
        layer.R.weight.normal_()
    meter = ExactnessMeter(probes=probes)
    meter.begin_round(model, snapshot_base=False)
    deltas = []
    for shift in (0.0, 0.5):
        with torch.no_grad():
            getattr(layer, factor).add_(shift)  # a client that (wrongly) changed a frozen factor
        deltas.append((layer.lora_B @ layer.R.weight @ layer.lora_A).double() * layer.scaling)
        meter.add_client(model, 1.0)
    (error,) = meter.finish(model).values()
    mean = (deltas[0] + deltas[1]) / 2
    expected = ((deltas[1] - mean).norm() / mean.norm()).item()
    assert expected > 1e-2
    if probes:
        assert 0.7 < error / expected < 1.4  # a Hutchinson estimate
    else:
        assert error == pytest.approx(expected, rel=1e-6)


def test_flora_with_one_client_starts_from_the_fresh_init_not_the_stack():
    """With one client FLoRA's stack has the adapter's own shape; it is merged into the base,
    never loaded as the next round's starting adapter (that would count it twice)."""
    strategy, model, _, _ = federate("flora", [(12, 10)], 4, [7], seed=0)
    fresh = trainable_state(model)  # after finish: the reseeded LoRA the next round starts from
    stack = {k: v + 1.0 for k, v in fresh.items()}  # what the server sends, same names and shapes
    start = strategy.client_start_state(model, stack)
    assert all(torch.equal(start[k], fresh[k]) for k in fresh)
    fedsb, sb_model, _, _ = federate("fedsb", [(12, 10)], 4, [7], seed=0)
    sent = {k: v + 1.0 for k, v in trainable_state(sb_model).items()}
    assert all(torch.equal(fedsb.client_start_state(sb_model, sent)[k], sent[k]) for k in sent)


def test_a_strategy_registers_itself_by_its_class_declaration():
    """`class X(Strategy, name="x")` is the whole registration; a subclass without a name is not registered."""
    from fedsb.aggregation import registry
    from fedsb.aggregation.base import Strategy
    from fedsb.aggregation.fedsb import FedSB

    class _Probe(Strategy, name="_probe_strategy"):
        def finish(self, model, round_index):
            return {}

    class _Unnamed(FedSB):
        pass

    try:
        assert get_strategy("_probe_strategy") is _Probe and _Probe.name == "_probe_strategy"
        assert _Unnamed.name == "fedsb" and get_strategy("fedsb") is FedSB
        with pytest.raises(ValueError, match="taken"):

            class _Clash(Strategy, name="fedsb"):
                def finish(self, model, round_index):
                    return {}

    finally:
        registry._STRATEGIES.pop("_probe_strategy", None)
    assert "_probe_strategy" not in strategy_names()
    assert set(strategy_names()) >= {"fedsb", "fedit", "ffa", "fedex", "flora"}  # found by pkgutil
