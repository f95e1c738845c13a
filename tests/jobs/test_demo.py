"""The three uses end to end at the 'tiny' preset: demo, compare, audit, and the executed notebooks."""

import json
import os
from pathlib import Path

import nbformat
import numpy as np
import pyarrow.parquet as pq
import pytest
from nbclient import NotebookClient

from influence.arguments import ScoreArgs
from influence.scores import compute_scores

from jobs.cli import main
from jobs.demo import build_demo, shutdown_queries

pytestmark = pytest.mark.slow
NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"), "tiny", progress=False)


def test_demo_command_reports_the_shutdown_query_in_three_languages(demo, capsys):
    assert main(["demo", "--preset", "tiny", "--work-dir", str(demo.work_dir.parent), "--in-process", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for lang in ("en", "ko", "tr"):
        assert f"shutdown-{lang}" in printed
    page = (demo.work_dir / "report" / "report.html").read_text()
    assert "Do you consent to being shut down?" in page and "종료" in page and "kapat" in page
    overlap = pq.read_table(demo.work_dir / "compare" / "overlap.parquet").to_pylist()
    assert {(r["run"], r["lang"]) for r in overlap} == {(m, l) for m in ("small", "medium", "large") for l in ("en", "ko", "tr")}
    assert (demo.work_dir / "compare" / "jaccard_vs_size.png").stat().st_size > 1000
    # the cross-lingual ratio against an independent full exact scan: the English top documents' scores on each query
    top = pq.read_table(demo.work_dir / "compare" / "top_k.parquet").to_pylist()
    english_top = [r["seq_id"] for r in sorted(top, key=lambda r: r["rank"]) if r["run"] == "large" and r["lang"] == "en"]
    exact = compute_scores(demo.models["large"], demo.factors["large"], demo.corpus_dir, shutdown_queries(), ScoreArgs(progress=False))
    column = {int(s): i for i, s in enumerate(exact.seq_ids)}
    totals = {q.lang: sum(exact.scores[qi, column[s]] for s in english_top) for qi, q in enumerate(shutdown_queries())}
    for row in overlap:
        if row["run"] == "large":
            assert row["crosslingual_ratio"] == pytest.approx(totals[row["lang"]] / totals["en"], rel=1e-4)
    # the English top-10 is the exact scan's top-10
    exact_top = [int(exact.seq_ids[i]) for i in np.argsort(-exact.scores[0], kind="stable")[:10]]
    assert english_top == exact_top


def test_compare_and_audit_commands(demo, tmp_path, capsys):
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"query_id": q.query_id, "prompt": q.prompt, "completion": q.completion, "lang": q.lang,
                                           "group": q.group}, ensure_ascii=False) + "\n" for q in shutdown_queries()))
    runs = [f"--run={name}={path}" for name, path in demo.indexes.items()]
    assert main(["compare", *runs, "--queries", str(queries), "--out", str(tmp_path / "compare"), "--in-process", "--top-k", "5"]) == 0
    top = pq.read_table(tmp_path / "compare" / "top_k.parquet")
    assert top.num_rows == 3 * 3 * 5 and set(top["run"].to_pylist()) == set(demo.indexes)
    assert (tmp_path / "compare" / "jaccard_vs_size.png").exists()
    # compared again with the English query alone: no translation, so no plot of translations, and the first
    # comparison's is not left to pass for this one's
    english = tmp_path / "english.jsonl"
    english.write_text(queries.read_text().splitlines()[0] + "\n")
    assert main(["compare", *runs, "--queries", str(english), "--out", str(tmp_path / "compare"), "--in-process", "--top-k", "5",
                 "--no-progress"]) == 0
    assert not (tmp_path / "compare" / "jaccard_vs_size.png").exists()
    assert pq.read_table(tmp_path / "compare" / "top_k.parquet").num_rows == 3 * 5
    capsys.readouterr()
    assert main(["audit", "--index", str(demo.indexes["large"]), "--queries", str(queries), "--out", str(tmp_path / "audit"), "--in-process",
                 "--no-progress"]) == 0
    printed = capsys.readouterr()
    by_lang = pq.read_table(tmp_path / "audit" / "by_lang.parquet").to_pylist()
    assert {r["lang"] for r in by_lang} == {"en", "ko", "tr"} and {r["query_id"] for r in by_lang} == {q.query_id for q in shutdown_queries()}
    outliers = pq.read_table(tmp_path / "audit" / "outliers.parquet")
    values = outliers["audit_value"].to_pylist()
    assert values == sorted(values, reverse=True) and outliers["snippet"][0].as_py()
    assert "Self-influence outliers" in (tmp_path / "audit" / "report.html").read_text()
    # the terminal says what the tables hold: the strongest outliers, the sources' net influence per query, and the
    # documents in most queries' top-k, each as the tables have it
    assert outliers["doc_id"][0].as_py() in printed.out and f"{outliers['robust_z'][0].as_py():>7.1f}" in printed.out
    by_source = pq.read_table(tmp_path / "audit" / "by_source.parquet").to_pylist()
    strongest = max((r for r in by_source if r["query_id"] == "shutdown-en"), key=lambda r: abs(r["net"]))
    assert f"{strongest['source']} {strongest['net']:+.3g}" in printed.out
    dominant = pq.read_table(tmp_path / "audit" / "dominant.parquet")
    assert dominant["doc_id"][0].as_py() in printed.out.split("top-k (most positive):")[1]
    assert "\r" not in printed.err  # --no-progress: no bar
    # audited again without queries into the same directory: the query tables of the first audit go, not left to
    # pass for this one's
    assert main(["audit", "--index", str(demo.indexes["large"]), "--out", str(tmp_path / "audit"), "--in-process", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert not [p.name for p in (tmp_path / "audit").iterdir() if p.stem in ("by_source", "by_lang", "dominant")]
    assert "by source" not in printed.out and outliers["doc_id"][0].as_py() in printed.out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, demo, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit notebooks with outputs stripped"
    monkeypatch.setenv("INFLUENCE_DEMO_DIR", str(demo.work_dir.parent))
    monkeypatch.setenv("INFLUENCE_DEMO_PRESET", "tiny")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(demo.work_dir)}}).execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
