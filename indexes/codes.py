"""How the index holds each sequence: the sketch as 4-bit codes with a step per row (`SketchStore`) and, in the
refine tier, the whitened gradient itself in float16 (`RefineStore`), with the encoders that make both. The searches
over them are in `indexes.search`; writing and loading them, in `indexes.store`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import faiss
import numpy as np
import torch

from influence.errors import InfluenceError

# A stored entry is round(x / step) in -CODE_LEVELS..CODE_LEVELS, kept as the nibble code = that + CODE_LEVELS
CODE_LEVELS = 7

# Refine-tier rows converted to float32 per GEMM: a block of 16 whitened gradients stays in cache (measured fastest)
_REFINE_BLOCK = 16
# float16 keeps 11 significant bits: a stored entry is within 2^-11 of its value relative (normal range) or 2^-25
# absolute (subnormal, entries below 2^-14 of the row's largest). The bound is doubled for the float32 sum.
_HALF_RELATIVE = 2.0 ** -10
_HALF_ABSOLUTE = 2.0 ** -25


@dataclass
class SketchStore:
    """The sketches as stored: 4-bit codes (a read-only memmap) and each row's step (entry = (code - 7) x step).

    Column j of `codes` holds entry j in its low nibble and entry `half + j` in its high nibble (half = ceil(d / 2)):
    two planes, so a scan decodes a block with two bit operations and no shuffle.
    """

    codes: np.ndarray    # (n, ceil(d / 2)) uint8
    steps: np.ndarray    # (n,) float32
    dim: int
    _scanner: Optional[faiss.Index] = field(default=None, init=False, repr=False, compare=False)

    @property
    def ntotal(self) -> int:
        return self.codes.shape[0]

    @property
    def d(self) -> int:
        return self.dim

    def decode(self, ids) -> np.ndarray:
        """float32 (m, d) sketches of the rows `ids` (an index array or a slice), as the store approximates them."""
        codes = np.asarray(self.codes[ids])  # (m, half)
        levels = np.concatenate([codes & 15, codes >> 4], axis=1)[:, : self.dim].astype(np.float32) - CODE_LEVELS
        return levels * self.steps[ids][:, None]

    def rounding_noise(self, query_sketch_norm: float, ids: np.ndarray) -> np.ndarray:
        """About the standard deviation of the error that 4-bit rounding adds to <query sketch, row> for rows `ids`:
        each entry is off by at most step / 2, roughly uniformly, so ||query sketch|| x step / sqrt(12)."""
        return float(query_sketch_norm) * self.steps[ids].astype(np.float64) / np.sqrt(12.0)

    def scanner(self) -> faiss.IndexScalarQuantizer:
        """The codes as a FAISS 4-bit uniform scalar quantizer whose entries decode to code - 7 (levels, not yet times
        the row's step), built on first use: a copy of the codes in memory.

        FAISS packs dimension 2b in the low nibble of byte b and 2b + 1 in its high nibble, so its dimension 2b is the
        store's entry b and 2b + 1 is entry half + b: queries are interleaved to match (`_interleave`), not the codes.
        """
        if self._scanner is None:
            half = self.codes.shape[1]
            index = faiss.IndexScalarQuantizer(2 * half, faiss.ScalarQuantizer.QT_4bit_uniform, faiss.METRIC_INNER_PRODUCT)
            # uniform decoding is vmin + (code + 0.5) / 15 x vdiff: vmin = -7.5, vdiff = 15 gives code - 7 exactly
            faiss.copy_array_to_vector(np.array([-CODE_LEVELS - 0.5, 2 * CODE_LEVELS + 1], np.float32), index.sq.trained)
            index.is_trained = True
            faiss.copy_array_to_vector(np.ascontiguousarray(self.codes).reshape(-1), index.codes)
            index.ntotal = self.ntotal
            self._scanner = index
        return self._scanner

    def _interleave(self, queries: np.ndarray) -> np.ndarray:
        """(q, d) queries in the scanner's dimension order (q, 2 half); the odd padding entry gets 0."""
        half = self.codes.shape[1]
        out = np.zeros((len(queries), 2 * half), np.float32)
        out[:, 0::2] = queries[:, :half]
        out[:, 1::2][:, : self.dim - half] = queries[:, half:]
        return out


@dataclass
class RefineStore:
    """The refine tier: every sequence's whitened gradient W(z) itself, not a sketch of it, in float16, memory-mapped.

    Row i holds W(z_i) / scale_i with scale_i = max |W(z_i)|, so every entry is in [-1, 1] whatever the model's scale.
    <W(q), W(z)> from it is the EK-FAC score up to float16 rounding, which is bounded (`error_bound`), not estimated:
    the exact re-rank then only has to score the candidates whose bounds overlap the k-th score.
    """

    rows: np.ndarray     # (n, D) float16
    scales: np.ndarray   # (n,) float32
    dim: int

    @property
    def ntotal(self) -> int:
        return self.rows.shape[0]

    def scores(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """float64 (q, m) inner products of whitened queries (q, D) with rows `ids` (m,), read in blocks of 16 rows."""
        queries = torch.from_numpy(as_queries(queries, self.dim))
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")  # rows read in file order: a third faster than in candidate order
        rows, sorted_ids = np.asarray(self.rows), ids[order]  # a plain view of the memmap: no memmap wrapper per read
        out = np.empty((len(queries), len(ids)), np.float64)
        block = torch.empty(min(_REFINE_BLOCK, max(len(ids), 1)), self.dim)
        for start in range(0, len(ids), _REFINE_BLOCK):
            part = torch.from_numpy(rows[sorted_ids[start : start + _REFINE_BLOCK]])  # a copy of m rows, float16
            block[: len(part)].copy_(part)
            out[:, order[start : start + len(part)]] = (queries @ block[: len(part)].T).double().numpy()
        return out * self.scales[ids].astype(np.float64)

    def error_bound(self, queries: np.ndarray, ids: np.ndarray, document_norms: np.ndarray) -> np.ndarray:
        """(q, m): |scores - <W(q), W(z)>| never exceeds it. Each stored entry is off by at most 2^-11 of itself or
        2^-25 of the row's scale, so the error is at most 2^-11 sum |q_j W_j| + 2^-25 scale ||q||_1 <= 2^-11 ||q|| ||W(z)||
        + 2^-25 scale ||q||_1 (Cauchy-Schwarz), doubled for the float32 sum; `document_norms` are the exact ||W(z)||."""
        queries = np.asarray(queries, np.float64)
        l2, l1 = np.linalg.norm(queries, axis=1), np.abs(queries).sum(1)
        ids = np.asarray(ids, dtype=np.int64)
        return (_HALF_RELATIVE * np.multiply.outer(l2, np.asarray(document_norms, np.float64))
                + 2 * _HALF_ABSOLUTE * np.multiply.outer(l1, self.scales[ids].astype(np.float64)))


def encode_refine(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float16 rows (b, D) and scales (b,) float32 of whitened gradients (b, D), as `RefineStore` holds them."""
    block = np.asarray(block, dtype=np.float32)
    scales = np.abs(block).max(axis=1).astype(np.float32)
    scales[scales == 0] = 1.0
    return (block / scales[:, None]).astype(np.float16), scales


def encode_sketches(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4-bit codes (b, ceil(d / 2)) uint8 and steps (b,) float32 of float sketches (b, d), as `SketchStore` holds them.

    Per row, step = max |x| / 7 and each entry is rounded to the nearest multiple of it. The rounding adds an error
    of about ||q|| x step / sqrt(12) to a score, a few percent of the count sketch's own noise, so 4 bits per number
    buy four times the sketch dimension of float16 for the same bytes (measured: README, "Query latency and retrieval").
    """
    block = np.asarray(block, dtype=np.float32)
    rows, dim = block.shape
    steps = (np.abs(block).max(axis=1) / CODE_LEVELS).astype(np.float32)
    steps[steps == 0] = 1.0
    levels = np.clip(np.rint(block / steps[:, None]), -CODE_LEVELS, CODE_LEVELS).astype(np.uint8) + CODE_LEVELS  # 0..14
    if dim % 2:
        levels = np.pad(levels, ((0, 0), (0, 1)), constant_values=CODE_LEVELS)  # a zero the queries never read
    half = levels.shape[1] // 2
    return np.ascontiguousarray(levels[:, :half] | (levels[:, half:] << 4)), steps


def as_queries(queries: np.ndarray, dim: int | None) -> np.ndarray:
    """A C-contiguous float32 (q, d) copy/view of `queries`, checked against the index dimension."""
    if not isinstance(queries, np.ndarray) or queries.ndim != 2 or not np.issubdtype(queries.dtype, np.floating):
        shape = getattr(queries, "shape", type(queries).__name__)
        raise InfluenceError(f"queries must be a 2-D float numpy array (q, d), got {shape}; use queries[None] for a single query")
    if dim is not None and queries.shape[1] != dim:
        raise InfluenceError(
            f"queries have dimension {queries.shape[1]} but the index holds {dim}-dimensional sketches; "
            "sketch the queries with the same projection (seed and size) as the index"
        )
    if not np.isfinite(queries).all():
        raise InfluenceError("queries contain NaN or inf; check the query gradient (damping, model dtype) and recompute it")
    return np.ascontiguousarray(queries, dtype=np.float32)
