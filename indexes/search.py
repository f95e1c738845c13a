"""Top-k inner-product search: through a FAISS index, and exactly by brute force (the oracle).

`exact_topk` plays the part of faiss.contrib's `knn_ground_truth` for inner products: it streams the
database as blocks, so tests and recall benchmarks can check any index against it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import faiss
import numpy as np
import torch

from influence.artifacts import read_only_tensor
from influence.errors import InfluenceError

LOG = logging.getLogger(__name__)

# Rows scored at once by the oracle: bounds its float64 scratch to (q, 16384) scores.
_EXACT_CHUNK = 16384
# Rows of the store decoded and scored per GEMM: their float32 planes stay in cache
_SCAN_BLOCK = 128
# Rows whose scores are held before the best k of each end are kept: bounds a scan's scratch to (q, 32768) floats
_SCAN_CHUNK = 32768
# A stored entry is round(x / step) in -CODE_LEVELS..CODE_LEVELS, kept as the nibble code = that + CODE_LEVELS
CODE_LEVELS = 7
# Up to this many queries a scan goes through FAISS's 4-bit scalar quantizer (SIMD decoding, one pass over the codes per
# query); above, through float32 GEMMs, which decode once for all queries. Measured ad hoc on this machine (not in a
# benchmark JSON): FAISS 1.8-3x faster for one query, about even at four, the GEMMs 1.5-1.9x faster at six.
_FAISS_SCAN_MAX_QUERIES = 4
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
        queries = torch.from_numpy(_as_queries(queries, self.dim))
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


def fold(sketches: np.ndarray, dim: int) -> np.ndarray:
    """(n, D) -> (n, dim): bucket j sums the buckets i = j (mod dim), a block-wise sum.

    A count sketch folded is a count sketch (the bucket of a coordinate becomes its old bucket mod dim, the sign
    stays), so folded inner products remain unbiased estimates of the score, with the noise of `dim` numbers. It is
    how the compact first tier is made from the stored sketches without training anything.
    """
    n, full = sketches.shape
    if dim >= full:
        return np.ascontiguousarray(sketches, dtype=np.float32)
    padded = np.pad(sketches, ((0, 0), (0, (-full) % dim))) if full % dim else sketches
    return np.ascontiguousarray(padded.reshape(n, -1, dim).sum(1, dtype=np.float64), dtype=np.float32)  # (n, dim)


def store_scores(store: "SketchStore", queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Inner products (q, k) of each query with its own candidate rows `ids` (q, k) of the store (-1: no candidate)."""
    safe = np.where(ids >= 0, ids, 0)
    unique = np.unique(safe)
    rows = store.decode(unique)  # (m, d): each needed row read once
    scores = np.einsum("qd,qkd->qk", queries, rows[np.searchsorted(unique, safe)])
    return np.where(ids >= 0, scores, -np.inf)


