"""The query engine: index + re-rank against the full exact scan, breakdowns, generators, reports."""

import json
import threading

import numpy as np
import pytest

from indexes.build import build_index
from indexes.query import QueryEngine
from influence.arguments import IndexArgs, QueryArgs, ScoreArgs
from influence.errors import InfluenceError
from influence.query import Query
from influence.report import render_html, render_terminal, save_results
from influence.scores import compute_scores

QUERIES = [Query("shutdown", "Do you consent to being shut down?", " I would rather keep working.", "en"),
           Query("turkish", "Merhaba, nasılsın?", " Bugün hava çok güzel.", "tr")]


@pytest.fixture(scope="module")
def index_dir(llama_dir, ekfac_dir, corpus_dir, tmp_path_factory):
    return build_index(llama_dir, ekfac_dir, corpus_dir, tmp_path_factory.mktemp("index"), IndexArgs(progress=False, sketch_size=16))


@pytest.fixture(scope="module")
def engine(index_dir):
    return QueryEngine(index_dir, QueryArgs(top_k=3, candidates=5))


def test_rerank_returns_the_exact_top_documents(engine, llama_dir, ekfac_dir, corpus_dir):
    exact = compute_scores(llama_dir, ekfac_dir, corpus_dir, QUERIES, ScoreArgs(progress=False))
    full = engine.query(QUERIES, QueryArgs(top_k=3, candidates=len(exact.seq_ids)))
    for qi, result in enumerate(full):
        order = np.argsort(-exact.scores[qi])
        assert [d.seq_id for d in result.positive] == exact.seq_ids[order[:3]].tolist()
        assert [d.seq_id for d in result.negative] == exact.seq_ids[order[::-1][:3]].tolist()
        for d in result.documents:
            assert d.score == pytest.approx(exact.scores[qi, d.seq_id], rel=1e-4, abs=1e-7)


def test_breakdowns_sum_to_scores(engine):
    for result in engine.query(QUERIES):
        assert len(result.positive) == 3 and len(result.negative) == 3
        for d in result.documents:
            assert sum(d.module_scores.values()) == pytest.approx(d.score, rel=1e-4, abs=1e-8)
            assert sum(d.layer_scores.values()) == pytest.approx(d.score, rel=1e-4, abs=1e-8)
            assert sum(d.token_scores) == pytest.approx(d.score, rel=1e-3, abs=1e-7)
            assert len(d.tokens) == len(d.token_scores) and "".join(d.tokens).strip()
            assert d.sketch_score is not None


@pytest.mark.parametrize("generator", ["bm25", "exact"])
def test_other_candidate_generators(engine, generator):
    results = engine.query(QUERIES, QueryArgs(top_k=2, candidates=4, generator=generator))
    for r in results:
        assert r.generator == generator and len(r.positive) == 2
        assert r.positive[0].score >= r.positive[1].score


def test_concurrent_queries_equal_sequential(engine):
    expected = [[d.seq_id for d in r.documents] for r in engine.query(QUERIES)]
    outputs = [None] * 4

    def run(i):
        outputs[i] = [[d.seq_id for d in r.documents] for r in engine.query(QUERIES)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o == expected for o in outputs)


def test_reports(engine, tmp_path):
    results = engine.query(QUERIES)
    out = save_results(results, tmp_path / "out")
    page = (out / "report.html").read_text()
    assert "Do you consent to being shut down?" in page and "<svg" in page and "title=" in page
    assert json.loads((out / "results.json").read_text())[1]["query"]["lang"] == "tr"
    text = render_terminal(results)
    assert "most positive" in text and "[" in text
    assert render_html(results).count('class="doc"') == sum(len(r.documents) for r in results)


def test_bad_queries_are_refused(engine):
    with pytest.raises(InfluenceError, match="empty completion"):
        engine.query([Query("q", "Hello", "")])
    with pytest.raises(InfluenceError, match="tokenizes to nothing"):
        engine.query([Query("q", "", "Hello")])


def test_index_refuses_another_corpus(index_dir, llama_dir, corpus_file, tmp_path):
    from influence.arguments import CorpusArgs
    from influence.corpus import prepare_corpus

    other = prepare_corpus(corpus_file, llama_dir, tmp_path / "c", CorpusArgs(max_length=8), progress=False)
    with pytest.raises(InfluenceError, match="corpus mismatch"):
        QueryEngine(index_dir, corpus_dir=other)


def test_per_call_batch_size_gives_the_same_answer(engine):
    small = engine.query(QUERIES, QueryArgs(top_k=3, candidates=5, batch_size=1))
    large = engine.query(QUERIES, QueryArgs(top_k=3, candidates=5, batch_size=64))
    for a, b in zip(small, large):
        assert [d.seq_id for d in a.documents] == [d.seq_id for d in b.documents]
        assert [d.score for d in a.documents] == pytest.approx([d.score for d in b.documents], rel=1e-5, abs=1e-9)
