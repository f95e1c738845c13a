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
import pyarrow.compute as pc

from indexes.store import load_doc_table
from influence.arguments import ScoreArgs
from influence.artifacts import atomic_path, ensure_writable_dir, read_manifest, write_json, write_tables
from influence.corpus import load_sequences
from influence.factors import shard_rows
from jobs.plots import plot_histogram
from jobs.report import render_audit_html
from influence.queries import Query
from jobs.cluster import ray_cluster

LOG = logging.getLogger(__name__)


def self_influence_summary(docs: pa.Table) -> dict:
    values = docs["self_influence"].to_numpy()
    quantiles = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0])
    return {"count": int(len(values)), "mean": float(values.mean()), "std": float(values.std()),
            "quantiles": dict(zip(["min", "q25", "median", "q75", "q90", "q99", "max"], map(float, quantiles)))}


def self_influence_outliers(docs: pa.Table, top: int = 20, per_token: bool = False) -> pa.Table:
    """The `top` sequences by self-influence (or self-influence per token), with robust z-scores."""
    values = docs["self_influence"].to_numpy().astype(np.float64)
    if per_token:
        values = values / np.maximum(docs["num_tokens"].to_numpy(), 1)
    median = np.median(values)
    mad = np.median(np.abs(values - median)) * 1.4826 or 1.0
    order = np.argsort(-values, kind="stable")[:top]
    table = docs.take(pa.array(order))
    return table.append_column("audit_value", pa.array(values[order])).append_column("robust_z", pa.array((values[order] - median) / mad))


def influence_by_group(scores: np.ndarray, groups: np.ndarray, query_ids: list[str], column: str) -> pa.Table:
    """Per query and group (a source or a language): documents, summed positive, negative and net influence."""
    rows = []
    for qi, query_id in enumerate(query_ids):
        for group in np.unique(groups):
            mask = groups == group
            values = scores[qi, mask]
            rows.append({"query_id": query_id, column: str(group), "documents": int(mask.sum()),
                         "positive": float(values[values > 0].sum()), "negative": float(values[values < 0].sum()),
                         "net": float(values.sum()), "mean": float(values.mean())})
    return pa.Table.from_pylist(rows)


def dominant_documents(scores: np.ndarray, seq_ids: np.ndarray, top_k: int = 10) -> pa.Table:
    """Sequences that appear among the top-k most positive of many queries, most frequent first."""
    counts: dict[int, int] = {}
    for qi in range(scores.shape[0]):
        for row in np.argsort(-scores[qi], kind="stable")[:top_k]:
            counts[int(seq_ids[row])] = counts.get(int(seq_ids[row]), 0) + 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return pa.table({"seq_id": pa.array([s for s, _ in ranked], pa.int64()), "queries_in_top_k": [c for _, c in ranked]})


def attach_snippets(table: pa.Table, sequences: pa.Table, width: int = 120) -> pa.Table:
    """Add doc id, source, language and a one-line snippet of each row's sequence (by `seq_id`)."""
    rows = sequences.take(pc.cast(table["seq_id"], pa.int64()))
    snippets = [t.replace("\n", " ")[:width] for t in rows["text"].to_pylist()]
    for name in ("doc_id", "source", "lang"):
        if name not in table.column_names:
            table = table.append_column(name, rows[name])
    return table.append_column("snippet", pa.array(snippets))


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
