"""Sketches: one short vector per sequence whose inner products estimate EK-FAC influence scores.

score(q, z) = <P(q), G(z)> = <W(q), W(z)> with W(V) = (Q_S^T V Q_A) / sqrt(Lambda + lambda) per module (see
`preconditioner.py`), so the score is an inner product of the whitened gradients of all tracked modules, concatenated.

The sketch hashes that concatenation into one vector of `dim` numbers (a count sketch): entry j of module m's
flattened W goes to bucket h_m(j) with sign s_m(j),

    sketch(z) = sum_m sum_j s_m(j) W_m(z)_j e_{h_m(j)}.

<sketch(q), sketch(z)> is an unbiased estimate of the score, with variance
(||W(q)||^2 ||W(z)||^2 + score^2 - 2 sum_j W(q)_j^2 W(z)_j^2) / dim: never more than a dense Gaussian projection
to `dim` numbers, at the cost of one pass over W instead of dim. The budget is shared by all modules, so a
document's footprint does not grow with the model's depth.

h_m and s_m are multiply-shift hash functions of the flat index, seeded by (seed, module): computed on the fly,
nothing of size W is stored, and every worker and the query engine draw the same ones. Forming W exactly (a
rotation of each token's a and s, then one GEMM per sequence) costs about one more forward pass of the tracked
modules, and gives the exact self-influence ||W(z)||^2 and gradient norm ||G(z)|| on the way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from influence.factors import Factors
from influence.gradients import rotated_gradients
from influence.preconditioner import rotate


def hash_seed(seed: int, module: str, purpose: str) -> int:
    """An odd 63-bit multiplier or offset from (seed, module, purpose): the same in every process."""
    digest = hashlib.blake2b(f"{seed}:{module}:{purpose}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & (2**62 - 1)) | 1


def bucket_and_sign(module: str, size: int, dim: int, seed: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Count-sketch hashes of the flat indices 0..size-1 of one module: buckets (size,) int64 in [0, dim), signs (size,) +-1.

    Multiply-shift hashing (Dietzfelbinger et al.): the high bits of a * j + b (int64 arithmetic wraps around).
    Pairwise independence is all the count sketch's variance bound needs.
    """
    j = torch.arange(size, dtype=torch.int64, device=device)
    mixed = j * hash_seed(seed, module, "bucket-a") + hash_seed(seed, module, "bucket-b")
    buckets = torch.remainder(mixed >> 31, dim)
    signs = ((j * hash_seed(seed, module, "sign-a") + hash_seed(seed, module, "sign-b")) >> 62) & 1
    return buckets, 1 - 2 * signs


@dataclass
class SketchBatch:
    sketches: torch.Tensor        # (batch, dim) float32
    self_influence: torch.Tensor  # (batch,) float64, exact ||W(z)||^2
    gradient_norm: torch.Tensor   # (batch,) float64, exact ||G(z)|| over tracked modules
    whitened: Optional[torch.Tensor] = None  # (batch, D) float32: +-W(z) itself, when asked for (the refine tier)


