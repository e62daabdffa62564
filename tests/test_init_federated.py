"""Acceptance tests of the federated LoRA-SB initialization (`fedsb.init.federated`)."""

from __future__ import annotations

import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save
from torch import Tensor

from fedsb.federated.comm import encoded_size
from fedsb.init import svd
from fedsb.init.federated import (
    clip_message,
    communication_cost,
    derive_seed,
    federated_randomized_svd,
    server_sum,
)

LR_EFF = 1e-3


def sign_update(shape: tuple[int, int], seed: int) -> Tensor:
    """A realistic U = -lr_eff * sign(G): full rank, flat spectrum, so Omega matters a lot."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return svd.sign_step(g, LR_EFF)


def reference_svd(u: Tensor, seed: int, index: int, **kwargs: int) -> tuple[Tensor, Tensor, Tensor]:
    """The centralized randomized SVD with the generator every party derives for layer `index`."""
    generator = torch.Generator().manual_seed(derive_seed(seed, index))
    return svd.randomized_svd(u, generator=generator, **kwargs)


def orthonormal(shape: tuple[int, int], seed: int) -> Tensor:
    return svd.orthonormal_basis(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


def principal_cosines(a: Tensor, b: Tensor) -> Tensor:
    """Cosines of the principal angles between the column spaces of orthonormal a and b."""
    return torch.linalg.svdvals(a.mT @ b)


def assert_factors_close(got: tuple[Tensor, ...], want: tuple[Tensor, ...]) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- (a), (b) one client

ONE_CLIENT_LAYERS = {"q": (48, 32), "down": (24, 64), "narrow": (10, 40)}  # narrow: k capped at 10


@pytest.mark.parametrize("power_iters", [0, 2])
def test_one_client_equals_centralized_randomized_svd(power_iters: int) -> None:
    updates = {name: sign_update(shape, i) for i, (name, shape) in enumerate(ONE_CLIENT_LAYERS.items())}
    result = federated_randomized_svd(
        [updates], [7.0], ONE_CLIENT_LAYERS, rank=4, oversample=10, power_iters=power_iters, seed=123
    )
    assert list(result.factors) == list(ONE_CLIENT_LAYERS)
    for index, (name, u) in enumerate(updates.items()):
        want = reference_svd(u, 123, index, rank=4, oversample=10, power_iters=power_iters)
        assert_factors_close(result.factors[name], want)
    assert result.rounds == 2 + 2 * power_iters


def test_one_client_comparison_is_sensitive_to_the_seed() -> None:
    """Control for the test above: another seed's Omega gives visibly different factors."""
    u = sign_update((48, 32), 0)
    result = federated_randomized_svd([{"q": u}], [1.0], {"q": (48, 32)}, rank=4, seed=123)
    p_other, _, _ = reference_svd(u, 124, 0, rank=4, oversample=10, power_iters=0)
    assert (result.factors["q"][0].abs() - p_other.abs()).abs().max() > 1e-2


def test_callable_and_mapping_clients_agree() -> None:
    shapes = {"a": (30, 20), "b": (20, 30)}
    clients = [{n: sign_update(s, 10 * c + i) for i, (n, s) in enumerate(shapes.items())} for c in range(3)]
    as_maps = federated_randomized_svd(clients, [1, 2, 3], shapes, rank=3, power_iters=1, seed=5)
    as_calls = federated_randomized_svd(
        [c.__getitem__ for c in clients], [1, 2, 3], shapes, rank=3, power_iters=1, seed=5
    )
    for name in shapes:
        assert_factors_close(as_calls.factors[name], as_maps.factors[name])


# --------------------------------------------------------------------------- (c) several clients


def low_rank_common(shape: tuple[int, int], n_components: int, seed: int) -> Tensor:
    """A matrix with singular values 1/k^2, k = 1..n_components (a decaying spectrum)."""
    m, n = shape
    left = orthonormal((m, n_components), seed)
    right = orthonormal((n, n_components), seed + 1)
    sigma = 1.0 / torch.arange(1, n_components + 1, dtype=torch.float32) ** 2
    return left @ torch.diag(sigma) @ right.mT