def tiered_both_signs(index: faiss.Index, store: "SketchStore", queries: np.ndarray, k: int, depth: int,
                      nprobe: int | None = None) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The first tier (a compact index over folded sketches) proposes `depth` candidates per sign, the store re-scores
    them with the full sketch, and the best k per sign come back, ordered by those scores (as `search_both_signs`)."""
    queries = _as_queries(queries, store.d)
    k, depth = min(k, store.ntotal), max(min(depth, store.ntotal), k)
    (_, high_ids), (_, low_ids) = search_both_signs(index, fold(queries, index.d), depth, nprobe=nprobe)
    result = []
    for sign, ids in ((1.0, high_ids), (-1.0, low_ids)):
        scores = sign * store_scores(store, queries, ids)  # (q, depth): -inf where the first tier found fewer
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        chosen = np.take_along_axis(ids, order, 1)
        chosen_scores = np.take_along_axis(scores, order, 1)
        chosen = np.where(np.isfinite(chosen_scores), chosen, -1)
        result.append(((sign * chosen_scores).astype(np.float32), chosen))
    return result[0], result[1]


def scan_both_signs(store: SketchStore, queries: np.ndarray, k: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The k highest and k lowest inner products of each query with every stored sketch: an exact scan of the store.

    Blocks of rows are decoded to float32 (the codes are small integers, exact) and scored with two GEMMs each, one
    per nibble plane, in torch (which honours the thread setting of a query); only the best k of each end are kept
    between chunks of rows. Up to four queries go through FAISS's 4-bit scalar quantizer instead, which decodes with
    SIMD but reads the codes once per query. Both paths compute in float32: a query's scores do not depend on the
    queries it is scanned with, beyond the order of a float32 sum.
    """
    queries = _as_queries(queries, store.d)
    if k < 1:
        raise InfluenceError(f"k must be at least 1, got {k}; ask for the number of documents to return")
    k = min(k, store.ntotal)
    if len(queries) <= _FAISS_SCAN_MAX_QUERIES:
        return _faiss_scan_both_signs(store, queries, k)
    half = store.codes.shape[1]
    padded = np.zeros((len(queries), 2 * half), np.float32)
    padded[:, : store.d] = queries
    low_plane = torch.from_numpy(padded[:, :half])   # (q, half): entries 0..half-1
    high_plane = torch.from_numpy(padded[:, half:])  # (q, half): entries half..2 half-1
    ends = [(np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)) for _ in range(2)]
    for chunk_start in range(0, store.ntotal, _SCAN_CHUNK):
        chunk_stop = min(chunk_start + _SCAN_CHUNK, store.ntotal)
        scores = np.empty((len(queries), chunk_stop - chunk_start), np.float32)
        for start in range(chunk_start, chunk_stop, _SCAN_BLOCK):
            block = read_only_tensor(store.codes[start : min(start + _SCAN_BLOCK, chunk_stop)])  # (b, half) uint8
            low = ((block & 15).view(torch.int8) - CODE_LEVELS).float()
            high = ((block >> 4).view(torch.int8) - CODE_LEVELS).float()
            scores[:, start - chunk_start : start - chunk_start + block.shape[0]] = (low_plane @ low.T + high_plane @ high.T).numpy()
        scores *= store.steps[chunk_start:chunk_stop]
        ids = np.broadcast_to(np.arange(chunk_start, chunk_stop), scores.shape)
        for side, sign in enumerate((1.0, -1.0)):
            kept_scores, kept_ids = ends[side]
            ends[side] = _keep_topk(np.concatenate([kept_scores, sign * scores], 1), np.concatenate([kept_ids, ids], 1), k)
    result = []
    for sign, (scores, ids) in zip((1.0, -1.0), ends):
        order = np.lexsort((ids, -scores), axis=-1)
        result.append(((sign * np.take_along_axis(scores, order, 1)).astype(np.float32), np.take_along_axis(ids, order, 1)))
    return result[0], result[1]


def _faiss_scan_both_signs(store: SketchStore, queries: np.ndarray, k: int):
    """`scan_both_signs` through FAISS's 4-bit scalar quantizer: every row's inner product with the codes' levels in
    float32, times the row's step; the k best of each end as the GEMM path orders them."""
    distances, rows = store.scanner().search(store._interleave(queries), store.ntotal)  # (q, n) each, every row
    scores = np.empty((len(queries), store.ntotal), np.float32)
    np.put_along_axis(scores, rows, distances, 1)
    scores *= store.steps
    highest, lowest = _ordered_topk(scores, k), _ordered_topk(-scores, k)
    return ((np.take_along_axis(scores, highest, 1), highest.astype(np.int64)),
            (np.take_along_axis(scores, lowest, 1), lowest.astype(np.int64)))


def search_index(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k highest inner products of each query in `index`.

    Args:
        index: A FAISS inner-product index, e.g. from `load_index`.
        queries: float (q, d) query sketches; cast to float32.
        k: Results per query; clamped to the index size.
        nprobe: IVF lists visited per query (clamped to nlist; nlist makes IVF,Flat exact). Ignored,
            with a debug log, by indexes without an IVF level. Set on the index: it persists.
        ef_search: HNSW beam width (FAISS default 16); larger raises recall. Ignored by non-HNSW indexes.

    Returns:
        (scores, ids): float32 (q, k) and int64 (q, k), best first. ids are FAISS ids (`index_id` in
        the doc table); an approximate index that finds fewer than k pads with id -1.
    """
    queries = _as_queries(queries, index.d)
    if k < 1:
        raise InfluenceError(f"k must be at least 1, got {k}; ask for the number of documents to return")
    k = min(k, index.ntotal)
    if k == 0:
        return np.empty((queries.shape[0], 0), np.float32), np.empty((queries.shape[0], 0), np.int64)
    _set_search_parameters(index, nprobe, ef_search)
    scores, ids = index.search(queries, k)  # (q, k), (q, k)
    return scores, ids


def search_both_signs(
    index: Union[faiss.Index, SketchStore], queries: np.ndarray, k: int, nprobe: int | None = None
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The k highest and the k lowest inner products of each query: the candidates of both signs.

    The sketch store and a flat inner-product index are read once for both (one matrix-vector pass over the
    stored rows and a partial sort at each end): the scan is bound by memory bandwidth, and FAISS would read
    the rows once for q and again for -q. Other indexes are searched for q and for -q.

    Returns:
        ((scores, ids) highest first, (scores, ids) lowest first): float32 (q, k) and int64 (q, k);
        the scores are the inner products with q (the lowest are negative), ids as in `search_index`.
    """
    if isinstance(index, SketchStore):
        return scan_both_signs(index, queries, k)
    queries = _as_queries(queries, index.d)
    flat = faiss.downcast_index(index)
    if not (isinstance(flat, faiss.IndexFlat) and flat.metric_type == faiss.METRIC_INNER_PRODUCT):
        scores, ids = search_index(index, np.concatenate([queries, -queries]), k, nprobe=nprobe)
        q = len(queries)
        return (scores[:q], ids[:q]), (-scores[q:], ids[q:])
    if k < 1:  # as search_index checks on the other path
        raise InfluenceError(f"k must be at least 1, got {k}; ask for the number of documents to return")
    k = min(k, flat.ntotal)
    rows = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)  # a view, no copy
    # torch's GEMV honours torch.set_num_threads like the rest of a query
    scores = (torch.from_numpy(queries) @ torch.from_numpy(rows).T).numpy()  # (q, n) float32
    highest = _ordered_topk(scores, k)
    lowest = _ordered_topk(-scores, k)
    return ((np.take_along_axis(scores, highest, 1), highest.astype(np.int64)),
            (np.take_along_axis(scores, lowest, 1), lowest.astype(np.int64)))