class Sketcher:
    """Whitens per-module gradients exactly and hashes them into one `dim`-vector per sequence."""

    def __init__(self, factors: Factors, modules: list[str], dim: int, seed: int = 0):
        self.factors, self.modules, self.dim, self.seed = factors, list(modules), int(dim), seed
        # (Lambda + lambda)^-1/2 times each coordinate's hash sign: whitening and signing in one multiply
        self.signed_inverse_sqrt = {}
        for name in self.modules:
            f = factors.modules[name]
            _, signs = bucket_and_sign(name, f.eigenvalues.numel(), self.dim, seed, f.eigenvalues.device)
            self.signed_inverse_sqrt[name] = (f.eigenvalues + f.damping).rsqrt() * signs.view_as(f.eigenvalues).to(f.eigenvalues.dtype)

    def noise_scale(self, query_norm: np.ndarray, document_norm: np.ndarray) -> np.ndarray:
        """||W(q)|| ||W(z)|| / sqrt(dim): about the standard deviation of a sketch score (see the module docstring).

        The query engine stops re-ranking once every remaining candidate's sketch score plus a few of these falls
        below the exact k-th score.
        """
        return np.multiply.outer(np.asarray(query_norm, np.float64), np.asarray(document_norm, np.float64)) / np.sqrt(self.dim)

    def _hash_into(self, sketch: torch.Tensor, name: str, signed_whitened: torch.Tensor) -> None:
        flat = signed_whitened.flatten(1)  # (batch, D_m), already multiplied by the signs
        buckets, _ = bucket_and_sign(name, flat.shape[1], self.dim, self.seed, flat.device)
        sketch.index_add_(1, buckets, flat)

    @property
    def whitened_dim(self) -> int:
        """D: the numbers in W(z), all tracked modules together (what the refine tier stores per sequence)."""
        return sum(v.numel() for v in self.signed_inverse_sqrt.values())

    def sketch_io(self, io: dict[str, tuple[torch.Tensor, torch.Tensor]], whitened: bool = False) -> SketchBatch:
        """Sketches, exact self-influences and gradient norms of a batch, from each module's captured (a, s); with
        `whitened`, also W(z) itself, module after module, each entry times its hash sign (signs cancel in <W(q), W(z)>
        when the queries' come from `sketch_rotated(..., whitened=True)`)."""
        first = next(iter(io.values()))[0]
        dtype = next(iter(self.signed_inverse_sqrt.values())).dtype
        sketch = torch.zeros(first.shape[0], self.dim, dtype=dtype, device=first.device)
        self_influence = torch.zeros(first.shape[0], dtype=torch.float64)
        squared_norm = torch.zeros(first.shape[0], dtype=torch.float64)
        parts = []
        for name in self.modules:
            a, s = io[name]
            f = self.factors.modules[name]
            rotated = rotated_gradients(a.to(dtype), s.to(dtype), f.q_a, f.q_s)  # (batch, d_out, d_in): Q_S^T G Q_A
            squared_norm += _squared_norms(rotated)  # the rotation is orthogonal: ||G'|| = ||G||
            signed = rotated.mul_(self.signed_inverse_sqrt[name])  # +-W in place: G' is not needed any more
            self_influence += _squared_norms(signed)
            self._hash_into(sketch, name, signed)
            if whitened:
                parts.append(signed.flatten(1).float())
        return SketchBatch(sketch.float(), self_influence, squared_norm.sqrt(), torch.cat(parts, 1) if whitened else None)

    def sketch_rotated(self, rotated: dict[str, torch.Tensor], whitened: bool = False
                       ) -> tuple[torch.Tensor, np.ndarray, Optional[np.ndarray]]:
        """Sketches (n, dim) float32 and exact ||W(V)|| (n,) float64 of gradients already in the eigenbasis
        {module: (n, d_out, d_in)}, e.g. queries (`scores.rotated_query_gradients`); with `whitened`, also +-W(V) (n, D)
        float32 in the order and with the signs of `sketch_io`'s (the queries' side of the refine tier), else None."""
        first = next(iter(rotated.values()))
        dtype = next(iter(self.signed_inverse_sqrt.values())).dtype
        sketch = torch.zeros(first.shape[0], self.dim, dtype=dtype, device=first.device)
        squared = torch.zeros(first.shape[0], dtype=torch.float64)
        parts = []
        for name in self.modules:
            signed = rotated[name].to(dtype) * self.signed_inverse_sqrt[name]
            squared += _squared_norms(signed)
            self._hash_into(sketch, name, signed)
            if whitened:
                parts.append(signed.flatten(1).float())
        return sketch.float().cpu(), squared.sqrt().numpy(), torch.cat(parts, 1).cpu().numpy() if whitened else None

    def sketch_gradients(self, gradients: dict[str, torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
        """The same from gradients in the original basis {module: (n, d_out, d_in)}."""
        dtype = next(iter(self.signed_inverse_sqrt.values())).dtype
        return self.sketch_rotated({name: rotate(gradients[name].to(dtype), self.factors.modules[name]) for name in self.modules})[:2]


def _squared_norms(matrices: torch.Tensor) -> torch.Tensor:
    """||M_n||_F^2 of (batch, rows, cols), float64 on the CPU, without a squared copy of the batch."""
    return torch.linalg.vector_norm(matrices, dim=(1, 2)).double().cpu().pow(2)
