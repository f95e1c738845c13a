"""The compare stage: the same queries (in several languages) against several runs (e.g. model sizes).

Each run is one task (a worker loads its QueryEngine): it answers every query (top-k of both signs, exactly
re-ranked) and scores exactly, on every query of a group of translations, the reference (English) query's top
documents and their translations. The driver turns that into tables and plots against model size:

- `top_k` (positive documents, one row per query and rank) and `top_k.signed` (both signs, with each document's
  language and alignment group);
- `overlap`: per run, query group and language, the positive top-k's Jaccard and rank-biased overlap with the
  reference query's, and the paper's cross-lingual ratio (kept as it was: `crosslingual_ratio`);
- `overlap.crosslingual`: the same per sign, and through the documents' alignment (see `CROSSLINGUAL_COLUMNS`):
  (a) the paper's measure, the influence of the reference query's top-k documents on the translated query relative
  to their influence on the reference query (Grosse et al. 2023, section 5.3: Figures 15-16 relate it to model size);
  (b) the influence of those documents' translations on the translated query, relative to the same denominator;
  overlap of the two top-k lists counted through the alignment (a document and its translation are the same content).

The alignment maps a document to its group of translations: `align(doc_id, lang) -> group or None`, by default
`align_by_doc_id` (doc ids written `<group>/<lang>`, as `jobs.demo.parallel` writes them). Runs carry a `series`
label (e.g. "pretrained" and "tiny, trained here"), so the plots keep model families apart.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from influence.arguments import QueryArgs
from influence.artifacts import atomic_path, read_manifest, write_json
from influence.errors import InfluenceError
from influence.outputs import prepare_output
from influence.queries import Query
from influence.stage import Executor, Pass, Workspace, run_stage
from jobs.plots import _figure, plain_label, plot_against_size
from jobs.report import write_tables

LOG = logging.getLogger(__name__)
REFERENCE_LANG = "en"
SIGNS = ("+", "-")
DEFAULT_SERIES = "runs"

#: an alignment: (doc_id, lang) -> the group shared by a document and its translations, or None
Alignment = Callable[[str, str], Optional[str]]

#: tables written as NAME.parquet and NAME.csv (the dotted names fit the compare artifact's file patterns)
TABLES = ("top_k", "top_k.signed", "overlap", "overlap.crosslingual")

#: the `overlap.crosslingual` table: one row per run, query group, query language and sign
CROSSLINGUAL_COLUMNS = {
    "run": "the run (an index) the row measures",
    "series": "the family of models the run belongs to (plots draw one line per series and language)",
    "parameters": "the run's model parameters, embeddings included",
    "group": "the query group (a query and its translations)",
    "reference": "the reference query of the group (its English member, else its first)",
    "query_id": "the query the row measures",
    "lang": "that query's language",
    "sign": "'+': the most positively influential documents; '-': the most negative ones",
    "k": "documents in the reference query's top-k of this sign (T below; fewer than top-k when fewer have that sign)",
    "reference_total": "sum over T of I(reference query, d): the denominator of both ratios",
    "ratio_same_docs": "(a) the paper's measure: sum over T of I(query, d) / reference_total",
    "aligned_docs": "documents d of T with a translation into the query's language (A below; d itself if already in it)",
    "ratio_translations": "(b) sum over A of I(query, translation of d) / sum over A of I(reference query, d)",
    "ratio_same_docs_aligned": "(a) restricted to A, for comparison with (b) on the same documents",
    "own_total": "sum over the query's own top-k of this sign of I(query, d)",
    "share_same_docs": "sum over T of I(query, d) / own_total: (a) against the query's own scale, at most 1 when the top-k "
                       "is exact (a query's gradient grows with its tokens, so (a) can exceed 1 for a translation the "
                       "tokenizer spells long, and this cannot)",
    "share_translations": "sum over A of I(query, translation of d) / own_total: (b) against the query's own scale",
    "jaccard": "Jaccard of the query's and the reference query's top-k sequences of this sign",
    "rbo": "rank-biased overlap (p = 0.9) of the same two lists",
    "jaccard_aligned": "Jaccard of the two top-k lists with each document replaced by its alignment group",
    "rbo_aligned": "rank-biased overlap of the two lists through the alignment",
    "translations_in_top_k": "share of A whose translation is in the query's own top-k of this sign",
    "same_lang_share": "share of the query's top-k documents written in the query's language",
}


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


def align_by_doc_id(doc_id: str, lang: str) -> Optional[str]:
    """The default alignment: a doc id `<group>/<lang>` belongs to `<group>`; any other id to no group."""
    suffix = f"/{lang}"
    return doc_id[: -len(suffix)] if doc_id.endswith(suffix) and len(doc_id) > len(suffix) else None


def aligned_keys(docs: Sequence[tuple[str, Optional[str]]]) -> list[str]:
    """A ranked list of (doc_id, group) as alignment keys, first occurrence kept: a document and its translation
    count as one item (an unaligned document is its own item)."""
    keys = [f"group:{group}" if group is not None else f"doc:{doc_id}" for doc_id, group in docs]
    return list(dict.fromkeys(keys))


def _reference(members: Sequence[Query]) -> Query:
    return next((q for q in members if q.lang == REFERENCE_LANG), members[0])


def compare_work(workspace: Workspace, args: QueryArgs, payload: tuple) -> dict:
    """One run: both signs' top-k per query, and per query group the exact scores, on every member, of the reference
    query's top documents and of their translations into every member's language.

    With the `index` (or `bm25`) generator the top-k are the engine's answers (candidates, then the exact re-rank) and
    the measures' documents are scored exactly afterwards; with `exact`, one full exact scan gives both.
    """
    from indexes.engine import QueryEngine

    name, index_dir, queries, align = payload
    engine = workspace.get(("engine", index_dir, args.dtype, args.device), lambda: QueryEngine(index_dir, args))
    sequences = engine.sequences
    doc_ids, langs = sequences["doc_id"].to_pylist(), sequences["lang"].to_pylist()
    chunks = sequences["chunk"].to_pylist()
    groups = [align(d, lang) for d, lang in zip(doc_ids, langs)]
    translation = {(g, lang, c): s for s, (g, lang, c) in enumerate(zip(groups, langs, chunks)) if g is not None}

    if args.generator == "exact":
        # a full exact scan gives every score of every query at once: the top-k of both signs and every score the
        # measures need come from this one pass (a second pass over the needed documents would cost as much again)
        scanned = engine.seq_ids
        matrix = engine.score_documents(list(queries), scanned)  # (queries, sequences)
        known = {int(s): i for i, s in enumerate(scanned)}
        top = {q.query_id: {sign: [(int(scanned[i]), float(matrix[qi, i]))
                                    for i in np.argsort(-direction * matrix[qi], kind="stable")[: args.top_k]]
                            for sign, direction in zip(SIGNS, (1.0, -1.0))} for qi, q in enumerate(queries)}
    else:
        results = engine.query(list(queries), args)
        top = {r.query.query_id: {sign: [(d.seq_id, d.score) for d in r.documents if d.sign == sign] for sign in SIGNS}
               for r in results}
    # a sign's list holds only documents of that sign: with few documents of a sign, the k "most negative" would
    # otherwise include positive ones (and a ratio over them would measure the wrong thing)
    top = {qid: {sign: [(s, score) for s, score in docs[sign] if (score > 0 if sign == "+" else score < 0)] for sign in SIGNS}
           for qid, docs in top.items()}
    crosslingual = {}
    for group in sorted({q.group_id for q in queries}):
        members = [q for q in queries if q.group_id == group]
        reference = _reference(members)
        needed: list[int] = []
        translations: dict[str, dict[int, Optional[int]]] = {}  # lang -> reference doc seq_id -> its translation
        for sign in SIGNS:
            for seq_id, _ in top[reference.query_id][sign]:
                needed.append(seq_id)
                for lang in {q.lang for q in members}:
                    found = translation.get((groups[seq_id], lang, chunks[seq_id])) if groups[seq_id] is not None else None
                    translations.setdefault(lang, {})[seq_id] = found
                    if found is not None:
                        needed.append(found)
        needed = list(dict.fromkeys(needed))
        if args.generator == "exact":
            rows = [queries.index(q) for q in members]
            scores = matrix[np.ix_(rows, [known[s] for s in needed])]
        else:
            scores = engine.score_documents(members, needed) if needed else np.zeros((len(members), 0))  # (members, needed)
        crosslingual[group] = {"reference": reference.query_id, "members": [q.query_id for q in members], "seq_ids": needed,
                               "scores": np.asarray(scores).tolist(), "translations": translations}
    shown = {s for q in top.values() for docs in q.values() for s, _ in docs} | {s for c in crosslingual.values() for s in c["seq_ids"]}
    documents = {s: (doc_ids[s], langs[s], groups[s]) for s in shown}
    parameters = sum(p.numel() for p in engine.loaded.model.parameters())
    return {"run": name, "parameters": int(parameters), "top": top, "crosslingual": crosslingual, "documents": documents}


def compare_tables(outputs: list[dict], queries: Sequence[Query], series: Optional[dict[str, str]] = None) -> dict[str, pa.Table]:
    """The `TABLES` from the runs' outputs (see the module docstring)."""
    by_id = {q.query_id: q for q in queries}
    series = series or {}
    top_rows, signed_rows, overlap_rows, cross_rows = [], [], [], []
    for out in outputs:
        run, parameters, docs = out["run"], out["parameters"], out["documents"]
        label = series.get(run, DEFAULT_SERIES)
        for query_id, signs in out["top"].items():
            q = by_id[query_id]
            for sign in SIGNS:
                for rank, (seq_id, score) in enumerate(signs[sign], start=1):
                    doc_id, doc_lang, doc_group = docs[seq_id]
                    row = {"run": run, "parameters": parameters, "query_id": query_id, "group": q.group_id, "lang": q.lang,
                           "rank": rank, "seq_id": seq_id, "doc_id": doc_id, "score": score}
                    if sign == "+":
                        top_rows.append(row)
                    signed_rows.append({**row, "series": label, "sign": sign, "doc_lang": doc_lang, "doc_group": doc_group})
        for group, info in out["crosslingual"].items():
            column = {s: i for i, s in enumerate(info["seq_ids"])}
            scores = {qid: np.asarray(row) for qid, row in zip(info["members"], info["scores"])}
            reference = info["reference"]
            for query_id in info["members"]:
                lang = by_id[query_id].lang
                for sign in SIGNS:
                    ref_ids = [s for s, _ in out["top"][reference][sign]]
                    ids = [s for s, _ in out["top"][query_id][sign]]
                    ref_scores = np.array([scores[reference][column[s]] for s in ref_ids])
                    same = np.array([scores[query_id][column[s]] for s in ref_ids])
                    pairs = [(s, info["translations"][lang][s]) for s in ref_ids if info["translations"][lang][s] is not None]
                    aligned_ref = np.array([scores[reference][column[s]] for s, _ in pairs])
                    translated = np.array([scores[query_id][column[t]] for _, t in pairs])
                    ratio_same = crosslingual_ratio(same, ref_scores)
                    own = np.array([score for _, score in out["top"][query_id][sign]])
                    if sign == "+":
                        overlap_rows.append({"run": run, "parameters": parameters, "group": group, "reference": reference,
                                             "query_id": query_id, "lang": lang, "jaccard": jaccard(ref_ids, ids),
                                             "rbo": rank_biased_overlap(ref_ids, ids), "crosslingual_ratio": ratio_same,
                                             "series": label})
                    ref_keys = aligned_keys([(docs[s][0], docs[s][2]) for s in ref_ids])
                    keys = aligned_keys([(docs[s][0], docs[s][2]) for s in ids])
                    if ref_ids:
                        lists = {"jaccard": jaccard(ref_ids, ids), "rbo": rank_biased_overlap(ref_ids, ids),
                                 "jaccard_aligned": jaccard(ref_keys, keys), "rbo_aligned": rank_biased_overlap(ref_keys, keys)}
                    else:  # no reference document of this sign: nothing to compare with
                        lists = dict.fromkeys(("jaccard", "rbo", "jaccard_aligned", "rbo_aligned"), float("nan"))
                    cross_rows.append({
                        "run": run, "series": label, "parameters": parameters, "group": group, "reference": reference,
                        "query_id": query_id, "lang": lang, "sign": sign, "k": len(ref_ids),
                        "reference_total": float(ref_scores.sum()), "ratio_same_docs": ratio_same, "aligned_docs": len(pairs),
                        "ratio_translations": crosslingual_ratio(translated, aligned_ref) if pairs else float("nan"),
                        "ratio_same_docs_aligned": crosslingual_ratio(np.array([scores[query_id][column[s]] for s, _ in pairs]),
                                                                      aligned_ref) if pairs else float("nan"),
                        "own_total": float(own.sum()), "share_same_docs": crosslingual_ratio(same, own),
                        "share_translations": crosslingual_ratio(translated, own) if pairs else float("nan"),
                        **lists,
                        "translations_in_top_k": (sum(t in set(ids) for _, t in pairs) / len(pairs)) if pairs else float("nan"),
                        "same_lang_share": (sum(docs[s][1] == lang for s in ids) / len(ids)) if ids else float("nan"),
                    })
    cross_schema = pa.schema([(name, _CROSS_TYPES.get(name, pa.float64())) for name in CROSSLINGUAL_COLUMNS])
    return {"top_k": pa.Table.from_pylist(top_rows), "top_k.signed": pa.Table.from_pylist(signed_rows),
            "overlap": pa.Table.from_pylist(overlap_rows),
            "overlap.crosslingual": pa.Table.from_pylist(cross_rows, schema=cross_schema)}


