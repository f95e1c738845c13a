"""The audit job: self-influence outliers over a whole index, and where a set of queries' influence comes from.

Exact scores of every sequence for the queries are computed by Ray actors over corpus shards (one
Scorer each); the driver aggregates them by source and language, finds documents that dominate many
queries, and writes tables and an HTML report.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from indexes.store import load_doc_table
from influence.arguments import ScoreArgs
from influence.artifacts import atomic_path, ensure_writable_dir, read_manifest, write_json, write_tables
from influence.audit import (
    attach_snippets,
    dominant_documents,
    influence_by_group,
    self_influence_outliers,
    self_influence_summary,
)
from influence.corpus import load_sequences
from influence.factors import shard_rows
from influence.plots import plot_histogram
from influence.report import render_audit_html
from influence.query import Query
from jobs.cluster import ray_cluster

LOG = logging.getLogger(__name__)


class ScoreWorker:
    """A Ray actor holding one Scorer; scores row ranges of the corpus."""

    def __init__(self, model_dir: str, factors_dir: str, args: ScoreArgs):
        from influence.scores import Scorer

        self.paths = (model_dir, factors_dir)
        self.scorer = Scorer(model_dir, factors_dir, args)
        self.args = args

    def score(self, corpus_dir: str, queries: list[Query], start: int, stop: int):
        from influence.scores import compute_scores

        result = compute_scores(*self.paths, corpus_dir, queries, self.args, scorer=self.scorer, rows=range(start, stop))
        return result.seq_ids, result.scores


def score_corpus(model_dir: str, factors_dir: str, corpus_dir: str, queries: Sequence[Query], num_rows: int, workers: int,
                 args: ScoreArgs) -> tuple[np.ndarray, np.ndarray]:
    """Exact (queries, n) scores of every sequence, computed by `workers` actors over shards."""
    import ray
    from ray.util import ActorPool

    actor = ray.remote(num_cpus=1, max_restarts=2, max_task_retries=2)(ScoreWorker)
    pool = ActorPool([actor.remote(model_dir, factors_dir, args) for _ in range(workers)])
    shards = [shard_rows(num_rows, k, workers * 2) for k in range(workers * 2)]
    parts = list(pool.map(lambda a, r: a.score.remote(corpus_dir, list(queries), r.start, r.stop), shards))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts], axis=1)


def run_audit_job(index_dir: Path | str, queries: Sequence[Query], out_dir: Path | str, top: int = 20, top_k: int = 10,
                  workers: int = 2, address: Optional[str] = None) -> Path:
    """(workers=0: score in this process.) Write self_influence_outliers.csv, by_source.csv, by_lang.csv, dominant.csv (+ Parquet), a histogram and report.html."""
    out_dir = ensure_writable_dir(Path(out_dir))
    manifest = read_manifest(Path(index_dir), "index")
    docs = load_doc_table(Path(index_dir))
    sequences, _ = load_sequences(manifest["corpus_dir"])
    tables = {
        "outliers": attach_snippets(self_influence_outliers(docs, top), sequences),
        "outliers_per_token": attach_snippets(self_influence_outliers(docs, top, per_token=True), sequences),
    }
    summary = {"self_influence": self_influence_summary(docs), "queries": [q.query_id for q in queries]}
    if queries:
        paths = (manifest["model_dir"], manifest["factors_dir"], manifest["corpus_dir"])
        if workers == 0:  # in this process
            from influence.scores import compute_scores

            result = compute_scores(*paths, queries, ScoreArgs(progress=False))
            seq_ids, scores = result.seq_ids, result.scores
        else:
            with ray_cluster(address):
                seq_ids, scores = score_corpus(*paths, queries, sequences.num_rows, workers, ScoreArgs(progress=False))
        rows = sequences.take(pa.array(seq_ids))
        query_ids = [q.query_id for q in queries]
        tables["by_source"] = influence_by_group(scores, np.asarray(rows["source"].to_pylist()), query_ids, "source")
        tables["by_lang"] = influence_by_group(scores, np.asarray(rows["lang"].to_pylist()), query_ids, "lang")
        tables["dominant"] = attach_snippets(dominant_documents(scores, seq_ids, top_k).slice(0, top), sequences)
    write_tables(out_dir, tables)
    plot_histogram(docs["self_influence"].to_numpy(), out_dir / "self_influence.png", "Self-influence of every sequence", "self-influence")
    write_json(out_dir / "summary.json", summary)
    with atomic_path(out_dir / "report.html") as tmp:
        tmp.write_text(render_audit_html(tables, summary), encoding="utf-8")
    return out_dir
