"""The audit: self-influence outliers over a whole index, and where a set of queries' influence comes from.

Exact scores of every sequence for the queries come from the score stage (on any executor); the driver
aggregates them by source and language, finds documents that dominate many queries, and writes tables, a
histogram and an HTML report.
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
from influence.artifacts import read_json, read_manifest, require_same, resolve_reference, write_json
from influence.corpus import load_sequences
from influence.models import model_identity, require_model_dir
from influence.outputs import prepare_output
from influence.queries import Query
from influence.scores import compute_scores
from influence.stage import Executor
from jobs.plots import plot_histogram
from jobs.report import render_audit_html, write_tables, write_text

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
    """Sequences that appear among the top-k most positive of many queries, most frequent first (only positive scores
    count: with fewer than k positive sequences, a query's top-k is shorter)."""
    counts: dict[int, int] = {}
    for qi in range(scores.shape[0]):
        for row in np.argsort(-scores[qi], kind="stable")[:top_k]:
            if not scores[qi, row] > 0:
                break
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


def run_audit(index_dir: Path | str, queries: Sequence[Query], out_dir: Path | str, top: int = 20, top_k: int = 10,
              args: ScoreArgs = ScoreArgs(progress=False), executor: Optional[Executor] = None, model_dir: Optional[Path] = None,
              factors_dir: Optional[Path] = None, corpus_dir: Optional[Path] = None) -> Path:
    """Write outliers, outliers_per_token, by_source, by_lang and dominant tables (Parquet + CSV), a histogram and report.html.

    The model, factors and corpus are the ones the index records (relative to it when they were built side by side, so
    a moved run directory still works), unless given.
    """
    index_dir = Path(index_dir).resolve()
    manifest = read_manifest(index_dir, "index")
    model_dir = model_dir or resolve_reference(manifest, "model_dir", index_dir)
    factors_dir = factors_dir or resolve_reference(manifest, "factors_dir", index_dir)
    corpus_dir = corpus_dir or resolve_reference(manifest, "corpus_dir", index_dir)
    # every input checked against the index before anything is written or scored
    model_dir = require_model_dir(model_dir)
    identity = model_identity(model_dir)
    require_same("model", manifest["model_fingerprint"], identity.fingerprint, index_dir,
                 "audit with the model the index was built from (--model)")
    factors_manifest = read_manifest(factors_dir, "factors")
    require_same("model", identity.fingerprint, factors_manifest["model_fingerprint"], Path(factors_dir),
                 "pass factors fitted on this model (--factors), or the model they were fitted on (--model)")
    require_same("factors", manifest["factors_fingerprint"], factors_manifest["factors_fingerprint"], index_dir,
                 "pass the factors directory the index was built from (--factors)")
    docs = load_doc_table(index_dir)
    sequences, corpus_manifest = load_sequences(corpus_dir)
    require_same("corpus", manifest["corpus_fingerprint"], corpus_manifest["corpus_fingerprint"], index_dir,
                 "pass the corpus directory the index was built from (--corpus)")
    inputs = {"index": index_dir, "model": Path(model_dir), "factors": Path(factors_dir), "corpus": Path(corpus_dir)}
    with prepare_output(Path(out_dir), "audit", inputs, replaces=True) as out_dir:
        tables = {
            "outliers": attach_snippets(self_influence_outliers(docs, top), sequences),
            "outliers_per_token": attach_snippets(self_influence_outliers(docs, top, per_token=True), sequences),
        }
        summary = {"self_influence": self_influence_summary(docs), "queries": [q.query_id for q in queries]}
        if queries:
            result = compute_scores(model_dir, factors_dir, corpus_dir, queries, args, executor=executor)
            seq_ids, scores = result.seq_ids, result.scores
            rows = sequences.take(pa.array(seq_ids))
            query_ids = [q.query_id for q in queries]
            tables["by_source"] = influence_by_group(scores, np.asarray(rows["source"].to_pylist()), query_ids, "source")
            tables["by_lang"] = influence_by_group(scores, np.asarray(rows["lang"].to_pylist()), query_ids, "lang")
            tables["dominant"] = attach_snippets(dominant_documents(scores, seq_ids, top_k).slice(0, top), sequences)
        write_tables(out_dir, tables)
        plot_histogram(docs["self_influence"].to_numpy(), out_dir / "self_influence.png", "Self-influence of every sequence",
                       "self-influence")
        write_json(out_dir / "summary.json", summary)
        write_text(out_dir / "report.html", render_audit_html(tables, summary))
    return out_dir


def read_audit(out_dir: Path | str) -> tuple[dict[str, pa.Table], dict]:
    """An audit's tables and summary as `run_audit` wrote them."""
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    tables = {path.stem: pq.read_table(path) for path in sorted(out_dir.glob("*.parquet"))}
    return tables, read_json(out_dir / "summary.json")