def several_clients(shapes: dict[str, tuple[int, int]], n_clients: int, seed: int):
    """Random weights and U_i = (shared part with spectrum 1/k^2) + small client-specific noise."""
    gen = torch.Generator().manual_seed(seed)
    weights = (torch.rand(n_clients, generator=gen) + 0.1).tolist()
    common = {n: low_rank_common(s, 30, seed + i) for i, (n, s) in enumerate(shapes.items())}
    clients = [
        {n: common[n] + 1e-4 * torch.randn(*s, generator=gen) for n, s in shapes.items()} for _ in range(n_clients)
    ]
    return clients, weights


def weighted_mean(clients: list[dict[str, Tensor]], weights: list[float], name: str) -> Tensor:
    total = sum(weights)
    return sum(w / total * c[name] for w, c in zip(weights, clients, strict=True))


SEVERAL_SHAPES = {"q": (120, 80), "up": (60, 150)}


# Without power iterations a rank-(r+p) sketch of this spectrum reaches cosines of ~0.98-0.999
# depending on Omega (a property of the randomized SVD, not of federation; the exact match to
# the centralized algorithm is checked below for power_iters=0 too), so the 0.99 bar uses >= 1.
@pytest.mark.parametrize("power_iters", [1, 2])
def test_several_clients_recover_the_subspaces_of_the_weighted_mean(power_iters: int) -> None:
    rank = 8
    clients, weights = several_clients(SEVERAL_SHAPES, 5, seed=0)
    result = federated_randomized_svd(clients, weights, SEVERAL_SHAPES, rank=rank, power_iters=power_iters, seed=9)

    half = rank // 2
    for name, (m, n) in SEVERAL_SHAPES.items():
        left, sigma, right_t = torch.linalg.svd(weighted_mean(clients, weights, name), full_matrices=False)
        b, s, a = result.factors[name]
        assert b.shape == (m, rank) and s.shape == (rank,) and a.shape == (rank, n)
        assert principal_cosines(b[:, :half], left[:, :half]).min() >= 0.99
        assert principal_cosines(a[:half].mT, right_t[:half].mT).min() >= 0.99
        torch.testing.assert_close(s[:half], sigma[:half], rtol=1e-2, atol=0)


@pytest.mark.parametrize("power_iters", [0, 2])
def test_several_clients_equal_centralized_randomized_svd_of_the_mean(power_iters: int) -> None:
    """Every message is linear in U_i, so the sums are U Omega, U^T Q, ... up to rounding."""
    clients, weights = several_clients(SEVERAL_SHAPES, 5, seed=1)
    result = federated_randomized_svd(clients, weights, SEVERAL_SHAPES, rank=8, power_iters=power_iters, seed=4)
    for index, name in enumerate(SEVERAL_SHAPES):
        mean = weighted_mean(clients, weights, name)
        want = reference_svd(mean, 4, index, rank=8, oversample=10, power_iters=power_iters)
        got_b, got_s, got_a = result.factors[name]
        ref_b, ref_s, ref_a = want
        # A singular pair's sign is arbitrary: rounding (e.g. another thread count) may flip it.
        flip = torch.sign((got_b * ref_b).sum(0))
        torch.testing.assert_close(got_s, ref_s, rtol=0, atol=5e-5)
        torch.testing.assert_close(got_b * flip, ref_b, rtol=0, atol=5e-5)
        torch.testing.assert_close(got_a * flip[:, None], ref_a, rtol=0, atol=5e-5)


def test_weights_decide_which_client_dominates() -> None:
    """Two clients with orthogonal rank-one updates: the heavier one gives the top direction."""
    x, y = orthonormal((40, 2), 1).unbind(1)
    v, w = orthonormal((30, 2), 2).unbind(1)
    clients = [{"w": torch.outer(x, v)}, {"w": torch.outer(y, w)}]
    for weights, winner, loser in (([4.0, 1.0], x, y), ([1.0, 4.0], y, x)):
        b, s, _ = federated_randomized_svd(clients, weights, {"w": (40, 30)}, rank=1, seed=0).factors["w"]
        assert abs(float(b[:, 0] @ winner)) > 0.999 and abs(float(b[:, 0] @ loser)) < 1e-3
        assert float(s[0]) == pytest.approx(0.8, rel=1e-4)


