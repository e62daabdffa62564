"""fp32 attention under CPU bf16 autocast: same results as SDPA without autocast, fp32 inside it."""

import torch

from fedsb.attention import NAME
from fedsb.models import load_model


def _batch():
    ids = torch.randint(3, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: the mask path is exercised
    return ids, mask


def test_default_models_use_it_and_match_sdpa_without_autocast():
    model, _ = load_model("tiny-llama")
    assert model.config._attn_implementation == NAME
    ids, mask = _batch()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("sdpa")
        theirs = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(ours, theirs)


def test_runs_the_kernel_in_fp32_under_autocast_and_trains(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    seen = []
    real = sdpa.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kw):
        seen.append((query.dtype, torch.is_autocast_enabled("cpu")))
        return real(module, query, key, value, attention_mask, **kw)

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", spy)
    model, _ = load_model("tiny-llama")
    ids, mask = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.dtype == torch.bfloat16  # the rest of the model stays in bf16
    assert seen and all(s == (torch.float32, False) for s in seen)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
