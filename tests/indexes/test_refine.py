"""The refine tier: float16 whitened gradients whose scores stay within their error bound of the exact EK-FAC scores,
and a query engine that, standing on it, re-ranks little more than the documents it returns and still answers like a
full exact scan."""

import numpy as np
import pyarrow as pa
import pytest

from indexes.build import build_index
from indexes.engine import QueryEngine
from indexes.codes import RefineStore, encode_refine
from indexes.shards import write_sketch_shard
from indexes.store import load_doc_table, load_refine_store, merge_sketch_shards
from influence.arguments import IndexArgs, QueryArgs, ScoreArgs
from influence.errors import InfluenceError
from influence.queries import Query
from influence.scores import compute_scores, rotated_query_gradients

QUERIES = [Query("shutdown", "Do you consent to being shut down?", " I would rather keep working.", "en"),
           Query("turkish", "Merhaba, nasılsın?", " Bugün hava çok güzel.", "tr")]


def test_refine_scores_stay_within_their_bound():
    rng = np.random.default_rng(0)
    # heavy tails, rows of very different scales (1e-30 .. 1e6) and entries far below a row's largest (float16 subnormals)
    rows = rng.standard_t(2, (300, 257)) * 10.0 ** rng.uniform(-30, 6, (300, 1))
    rows[:, :40] *= 1e-7
    rows[7] = 0.0
    store = RefineStore(*encode_refine(rows), 257)
    queries = rng.standard_t(3, (3, 257))
    ids = rng.permutation(300)[:120]
    got = store.scores(queries.astype(np.float32), ids)
    exact = queries @ rows[ids].T
    bound = store.error_bound(queries.astype(np.float32), ids, np.linalg.norm(rows[ids], axis=1))
    float32_queries = np.abs(queries - queries.astype(np.float32)) @ np.abs(rows[ids]).T  # the caller's float32 rounding
    assert (np.abs(got - exact) <= bound + float32_queries).all()
    norms = np.multiply.outer(np.linalg.norm(queries, axis=1), np.linalg.norm(rows[ids], axis=1))
    assert (bound <= 2e-3 * norms + 1e-300).all()  # and the bound is tight enough to separate documents
    zero = RefineStore(*encode_refine(np.zeros((1, 4))), 4)  # an all-zero gradient: scale 1, scores 0
    assert zero.scores(np.ones((1, 4), np.float32), np.array([0])).tolist() == [[0.0]]


@pytest.fixture(scope="module")
def refine_index(llama_dir, ekfac_dir, corpus_dir, tmp_path_factory):
    return build_index(llama_dir, ekfac_dir, corpus_dir, tmp_path_factory.mktemp("refine") / "index",
                       IndexArgs(progress=False, sketch_dim=256, refine=True, shard_size=7))


@pytest.fixture(scope="module")
def exact(llama_dir, ekfac_dir, corpus_dir):
    return compute_scores(llama_dir, ekfac_dir, corpus_dir, QUERIES, ScoreArgs(progress=False))


def test_refine_tier_scores_are_the_exact_scores_within_the_bound(refine_index, exact):
    engine = QueryEngine(refine_index, QueryArgs())
    assert engine.refine is not None and engine.refine.dim == engine.sketcher.whitened_dim
    assert not any(refine_index.glob("sketch_shard_*"))  # the shards' refine rows were merged, then removed
    rotated = rotated_query_gradients(engine.loaded, engine._tokenize(QUERIES), engine.factors)
    whitened = engine.sketcher.sketch_rotated(rotated, whitened=True)[2]
    rows = engine.index_ids[exact.seq_ids]
    got = engine.refine.scores(whitened, rows)
    bound = engine.refine.error_bound(whitened, rows, engine.document_norms[rows])
    assert (np.abs(got - exact.scores) <= bound * 1.01 + 1e-6 * np.abs(exact.scores).max()).all()
    assert build_index(engine.model_dir, engine.factors_dir, engine.corpus_dir, refine_index,
                       IndexArgs(progress=False, sketch_dim=256, refine=True, shard_size=7)) == refine_index  # reused as built
    docs = load_doc_table(refine_index)
    assert "refine_scale" in docs.column_names and (docs["refine_scale"].to_numpy() > 0).all()


def test_queries_standing_on_the_refine_tier_answer_like_a_full_scan(refine_index, index_without_refine, exact):
    top_k, everything = 3, len(exact.seq_ids)
    refined = QueryEngine(refine_index, QueryArgs(top_k=top_k, candidates=everything))
    sketched = QueryEngine(index_without_refine, QueryArgs(top_k=top_k, candidates=everything))
    for qi, query in enumerate(QUERIES):
        (with_refine,), (with_sketch,) = refined.query([query]), sketched.query([query])
        order = np.argsort(-exact.scores[qi], kind="stable")
        assert [d.seq_id for d in with_refine.positive] == exact.seq_ids[order[:top_k]].tolist()
        assert [d.seq_id for d in with_refine.negative] == exact.seq_ids[order[::-1][:top_k]].tolist()
        for d in with_refine.documents:  # re-ranked scores are the full scan's
            assert d.score == pytest.approx(exact.scores[qi, d.seq_id], rel=1e-4, abs=1e-7)
            assert sum(d.token_scores) == pytest.approx(d.score, rel=1e-3, abs=1e-7)
        # the bound separates nearly every candidate: far fewer exact re-ranks than on the sketch's noise
        assert with_refine.num_candidates < with_sketch.num_candidates
        assert with_refine.num_candidates <= 2 * top_k + 4
    # asked not to, the engine stands on the sketch store alone
    plain = refined.query(QUERIES[:1], QueryArgs(top_k=top_k, candidates=everything, refine=False))[0]
    assert plain.refined == 0 and with_sketch.refined == 0 < with_refine.refined
    assert [d.seq_id for d in plain.positive] == [d.seq_id for d in refined.query(QUERIES[:1])[0].positive]


