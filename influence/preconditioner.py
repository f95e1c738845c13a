"""The damped EK-FAC inverse and its square root, as small tensor functions.

With eigenbasis Q_A, Q_S, eigenvalues Lambda and damping lambda (see `factors.py`):
  precondition(V) = (F + lambda I)^-1 V = Q_S [(Q_S^T V Q_A) / (Lambda + lambda)] Q_A^T
  whiten(V)       = (Q_S^T V Q_A) / sqrt(Lambda + lambda)    (in the eigenbasis)
so <whiten(q), whiten(g)> = <precondition(q), g>: the split the index is built on.
"""

from __future__ import annotations

import torch

from influence.factors import ModuleFactors


def rotate(gradient: torch.Tensor, factors: ModuleFactors) -> torch.Tensor:
    """Q_S^T V Q_A for (..., d_out, d_in); V itself when the strategy has no basis."""
    if factors.q_a is None:
        return gradient
    return factors.q_s.T @ gradient @ factors.q_a


def unrotate(gradient: torch.Tensor, factors: ModuleFactors) -> torch.Tensor:
    """Q_S V Q_A^T: back from the eigenbasis."""
    if factors.q_a is None:
        return gradient
    return factors.q_s @ gradient @ factors.q_a.T


def precondition(gradient: torch.Tensor, factors: ModuleFactors) -> torch.Tensor:
    """(F + lambda I)^-1 V for V of shape (..., d_out, d_in)."""
    return unrotate(rotate(gradient, factors) / (factors.eigenvalues + factors.damping), factors)


def whiten(gradient: torch.Tensor, factors: ModuleFactors) -> torch.Tensor:
    """(F + lambda I)^-1/2 V expressed in the eigenbasis: (..., d_out, d_in)."""
    return rotate(gradient, factors) / (factors.eigenvalues + factors.damping).sqrt()


def self_influence_from_rotated(rotated: torch.Tensor, factors: ModuleFactors, rows: slice = slice(None)) -> torch.Tensor:
    """g^T (F + lambda I)^-1 g per sequence from Q_S^T G Q_A of shape (batch, d_out, d_in), or its share from the
    output `rows` of it (batch, len(rows), d_in)."""
    return (rotated.pow(2) / (factors.eigenvalues[rows] + factors.damping)).sum(dim=(-1, -2))


def low_rank(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors (U diag(sigma), V) of (..., d_out, d_in): matrix ~ left @ right^T."""
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = min(rank, sigma.shape[-1])
    return u[..., :rank] * sigma[..., None, :rank], vh[..., :rank, :].transpose(-1, -2)
