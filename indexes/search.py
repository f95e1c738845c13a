"""Top-k inner-product search: through a FAISS index, over the sketch store (`indexes.codes`), and exactly by brute
force (the oracle).

`exact_topk` plays the part of faiss.contrib's `knn_ground_truth` for inner products: it streams the
database as blocks, so tests and recall benchmarks can check any index against it.
"""

from __future__ import annotations

import logging
from typing import Iterable, Union

import faiss
import numpy as np
import torch

from indexes.codes import CODE_LEVELS, SketchStore, as_queries
from influence.artifacts import read_only_tensor
from influence.errors import InfluenceError

LOG = logging.getLogger(__name__)

# Rows scored at once by the oracle: bounds its float64 scratch to (q, 16384) scores.
_EXACT_CHUNK = 16384
# Rows of the store decoded and scored per GEMM: their float32 planes stay in cache
_SCAN_BLOCK = 128
# Rows whose scores are held before the best k of each end are kept: bounds a scan's scratch to (q, 32768) floats
_SCAN_CHUNK = 32768
# Up to this many queries a scan goes through FAISS's 4-bit scalar quantizer (SIMD decoding, one pass over the codes per
# query); above, through float32 GEMMs, which decode once for all queries. Measured ad hoc on this machine (not in a
# benchmark JSON): FAISS 1.8-3x faster for one query, about even at four, the GEMMs 1.5-1.9x faster at six.
_FAISS_SCAN_MAX_QUERIES = 4


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
    queries = as_queries(queries, store.d)
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
    queries = as_queries(queries, store.d)
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
    queries = as_queries(queries, index.d)
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
    queries = as_queries(queries, index.d)
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
    queries = as_queries(queries, None)
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
