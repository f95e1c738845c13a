"""The fit's eigenbasis: covariance sums packed as upper triangles, their eigendecompositions (a pass of their own, one
task per distinct matrix) and the eigenvectors file that pass 2 reads.

  A = Q_A diag(l_A) Q_A^T,  S = Q_S diag(l_S) Q_S^T   (per tracked module, decomposed in float64)

`eigenvectors.safetensors` holds, per module, Q_A, Q_S, l_A and l_S, and the token counts; it exists only while a fit
can resume (`influence.factors` removes it once `factors.safetensors` holds the same tensors).
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache, partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from influence import constants as C
from influence.artifacts import load_tensors, read_only_tensor, save_tensors
from influence.errors import InfluenceError
from influence.stage import Pass, Workspace


def packed_symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a symmetric (d, d) matrix, row by row: d(d+1)/2 numbers. Covariance sums travel from the
    workers, wait in the driver and sit in the shards like this: half the memory and disk of the full matrices."""
    rows, cols = _upper_indices(matrix.shape[0], str(matrix.device))
    return matrix[rows, cols]


def unpacked_symmetric(packed: torch.Tensor) -> torch.Tensor:
    """The (d, d) symmetric matrix of `packed_symmetric`'s output."""
    d = (math.isqrt(8 * packed.numel() + 1) - 1) // 2
    if packed.dim() != 1 or d * (d + 1) // 2 != packed.numel():
        raise InfluenceError(f"a covariance sum of shape {tuple(packed.shape)} is not the upper triangle of a square matrix: "
                             "its shard comes from another version of the engine; delete the factors directory and re-run the fit")
    rows, cols = _upper_indices(d, str(packed.device))
    matrix = torch.empty(d, d, dtype=packed.dtype, device=packed.device)
    matrix[rows, cols] = packed
    matrix[cols, rows] = packed
    return matrix


@lru_cache(maxsize=16)
def _upper_indices(d: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(d, d, device=device)
    return rows, cols


def eigendecomposition_pass(total: dict[str, torch.Tensor], module_names: Sequence[str], device: str, storage: str,
                            out_path: Path) -> Pass:
    """Decompose every module's A and S, from the covariance pass's summed shards `total` (consumed), into `out_path`.

    An eigendecomposition costs about 9 d^3 flops and does not scale like a GEMM: for a 1536-wide module it takes
    seconds, so they are spread over the workers like the data passes (on a GPU worker, they run there). Modules that
    read the same input (gate_proj and up_proj) have the same A: it is decomposed once.
    """
    num_tokens, num_labelled, _ = total[C.COUNTS].tolist()
    matrices: dict[str, torch.Tensor] = {}   # content key -> matrix
    targets: dict[str, list[str]] = {}       # content key -> the (module + suffix) it serves
    for name in module_names:
        for suffix, count in ((C.ACTIVATION_SUM, num_tokens), (C.GRADIENT_SUM, num_labelled)):
            matrix = total.pop(name + suffix) / max(count, 1.0)
            key = hashlib.blake2b(matrix.numpy().tobytes(), digest_size=16).hexdigest()
            matrices.setdefault(key, matrix)
            targets.setdefault(key, []).append(name + suffix)
    results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    keys = sorted(matrices, key=lambda k: -matrices[k].numel())  # largest first: they bound the pass's length
    return Pass("eigendecomposition", keys, eigendecomposition_work, save=results.__setitem__,
                payload=lambda key: (matrices[key].numpy(), device, storage),
                reduce=partial(_save_basis, out_path, results, targets, total[C.COUNTS]), unit="matrix")


def eigendecomposition_work(workspace: Workspace, shared, payload: tuple[np.ndarray, str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (clamped at 0, float64) and eigenvectors (in the factors' storage dtype) of one symmetric matrix,
    decomposed in float64. The eigenvectors travel and wait for the others in the dtype they are stored in: half the
    memory of float64 in the driver for a float32 fit."""
    matrix, device, storage = payload
    device = device if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    eigenvalues, eigenvectors = torch.linalg.eigh(unpacked_symmetric(read_only_tensor(matrix).to(device)))
    return eigenvalues.clamp_min(0).cpu().numpy(), eigenvectors.to(getattr(torch, storage)).cpu().numpy()


def _save_basis(out_path: Path, results: dict, targets: dict[str, list[str]], counts: torch.Tensor) -> None:
    suffixes = {C.ACTIVATION_SUM: (C.ACTIVATION_EIGENVALUES, C.ACTIVATION_EIGENVECTORS),
                C.GRADIENT_SUM: (C.GRADIENT_EIGENVALUES, C.GRADIENT_EIGENVECTORS)}
    tensors = {C.COUNTS: counts}
    for key, (eigenvalues, eigenvectors) in results.items():
        for target in targets[key]:
            for suffix, (values_key, vectors_key) in suffixes.items():
                if target.endswith(suffix):
                    name = target[: -len(suffix)]
                    # modules sharing a matrix share these tensors: save_tensors writes copies of all but one
                    tensors[name + values_key] = read_only_tensor(eigenvalues)
                    tensors[name + vectors_key] = read_only_tensor(eigenvectors)
    save_tensors(out_path, tensors)


def load_basis(path: Path, module_names: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module: (Q_A, Q_S)} from the eigenvectors file, as numpy arrays (what pass 2's tasks share)."""
    tensors = load_tensors(path)
    try:
        return {name: (tensors[name + C.ACTIVATION_EIGENVECTORS].numpy(), tensors[name + C.GRADIENT_EIGENVECTORS].numpy())
                for name in module_names}
    except KeyError as exc:
        raise InfluenceError(f"{path} lacks {exc.args[0]}; delete it and re-run the fit") from exc
