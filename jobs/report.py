"""Reports of query results: a terminal table, Parquet/JSON for programs, a self-contained HTML page.

The HTML page shows the query on top, then each document with its tokens shaded by influence (red
raises the completion's probability, blue lowers it; hover for the value) and a bar chart of the
score's distribution over layers. It has no external resources, so it can be mailed or archived.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from influence.artifacts import atomic_path, write_parquet
from influence.explain import DocumentInfluence, QueryResult
from influence.outputs import prepare_output

RESULTS_JSON, RESULTS_PARQUET, REPORT_HTML = "results.json", "results.parquet", "report.html"
# C0/C1 controls (ANSI and OSC escapes, carriage returns, backspaces), line and paragraph separators, bidi overrides
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def terminal_text(text) -> str:
    """Untrusted text (documents, ids, error messages) made safe to print: every control character is shown as an
    escape (\\x1b, \\r, \\n ...), so a document cannot move the cursor, retitle the window or hide what follows."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def marked_snippet(doc: DocumentInfluence, width: int = 90, marks: int = 3) -> str:
    """The document's text on one line with its most influential tokens in [brackets]."""
    if not doc.tokens:
        return terminal_text(doc.text.replace("\n", " ")[:width])
    sign = 1.0 if doc.sign == "+" else -1.0
    top = set(sorted(range(len(doc.tokens)), key=lambda i: -sign * doc.token_scores[i])[:marks])
    pieces = [f"[{t.strip()}]" if i in top and t.strip() else t for i, t in enumerate(doc.tokens)]
    text = "".join(pieces).replace("\n", " ")
    first = min(top) if top else 0
    start = max(0, len("".join(doc.tokens[:first]).replace("\n", " ")) - width // 3)
    return ("…" if start else "") + terminal_text(text[start : start + width])


def signed(result: QueryResult) -> QueryResult:
    """The result with each sign listing only documents of that sign: "most negative" never shows a positive score,
    even when the corpus has fewer than --top-k documents of a sign (the engine ranks every re-ranked document)."""
    kept = [d for d in result.documents if (d.score > 0 if d.sign == "+" else d.score < 0)]
    return result if len(kept) == len(result.documents) else dataclasses.replace(result, documents=kept)


def render_terminal(results: Sequence[QueryResult], width: int = 90) -> str:
    lines = []
    for result in map(signed, results):
        q = result.query
        lines.append(f"\n== {terminal_text(q.query_id)} [{terminal_text(q.lang)}] ==  prompt: {q.prompt!r}")
        lines.append(f"   completion: {q.completion!r}")
        how = (f"{result.num_candidates} candidates from '{result.generator}', re-ranked exactly" if result.exact
               else f"top sketch scores from '{result.generator}' (estimates, not re-ranked)")
        lines.append(f"   {how}, "
                     + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.seconds.items()))
        for label, docs in (("most positive (support the completion)", result.positive), ("most negative", result.negative)):
            lines.append(f"   -- {label}")
            if not docs:
                lines.append(f"   (none of the {result.num_candidates or 'scored'} documents scored has this sign)")
            for d in docs:
                top_layer = terminal_text(max(d.layer_scores, key=lambda k: abs(d.layer_scores[k]))) if d.layer_scores else "-"
                lines.append(f"   {d.sign}{d.rank:<3} {d.score:+.3e}  {terminal_text(d.doc_id)[:22]:<22} {terminal_text(d.lang)[:4]:<4} "
                             f"{top_layer:<9} {marked_snippet(d, width)}")
    return "\n".join(lines)


def render_scores(result, sequences, top: int) -> str:
    """Per query the `top` most positive and most negative sequences: a sign lists only scores of that sign."""
    import numpy as np

    lines = []
    for qi, query_id in enumerate(result.query_ids):
        scores = result.scores[qi]
        order = np.argsort(-scores, kind="stable")
        lines.append(f"\n== {terminal_text(query_id)}: most positive / most negative influence ==")
        for label, rows in (("+", [r for r in order if scores[r] > 0][:top]), ("-", [r for r in order[::-1] if scores[r] < 0][:top])):
            if not rows:
                lines.append(f" {label} (no sequence has a {'positive' if label == '+' else 'negative'} score)")
            for row in rows:
                seq = int(result.seq_ids[row])
                lines.append(f" {label} {scores[row]:+.4e}  {terminal_text(sequences['doc_id'][seq].as_py())[:24]:<24} "
                             f"{terminal_text(sequences['text'][seq].as_py())[:70]}")
    return "\n".join(lines)


