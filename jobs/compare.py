"""The compare stage: the same queries (in several languages) against several runs (e.g. model sizes).

Each run is one task (a worker loads its QueryEngine); the driver assembles top-k lists per (run, language),
overlaps between languages (Jaccard, rank-biased overlap) and the paper's cross-lingual measure, writes them as
Parquet and CSV, and plots them against model size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from influence.arguments import QueryArgs
from influence.artifacts import prepare_output, read_manifest, write_json
from influence.errors import InfluenceError
from influence.queries import Query
from influence.stage import Executor, Pass, Workspace, run_stage
from jobs.plots import plot_against_size
from jobs.report import write_tables

LOG = logging.getLogger(__name__)
REFERENCE_LANG = "en"


def jaccard(a: Sequence, b: Sequence) -> float:
    """|A ∩ B| / |A ∪ B| of two top-k lists (order ignored)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def rank_biased_overlap(a: Sequence, b: Sequence, p: float = 0.9) -> float:
    """Rank-biased overlap (Webber et al. 2010) truncated at the lists' depth and normalised so that
    identical lists score 1: sum_d p^(d-1) |A_:d ∩ B_:d| / d, divided by sum_d p^(d-1)."""
    depth = min(len(a), len(b))
    if depth == 0:
        return 1.0
    weights = p ** np.arange(depth)
    agreement = [len(set(a[: d + 1]) & set(b[: d + 1])) / (d + 1) for d in range(depth)]
    return float(np.dot(weights, agreement) / weights.sum())


def crosslingual_ratio(scores_translated: np.ndarray, scores_reference: np.ndarray) -> float:
    """The paper's cross-lingual measure: the influence of the reference query's top documents on the
    translated query, relative to their influence on the reference query (sum over the documents)."""
    reference = float(np.sum(scores_reference))
    return float(np.sum(scores_translated)) / reference if reference != 0 else float("nan")


def compare_work(workspace: Workspace, args: QueryArgs, payload: tuple[str, str, tuple[Query, ...]]) -> dict:
    """One run: top-k per query, and each group's reference top documents scored on every translation."""
    from indexes.engine import QueryEngine

    name, index_dir, queries = payload
    engine = workspace.get(("engine", index_dir, args.dtype, args.device), lambda: QueryEngine(index_dir, args))
    results = engine.query(list(queries), args)
    top = {r.query.query_id: [(d.seq_id, d.doc_id, d.score) for d in r.positive] for r in results}
    crosslingual = {}
    for group in sorted({q.group_id for q in queries}):
        members = [q for q in queries if q.group_id == group]
        reference = next((q for q in members if q.lang == REFERENCE_LANG), members[0])
        seq_ids = [s for s, _, _ in top[reference.query_id]]
        scores = engine.score_documents(members, seq_ids)  # (members, top_k)
        crosslingual[group] = {"reference": reference.query_id, "scores": {q.query_id: scores[i].tolist() for i, q in enumerate(members)}}
    parameters = sum(p.numel() for p in engine.loaded.model.parameters())
    return {"run": name, "parameters": int(parameters), "top": top, "crosslingual": crosslingual}


def compare_tables(outputs: list[dict], queries: Sequence[Query]) -> tuple[pa.Table, pa.Table]:
    """(top-k rows, per run x group x language overlap rows) from the runs' outputs."""
    by_id = {q.query_id: q for q in queries}
    top_rows, overlap_rows = [], []
    for out in outputs:
        for query_id, docs in out["top"].items():
            q = by_id[query_id]
            top_rows += [{"run": out["run"], "parameters": out["parameters"], "query_id": query_id, "group": q.group_id,
                          "lang": q.lang, "rank": r + 1, "seq_id": s, "doc_id": d, "score": sc} for r, (s, d, sc) in enumerate(docs)]
        for group, info in out["crosslingual"].items():
            reference = info["reference"]
            ref_ids = [s for s, _, _ in out["top"][reference]]
            for query_id, scores in info["scores"].items():
                ids = [s for s, _, _ in out["top"][query_id]]
                overlap_rows.append({
                    "run": out["run"], "parameters": out["parameters"], "group": group, "reference": reference,
                    "query_id": query_id, "lang": by_id[query_id].lang, "jaccard": jaccard(ref_ids, ids),
                    "rbo": rank_biased_overlap(ref_ids, ids),
                    "crosslingual_ratio": crosslingual_ratio(np.asarray(scores), np.asarray(info["scores"][reference])),
                })
    return pa.Table.from_pylist(top_rows), pa.Table.from_pylist(overlap_rows)


def run_compare(runs: dict[str, Path | str], queries: Sequence[Query], out_dir: Path | str, args: QueryArgs = QueryArgs(),
                executor: Optional[Executor] = None) -> Path:
    """Query every run (one task each, on `executor`) and write top_k and overlap tables, plots and summary.json."""
    if not runs:
        raise InfluenceError("compare needs at least one run: --run NAME=INDEX_DIR")
    if len({q.query_id for q in queries}) != len(queries):
        raise InfluenceError("query ids must be unique")
    runs = {name: Path(index_dir).resolve() for name, index_dir in runs.items()}
    for index_dir in runs.values():
        read_manifest(index_dir, "index")
    with prepare_output(Path(out_dir), "compare", {f"run {name}": path for name, path in runs.items()}) as out_dir:
        outputs: dict[str, dict] = {}
        names = list(runs)
        step = Pass("runs", names, compare_work, save=outputs.__setitem__, shared=args, shared_key=("compare", args.dtype, args.device),
                    payload=lambda name: (name, str(runs[name]), tuple(queries)), unit="run")
        run_stage("compare", [step], executor, progress=False)
        top, overlap = compare_tables([outputs[name] for name in names], queries)
        write_tables(out_dir, {"top_k": top, "overlap": overlap})
        translated = overlap.filter(pc.not_equal(overlap["query_id"], overlap["reference"]))
        if translated.num_rows:
            plot_against_size(translated, "jaccard", "lang", out_dir / "jaccard_vs_size.png",
                              "Top-k overlap with the English query", "Jaccard of top-k")
            plot_against_size(translated, "crosslingual_ratio", "lang", out_dir / "crosslingual_vs_size.png",
                              "Influence of the English top documents on translations", "relative influence")
        write_json(out_dir / "summary.json", {"runs": {o["run"]: o["parameters"] for o in outputs.values()},
                                              "overlap": overlap.to_pylist()})
    return out_dir
