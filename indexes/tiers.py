"""The first tier at scale: vectors added to a trained IVF index by a stage that streams blocks to the workers.

An IVF first tier is trained once, on the driver, on a sample; adding the corpus is then embarrassingly parallel:
each task encodes one block of (folded) sketches into a copy of the trained, empty index (`add_with_ids`, so the
global ids survive any order of completion), and the driver merges the small encoded shard into the index as it
arrives (`merge_from`: the inverted lists are appended, nothing is re-encoded). The blocks are produced on the driver
one task at a time (`payload`), so neither side ever holds the corpus, whatever its size: 10 million sketches stream
through in blocks of 100,000.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import faiss
import numpy as np

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
                shared_key=("first tier", trained.size, trained[:64].tobytes()), sizes=sizes, unit="vec")
    run_stage("first tier", [step], executor, progress)
    return index
