"""Merged-adapter inference: same greedy outputs as the unmerged fp32 path, exact restore."""

from __future__ import annotations

import pytest
import torch

from fedsb.adapter.inject import adapter_layers, inject_adapters
from fedsb.adapter.merge import merged_adapters
from fedsb.evaluation import generate
from fedsb.init import init_random
from fixtures_tasks import smollm2_tokenizer, tiny_llama

PROMPTS = ["Hello there, how are", "What is 2+2? Answer:", "x", "Once upon a time in a land far away"]


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def _adapted(tok, kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_llama(len(tok))
    layers = inject_adapters(model, ["q_proj", "v_proj", "up_proj", "down_proj"], kind=kind, rank=4)
    if kind == "lorasb":
        init_random(layers, seed=1)
        for layer in layers.values():  # a visible, non-trivial R
            layer.R.weight.data.normal_(0, 0.5)
    else:
        for layer in layers.values():
            layer.lora_A.data.normal_(0, 0.3)
            layer.lora_B.data.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("kind", ["lorasb", "lora"])
def test_merged_outputs_equal_unmerged_and_weights_restore_bit_exactly(tok, kind):
    model = _adapted(tok, kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.tensor([tok("some input text")["input_ids"]])
    with torch.no_grad():
        ref = model(x).logits
        with merged_adapters(model) as n:
            assert n == len(adapter_layers(model))
            merged = model(x).logits
            assert all(layer.merged for layer in adapter_layers(model).values())
    assert torch.allclose(merged, ref, atol=1e-4, rtol=0)  # fp32 rounding of W + BRA vs the two paths
    assert not any(layer.merged for layer in adapter_layers(model).values())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # The adapter path really contributes, so the merged equality above is not vacuous.
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.scaling = 0.0
        plain = model(x).logits
    assert (plain - ref).abs().max() > 1e-3


def test_greedy_generation_merged_equals_unmerged_fp32(tok):
    model = _adapted(tok, "lorasb")
    kw = dict(max_new_tokens=12, progress=False, precision="fp32", batch_size=4)
    unmerged = generate(model, tok, PROMPTS, merge=False, **kw)
    merged = generate(model, tok, PROMPTS, merge=True, **kw)
    assert merged == unmerged


def test_restore_after_an_exception_and_bf16_merge(tok):
    model = _adapted(tok, "lorasb")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError), merged_adapters(model, torch.bfloat16):
        assert all(layer.base_layer.weight.dtype == torch.bfloat16 for layer in adapter_layers(model).values())
        raise RuntimeError("boom")
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    out = generate(model, tok, PROMPTS[:2], max_new_tokens=4, progress=False, precision="bf16")
    assert len(out) == 2
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_bf16_stored_weight_keeps_its_small_delta_in_evaluation():
    """A fine-tuned delta below half a bf16 step of W vanishes if merged into a bf16-stored W
    (bf16(bf16(W) + delta) == bf16(W)); such layers run unmerged, as in training."""
    from fedsb.adapter.inject import store_frozen
    from fedsb.adapter.layer import LoraSBLinear

    torch.manual_seed(0)
    layer = LoraSBLinear(torch.nn.Linear(64, 64, bias=False), rank=8)
    model = torch.nn.Sequential(layer)
    layer.base_layer.weight.data.normal_(0, 0.5)
    layer.base_layer.weight.requires_grad_(False)  # frozen, as after mark_trainable
    init_random({"0": layer}, seed=0)
    layer.R.weight.data = torch.eye(8) * 1e-3  # delta entries ~1e-4, half a bf16 step of W is ~1e-3
    store_frozen(model, torch.bfloat16)
    x = torch.randn(16, 64).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base = torch.nn.functional.linear(x, layer.base_layer.weight)
        unmerged = layer(x)
        rounded_away = (layer.base_layer.weight.float() + layer.delta_weight()).bfloat16()
        lost = (rounded_away == layer.base_layer.weight).float().mean()
        assert lost > 0.9  # merged in bf16, most of the delta would be rounded away: what this test guards against
        with merged_adapters(model, torch.bfloat16) as n:
            evaluated = layer(x)
    assert n == 0 and not layer.merged
    assert torch.equal(evaluated, unmerged) and not torch.equal(evaluated, base)
