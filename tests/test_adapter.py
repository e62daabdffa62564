import pytest
import torch
from torch import nn

from fedsb.adapter.inject import (
    adapter_layers,
    adapter_state,
    inject_adapters,
    load_state,
    mark_trainable,
    remove_adapters,
    resolve_targets,
    trainable_state,
)
from fedsb.adapter.layer import LoraLinear, LoraSBLinear
from fedsb.init import init_random
from tests.conftest import lm_batch

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen"])
def test_zero_r_equals_base_model(arch, request):
    model = request.getfixturevalue(arch)
    batch = lm_batch()
    before = logits(model, batch)
    layers = inject_adapters(model, PROJ, rank=4)
    init_random(layers, seed=1)
    assert len(layers) == 14
    torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=0)


def test_wrapping_does_not_copy_the_weight(tiny_llama):
    q = tiny_llama.model.layers[0].self_attn.q_proj
    inject_adapters(tiny_llama, ["q_proj"], rank=2)
    wrapped = tiny_llama.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped, LoraSBLinear) and wrapped.base_layer is q


def test_merge_equals_unmerged_forward(tiny_llama):
    batch = lm_batch()
    layers = inject_adapters(tiny_llama, "all-linear", rank=4, alpha=8)
    init_random(layers, seed=2)
    for layer in layers.values():
        nn.init.normal_(layer.R.weight, std=0.5)
    unmerged = logits(tiny_llama, batch)
    for layer in layers.values():
        layer.merge()
    merged = logits(tiny_llama, batch)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    assert (merged - logits(remove_adapters(tiny_llama, merge=False), batch)).abs().max() > 1e-4
    # the delta really changed the output, and unmerge (via remove) restores the base


def test_unmerge_restores_base(tiny_llama):
    batch = lm_batch()
    base = logits(tiny_llama, batch)
    layers = inject_adapters(tiny_llama, PROJ, rank=3)
    init_random(layers, seed=3)
    for layer in layers.values():
        nn.init.normal_(layer.R.weight)
        layer.merge()
        layer.unmerge()
        nn.init.zeros_(layer.R.weight)
    torch.testing.assert_close(logits(tiny_llama, batch), base, rtol=1e-5, atol=1e-5)


def test_only_r_trains(tiny_llama):
    inject_adapters(tiny_llama, "all-linear", rank=4)
    trainable = mark_trainable(tiny_llama)
    named = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert named and all(n.endswith(".R.weight") for n in named)
    assert len(trainable) == len(named) == len(adapter_layers(tiny_llama))
    assert all(not b.requires_grad for n, b in tiny_llama.named_buffers() if "lora_" in n)


def test_head_marked_trainable(tiny_bert):
    inject_adapters(tiny_bert, ["query", "value"], rank=4)
    mark_trainable(tiny_bert, ["classifier"])
    named = {n for n, p in tiny_bert.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= named
    assert all(n.endswith(".R.weight") or n.startswith("classifier") for n in named)
    assert "head.classifier.weight" in trainable_state(tiny_bert, ["classifier"])


def test_all_linear_skips_heads(tiny_llama, tiny_bert):
    assert not any("lm_head" in n for n in resolve_targets(tiny_llama, "all-linear"))
    assert not any("classifier" in n or "pooler" in n for n in resolve_targets(tiny_bert, "all-linear"))


def test_regex_targets(tiny_llama):
    names = resolve_targets(tiny_llama, r".*layers\.0\.self_attn\.(q|v)_proj")
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_bad_targets_and_ranks(tiny_llama):
    with pytest.raises(ValueError, match="match no module"):
        inject_adapters(tiny_llama, ["nonexistent_proj"], rank=2)
    with pytest.raises(ValueError, match="rank 999"):
        inject_adapters(tiny_llama, ["q_proj"], rank=999)
    with pytest.raises(TypeError, match="embed_tokens"):
        inject_adapters(tiny_llama, ["embed_tokens"], rank=2)


def test_lora_baseline_layer_trains_a_and_b_or_b_only(tiny_llama):
    layers = inject_adapters(tiny_llama, ["q_proj"], kind="lora", rank=2, train_a=False)
    mark_trainable(tiny_llama)
    for layer in layers.values():
        assert isinstance(layer, LoraLinear)
        assert layer.lora_B.requires_grad and not layer.lora_A.requires_grad
    assert all(k.endswith("lora_B") for k in trainable_state(tiny_llama))


def test_state_round_trip_and_shape_errors(tiny_llama):
    layers = inject_adapters(tiny_llama, PROJ, rank=4)
    init_random(layers, seed=5)
    state = adapter_state(tiny_llama)
    state = {k: v + 1 for k, v in state.items()}
    load_state(tiny_llama, state)
    assert all(torch.equal(v, adapter_state(tiny_llama)[k]) for k, v in state.items())
    bad = dict(state)
    key = next(k for k in bad if k.endswith(".R"))
    bad[key] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match=r"expected shape \(4, 4\), found \(5, 5\)"):
        load_state(tiny_llama, bad)
    with pytest.raises(ValueError, match="unexpected adapter tensors"):
        load_state(tiny_llama, {**state, "x.R": torch.zeros(1)})


def test_r_gradient_flows(tiny_llama):
    layers = inject_adapters(tiny_llama, PROJ, rank=4)
    init_random(layers, seed=1)
    mark_trainable(tiny_llama)
    tiny_llama.train()
    tiny_llama(**lm_batch()).loss.backward()
    grads = [layer.R.weight.grad for layer in layers.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
