import pytest
import torch

from fedsb.adapter.inject import inject_adapters, mark_trainable
from fedsb.init import estimate_gradients, init_central, init_random
from fedsb.init.svd import effective_lr, randomized_svd, sign_step
from tests.conftest import lm_batch

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_effective_lr_uses_training_schedule():
    assert effective_lr(1e-4, 0.02, 1000) == pytest.approx(1e-4 / 20)
    assert effective_lr(1e-4, 0.0, 1000) == 1e-4  # no warm-up: at least one step


def test_randomized_svd_matches_full_svd_when_sketch_covers_rank():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(20, 6, generator=g) @ torch.randn(6, 15, generator=g)
    p, s, qt = randomized_svd(u, 6, oversample=4, power_iters=1, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(p @ torch.diag(s) @ qt, u, rtol=1e-4, atol=1e-4)


def test_randomized_svd_is_seeded_not_global():
    u = torch.randn(30, 20)
    torch.manual_seed(123)
    a = randomized_svd(u, 3, power_iters=0, oversample=2, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(999)
    b = randomized_svd(u, 3, power_iters=0, oversample=2, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_rank_too_large_is_an_error():
    with pytest.raises(ValueError, match="rank 9 exceeds"):
        randomized_svd(torch.zeros(8, 4), 9, generator=torch.Generator())


def test_init_equals_truncation_of_first_step(tiny_llama):
    batches = [lm_batch(seed=i) for i in range(3)]
    layers = inject_adapters(tiny_llama, PROJ, rank=4, alpha=16)
    grads = estimate_gradients(tiny_llama, layers, batches)
    lr, warmup, steps = 1e-3, 0.1, 50
    init_central(tiny_llama, layers, batches, lr=lr, warmup_ratio=warmup, total_steps=steps, oversample=64, power_iters=2)
    lr_eff = effective_lr(lr, warmup, steps)
    for name, layer in layers.items():
        u = sign_step(grads[name], lr_eff)
        full_u, full_s, full_vt = torch.linalg.svd(u, full_matrices=False)
        truncation = full_u[:, :4] @ torch.diag(full_s[:4]) @ full_vt[:4]
        err = (layer.delta_weight() - truncation).norm() / truncation.norm()
        assert err <= 1e-4, (name, err)
        # B and A are orthonormal, R0 is diagonal
        torch.testing.assert_close(layer.lora_B.T @ layer.lora_B, torch.eye(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, torch.eye(4), atol=1e-5, rtol=0)
        r = layer.R.weight
        assert torch.count_nonzero(r - torch.diag(torch.diag(r))) == 0


def test_gradient_estimation_restores_flags_and_mode(tiny_llama):
    layers = inject_adapters(tiny_llama, PROJ, rank=2)
    mark_trainable(tiny_llama)
    tiny_llama.train()
    flags = {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    estimate_gradients(tiny_llama, layers, [lm_batch()])
    assert {n: p.requires_grad for n, p in tiny_llama.named_parameters()} == flags
    assert all(m.training for m in tiny_llama.modules())
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_gradient_estimation_restores_state_on_error(tiny_llama):
    layers = inject_adapters(tiny_llama, PROJ, rank=2)
    mark_trainable(tiny_llama)
    tiny_llama.eval()

    def boom(model, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        estimate_gradients(tiny_llama, layers, [lm_batch()], loss_fn=boom)
    assert not any(layer.base_layer.weight.requires_grad for layer in layers.values())
    assert not any(m.training for m in tiny_llama.modules())


def test_gradient_is_the_mean_over_batches(tiny_llama):
    layers = inject_adapters(tiny_llama, ["q_proj"], rank=2)
    b1, b2 = lm_batch(seed=1), lm_batch(seed=2)
    g1 = estimate_gradients(tiny_llama, layers, [b1])
    g2 = estimate_gradients(tiny_llama, layers, [b2])
    g12 = estimate_gradients(tiny_llama, layers, [b1, b2])
    for name in layers:
        torch.testing.assert_close(g12[name], (g1[name] + g2[name]) / 2, rtol=1e-5, atol=1e-7)


def test_random_init_is_orthonormal_zero_r_and_seeded(tiny_llama):
    layers = inject_adapters(tiny_llama, PROJ, rank=4)
    init_random(layers, seed=11)
    first = {n: layer.lora_A.clone() for n, layer in layers.items()}
    init_random(layers, seed=11)
    for n, layer in layers.items():
        assert torch.equal(first[n], layer.lora_A)
        assert torch.count_nonzero(layer.R.weight) == 0
        torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, torch.eye(4), atol=1e-5, rtol=0)
