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
modules, and gives the exact self-influence ||W(z)||^2 and gradient norm ||G(z)|| on the way. W is formed a block of rows at a time, each
block whitened and hashed while it is in the cache (`gradients.rotated_gradient_blocks`).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from influence.factors import Factors
from influence.gradients import rotated_gradient_blocks
from influence.preconditioner import rotate


@lru_cache(maxsize=None)  # asked for every block of every batch
def hash_seed(seed: int, module: str, purpose: str) -> int:
    """An odd 63-bit multiplier or offset from (seed, module, purpose): the same in every process."""
    digest = hashlib.blake2b(f"{seed}:{module}:{purpose}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & (2**62 - 1)) | 1


def buckets(module: str, start: int, stop: int, dim: int, seed: int, device="cpu") -> torch.Tensor:
    """Count-sketch buckets (stop - start,) int64 in [0, dim) of one module's flat indices start..stop-1.

    Multiply-shift hashing (Dietzfelbinger et al.): the high bits of a * j + b (int64 arithmetic wraps around).
    Pairwise independence is all the count sketch's variance bound needs. Any range gives the same buckets as the
    whole, so a module can be hashed block by block.
    """
    j = torch.arange(start, stop, dtype=torch.int64, device=device)
    mixed = (j * hash_seed(seed, module, "bucket-a") + hash_seed(seed, module, "bucket-b")) >> 31
    # a power of two (the default) takes the low bits: the same numbers as the floor remainder, without a division
    return mixed & (dim - 1) if dim & (dim - 1) == 0 else torch.remainder(mixed, dim)


def signs(module: str, size: int, seed: int, device="cpu") -> torch.Tensor:
    """Count-sketch signs (size,) int64 +-1 of one module's flat indices 0..size-1: another multiply-shift hash's top bit."""
    j = torch.arange(size, dtype=torch.int64, device=device)
    return 1 - 2 * (((j * hash_seed(seed, module, "sign-a") + hash_seed(seed, module, "sign-b")) >> 62) & 1)


def bucket_and_sign(module: str, size: int, dim: int, seed: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Both hashes of one module's flat indices 0..size-1: `buckets` and `signs`."""
    return buckets(module, 0, size, dim, seed, device), signs(module, size, seed, device)


#: Whiten and hash CPU blocks with `kernels.whiten_and_hash` (one pass, numba); False: torch's operations on every device,
#: the reference the tests compare the kernel with.
CPU_KERNEL = True


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
            sign = signs(name, f.eigenvalues.numel(), seed, f.eigenvalues.device).view_as(f.eigenvalues).to(f.eigenvalues.dtype)
            self.signed_inverse_sqrt[name] = (f.eigenvalues + f.damping).rsqrt() * sign

    def noise_scale(self, query_norm: np.ndarray, document_norm: np.ndarray) -> np.ndarray:
        """||W(q)|| ||W(z)|| / sqrt(dim): about the standard deviation of a sketch score (see the module docstring).

        The query engine stops re-ranking once every remaining candidate's sketch score plus a few of these falls
        below the exact k-th score.
        """
        return np.multiply.outer(np.asarray(query_norm, np.float64), np.asarray(document_norm, np.float64)) / np.sqrt(self.dim)

    def _hash_into(self, sketch: torch.Tensor, name: str, signed_whitened: torch.Tensor, start: int = 0) -> None:
        """Add a module's entries start.. (already multiplied by their signs), flattened per sequence, to `sketch`."""
        flat = signed_whitened.flatten(1)  # (batch, numbers)
        sketch.index_add_(1, buckets(name, start, start + flat.shape[1], self.dim, self.seed, flat.device), flat)

    def _whiten_and_hash(self, sketch: torch.Tensor, name: str, block: torch.Tensor, signed_inverse_sqrt: torch.Tensor,
                         start: int, gradient_sq: torch.Tensor, whitened_sq: torch.Tensor) -> None:
        """block (batch, rows, d_in), the flat entries start.. of module `name`'s rotated gradients: add their squared
        norms to gradient_sq, whiten them in place, add their squared norms to whitened_sq and hash them into sketch."""
        if CPU_KERNEL and block.device.type == "cpu" and sketch.dtype == block.dtype:
            from influence.kernels import whiten_and_hash

            whiten_and_hash(block.view(block.shape[0], -1).numpy(), signed_inverse_sqrt.reshape(-1).numpy(), start,
                            np.uint64(hash_seed(self.seed, name, "bucket-a")), np.uint64(hash_seed(self.seed, name, "bucket-b")),
                            self.dim, sketch.numpy(), gradient_sq.numpy(), whitened_sq.numpy())
            return
        gradient_sq += _squared_norms(block)
        block.mul_(signed_inverse_sqrt)
        whitened_sq += _squared_norms(block)
        self._hash_into(sketch, name, block, start)

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
            inverse_sqrt = self.signed_inverse_sqrt[name]
            for rows, block in rotated_gradient_blocks(a.to(dtype), s.to(dtype), f.q_a, f.q_s):  # Q_S^T G Q_A, some rows
                # the rotation is orthogonal: ||G'|| = ||G||; block becomes +-W in place (G' is not needed any more)
                self._whiten_and_hash(sketch, name, block, inverse_sqrt[rows], rows.start * block.shape[-1], squared_norm,
                                      self_influence)
                if whitened:
                    parts.append(block.flatten(1).float())
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
