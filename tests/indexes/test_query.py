"""The query engine: index + re-rank against the full exact scan, breakdowns, generators, reports."""

import json
import threading

import numpy as np
import pytest

from indexes.build import build_index
from indexes.engine import QueryEngine
from influence.arguments import IndexArgs, QueryArgs, ScoreArgs
from influence.errors import InfluenceError
from influence.queries import Query
from jobs.report import render_html, render_terminal, save_results
from influence.scores import compute_scores, prepare_queries, query_gradients

QUERIES = [Query("shutdown", "Do you consent to being shut down?", " I would rather keep working.", "en"),
           Query("turkish", "Merhaba, nasılsın?", " Bugün hava çok güzel.", "tr")]


@pytest.fixture(scope="module")
def index_dir(llama_dir, ekfac_dir, corpus_dir, tmp_path_factory):
    return build_index(llama_dir, ekfac_dir, corpus_dir, tmp_path_factory.mktemp("index"), IndexArgs(progress=False, sketch_dim=256))


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
    # every sequence re-ranked, so that each list is full (5 candidates per sign may hold only 2 of a sign)
    for result in engine.query(QUERIES, QueryArgs(top_k=3, candidates=len(engine.seq_ids), adaptive=False)):
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


def test_hybrid_generator_reranks_the_union_of_index_and_text_candidates(engine):
    # without the adaptive stop every candidate is re-ranked, so the hybrid's top k is the top k of a superset of both
    # generators' candidates: never below either's, sign by sign
    fixed = dict(top_k=3, candidates=4, adaptive=False)
    hybrid = engine.query(QUERIES, QueryArgs(generator="hybrid", text_candidates=5, **fixed))
    index = engine.query(QUERIES, QueryArgs(generator="index", **fixed))
    text = engine.query(QUERIES, QueryArgs(generator="bm25", **{**fixed, "candidates": 5}))
    # the shutdown query shares words with four sequences, some of which the index did not propose; the Turkish query's
    # words are in its own document's two sequences only (the other sequences score 0: no text candidates)
    assert [t.num_candidates for t in text] == [4, 2]
    assert index[0].num_candidates < hybrid[0].num_candidates
    for qi, query in enumerate(QUERIES):
        assert hybrid[qi].generator == "hybrid"
        assert max(index[qi].num_candidates, text[qi].num_candidates) <= hybrid[qi].num_candidates \
            <= index[qi].num_candidates + text[qi].num_candidates
        for sign in ("positive", "negative"):
            direction = 1.0 if sign == "positive" else -1.0
            best = [direction * d.score for d in getattr(hybrid[qi], sign)]
            for other in (index[qi], text[qi]):
                theirs = [direction * d.score for d in getattr(other, sign)]
                assert all(b >= t - 1e-4 * abs(t) for b, t in zip(best, theirs)), (query.query_id, sign, best, theirs)
    # with the adaptive stop, the text's candidates are re-ranked whatever their sketch scores (the text gives no bound),
    # also when the index's pool holds them already (here it holds the whole corpus)
    [texts] = engine.bm25_candidates(QUERIES[:1], 6)
    for candidates in (4, len(engine.seq_ids)):
        [adaptive] = engine.query(QUERIES[:1], QueryArgs(generator="hybrid", top_k=3, candidates=candidates, text_candidates=6))
        assert adaptive.num_candidates >= len(set(texts.tolist()))


def test_text_candidates_join_a_pool_alternately_with_infinite_slack():
    from indexes.candidates import CandidatePool

    pool = CandidatePool(np.array([1, 2, 3]), np.array([0.9, 0.5, 0.1]), np.array([0.2, 0.2, 0.2]), beyond=0.3)
    joined = pool.with_text_candidates(np.array([3, 9]), np.array([0.1, -0.4]))
    assert joined.seq_ids.tolist() == [1, 3, 2, 9]  # the index's best, the text's best, ...; 3 once, as the text's
    assert joined.scores.tolist() == [0.9, 0.1, 0.5, -0.4] and joined.slack.tolist() == [0.2, np.inf, 0.2, np.inf]
    assert joined.beyond == 0.3


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


