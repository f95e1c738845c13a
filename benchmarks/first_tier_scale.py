"""The first tier at 10 million documents: a compact IVF-PQ index over folded sketches, built by a stage that streams
blocks to Ray workers, searched in milliseconds.

The sketches of the query benchmark's real 10k index (`query_latency.prepare`: a tiny Llama on chatterbot-corpus text,
the default `IndexArgs`) are folded to `fold_dim` numbers (`indexes.search.fold`: a folded count sketch is a count
sketch); their mean and covariance drive a Gaussian generator of synthetic rows of the same dimension. An
`IVF<nlist>,PQ<m>` index is trained on synthetic rows, then `num_rows` synthetic rows are added by
`indexes.tiers.add_blocks` on a `RayExecutor` (blocks generated on the driver one task at a time, encoded by the
workers, merged in order), so neither side ever holds the rows. Reported:

- build: seconds (training, adding), rows/s, peak RSS of the driver and the workers, index bytes on disk and per row;
- search: p50/p95 of one query (the real queries' folded sketches, both signs as the engine asks) at several `nprobe`
  and depths, one torch/FAISS thread;
- on the real 10k rows: the recall of the store's exact-scan top-10 (in sketch space, both signs) among the first
  tier's top `depth` candidates: what the first tier loses before the store orders its candidates.

    python benchmarks/first_tier_scale.py             # 10 million rows: about 10 minutes on 2 cores (reads the 10k index)
    python benchmarks/first_tier_scale.py --quick     # 100k rows on the quick index: a minute; writes to a temp path
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402  (sets the environment before torch is imported)

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import query_latency  # noqa: E402
from indexes.engine import QueryEngine  # noqa: E402
from indexes.search import fold, search_both_signs  # noqa: E402
from indexes.store import load_sketch_store  # noqa: E402
from indexes.tiers import add_blocks, create_index  # noqa: E402
from influence import QueryArgs  # noqa: E402
from influence.queries import tokenize_query  # noqa: E402
from influence.scores import rotated_query_gradients  # noqa: E402
from influence.stage import LocalExecutor  # noqa: E402
from jobs.runner import RayExecutor  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Settings:
    num_rows: int = 10_000_000
    fold_dim: int = 256
    nlist: int = 4096
    pq_bytes: int = 32
    train_rows: int = 200_000
    block_rows: int = 100_000
    workers: int = 2
    nprobes: tuple = (8, 16, 32)
    depths: tuple = (100, 2000)
    seed: int = 0


QUICK = Settings(num_rows=100_000, nlist=128, train_rows=10_000, block_rows=25_000, workers=0, nprobes=(8,), depths=(100,))


def real_rows(index_dir: Path, fold_dim: int) -> np.ndarray:
    """The real index's sketches (float32, as the store decodes them) folded to `fold_dim`."""
    return fold(load_sketch_store(index_dir).decode(slice(None)), fold_dim)


class Generator:
    """Synthetic rows from the real rows' mean and covariance, block k from seed (seed, k): reproducible anywhere."""

    def __init__(self, rows: np.ndarray, seed: int):
        self.mean = rows.mean(0)
        covariance = np.cov(rows, rowvar=False) + 1e-6 * np.eye(rows.shape[1]) * np.trace(np.cov(rows, rowvar=False)) / rows.shape[1]
        self.factor = np.linalg.cholesky(covariance).astype(np.float32)
        self.seed = seed

    def block(self, k: int, n: int) -> np.ndarray:
        z = np.random.default_rng((self.seed, k)).standard_normal((n, len(self.mean)), dtype=np.float32)
        return (z @ self.factor.T + self.mean).astype(np.float32)