def results_table(results: Sequence[QueryResult]) -> pa.Table:
    rows = []
    for result in results:
        for d in result.documents:
            row = d.to_dict()
            row["module_scores"] = json.dumps(row["module_scores"])
            row["layer_scores"] = json.dumps(row["layer_scores"])
            row.update(prompt=result.query.prompt, completion=result.query.completion, query_lang=result.query.lang)
            rows.append(row)
    return pa.Table.from_pylist(rows)


def _shade(value: float, scale: float) -> str:
    alpha = min(abs(value) / scale, 1.0) * 0.85 if scale > 0 else 0.0
    color = "220,50,47" if value > 0 else "38,139,210"
    return f"background: rgba({color},{alpha:.3f})"


def _layer_chart(layers: dict[str, float]) -> str:
    if not layers:
        return ""
    scale = max(abs(v) for v in layers.values()) or 1.0
    bar_height, width = 16, 260
    rows = []
    for i, (name, value) in enumerate(layers.items()):
        length = abs(value) / scale * (width / 2)
        x = width / 2 if value >= 0 else width / 2 - length
        fill = "#dc322f" if value >= 0 else "#268bd2"
        y = i * (bar_height + 4)
        rows.append(f'<text x="0" y="{y + 12}" font-size="11">{html.escape(name)}</text>'
                    f'<rect x="{90 + x:.1f}" y="{y}" width="{length:.1f}" height="{bar_height}" fill="{fill}">'
                    f'<title>{html.escape(name)}: {value:+.3e}</title></rect>')
    height = len(layers) * (bar_height + 4)
    axis = f'<line x1="{90 + width / 2}" y1="0" x2="{90 + width / 2}" y2="{height}" stroke="#888"/>'
    return f'<svg class="layers" width="{90 + width}" height="{height}">{axis}{"".join(rows)}</svg>'


def _document_html(d: DocumentInfluence) -> str:
    if d.tokens:
        scale = max(abs(v) for v in d.token_scores) or 1.0
        body = "".join(f'<span style="{_shade(v, scale)}" title="{v:+.3e}">{html.escape(t)}</span>' for t, v in zip(d.tokens, d.token_scores))
    else:
        body = html.escape(d.text)
    sketch = "" if d.sketch_score is None else f" · sketch {d.sketch_score:+.3e}"
    return (f'<div class="doc"><div class="meta"><b>{d.sign}{d.rank}</b> score <b>{d.score:+.4e}</b>{sketch} · '
            f'{html.escape(d.doc_id)} (chunk {d.chunk}) · {html.escape(d.source)} · {html.escape(d.lang)}</div>'
            f'<div class="row"><pre class="tokens">{body}</pre>{_layer_chart(d.layer_scores)}</div></div>')


def _how(r: QueryResult) -> str:
    if r.exact:
        return f"{r.num_candidates} candidates from <code>{html.escape(r.generator)}</code>, re-ranked exactly with EK-FAC"
    return f"ranked by sketch scores from <code>{html.escape(r.generator)}</code>: estimates of the EK-FAC score, not re-ranked"


def render_html(results: Sequence[QueryResult], title: str = "Influence report") -> str:
    sections = []
    for r in results:
        q = r.query
        timing = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in r.seconds.items())
        sections.append(
            f'<section><h2>{html.escape(q.query_id)} <small>[{html.escape(q.lang)}]</small></h2>'
            f'<div class="query"><span class="prompt">{html.escape(q.prompt)}</span><span class="completion">{html.escape(q.completion)}</span></div>'
            f'<p class="note">{_how(r)} · {timing}</p>'
            f'<h3>Most positive: upweighting these raises p(completion | prompt)</h3>{"".join(map(_document_html, r.positive))}'
            f'<h3>Most negative</h3>{"".join(map(_document_html, r.negative))}</section>'
        )
    style = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
