"""Pure maths of the LoRA-SB initialization: the sign step and a seeded randomized SVD.

The randomized SVD is Halko, Martinsson & Tropp (2011), Algorithm 4.4 (range finder with
power iterations) + 5.1 (direct SVD), the same algorithm as `torch.svd_lowrank`, but with the
test matrix drawn from an explicit generator so that no global RNG is touched and so that the
federated initialization (`fedsb.init.federated`) can reproduce it from sums alone.
"""

from __future__ import annotations

import torch
from torch import Tensor


def effective_lr(lr: float, warmup_ratio: float, total_steps: int) -> float:
    """The first Adam-like step size: lr divided by the number of warm-up steps (at least 1)."""
    return lr / max(1.0, warmup_ratio * total_steps)


def sign_step(grad: Tensor, lr_eff: float) -> Tensor:
    """`U = -lr_eff * sign(G)`: the first Adam step from zero moments, in fp32."""
    return torch.sign(grad.float()).mul_(-lr_eff)


def gaussian_test_matrix(n: int, k: int, generator: torch.Generator) -> Tensor:
    """An n x k standard Gaussian matrix in fp32 drawn from `generator` (on the CPU)."""
    return torch.randn(n, k, generator=generator, dtype=torch.float32, device=generator.device)


def orthonormal_basis(y: Tensor) -> Tensor:
    """An orthonormal basis of the columns of `y` (reduced QR)."""
    q, _ = torch.linalg.qr(y, mode="reduced")
    return q


def randomized_range(u: Tensor, omega: Tensor, power_iters: int) -> Tensor:
    """Orthonormal Q (m x k) approximating the range of `u` (m x n), with power iterations."""
    q = orthonormal_basis(u @ omega)
    for _ in range(power_iters):
        q = orthonormal_basis(u.mT @ q)
        q = orthonormal_basis(u @ q)
    return q


def svd_from_projection(q: Tensor, z: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Given the range basis Q (m x k) and Z = Q^T U (k x n), return the rank-r SVD of U."""
    w, s, vt = torch.linalg.svd(z, full_matrices=False)
    return q @ w[:, :rank], s[:rank], vt[:rank]


def randomized_svd(
    u: Tensor,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD `u ~ P diag(S) Qt` of rank `rank` (P: m x r, S: r, Qt: r x n), fp32."""
    m, n = u.shape
    if rank > min(m, n):
        raise ValueError(f"rank {rank} exceeds min(d_out, d_in) = {min(m, n)} of a {m}x{n} matrix")
    u = u.float()
    k = min(rank + oversample, m, n)
    omega = gaussian_test_matrix(n, k, generator).to(u.device)
    q = randomized_range(u, omega, power_iters)
    return svd_from_projection(q, q.mT @ u, rank)