def query_sketches(setup, fold_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The real queries' sketches as the engine makes them, folded like the rows."""
    engine = QueryEngine(setup.index_dir, QueryArgs())
    tokenized = [tokenize_query(q, engine.tokenizer, engine.context) for q in setup.queries]
    sketches, _, _ = engine.sketcher.sketch_rotated(rotated_query_gradients(engine.loaded, tokenized, engine.factors))
    return sketches.numpy(), fold(sketches.numpy(), fold_dim)


def build(settings: Settings, generator: Generator, executor) -> tuple[faiss.Index, dict]:
    index = create_index(settings.fold_dim, f"IVF{settings.nlist},PQ{settings.pq_bytes}")
    common.reset_peak_rss()
    with common.Timer() as train:
        index.train(generator.block(1 << 30, settings.train_rows))  # a block no row uses
    blocks = list(range(-(-settings.num_rows // settings.block_rows)))

    def block(k: int) -> tuple[np.ndarray, np.ndarray]:
        start = k * settings.block_rows
        n = min(settings.block_rows, settings.num_rows - start)
        return np.arange(start, start + n, dtype=np.int64), generator.block(k, n)

    with common.Timer() as adding:
        add_blocks(index, blocks, block, executor, progress=False)
    assert index.ntotal == settings.num_rows, index.ntotal
    return index, {"train_seconds": train.seconds, "add_seconds": adding.seconds, "rows_per_s": settings.num_rows / adding.seconds,
                   "driver_peak_rss_mb": common.peak_rss_mb(), "workers": common.process_peaks("StageWorker")}


def search_latency(index: faiss.Index, queries: np.ndarray, settings: Settings) -> dict:
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    out = {}
    for nprobe in settings.nprobes:
        for depth in settings.depths:
            search_both_signs(index, queries[:1], depth, nprobe=nprobe)  # warm-up
            seconds = []
            for q in queries:
                start = time.perf_counter()
                search_both_signs(index, q[None], depth, nprobe=nprobe)
                seconds.append(time.perf_counter() - start)
            out[f"nprobe={nprobe},depth={depth}"] = {k: (v * 1000 if k != "n" else v) for k, v in common.percentiles(seconds).items()}
    return out


def real_recall(folded: np.ndarray, full_rows: np.ndarray, full_queries: np.ndarray, folded_queries: np.ndarray,
                settings: Settings) -> dict:
    """On the real rows: the first tier (trained on them) against the exact scan of the full sketches, both signs."""
    nlist = max(16, int(np.sqrt(len(folded))))
    index = create_index(settings.fold_dim, f"IVF{nlist},PQ{settings.pq_bytes}")
    index.train(folded)
    index.add(folded)
    exact = full_queries.astype(np.float64) @ full_rows.astype(np.float64).T  # (q, n) sketch-space scores
    out = {}
    for depth in settings.depths:
        for nprobe in settings.nprobes:
            (_, high), (_, low) = search_both_signs(index, folded_queries, depth, nprobe=nprobe)
            recall = {}
            for sign, found in (("+", high), ("-", low)):
                truth = [common.top_ids(exact[qi], 10, sign) for qi in range(len(exact))]
                recall[sign] = float(np.mean([common.recall_at_k(found[qi], truth[qi]) for qi in range(len(exact))]))
            out[f"nprobe={nprobe},depth={depth}"] = recall
    return {"rows": len(folded), "nlist": nlist, "recall_of_scan_top10": out}


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--fold-dim", type=int, default=None, help="numbers the sketches are folded to (default 256)")
    parser.add_argument("--pq-bytes", type=int, default=None, help="bytes of PQ code per row (default 32)")
    parser.add_argument("--work-dir", type=Path, default=common.WORK / "query_latency")
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args(argv)
    settings = QUICK if ns.quick else Settings()
    if ns.rows:
        settings = dataclasses.replace(settings, num_rows=ns.rows)
    for name in ("fold_dim", "pq_bytes"):
        if getattr(ns, name):
            settings = dataclasses.replace(settings, **{name: getattr(ns, name)})
    facts = common.machine_facts()
    setup = query_latency.prepare(query_latency.QUICK if ns.quick else query_latency.DEFAULT, ns.work_dir)
    store = load_sketch_store(setup.index_dir)
    full_rows = store.decode(slice(None))
    rows = fold(full_rows, settings.fold_dim)
    full_queries, queries = query_sketches(setup, settings.fold_dim)
    generator = Generator(rows, settings.seed)
    with (RayExecutor(settings.workers) if settings.workers else nullcontext(LocalExecutor())) as executor:
        index, build_figures = build(settings, generator, executor)
    path = ns.work_dir / "first_tier_scale.faiss"
    faiss.write_index(index, str(path))
    size = path.stat().st_size
    result = {"settings": dataclasses.asdict(settings), "factory": f"IVF{settings.nlist},PQ{settings.pq_bytes}",
              "build": build_figures, "bytes_on_disk": size, "bytes_per_row": size / settings.num_rows,
              "search_ms": search_latency(index, queries, settings),
              "real": real_recall(rows, full_rows, full_queries, queries, settings),
              "machine": common.finish_machine(facts)}
    path.unlink()
    out = ns.out or common.default_out("first_tier_scale", ns.quick)
    common.write_results(out, result, common.command_line("first_tier_scale.py", argv))
    print({k: result[k] for k in ("factory", "bytes_per_row", "search_ms")}, f"\nwritten to {out}")
    return result



if __name__ == "__main__":
    main()