def test_at_most_one_client_update_is_alive_at_a_time() -> None:
    """The driver must stream clients: each U_i is dropped before the next one is produced."""
    shapes = {"a": (30, 20), "b": (20, 25)}
    alive: list[weakref.ref[Tensor]] = []
    peak = 0

    def make_client(c: int):
        def factor(layer: str) -> Tensor:
            nonlocal peak
            peak = max(peak, sum(ref() is not None for ref in alive))
            u = sign_update(shapes[layer], 100 * c + len(alive))
            alive.append(weakref.ref(u))
            return u

        return factor

    federated_randomized_svd([make_client(c) for c in range(4)], [1.0] * 4, shapes, rank=3, power_iters=1, seed=1)
    assert len(alive) == 4 * len(shapes) * (2 + 2 * 1)
    assert peak <= 1


# --------------------------------------------------------------------------- (d) bytes


def safetensors_message(shapes: dict[str, tuple[int, ...]]) -> bytes:
    return save({name: torch.zeros(shape, dtype=torch.float32) for name, shape in shapes.items()})


def header_bytes(blob: bytes) -> int:
    """Safetensors framing: an 8-byte little-endian length, then the JSON header of that length."""
    return 8 + int.from_bytes(blob[:8], "little")


def test_bytes_are_the_sketch_payload_plus_safetensors_headers() -> None:
    shapes = {"layers.0.q_proj": (48, 32), "layers.0.down_proj": (20, 64)}
    rank, oversample = 8, 4
    k = rank + oversample
    updates = {n: sign_update(s, i) for i, (n, s) in enumerate(shapes.items())}
    result = federated_randomized_svd([updates, updates], [1, 1], shapes, rank=rank, oversample=oversample, seed=0)

    y_shapes = {f"{n}.Y": (m, k) for n, (m, _) in shapes.items()}
    z_shapes = {f"{n}.Z": (k, d) for n, (_, d) in shapes.items()}
    q_shapes = {f"{n}.Q": (m, k) for n, (m, _) in shapes.items()}
    assert result.rounds == 2
    assert result.upload_bytes_per_client == encoded_size(y_shapes, "fp32") + encoded_size(z_shapes, "fp32")
    assert result.download_bytes_per_client == encoded_size(q_shapes, "fp32")  # round 1 is seed-only

    blobs = [safetensors_message(y_shapes), safetensors_message(z_shapes)]
    assert result.upload_bytes_per_client == sum(len(b) for b in blobs)
    payload = sum(len(b) - header_bytes(b) for b in blobs)
    assert payload == sum((m + d) * (rank + oversample) * 4 for m, d in shapes.values())


@pytest.mark.parametrize("power_iters", [1, 3])
def test_each_power_iteration_adds_one_upload_and_one_download_per_side(power_iters: int) -> None:
    shapes = {"o": (40, 24)}
    k = 14
    base = communication_cost(shapes, rank=4, oversample=10, power_iters=0)
    more = communication_cost(shapes, rank=4, oversample=10, power_iters=power_iters)
    w_bytes = len(safetensors_message({"o.W": (24, k)}))
    y_bytes = len(safetensors_message({"o.Y": (40, k)}))
    p_bytes = len(safetensors_message({"o.P": (24, k)}))
    q_bytes = len(safetensors_message({"o.Q": (40, k)}))
    assert more.rounds == base.rounds + 2 * power_iters
    assert more.upload_bytes_per_client == base.upload_bytes_per_client + power_iters * (w_bytes + y_bytes)
    assert more.download_bytes_per_client == base.download_bytes_per_client + power_iters * (q_bytes + p_bytes)


# --------------------------------------------------------------------------- (e) clipping and noise


small_matrices = st.builds(
    lambda seed, scale: scale * torch.randn(6, 5, generator=torch.Generator().manual_seed(seed)),
    st.integers(0, 2**31),
    st.floats(1e-3, 1e3),
)