def test_refine_rows_are_read_only_while_a_candidate_can_enter_the_top_k(refine_index, exact):
    engine = QueryEngine(refine_index, QueryArgs(top_k=2))
    read = []
    scores = engine.refine.scores
    engine.refine.scores = lambda queries, ids: read.append(len(ids)) or scores(queries, ids)
    everything = len(exact.seq_ids)
    try:
        for qi, query in enumerate(QUERIES):
            read.clear()
            (adaptive,) = engine.query([query], QueryArgs(top_k=2, candidates=everything))
            rows_read = sum(read)
            read.clear()  # a margin no sketch score can fall outside of: every candidate's row is read
            (every,) = engine.query([query], QueryArgs(top_k=2, candidates=everything, stop_margin=1e9))
            assert sum(read) == 2 * everything > rows_read == adaptive.refined  # the result counts the rows read
            assert [d.seq_id for d in adaptive.documents] == [d.seq_id for d in every.documents]
            order = np.argsort(-exact.scores[qi], kind="stable")
            assert [d.seq_id for d in adaptive.positive] == exact.seq_ids[order[:2]].tolist()
    finally:
        del engine.refine.scores


def test_default_depth_is_deeper_on_a_refine_tier():
    from influence.arguments import DEFAULT_CANDIDATES, REFINE_CANDIDATES

    assert QueryArgs().depth(refines=False) == DEFAULT_CANDIDATES < QueryArgs().depth(refines=True) == REFINE_CANDIDATES
    assert QueryArgs(candidates=30).depth(refines=True) == 30  # as asked, whatever the tiers
    assert QueryArgs(top_k=5000).depth(refines=False) == 5000  # never fewer than the documents returned
    with pytest.raises(InfluenceError, match="candidates must be a positive integer"):
        QueryArgs(candidates=0)


def test_without_the_rerank_the_refine_tier_orders_the_answer(refine_index, exact):
    engine = QueryEngine(refine_index, QueryArgs(top_k=3, candidates=len(exact.seq_ids), rerank=False))
    for qi, result in enumerate(engine.query(QUERIES)):
        assert not result.exact and result.num_candidates == 0
        order = np.argsort(-exact.scores[qi], kind="stable")
        assert [d.seq_id for d in result.positive] == exact.seq_ids[order[:3]].tolist()
        for d in result.documents:
            assert d.score == pytest.approx(exact.scores[qi, d.seq_id], rel=2e-3)


@pytest.fixture(scope="module")
def index_without_refine(llama_dir, ekfac_dir, corpus_dir, tmp_path_factory):
    return build_index(llama_dir, ekfac_dir, corpus_dir, tmp_path_factory.mktemp("plain") / "index",
                       IndexArgs(progress=False, sketch_dim=256))


def test_an_index_without_refine_tier_has_none(index_without_refine):
    assert load_refine_store(index_without_refine) is None
    assert not (index_without_refine / "refine.npy").exists()


def test_resuming_with_another_refine_setting_is_refused(llama_dir, ekfac_dir, corpus_dir, index_without_refine):
    with pytest.raises(InfluenceError, match="refine"):
        build_index(llama_dir, ekfac_dir, corpus_dir, index_without_refine, IndexArgs(progress=False, sketch_dim=256, refine=True))


def test_shards_that_disagree_on_the_refine_tier_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    sketches = rng.standard_normal((6, 8)).astype(np.float32)
    rows = pa.table({"seq_id": pa.array(np.arange(6), pa.int64())})
    refine, scales = encode_refine(rng.standard_normal((3, 5)))
    write_sketch_shard(tmp_path, 0, 2, sketches[:3], rows.slice(0, 3).append_column("refine_scale", pa.array(scales)), refine)
    write_sketch_shard(tmp_path, 1, 2, sketches[3:], rows.slice(3, 3).append_column("refine_scale", pa.array(scales)))
    with pytest.raises(InfluenceError, match="disagree on the refine tier"):
        merge_sketch_shards(tmp_path, 2, progress=False)
    with pytest.raises(InfluenceError, match="float16"):
        write_sketch_shard(tmp_path, 1, 2, sketches[3:], rows.slice(3, 3).append_column("refine_scale", pa.array(scales)),
                           refine.astype(np.float32))


def test_refine_is_refused_for_gradients_too_large_to_store(llama_dir, ekfac_dir, corpus_dir, tmp_path, monkeypatch):
    import indexes.build as build

    monkeypatch.setattr(build, "REFINE_MAX_NUMBERS", 100)  # the tiny model tracks 576
    with pytest.raises(InfluenceError, match="--refine would store .* numbers"):
        build_index(llama_dir, ekfac_dir, corpus_dir, tmp_path / "index", IndexArgs(progress=False, refine=True))
    assert not (tmp_path / "index").exists()
    monkeypatch.setattr(build, "REFINE_MAX_NUMBERS", 1 << 22)
    monkeypatch.setattr(build, "REFINE_MAX_SHARD_BYTES", 2 * 576 * 10)  # ten documents' refine rows per task
    with pytest.raises(InfluenceError, match="pass --shard-size 10 or less"):
        build_index(llama_dir, ekfac_dir, corpus_dir, tmp_path / "index", IndexArgs(progress=False, refine=True, shard_size=11))