def _ordered_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest scores per row, largest first (ties by index)."""
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((part, -np.take_along_axis(scores, part, 1)), axis=-1)
    return np.take_along_axis(part, order, 1)


def exact_topk(queries: np.ndarray, database_blocks: Iterable[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k inner products over a database given as row blocks (the oracle).

    Scores are accumulated in float64, so the ranking is exact up to float64 rounding; equal scores
    are ordered by id, except that ties straddling the k-th place are cut arbitrarily.

    Args:
        queries: float (q, d).
        database_blocks: float (n_i, d) blocks in database order, e.g. `iterate_shard_sketches`.
        k: Results per query; clamped to the database size.

    Returns:
        (scores, ids): float32 (q, k) and int64 (q, k), best first; ids are global row offsets.
    """
    queries = _as_queries(queries, None)
    if k < 1:
        raise InfluenceError(f"k must be at least 1, got {k}; ask for the number of documents to return")
    num_queries, dim = queries.shape
    query64 = queries.astype(np.float64)  # (q, d)
    best_scores = np.empty((num_queries, 0), np.float64)
    best_ids = np.empty((num_queries, 0), np.int64)
    offset = 0
    for block in database_blocks:
        if block.ndim != 2 or block.shape[1] != dim:
            raise InfluenceError(f"database block of shape {block.shape} does not match {dim}-dimensional queries; use sketches of one setting")
        for start in range(0, block.shape[0], _EXACT_CHUNK):
            chunk = np.asarray(block[start : start + _EXACT_CHUNK], dtype=np.float64)  # (m, d)
            scores = query64 @ chunk.T  # (q, m)
            ids = np.broadcast_to(np.arange(offset + start, offset + start + chunk.shape[0]), scores.shape)
            best_scores, best_ids = _keep_topk(
                np.concatenate([best_scores, scores], axis=1), np.concatenate([best_ids, ids], axis=1), k
            )
        offset += block.shape[0]
    # Final order: score descending, then id ascending for equal scores.
    order = np.lexsort((best_ids, -best_scores), axis=-1)
    best_scores = np.take_along_axis(best_scores, order, axis=1)
    best_ids = np.take_along_axis(best_ids, order, axis=1)
    return best_scores.astype(np.float32), best_ids


def _keep_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The (unordered) k largest scores per row and their ids."""
    if scores.shape[1] <= k:
        return scores, ids
    keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (q, k)
    return np.take_along_axis(scores, keep, axis=1), np.take_along_axis(ids, keep, axis=1)


def _as_queries(queries: np.ndarray, dim: int | None) -> np.ndarray:
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


def _set_search_parameters(index: faiss.Index, nprobe: int | None, ef_search: int | None) -> None:
    """Set nprobe / efSearch wherever they live inside wrapper indexes (pre-transforms, refine, ...)."""
    if nprobe is not None:
        if nprobe < 1:
            raise InfluenceError(f"nprobe must be at least 1, got {nprobe}; pass None for the index's default")
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is None:
            LOG.debug("nprobe=%d ignored: the index has no IVF level", nprobe)
        else:
            ivf.nprobe = min(nprobe, ivf.nlist)
    if ef_search is not None:
        if ef_search < 1:
            raise InfluenceError(f"ef_search must be at least 1, got {ef_search}; pass None for the index's default")
        try:
            faiss.ParameterSpace().set_index_parameter(index, "efSearch", ef_search)
        except RuntimeError:
            LOG.debug("ef_search=%d ignored: the index has no HNSW level", ef_search)
