"""The chunked head + cross-entropy (fedsb.head_loss) against the plain head and F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from fedsb.head_loss import chunked_head_cross_entropy, fused_head_supported


def _data(n=37, hidden=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g) * 0.3
    t = torch.randint(0, vocab, (n,), generator=g)
    tw = torch.rand(n, generator=g)
    return h, w, t, tw


def _plain(h, w, t, tw):
    return (F.cross_entropy(F.linear(h, w).float(), t, reduction="none") * tw).sum()


@pytest.mark.parametrize("chunk", [1, 5, 37, 128])
def test_fp32_loss_and_gradient_match_the_plain_head(chunk):
    h, w, t, tw = _data()
    ref = _plain(h, w, t, tw)
    (ref_grad,) = torch.autograd.grad(3.0 * ref, h)
    loss = chunked_head_cross_entropy(h, w, t, tw, chunk=chunk)
    (grad,) = torch.autograd.grad(3.0 * loss, h)  # the upstream gradient scales the stored one
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_the_autocast_head():
    """Under CPU autocast the plain path runs the head in bf16 and the loss in fp32; so does this."""
    h, w, t, tw = _data(n=64, hidden=32, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = (F.cross_entropy(F.linear(h, w).float(), t, reduction="none") * tw).sum()
        loss = chunked_head_cross_entropy(h, w, t, tw, chunk=16)
    (ref_grad,) = torch.autograd.grad(ref, h)
    (grad,) = torch.autograd.grad(loss, h)
    assert grad.dtype == torch.float32
    assert float(loss) == pytest.approx(float(ref), rel=1e-4)
    assert torch.allclose(grad, ref_grad, rtol=2e-2, atol=2e-3)


def test_no_gradient_is_formed_without_grad_and_a_trainable_head_is_refused():
    h, w, t, tw = _data()
    with torch.no_grad():
        loss = chunked_head_cross_entropy(h, w, t, tw)
    assert not loss.requires_grad and float(loss) == pytest.approx(float(_plain(h, w, t, tw)), rel=1e-6)
    with pytest.raises(ValueError, match="frozen head"):
        chunked_head_cross_entropy(h, w.requires_grad_(), t, tw)


def test_supported_only_for_a_frozen_plain_head_of_a_known_family():
    from fedsb.models import tiny_causal_lm

    model = tiny_causal_lm(seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    assert fused_head_supported(model)
    model.get_output_embeddings().weight.requires_grad_(True)
    assert not fused_head_supported(model)
    model.get_output_embeddings().weight.requires_grad_(False)
    model.config.model_type = "cohere"  # scaled logits (logit_scale): the model's own forward must run
    assert not fused_head_supported(model)  # (Gemma-2's soft cap is applied by the fused loss: tests/test_device.py)