@settings(max_examples=40, deadline=None)
@given(st.lists(small_matrices, min_size=2, max_size=5), small_matrices, st.floats(0.01, 10.0))
def test_clip_bounds_each_clients_contribution(messages: list[Tensor], replacement: Tensor, clip: float) -> None:
    """Replacing one client's message moves the clipped sum by at most 2 * w_i * clip_norm."""
    weights = [1.0 / len(messages)] * len(messages)
    for m in messages:
        assert float(torch.linalg.vector_norm(clip_message(m, clip))) <= clip * (1 + 1e-5)
    before = server_sum(messages, weights, clip_norm=clip)
    after = server_sum([replacement, *messages[1:]], weights, clip_norm=clip)
    assert float(torch.linalg.vector_norm(after - before)) <= 2 * weights[0] * clip * (1 + 1e-5)
    assert float(torch.linalg.vector_norm(before)) <= clip * (1 + 1e-5)


def test_clip_rescales_large_messages_and_keeps_small_ones() -> None:
    big, small = torch.full((3, 4), 10.0), torch.full((3, 4), 0.01)
    got = server_sum([big, small], [0.25, 0.75], clip_norm=1.0)
    want = 0.25 * big / torch.linalg.vector_norm(big) + 0.75 * small
    torch.testing.assert_close(got, want)
    assert clip_message(small, 1.0) is small


def test_server_noise_has_the_requested_scale_and_is_seeded() -> None:
    zeros = [torch.zeros(300, 200)] * 2

    def noisy(seed: int) -> Tensor:
        return server_sum(zeros, [0.5, 0.5], noise_std=0.3, generator=torch.Generator().manual_seed(seed))

    sample = noisy(0)
    assert float(sample.std()) == pytest.approx(0.3, rel=0.02)
    assert abs(float(sample.mean())) < 0.01
    assert torch.equal(sample, noisy(0))
    assert not torch.equal(sample, noisy(1))


def test_noise_changes_the_result_reproducibly() -> None:
    shapes = {"q": (40, 30), "v": (16, 30)}
    clients = [{n: sign_update(s, 10 * c + i) for i, (n, s) in enumerate(shapes.items())} for c in range(3)]

    def run(**kwargs) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        return federated_randomized_svd(clients, [3, 2, 1], shapes, rank=4, power_iters=1, seed=2, **kwargs).factors

    clean = run()
    noisy = run(noise_std=1e-3, noise_seed=7, clip_norm=1.0)
    again = run(noise_std=1e-3, noise_seed=7, clip_norm=1.0)
    other = run(noise_std=1e-3, noise_seed=8, clip_norm=1.0)
    for name in shapes:
        assert not torch.allclose(noisy[name][1], clean[name][1], atol=1e-6)
        assert all(torch.equal(x, y) for x, y in zip(noisy[name], again[name]))
        assert not torch.allclose(noisy[name][1], other[name][1], atol=1e-6)


# --------------------------------------------------------------------------- helpers and errors


def test_derive_seed_is_deterministic_distinct_and_fits_a_generator() -> None:
    seeds = {derive_seed(s, i) for s in range(20) for i in range(50)}
    assert len(seeds) == 20 * 50
    assert all(0 <= x < 2**63 for x in seeds)
    assert derive_seed(3, 4) == derive_seed(3, 4)
    torch.Generator().manual_seed(derive_seed(-1, 0))  # negative public seeds are fine too
    with pytest.raises(ValueError):
        derive_seed(0, -1)


def test_bad_inputs_are_rejected() -> None:
    u = {"q": torch.zeros(8, 6)}
    with pytest.raises(ValueError, match="rank"):
        federated_randomized_svd([u], [1.0], {"q": (8, 6)}, rank=7, seed=0)
    with pytest.raises(ValueError, match="shape"):
        federated_randomized_svd([u], [1.0], {"q": (6, 8)}, rank=2, seed=0)
    with pytest.raises(ValueError, match="weights"):
        federated_randomized_svd([u, u], [1.0], {"q": (8, 6)}, rank=2, seed=0)
    with pytest.raises(ValueError):
        server_sum([torch.zeros(2)], [1.0], clip_norm=0.0)