def test_a_query_answers_the_same_alone_and_in_a_batch(engine):
    # a sequence is scored for the queries whose pools want it, so a batch changes no query's rounds or answer
    together = engine.query(QUERIES, QueryArgs(top_k=3, candidates=12))
    for query, batched in zip(QUERIES, together):
        (alone,) = engine.query([query], QueryArgs(top_k=3, candidates=12))
        assert [d.seq_id for d in batched.documents] == [d.seq_id for d in alone.documents]
        assert batched.num_candidates == alone.num_candidates  # the same sequences scored exactly for it
        assert [d.score for d in batched.documents] == pytest.approx([d.score for d in alone.documents], rel=1e-5, abs=1e-9)
        for a, b in zip(batched.documents, alone.documents):
            np.testing.assert_allclose(a.token_scores, b.token_scores, rtol=1e-4, atol=1e-6 * max(np.abs(b.token_scores).max(), 1e-30))


def test_exact_scores_keep_each_pair_once_scored():
    from indexes.candidates import ExactScores

    scored = ExactScores(num_queries=2, num_modules=1, per_token=True)
    nan = np.nan
    scored.add(np.array([7, 3]), np.array([[1.0, 2.0], [nan, 4.0]]), np.array([[[1.0, 2.0], [nan, 4.0]]]),
               [np.array([[0.5, 0.5], [nan, nan]]), np.array([[2.0], [4.0]])])
    assert scored.has(0, np.array([7, 3, 9])).tolist() == [True, True, False]
    assert scored.has(1, np.array([7, 3])).tolist() == [False, True]
    # sequence 7 passed again for query 1 (its pool wanted it later): query 0's score is kept, query 1's filled in
    scored.add(np.array([7]), np.array([[nan], [5.0]]), np.array([[[nan], [5.0]]]), [np.array([[nan, nan], [2.0, 3.0]])])
    assert scored.order == [7, 3]
    np.testing.assert_array_equal(scored.scores, [[1.0, 2.0], [5.0, 4.0]])
    np.testing.assert_array_equal(scored.per_module[0], [[1.0, 2.0], [5.0, 4.0]])
    np.testing.assert_array_equal(scored.tokens[0], [[0.5, 0.5], [2.0, 3.0]])


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
    small = engine.query(QUERIES, QueryArgs(top_k=3, candidates=5, batch_tokens=1))
    large = engine.query(QUERIES, QueryArgs(top_k=3, candidates=5, batch_tokens=10_000))
    for a, b in zip(small, large):
        assert [d.seq_id for d in a.documents] == [d.seq_id for d in b.documents]
        assert [d.score for d in a.documents] == pytest.approx([d.score for d in b.documents], rel=1e-5, abs=1e-9)


def test_adaptive_rerank_with_a_huge_margin_rescores_every_candidate(engine):
    every = engine.query(QUERIES, QueryArgs(top_k=3, candidates=12, adaptive=False))
    wide = engine.query(QUERIES, QueryArgs(top_k=3, candidates=12, batch_tokens=40, stop_margin=1e9))
    for a, b in zip(every, wide):
        assert a.num_candidates == b.num_candidates
        assert [d.seq_id for d in a.documents] == [d.seq_id for d in b.documents]


def test_adaptive_rerank_stops_once_no_candidate_can_enter_the_top_k(engine):
    from indexes.candidates import CandidatePool

    ids = engine.seq_ids[:24]
    hopeless = np.r_[np.zeros(8), np.full(16, -1e9)]  # after the first 8, no sketch score + margin can reach the top 3
    pools = [(CandidatePool(ids, hopeless, np.ones(24)), CandidatePool(ids[::-1], -hopeless, np.ones(24)))]
    prepared = prepare_queries(query_gradients(engine.loaded, engine._tokenize(QUERIES[:1])), engine.factors)
    scored = engine._rerank(prepared, pools, QueryArgs(top_k=3, candidates=24))
    assert sorted(scored.order) == sorted(ids[:8].tolist() + ids[::-1][:8].tolist())  # the first round (8 per sign), no more
    # without the sketch scores (BM25 or exact pools) every candidate is scored
    scored = engine._rerank(prepared, [(CandidatePool(ids), CandidatePool(ids))], QueryArgs(top_k=3, candidates=24))
    assert sorted(scored.order) == sorted(ids.tolist())
    np.testing.assert_allclose(scored.scores[0, [scored.column[int(s)] for s in ids[:4]]],
                               engine.score_documents(QUERIES[:1], ids[:4])[0], rtol=1e-5, atol=1e-9)
    # the hopeless candidates stay unscored only because of their sketch scores: with hope they are scored
    hopeful = [(CandidatePool(ids, np.zeros(24), np.ones(24) * 1e12), CandidatePool(ids[::-1], np.zeros(24), np.ones(24) * 1e12))]
    assert len(engine._rerank(prepared, hopeful, QueryArgs(top_k=3, candidates=24)).order) == 24


