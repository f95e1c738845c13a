"""Independent computations the engine is tested against: plain autograd loops and dense matrices."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from influence.models import TrackedModule


def autograd_gradient(model, modules: list[TrackedModule], ids: list[int], completion_start: int | None = None,
                      labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-module gradient (d_out, d_in [+1]) of one unpadded sequence's summed loss, by .backward().

    The engine loads models frozen; the oracle unfreezes the tracked weights for its own backward pass.
    """
    frozen = [(m, m.module.weight.requires_grad) for m in modules]
    for m in modules:
        m.module.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    input_ids = torch.tensor([ids])
    logits = model(input_ids=input_ids).logits[0, :-1]  # (tokens - 1, vocab)
    targets = labels[: len(ids) - 1] if labels is not None else input_ids[0, 1:]
    losses = F.cross_entropy(logits, targets, reduction="none")
    if completion_start is not None:
        losses = losses[completion_start - 1 :]
    losses.sum().backward()
    grads = {}
    for m in modules:
        weight = m.module.weight.grad
        weight = weight.T if m.transposed else weight
        parts = [weight] + ([m.module.bias.grad[:, None]] if m.has_bias else [])
        grads[m.name] = torch.cat(parts, dim=1).detach().clone()
    model.zero_grad(set_to_none=True)
    for m, requires_grad in frozen:
        m.module.requires_grad_(requires_grad)
    return grads


def flatten(grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([grads[n].reshape(-1) for n in names])


def dense_ekfac_inverse(q_a: torch.Tensor, q_s: torch.Tensor, eigenvalues: torch.Tensor, damping: float) -> torch.Tensor:
    """(F + lambda I)^-1 as an explicit matrix over vec(G) (row-major, index o * d_in + i)."""
    basis = torch.kron(q_s, q_a)  # column (o', i') = outer(q_s[:, o'], q_a[:, i']) flattened row-major
    matrix = basis @ torch.diag(eigenvalues.reshape(-1)) @ basis.T
    return torch.linalg.inv(matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype))


def assert_same_factors(left, right) -> None:
    """Two fits agree: equal eigenvalues, and equal preconditioned random vectors (bases may differ in sign)."""
    from influence.preconditioner import precondition

    torch.manual_seed(0)
    for name, f in left.modules.items():
        g = right.modules[name]
        torch.testing.assert_close(g.eigenvalues, f.eigenvalues, rtol=1e-7, atol=1e-12)
        vector = torch.randn(f.eigenvalues.shape, dtype=torch.float64)
        torch.testing.assert_close(precondition(vector, g), precondition(vector, f), rtol=1e-6, atol=1e-9)