.query{background:#f6f6f0;padding:.8em;border-radius:6px;white-space:pre-wrap}.completion{background:#ffe9a8}
.doc{border-top:1px solid #ddd;padding:.5em 0}.meta{font-size:.9em;color:#444}.row{display:flex;gap:1em;align-items:flex-start}
pre.tokens{white-space:pre-wrap;flex:1;font-size:.9em;margin:.3em 0}.note{color:#666;font-size:.85em}"""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p>Red tokens raise the completion's log-probability when upweighted, "
            f"blue ones lower it. Bars: the score's share per layer.</p>{''.join(sections)}</body></html>")


def save_results(results: Sequence[QueryResult], out_dir: Path | str) -> Path:
    """Write results.json, results.parquet and report.html into `out_dir` (atomically, each)."""
    results = [signed(r) for r in results]
    with prepare_output(Path(out_dir), "query", {}, replaces=True) as out_dir:
        write_text(out_dir / RESULTS_JSON, json.dumps([r.to_dict() for r in results], indent=1, ensure_ascii=False))
        write_parquet(out_dir / RESULTS_PARQUET, results_table(results))
        write_text(out_dir / REPORT_HTML, render_html(results))
    return out_dir


def write_text(path: Path, text: str) -> None:
    """A UTF-8 text file, atomically (a full disk is reported with the size it needed)."""
    data = text.encode("utf-8")
    with atomic_path(path, len(data)) as tmp:
        tmp.write_bytes(data)


def write_tables(directory: Path, tables: dict[str, pa.Table]) -> None:
    """Each table as NAME.parquet (for programs) and NAME.csv (for spreadsheets), atomically."""
    import pyarrow.csv as pacsv

    for name, table in tables.items():
        write_parquet(Path(directory) / f"{name}.parquet", table)
        with atomic_path(Path(directory) / f"{name}.csv", table.nbytes) as tmp:
            pacsv.write_csv(table, tmp)


def _table_html(table: pa.Table, columns: Sequence[str]) -> str:
    columns = [c for c in columns if c in table.column_names]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(f'{v:.4g}' if isinstance(v, float) else str(v))}</td>" for v in row.values()) + "</tr>"
                   for row in table.select(columns).to_pylist())
    return f"<table><tr>{head}</tr>{body}</table>"


def render_audit_terminal(tables: dict[str, pa.Table], summary: dict, top: int = 5) -> str:
    """What the audit found, in a few lines: the strongest self-influence outliers and, with queries, each query's
    influence by source and the documents in most queries' top-k (the whole tables are in the CSV, Parquet and HTML)."""
    q = summary["self_influence"]["quantiles"]
    lines = [f"self-influence over {summary['self_influence']['count']} sequences: median {q['median']:.3g}, q99 {q['q99']:.3g}, "
             f"max {q['max']:.3g}; the strongest outliers (robust z):"]
    for row in tables["outliers"].slice(0, top).to_pylist():
        lines.append(f"  {row['robust_z']:>7.1f}  {terminal_text(row['doc_id'])[:24]:<24} {terminal_text(row['snippet'])[:80]}")
    if "by_source" in tables:
        lines.append("net influence by source (sum of exact scores over the source's sequences):")
        by_query: dict[str, list] = {}
        for row in tables["by_source"].to_pylist():
            by_query.setdefault(row["query_id"], []).append(row)
        for query_id, rows in by_query.items():
            rows = sorted(rows, key=lambda r: -abs(r["net"]))[:top]
            lines.append(f"  {terminal_text(query_id)[:24]:<24} " + ", ".join(f"{terminal_text(r['source'])} {r['net']:+.3g}" for r in rows))
    if "dominant" in tables and tables["dominant"].num_rows:
        lines.append("documents in the most queries' top-k (most positive):")
        for row in tables["dominant"].slice(0, top).to_pylist():
            lines.append(f"  {row['queries_in_top_k']:>4}  {terminal_text(row['doc_id'])[:24]:<24} {terminal_text(row['snippet'])[:80]}")
    return "\n".join(lines)


def render_audit_html(tables: dict[str, pa.Table], summary: dict) -> str:
    q = summary["self_influence"]["quantiles"]
    parts = [f"<h1>Dataset audit</h1><p>{summary['self_influence']['count']} sequences; self-influence median {q['median']:.3g}, "
             f"q99 {q['q99']:.3g}, max {q['max']:.3g}.</p><img src='self_influence.png' alt='self-influence histogram'>",
             "<h2>Self-influence outliers</h2>", _table_html(tables["outliers"], ["seq_id", "doc_id", "source", "lang", "num_tokens", "audit_value", "robust_z", "snippet"]),
             "<h2>Outliers per token</h2>", _table_html(tables["outliers_per_token"], ["seq_id", "doc_id", "source", "lang", "num_tokens", "audit_value", "robust_z", "snippet"])]
    for name, title in (("by_source", "Influence by source"), ("by_lang", "Influence by language"), ("dominant", "Documents in many queries' top-k")):
        if name in tables:
            parts += [f"<h2>{title}</h2>", _table_html(tables[name], tables[name].column_names)]
    style = "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:3px 6px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>Dataset audit</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