def test_a_top_k_that_documents_beyond_the_candidates_could_enter_is_flagged(engine, caplog):
    # a margin this wide puts every document beyond the candidates within reach of the k-th exact score
    with caplog.at_level("WARNING", logger="indexes.engine"):
        wide = engine.query(QUERIES[:1], QueryArgs(top_k=3, candidates=3, stop_margin=1e9))
    assert wide[0].incomplete == ("+", "-") and wide[0].to_dict()["incomplete"] == ["+", "-"]
    assert "raise --candidates, or `--generator hybrid`" in caplog.text and "beyond the 3 candidates per sign" in caplog.text
    every = QueryArgs(top_k=3, candidates=len(engine.seq_ids), stop_margin=1e9)  # every document is a candidate
    # or each sign's pool holds over half the corpus, so that both together bring all of it to an exact score
    halves = QueryArgs(top_k=3, candidates=len(engine.seq_ids) // 2 + 1, stop_margin=1e9)
    for args in (every, QueryArgs(top_k=3, generator="exact"), halves):       # or a full scan: nothing lies beyond
        answer = engine.query(QUERIES[:1], args)[0]
        assert answer.num_candidates == len(engine.seq_ids) and answer.incomplete == (), args


def test_stop_margin_must_be_non_negative():
    with pytest.raises(InfluenceError, match="stop_margin"):
        QueryArgs(stop_margin=-1.0)


def test_without_rerank_the_top_sketch_scores_come_back_as_estimates(engine, index_dir, tmp_path):
    from indexes.search import search_both_signs
    from indexes.store import load_sketch_store

    results = engine.query(QUERIES, QueryArgs(top_k=3, rerank=False))
    gradients = query_gradients(engine.loaded, engine._tokenize(QUERIES))
    (high, high_ids), (low, low_ids) = search_both_signs(load_sketch_store(index_dir), engine.sketcher.sketch_gradients(gradients)[0].numpy(), 3)
    for qi, r in enumerate(results):
        assert not r.exact and r.num_candidates == 0
        assert [d.seq_id for d in r.positive] == engine.seq_ids[high_ids[qi]].tolist()
        assert [d.seq_id for d in r.negative] == engine.seq_ids[low_ids[qi]].tolist()
        assert [d.score for d in r.positive] == pytest.approx(high[qi].tolist(), rel=1e-5)
        assert all(d.score == d.sketch_score and not d.token_scores and not d.layer_scores for d in r.documents)
    out = save_results(results, tmp_path / "sketch")
    assert "not re-ranked" in (out / "report.html").read_text() and "not re-ranked" in render_terminal(results)
    with pytest.raises(InfluenceError, match="sketch scores"):
        QueryArgs(rerank=False, generator="bm25")


def test_sketch_queries_are_the_sketches_of_their_gradients_in_the_original_basis(engine):
    sketches, norms = engine.sketch_queries(QUERIES)
    expected, expected_norms = engine.sketcher.sketch_gradients(query_gradients(engine.loaded, engine._tokenize(QUERIES)))
    assert sketches.shape == (len(QUERIES), 256) and sketches.dtype == np.float32
    np.testing.assert_allclose(sketches, expected.numpy(), rtol=1e-4, atol=1e-6 * np.abs(sketches).max())
    np.testing.assert_allclose(norms, expected_norms, rtol=1e-5)
    with pytest.raises(InfluenceError, match="unique"):
        engine.sketch_queries([QUERIES[0], QUERIES[0]])


def test_sketch_queries_at_another_dim_fold_to_the_index_sketches(engine):
    # an index at 1024 numbers folded to 256 holds exactly the numbers of one at 256 (tests/indexes/test_tiers.py): so
    # must the queries' sketches, for benchmarks comparing sketch sizes with one engine
    from indexes.search import fold

    sketches, norms = engine.sketch_queries(QUERIES)
    larger, larger_norms = engine.sketch_queries(QUERIES, dim=1024)
    assert larger.shape == (len(QUERIES), 1024)
    np.testing.assert_allclose(fold(larger, 256), sketches, rtol=1e-4, atol=1e-6 * np.abs(sketches).max())
    np.testing.assert_allclose(larger_norms, norms, rtol=1e-6)


def test_bm25_candidates_rank_a_sequence_first_for_its_own_text(engine):
    seq_id = int(engine.seq_ids[len(engine.seq_ids) // 2])
    text = engine.sequences["text"][seq_id].as_py()
    words = text.split()
    query = Query("own-text", " ".join(words[: len(words) // 2]) or text, " ".join(words[len(words) // 2 :]) or text)
    [ranked] = engine.bm25_candidates([query], 10**6)
    assert engine.sequences["text"][int(ranked[0])].as_py() == text  # itself, or a sequence of the same text
    assert sorted(ranked.tolist()) == sorted(engine.seq_ids.tolist())  # a depth beyond the corpus: every sequence once


@pytest.mark.parametrize("mode", [[], ["--no-rerank"], ["--no-adaptive", "--candidates", "8"],
                                  ["--generator", "hybrid", "--text-candidates", "4"]])
def test_query_command(index_dir, tmp_path, capsys, mode):
    from jobs.cli import main

    out = tmp_path / "answer"
    assert main(["query", "--index", str(index_dir), "--prompt", QUERIES[0].prompt, "--completion", QUERIES[0].completion,
                 "--top-k", "3", "--out", str(out), *mode]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results[0]["documents"]) == 6 and results[0]["exact"] == ("--no-rerank" not in mode)
    assert "most positive" in capsys.readouterr().out and (out / "report.html").exists()
    assert results[0]["generator"] == (mode[1] if mode[:1] == ["--generator"] else "index")


@pytest.mark.parametrize("together", [1, 2])
def test_per_token_scores_equal_a_full_scans_alone_and_in_a_batch(engine, llama_dir, ekfac_dir, corpus_dir, together):
    # one query: kept from the re-rank; two: scored again for the returned documents only. Both must equal the scan.
    exact = compute_scores(llama_dir, ekfac_dir, corpus_dir, QUERIES[:together], ScoreArgs(progress=False, per_token=True))
    column = {int(s): j for j, s in enumerate(exact.seq_ids)}
    for qi, result in enumerate(engine.query(QUERIES[:together], QueryArgs(top_k=3))):
        for d in result.documents:
            want = exact.per_token[column[d.seq_id]][qi]
            np.testing.assert_allclose(d.token_scores, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("progress", [True, False])
def test_the_rerank_bar_counts_the_sequences_scored(engine, monkeypatch, capsys, progress):
    from tqdm.auto import tqdm

    bars = []

    class Recorded(tqdm):  # the real bar, kept for its final count (closing it sets `disable`: keep what was asked)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.asked_off = kwargs["disable"]
            bars.append(self)

    monkeypatch.setattr("indexes.engine.tqdm", Recorded)
    monkeypatch.setattr("indexes.engine.PROGRESS_DELAY_S", 0.0)  # the bar waits 2 s before it shows; this re-rank takes less
    [result] = engine.query(QUERIES[:1], QueryArgs(top_k=3, candidates=8, adaptive=False, per_token=False, progress=progress))
    [bar] = bars
    assert bar.asked_off is not progress and ("exact re-rank" in capsys.readouterr().err) is progress
    if progress:  # adaptive off: every candidate of both pools scored once, out of at most that many (a disabled bar counts nothing)
        assert bar.n == bar.total == result.num_candidates > 0
        engine.query(QUERIES, QueryArgs(top_k=3, candidates=8, per_token=False, progress=True))  # two queries, adaptive
        assert 0 < bars[-1].n <= bars[-1].total


def test_the_query_command_shows_the_bar_by_default_and_the_api_does_not():
    from jobs.cli import build_parser

    parse = lambda *extra: build_parser().parse_args(["query", "--index", "i", "--prompt", "p", "--completion", "c", *extra])  # noqa: E731
    assert parse().progress is True and parse("--no-progress").progress is False
    assert QueryArgs().progress is False
