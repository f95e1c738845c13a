"""The first tier: a FAISS index over the (folded) sketches, built from a factory string and trained on a sample, and
at scale filled by a stage that streams blocks to the workers.

`create_index` and `check_factory` turn a factory string into an inner-product index or an error a user can act on
(before any sketching), `train_index` trains it, and `deterministic_threads` keeps its bytes independent of the
thread count. An IVF first tier is trained once, on the driver, on a sample; adding the corpus is then embarrassingly parallel:
each task encodes one block of (folded) sketches into a copy of the trained, empty index (`add_with_ids`, so the
global ids survive any order of completion), and the driver merges the small encoded shard into the index as it
arrives (`merge_from`: the inverted lists are appended, nothing is re-encoded). The blocks are produced on the driver
one task at a time (`payload`), so neither side ever holds the corpus, whatever its size: 10 million sketches stream
through in blocks of 100,000.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import faiss
import numpy as np

from indexes.constants import FACTORY_EXAMPLES
from influence.errors import InfluenceError
from influence.stage import Executor, Pass, Workspace, run_stage

LOG = logging.getLogger(__name__)


def require_ivf(index: faiss.Index, what: str) -> faiss.IndexIVF:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise InfluenceError(f"{what}: streaming additions need an IVF first tier (e.g. IVF1024,PQ32), got {type(index).__name__}")
    if not index.is_trained:
        raise InfluenceError(f"{what}: the first tier must be trained before vectors are added to it")
    return ivf


def encode_work(workspace: Workspace, trained: np.ndarray, payload: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """One block (ids (n,), vectors (n, d) float32) encoded into a copy of the trained empty index; returned serialized."""
    ids, vectors = payload
    empty = workspace.get(("trained first tier", trained.tobytes()[:64], trained.size), lambda: faiss.deserialize_index(trained))
    shard = faiss.clone_index(empty)
    shard.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return faiss.serialize_index(shard)


def add_blocks(index: faiss.Index, blocks: Sequence, block: Callable[[object], tuple[np.ndarray, np.ndarray]],
               executor: Optional[Executor] = None, progress: bool = True, sizes: Optional[Sequence[int]] = None) -> faiss.Index:
    """Add every block to a trained, empty IVF `index` on `executor`; `block(task)` yields (ids, vectors) on the driver."""
    ivf = require_ivf(index, "add_blocks")
    trained = faiss.serialize_index(index)  # the empty trained index every worker encodes with
    order = {task: position for position, task in enumerate(blocks)}
    waiting: dict[int, np.ndarray] = {}
    merged = [0]

    def merge(task, encoded: np.ndarray) -> None:
        # merged in block order whatever the order of completion: the lists, and so the file, do not depend on timing
        waiting[order[task]] = encoded
        while merged[0] in waiting:
            shard = faiss.deserialize_index(waiting.pop(merged[0]))
            ivf.merge_from(faiss.extract_index_ivf(shard), 0)  # ids were given explicitly: keep them
            merged[0] += 1

    step = Pass("first tier", list(blocks), encode_work, save=merge, payload=block, shared=trained,
                shared_key=("first tier", trained.size, trained[:64].tobytes()), sizes=sizes, unit="vec", in_order=True)
    run_stage("first tier", [step], executor, progress)
    return index


def check_factory(dim: int, factory: str, num_train: int) -> None:
    """Refuse, before any sketching, a factory that cannot build a `dim`-dimensional inner-product
    index, or whose IVF level has more centroids than the `num_train` rows it would be trained on."""
    _check_trainable(create_index(dim, factory), factory, num_train)


def _check_trainable(index: faiss.Index, factory: str, num_train: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and num_train < ivf.nlist:
        raise InfluenceError(
            f"factory {factory!r} needs at least {ivf.nlist} training rows for its {ivf.nlist} IVF centroids, "
            f"but only {num_train} are available; use a smaller nlist (e.g. IVF{max(1, num_train // 39)}) or \"Flat\""
        )
    codebook = _largest_codebook(index)
    if num_train < codebook:
        raise InfluenceError(
            f"factory {factory!r} trains codebooks of {codebook} centroids, which needs at least {codebook} training rows, "
            f"but only {num_train} are available; use fewer bits (e.g. PQ16x4 trains on 16 rows), an SQ or Flat factory, "
            "or more documents"
        )


def _largest_codebook(index: faiss.Index) -> int:
    """The most centroids any product or additive quantizer inside `index` trains (2^nbits), or 0."""
    largest, current = 0, faiss.downcast_index(index)
    while current is not None:
        for quantizer in (getattr(current, "pq", None), getattr(current, "aq", None)):
            nbits = getattr(quantizer, "nbits", 0) if quantizer is not None else 0
            bits = [nbits] if isinstance(nbits, int) else faiss.vector_to_array(nbits).tolist()  # RQ/LSQ: one per step
            largest = max([largest, *(1 << int(b) for b in bits if b)])
        if isinstance(current, faiss.IndexPreTransform):
            current = faiss.downcast_index(current.index)
        else:
            ivf = faiss.try_extract_index_ivf(current) if not isinstance(current, faiss.IndexIVF) else None
            current = faiss.downcast_index(ivf) if ivf is not None else None
    return largest


def create_index(dim: int, factory: str) -> faiss.Index:
    """faiss.index_factory with an inner-product metric, with errors a user can act on."""
    examples = ", ".join(f'"{example}"' for example in FACTORY_EXAMPLES)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = _faiss_reason(exc)
        raise InfluenceError(
            f"invalid FAISS factory string {factory!r} for {dim}-dimensional sketches ({reason}); "
            f"use e.g. {examples} (PQm needs m to divide the dimension {dim})"
        ) from exc
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise InfluenceError(f"FAISS factory {factory!r} does not support inner product; use e.g. {examples}")
    if isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)):
        raise InfluenceError(f"FAISS factory {factory!r} asks for an IDMap, but ids are always the row positions 0..N-1; drop the 'IDMap' prefix")
    _skip_polysemous_training(index)
    return index


def _skip_polysemous_training(index: faiss.Index) -> None:
    """Turn off the polysemous code ordering the factory enables for PQ: it only serves Hamming
    pre-filtering (polysemous_ht), which inner-product search never uses, and it costs ~4 s per
    sub-quantizer of training (the factory's "np" suffix does the same)."""
    current = faiss.downcast_index(index)
    while current is not None:
        if hasattr(current, "do_polysemous_training"):
            current.do_polysemous_training = False
        if isinstance(current, faiss.IndexPreTransform):
            current = faiss.downcast_index(current.index)
        elif isinstance(current, faiss.IndexIVF):
            current = None
        else:
            ivf = faiss.try_extract_index_ivf(current)
            current = faiss.downcast_index(ivf) if ivf is not None else None


def train_index(index: faiss.Index, factory: str, sample: np.ndarray) -> int:
    """Train `index` on `sample` (num_train, d), turning FAISS's failures into actionable errors."""
    _check_trainable(index, factory, sample.shape[0])
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and sample.shape[0] < 39 * ivf.nlist:
        LOG.warning("training %d IVF centroids on %d rows: FAISS advises >= %d", ivf.nlist, sample.shape[0], 39 * ivf.nlist)
    start_time = time.perf_counter()
    try:
        index.train(sample)
    except RuntimeError as exc:
        raise InfluenceError(
            f"training FAISS index {factory!r} on {sample.shape[0]} rows failed ({_faiss_reason(exc)}); PQ needs at least "
            "2^nbits training rows (256 for the default 8 bits, 16 for PQmx4): pass more rows or a larger train_size, "
            "use fewer bits, or use \"Flat\""
        ) from exc
    LOG.info("trained '%s' on %d sampled rows in %.1fs", factory, sample.shape[0], time.perf_counter() - start_time)
    return sample.shape[0]


def _faiss_reason(exc: RuntimeError) -> str:
    """The human part of a FAISS C++ error: drop the "Error in <signature> at <file>:<line>:" preamble."""
    message = str(exc).strip().splitlines()[-1]
    message = re.sub(r"^Error in .*? at \S+:\d+: ", "", message)
    return re.sub(r"^Error: '.*?' failed: ", "", message)


@contextmanager
def deterministic_threads(index: faiss.Index, factory: str) -> Iterator[None]:
    """Build on one thread where FAISS's result depends on the thread count, so the bytes do not.

    Multi-threaded HNSW/NSG construction links nodes in a racy order, and pre-transforms (PCA, OPQ,
    RR, ...) go through BLAS, whose float rounding changes with the thread count. Flat, IVF, PQ and SQ
    builds were measured byte-identical across 1 and 2 threads and keep every thread.
    """
    graph = any(name in factory.upper() for name in ("HNSW", "NSG"))
    if not graph and not isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)
