"""Sketches: short summaries of EK-FAC-whitened gradients, for the FAISS index.

score(q, z) = <P(q), G(z)> = <W(q), W(z)> with W(V) = (Q_S^T V Q_A) / sqrt(Lambda + lambda) (see
`preconditioner.py`), so an inner product of sketches estimates the score. Three sketches of k x k
numbers per module:

- "srht" (default): a subsampled randomised Hadamard transform of the flattened W: seeded random signs,
  the Walsh-Hadamard transform (zero-padded to a power of two), k x k seeded coordinates, scaled by
  1/k. Unbiased, with the variance of a dense Gaussian projection, but O(D log D) work and no D x k^2
  matrix (D = d_out d_in). A module with D <= k x k is stored exactly (W itself).
- "kronecker": R_out W R_in^T with seeded Gaussian R_out (k, d_out), R_in (k, d_in) of variance 1/k;
  unbiased but heavier-tailed than SRHT at the same size.
- "eigen": the coordinates of W in the EK-FAC eigenbasis with the largest Lambda / (Lambda + lambda),
  i.e. the directions where the curvature, not the damping, dominates. Deterministic, a gather; biased
  (it drops the other coordinates), which matters little only when the damping dominates most of them.

Measured on a 10k-sequence corpus (`benchmarks/query_latency.py`, README): at equal size "srht" finds
the exact top-10 documents of both signs best; the whitened gradients there are nearly isotropic
(sum of Lambda / (Lambda + lambda) is 79% of D there), so the data-dependent "eigen" coordinates do not beat a
random projection. The exact squared norm ||W(z)||^2 is the self-influence, kept beside the sketch;
with it the query engine bounds each sketch score's noise (`Sketcher.noise_scale`).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from influence.factors import Factors, ModuleFactors
from influence.gradients import rotated_gradients, sequence_gradients
from influence.models import TrackedModule
from influence.preconditioner import whiten


def projection_seed(seed: int, module: str) -> int:
    """Seeds derive from (seed, module name), so every worker draws the same projections."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{module}".encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def projection_matrices(module: str, shape: tuple[int, int], sketch_size: int, seed: int, dtype=torch.float32):
    """(R_out (k_out, d_out), R_in (k_in, d_in)) with N(0, 1/k) entries; k capped at the dimension."""
    d_out, d_in = shape
    generator = torch.Generator().manual_seed(projection_seed(seed, module))
    k_out, k_in = min(sketch_size, d_out), min(sketch_size, d_in)
    r_out = torch.randn(k_out, d_out, generator=generator, dtype=torch.float64) / k_out**0.5
    r_in = torch.randn(k_in, d_in, generator=generator, dtype=torch.float64) / k_in**0.5
    return r_out.to(dtype), r_in.to(dtype)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """The unnormalised Walsh-Hadamard transform of the rows of x (n, P), P a power of two.

    Sylvester's H_(2^(a+b)) = H_(2^a) kron H_(2^b): the rows are viewed as tensors with axes of at most
    128 and each axis is multiplied by a small Hadamard matrix, a few GEMMs instead of log2 P passes.
    """
    n, size = x.shape
    bits = size.bit_length() - 1
    if size != 1 << bits:
        raise ValueError(f"the Hadamard transform needs a power-of-two width, got {size}")
    axes = [7] * (bits // 7) + ([bits % 7] if bits % 7 else [])
    y = x.reshape(n, *[1 << a for a in axes])
    for axis, a in enumerate(axes, start=1):
        y = torch.movedim(torch.movedim(y, axis, -1) @ _hadamard(1 << a, x.dtype, x.device), -1, axis)
    return y.reshape(n, size)


@functools.lru_cache(maxsize=64)
def _hadamard(size: int, dtype, device) -> torch.Tensor:
    # cached: every query sketches with the same few sizes; callers never modify it in place
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def srht_parameters(module: str, width: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(signs (width,) of +-1, kept coordinates (size,) of the padded transform, ascending), from (seed, module)."""
    padded = 1 << (width - 1).bit_length()
    generator = torch.Generator().manual_seed(projection_seed(seed, module))
    signs = torch.randint(0, 2, (width,), generator=generator).to(torch.float64) * 2 - 1
    rows = torch.sort(torch.randperm(padded, generator=generator)[:size]).values
    return signs, rows


@dataclass
class SketchBatch:
    sketches: torch.Tensor        # (batch, sketch_dim) float32
    self_influence: torch.Tensor  # (batch,) float64, exact
    gradient_norm: torch.Tensor   # (batch,) float64, Frobenius norm over tracked modules


def eigen_coordinates(factors: ModuleFactors, size: int) -> torch.Tensor:
    """Flat indices of the `size` eigen-coordinates with the largest Lambda / (Lambda + damping), ascending."""
    # float32 and a stable sort: the index build and the query engine pick the same coordinates
    # whatever dtype each casts the factors to
    eigenvalues = factors.eigenvalues.float().flatten()
    ratio = eigenvalues / (eigenvalues + torch.tensor(factors.damping, dtype=torch.float32))
    order = torch.sort(ratio, descending=True, stable=True).indices[: min(size, ratio.numel())]
    return torch.sort(order).values


class Sketcher:
    """Whitens per-module gradients and sketches them; one instance per process holds the projections."""

    def __init__(self, factors: Factors, modules: list[TrackedModule], sketch_size: int, seed: int, method: str = "srht"):
        self.factors, self.modules, self.sketch_size, self.seed = factors, modules, sketch_size, seed
        if method == "eigen" and all(not bool(factors.modules[m.name].eigenvalues.any()) for m in modules):
            method = "srht"  # the identity strategy has no curvature to rank coordinates by
        self.method = method
        self.projections, self.coordinates, self.transforms, self.dims = {}, {}, {}, {}
        for m in modules:
            module_factors = factors.modules[m.name]
            dtype = module_factors.eigenvalues.dtype
            width = m.shape[0] * m.shape[1]
            if method == "eigen":
                self.coordinates[m.name] = eigen_coordinates(module_factors, sketch_size * sketch_size)
                self.dims[m.name] = len(self.coordinates[m.name])
            elif method == "srht":
                size = min(sketch_size * sketch_size, width)
                if size < width:  # else W itself is no larger than its sketch: keep it exactly
                    signs, rows = srht_parameters(m.name, width, size, seed)
                    self.transforms[m.name] = (signs.to(dtype), rows)
                self.dims[m.name] = size
            else:
                self.projections[m.name] = projection_matrices(m.name, m.shape, sketch_size, seed, dtype)
                self.dims[m.name] = self.projections[m.name][0].shape[0] * self.projections[m.name][1].shape[0]

    @property
    def dim(self) -> int:
        return sum(self.dims.values())

    def noise_scale(self, query_norm: np.ndarray, document_norm: np.ndarray) -> np.ndarray:
        """||W(q)|| ||W(z)|| / sqrt(dim): about the standard deviation of a random sketch's score estimate.

        A dense Gaussian projection to m numbers has variance (||x||^2 ||y||^2 + <x, y>^2) / m; SRHT has
        at most that, per module. The query engine stops re-ranking once every remaining candidate's
        sketch score plus a few of these falls below the exact k-th score.
        """
        return np.multiply.outer(np.asarray(query_norm, np.float64), np.asarray(document_norm, np.float64)) / np.sqrt(self.dim)

    def whiten(self, name: str, rotated: torch.Tensor) -> torch.Tensor:
        f = self.factors.modules[name]
        return rotated / (f.eigenvalues + f.damping).sqrt()  # (batch, d_out, d_in)

    def project(self, name: str, whitened: torch.Tensor) -> torch.Tensor:
        if self.method == "eigen":
            return whitened.flatten(1)[:, self.coordinates[name].to(whitened.device)]  # (batch, k * k)
        if self.method == "srht":
            flat = whitened.flatten(1)  # (batch, D)
            if name not in self.transforms:
                return flat
            signs, rows = self.transforms[name]
            padded = torch.zeros(flat.shape[0], 1 << (flat.shape[1] - 1).bit_length(), dtype=flat.dtype, device=flat.device)
            padded[:, : flat.shape[1]] = flat * signs.to(flat.device, flat.dtype)
            return hadamard_transform(padded)[:, rows.to(flat.device)] / len(rows) ** 0.5  # (batch, k * k)
        r_out, r_in = self.projections[name]
        return (r_out @ whitened @ r_in.T).flatten(1)  # (batch, k_out * k_in)

    def sketch_io(self, io: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> SketchBatch:
        """Sketches, exact self-influence and gradient norms of a batch from captured (a, s)."""
        parts, self_influence, squared_norm = [], 0.0, 0.0
        for m in self.modules:
            a, s = io[m.name]
            f = self.factors.modules[m.name]
            whitened = self.whiten(m.name, rotated_gradients(a, s, f.q_a, f.q_s))
            parts.append(self.project(m.name, whitened))
            self_influence = self_influence + whitened.double().pow(2).sum((1, 2))
            squared_norm = squared_norm + sequence_gradients(a, s).double().pow(2).sum((1, 2))
        return SketchBatch(torch.cat(parts, dim=1).float(), self_influence, squared_norm.sqrt())

    def sketch_gradients(self, gradients: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sketches of full gradients {module: (n, d_out, d_in)}, e.g. of queries: (n, sketch_dim)."""
        return self.sketch_gradients_with_norms(gradients)[0]

    def sketch_gradients_with_norms(self, gradients: dict[str, torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
        """Sketches (n, sketch_dim) and exact ||W(V)|| (n,) float64 over the tracked modules, from one whitening."""
        parts, squared = [], 0.0
        for m in self.modules:
            whitened = whiten(gradients[m.name], self.factors.modules[m.name])
            parts.append(self.project(m.name, whitened))
            squared = squared + whitened.double().pow(2).sum((1, 2))
        return torch.cat(parts, dim=1).float(), squared.sqrt().cpu().numpy()
