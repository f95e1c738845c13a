"""CPU loops that torch has no fused operation for, compiled by numba (cached beside this file after the first run).

`whiten_and_hash` does, in one pass over a block of rotated gradients that is still in the cache, what took torch four
passes and a table of bucket indices: the two squared norms, the whitening and the count sketch's scatter (see
`sketches.Sketcher.sketch_io`, whose torch path it must equal; the tests compare the two).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, boundscheck=False, fastmath=True)
def _whiten_row(row: np.ndarray, signed_inverse_sqrt: np.ndarray) -> tuple[float, float]:
    """row *= signed_inverse_sqrt in place; returns (||row||^2 before, after) summed in float64. fastmath only lets
    the two sums be reordered (vectorized): every number is finite here."""
    gradient_sq = 0.0
    whitened_sq = 0.0
    for j in range(row.shape[0]):
        value = np.float64(row[j])
        row[j] = row[j] * signed_inverse_sqrt[j]
        gradient_sq += value * value
        whitened_sq += np.float64(row[j]) * row[j]
    return gradient_sq, whitened_sq


@numba.njit(cache=True, boundscheck=False)
def whiten_and_hash(block: np.ndarray, signed_inverse_sqrt: np.ndarray, start: int, multiplier: np.uint64, offset: np.uint64,
                    dim: int, sketch: np.ndarray, gradient_sq: np.ndarray, whitened_sq: np.ndarray) -> None:
    """For each row b of block (batch, numbers), the flat entries start.. of one module's rotated gradient: whiten it in
    place (times the signed (Lambda + lambda)^-1/2 of those entries), add each entry to sketch[b] at its bucket, and add
    the row's squared norms before and after whitening to gradient_sq[b] and whitened_sq[b].

    The bucket of flat index j is `sketches.buckets`' multiply-shift hash: ((j * multiplier + offset) mod 2^64, read as
    a signed int64) >> 31, then floor-mod dim (the low bits when dim is a power of two).
    """
    power_of_two = (dim & (dim - 1)) == 0
    low_bits = np.int64(dim - 1)
    for b in range(block.shape[0]):
        row = block[b]
        g2, w2 = _whiten_row(row, signed_inverse_sqrt)
        gradient_sq[b] += g2
        whitened_sq[b] += w2
        out = sketch[b]
        mixed = np.uint64(start) * multiplier + offset  # uint64 arithmetic wraps around, as torch's int64 does
        for j in range(row.shape[0]):
            shifted = np.int64(mixed) >> 31
            out[shifted & low_bits if power_of_two else shifted % dim] += row[j]
            mixed += multiplier
