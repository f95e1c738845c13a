"""Dataset audits from an index's doc table and exact scores: outliers, influence by group, dominance.

Self-influence g^T (F + lambda I)^-1 g measures how much a sequence's own loss would move if it were
upweighted: very high values flag memorised, duplicated or mislabelled documents. It grows with
length, so outliers are also ranked per token.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


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
