"""BM25 over the sequences' text: the `bm25` and `hybrid` generators' first stage (the paper's TF-IDF baseline).

On real models the text finds positive top documents that a small sketch misses (`benchmarks/sketch_budget.py`), at
the cost of a second index. Building it is the slow part (34 s and 0.9 GB per million Bible verses on one core,
`benchmarks/text_index.py`), so the index stage stores it once (`IndexArgs.text_index`) in the index directory:

    index_dir/text_index/
        *.index.npy, *.index.json   bm25s's own files: the term-document scores (CSC), vocabulary and parameters
        text_index.json             the corpus it was built from, its row count and BM25's parameters

Every query engine then memory-maps it (0.75 s per million verses) instead of building it in its own
memory. The directory is written under another name and renamed into place, so a reader finds a whole one or none.
An index without one still answers text queries: each engine builds the same BM25 in memory, once.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from influence.artifacts import read_json, require_same, write_json
from influence.errors import InfluenceError

LOG = logging.getLogger(__name__)
TEXT_INDEX_DIR = "text_index"
TEXT_META_NAME = "text_index.json"
#: BM25's free parameters, as Lucene's defaults; recorded in the metadata so a stored index says how it scores.
BM25_PARAMS = {"method": "lucene", "k1": 1.5, "b": 0.75}
#: Building BM25 in memory warns from this many sequences on (about 3 s, `benchmarks/text_index.py`), and estimates
#: the wait at this many seconds per sequence (34 s per million verses there)
BUILD_WARNING_ROWS = 100_000
BUILD_S_PER_ROW = 3.5e-5


def require_bm25():
    """The bm25s module, or an error that says how to install it (checked before any work that needs it)."""
    try:
        import bm25s
    except ImportError as exc:
        raise InfluenceError("BM25 over the text needs the bm25s package; pip install -e \".[bm25]\" "
                             "(or query with --generator index)") from exc
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it sets DEBUG on import: its chatter would reach our terminal
    return bm25s


@dataclass
class TextIndex:
    """A BM25 retriever over a corpus's sequences, rows in the corpus's order; `stored` when read from an index directory."""

    retriever: object
    num_rows: int
    stored: bool = False

    @classmethod
    def build(cls, texts: Sequence[str], progress: bool = False) -> "TextIndex":
        bm25s = require_bm25()
        retriever = bm25s.BM25(**BM25_PARAMS)
        retriever.index(bm25s.tokenize(list(texts), show_progress=progress), show_progress=progress)
        return cls(retriever, len(texts))

    def search(self, texts: Sequence[str], depth: int, matching_only: bool = False) -> list[np.ndarray]:
        """Per text, the rows of the `depth` best-matching sequences, best first (depth capped at the corpus's rows);
        `matching_only` drops those that share no word with it (a BM25 score of 0, in no particular order)."""
        bm25s = require_bm25()
        depth = min(int(depth), self.num_rows)
        rows, scores = self.retriever.retrieve(bm25s.tokenize(list(texts), show_progress=False), k=depth, show_progress=False)
        return [np.asarray(r, dtype=np.int64)[np.asarray(v) > 0] if matching_only else np.asarray(r, dtype=np.int64)
                for r, v in zip(rows, scores)]


def text_index_path(index_dir: Path) -> Path:
    return Path(index_dir) / TEXT_INDEX_DIR


def text_index_exists(index_dir: Path) -> bool:
    return (text_index_path(index_dir) / TEXT_META_NAME).is_file()


def write_text_index(index_dir: Path, texts: Sequence[str], corpus_fingerprint: str, progress: bool = True) -> Path:
    """Build BM25 over `texts` (the corpus's sequences, in order) and store it as `index_dir/text_index`.

    The caller holds the index directory's lock (`outputs.prepare_output`). Written to a hidden sibling first and
    renamed into place with its metadata inside, so a failure or a kill leaves no partial text index (a stale
    hidden directory of a killed attempt is removed by the next)."""
    index_dir = Path(index_dir)
    final = text_index_path(index_dir)
    for stale in index_dir.glob(f".{TEXT_INDEX_DIR}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = index_dir / f".{TEXT_INDEX_DIR}-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    try:
        built = TextIndex.build(texts, progress)
        built.retriever.save(str(tmp), show_progress=False)
        write_json(tmp / TEXT_META_NAME, {"corpus_fingerprint": corpus_fingerprint, "num_rows": len(texts), **BM25_PARAMS,
                                          "build_seconds": round(time.perf_counter() - start, 3)})
        if final.exists():  # an unfinished one (no metadata) from an older version or a hand copy
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    LOG.info("text index: BM25 over %d sequences stored in %s in %.1fs", len(texts), final, time.perf_counter() - start)
    return final


def load_text_index(index_dir: Path, corpus_fingerprint: str, num_rows: int) -> TextIndex:
    """The text index stored in `index_dir`, memory-mapped, checked against the corpus the engine reads."""
    path = text_index_path(index_dir)
    meta = read_json(path / TEXT_META_NAME)
    if not isinstance(meta, dict):
        raise InfluenceError(f"{path / TEXT_META_NAME} was edited by hand or written by another version; rebuild it with "
                             "`influence index ... --text-index` after removing that directory")
    fix = f"remove {path} and store it again with `influence index ... --text-index` (seconds; the sketches are kept)"
    require_same("corpus", corpus_fingerprint, meta.get("corpus_fingerprint"), path, fix)
    require_same("text index rows", num_rows, meta.get("num_rows"), path, fix)
    try:
        retriever = require_bm25().BM25.load(str(path), mmap=True, show_progress=False)
    except (OSError, ValueError, KeyError) as exc:
        raise InfluenceError(f"{path} is not a readable BM25 index ({exc}); {fix}") from exc
    if retriever.scores.get("num_docs") != num_rows:
        raise InfluenceError(f"{path} scores {retriever.scores.get('num_docs')} documents, not the corpus's {num_rows}; {fix}")
    return TextIndex(retriever, num_rows, stored=True)


def open_text_index(index_dir: Path, sequences: pa.Table, corpus_fingerprint: str, progress: bool = True) -> TextIndex:
    """What a query engine searches: the text index stored in `index_dir`, else BM25 over `sequences`' text built in
    memory (with a warning first where that takes seconds)."""
    if text_index_exists(index_dir):
        return load_text_index(index_dir, corpus_fingerprint, sequences.num_rows)
    rows, start = sequences.num_rows, time.perf_counter()
    large = rows >= BUILD_WARNING_ROWS
    if large:  # seconds to a minute of silence otherwise, at every engine start
        LOG.warning("building BM25 over %d sequences in memory (about %.0f s); store it once with `influence index ... "
                    "--text-index` and every query reads it in under a second", rows, rows * BUILD_S_PER_ROW)
    built = TextIndex.build(sequences["text"].to_pylist(), progress=large and progress)
    LOG.info("BM25 over %d sequences built in memory in %.1fs", rows, time.perf_counter() - start)
    return built