_CROSS_TYPES = {name: pa.string() for name in ("run", "series", "group", "reference", "query_id", "lang", "sign")}
_CROSS_TYPES.update(parameters=pa.int64(), k=pa.int64(), aligned_docs=pa.int64())

#: (column, file, title, y label) of the plots drawn from the `overlap.crosslingual` table
CROSSLINGUAL_PLOTS = (
    ("ratio_same_docs", "paper_ratio_vs_size.png", "(a) English top-k documents' influence on the translation",
     "influence relative to English"),
    ("ratio_translations", "translation_ratio_vs_size.png", "(b) Their translations' influence on the translation",
     "influence relative to English"),
    ("share_same_docs", "paper_share_vs_size.png", "(a) against the translated query's own top-k influence",
     "share of the query's own top-k influence"),
    ("share_translations", "translation_share_vs_size.png", "(b) against the translated query's own top-k influence",
     "share of the query's own top-k influence"),
    ("jaccard_aligned", "aligned_jaccard_vs_size.png", "Top-k overlap with English through the alignment", "Jaccard"),
    ("rbo_aligned", "aligned_rbo_vs_size.png", "Top-k rank-biased overlap with English through the alignment", "RBO"),
)


def plot_crosslingual(table: pa.Table, value: str, path: Path, title: str, ylabel: str) -> Path:
    """One panel per sign: `value` (mean over query groups) against model parameters, one line per series and
    language (series told apart by line style, languages by colour), each point labelled with its run."""
    plt = _figure()
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(SIGNS), figsize=(11, 4.2), sharey=False)
    rows = table.to_pylist()
    languages = sorted({r["lang"] for r in rows})
    families = list(dict.fromkeys(r["series"] for r in rows))
    colors = {lang: plt.get_cmap("tab10")(i) for i, lang in enumerate(languages)}
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]
    for ax, sign in zip(axes, SIGNS):
        for fi, family in enumerate(families):
            for lang in languages:
                points: dict[tuple[int, str], list[float]] = {}
                for r in rows:
                    if r["sign"] == sign and r["series"] == family and r["lang"] == lang:
                        points.setdefault((r["parameters"], r["run"]), []).append(r[value])
                if not points:
                    continue
                keys = sorted(points)
                ys = [float(np.nanmean(points[k])) if not all(np.isnan(points[k])) else np.nan for k in keys]
                ax.plot([k[0] for k in keys], ys, linestyle=styles[fi % len(styles)], marker=markers[fi % len(markers)],
                        color=colors[lang], label=plain_label(f"{family}: {lang}"))
                for (params, run), y in zip(keys, ys):
                    if np.isfinite(y):
                        ax.annotate(plain_label(run), (params, y), textcoords="offset points", xytext=(3, 3), fontsize=6, alpha=0.7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow range would label every minor tick, over one another
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_xlabel("model parameters")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{'most positive' if sign == '+' else 'most negative'} documents", fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(plain_label(title), fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def run_compare(runs: dict[str, Path | str], queries: Sequence[Query], out_dir: Path | str, args: QueryArgs = QueryArgs(),
                executor: Optional[Executor] = None, series: Optional[dict[str, str]] = None,
                align: Alignment = align_by_doc_id, progress: bool = False) -> Path:
    """Query every run (one task each, on `executor`); write the tables (Parquet and CSV), plots and summary.json.

    Args:
        runs: {name: index directory}.
        queries: translations share a `group` and differ in `lang`; the English member is each group's reference.
        series: {run name: series label} (default: every run in one series, "runs").
        align: (doc_id, lang) -> alignment group or None; a module-level function, since it travels to workers.
        progress: a bar of the runs answered (each run's queries are one task on a worker).
    """
    if not runs:
        raise InfluenceError("compare needs at least one run: --run NAME=INDEX_DIR")
    if len({q.query_id for q in queries}) != len(queries):
        raise InfluenceError("query ids must be unique")
    unknown = set(series or {}) - set(runs)
    if unknown:
        raise InfluenceError(f"series given for runs that are not compared: {sorted(unknown)}")
    runs = {name: Path(index_dir).resolve() for name, index_dir in runs.items()}
    for index_dir in runs.values():
        read_manifest(index_dir, "index")
    with prepare_output(Path(out_dir), "compare", {f"run {name}": path for name, path in runs.items()}, replaces=True) as out_dir:
        outputs: dict[str, dict] = {}
        names = list(runs)
        step = Pass("runs", names, compare_work, save=outputs.__setitem__, shared=args, shared_key=("compare", args.dtype, args.device),
                    payload=lambda name: (name, str(runs[name]), tuple(queries), align), unit="run")
        run_stage("compare", [step], executor, progress=progress)
        tables = compare_tables([outputs[name] for name in names], queries, series)
        write_tables(out_dir, tables)
        overlap = tables["overlap"]
        translated = overlap.filter(pc.not_equal(overlap["query_id"], overlap["reference"]))
        if translated.num_rows:
            plot_against_size(translated, "jaccard", "lang", out_dir / "jaccard_vs_size.png",
                              "Top-k overlap with the English query", "Jaccard of top-k")
            plot_against_size(translated, "crosslingual_ratio", "lang", out_dir / "crosslingual_vs_size.png",
                              "Influence of the English top documents on translations", "relative influence")
        cross = tables["overlap.crosslingual"]
        cross_translated = cross.filter(pc.not_equal(cross["query_id"], cross["reference"]))
        if cross_translated.num_rows:
            for column, name, title, ylabel in CROSSLINGUAL_PLOTS:
                plot_crosslingual(cross_translated, column, out_dir / name, title, ylabel)
        write_json(out_dir / "summary.json", _finite({
            "runs": {o["run"]: o["parameters"] for o in outputs.values()},
            "series": {name: (series or {}).get(name, DEFAULT_SERIES) for name in names},
            "overlap": overlap.to_pylist(), "crosslingual": cross.to_pylist(), "crosslingual_columns": CROSSLINGUAL_COLUMNS,
        }))
    return out_dir


def _finite(value):
    """NaN as None, so summary.json is strict JSON (a ratio with no aligned documents is NaN in the tables)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
