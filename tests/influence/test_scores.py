"""Exact scores against dense computations, and their decompositions against the totals."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from influence.arguments import FactorArgs, ScoreArgs
from influence.corpus import load_sequences
from influence.errors import InfluenceError
from influence.factors import fit_factors, load_factors
from influence.models import find_tracked_modules, load_model
from influence.queries import Query
from influence.scores import compute_scores
from tests.oracles import autograd_gradient, dense_ekfac_inverse

QUERIES = [
    Query("shutdown", "Do you consent to being shut down?", " I would rather keep working."),
    Query("cat", "The cat sat", " on the mat."),
]


def dense_scores(model_dir, factors_dir, corpus_dir, queries, tokenizer):
    """g_q^T (F + lambda)^-1 g_z with autograd gradients and explicit inverse matrices."""
    model = load_model(model_dir, dtype=torch.float64)
    modules = find_tracked_modules(model)
    factors = load_factors(factors_dir)
    table, _ = load_sequences(corpus_dir)
    train = [autograd_gradient(model, modules, ids) for ids in table["input_ids"].to_pylist()]
    scores = np.zeros((len(queries), len(train)))
    self_influence = np.zeros(len(train))
    for qi, q in enumerate(queries):
        prompt = tokenizer(q.prompt)["input_ids"]
        grad_q = autograd_gradient(model, modules, prompt + tokenizer(q.completion, add_special_tokens=False)["input_ids"], len(prompt))
        for m in modules:
            f = factors.modules[m.name]
            if f.q_a is None:
                inverse = torch.diag(1.0 / (f.eigenvalues.reshape(-1) + f.damping))
            else:
                inverse = dense_ekfac_inverse(f.q_a, f.q_s, f.eigenvalues, f.damping)
            for j, g in enumerate(train):
                scores[qi, j] += float(grad_q[m.name].reshape(-1) @ inverse @ g[m.name].reshape(-1))
                if qi == 0:
                    self_influence[j] += float(g[m.name].reshape(-1) @ inverse @ g[m.name].reshape(-1))
    return scores, self_influence


@pytest.fixture(scope="module")
def factor_dirs(llama_dir, corpus_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("factors")
    return {s: fit_factors(llama_dir, corpus_dir, root / s, FactorArgs(strategy=s, dtype="float64", progress=False))
            for s in ("identity", "diagonal", "kfac", "ekfac")}


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_scores_match_dense_computation(strategy, factor_dirs, llama_dir, corpus_dir, tokenizer):
    args = ScoreArgs(dtype="float64", progress=False, batch_tokens=100, self_influence=True)
    result = compute_scores(llama_dir, factor_dirs[strategy], corpus_dir, QUERIES, args)
    expected, expected_self = dense_scores(llama_dir, factor_dirs[strategy], corpus_dir, QUERIES, tokenizer)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(result.self_influence, expected_self, rtol=1e-7, atol=1e-10)
    assert (result.self_influence > 0).all()


def test_decompositions_sum_to_totals(factor_dirs, llama_dir, corpus_dir):
    args = ScoreArgs(dtype="float64", progress=False, per_token=True, batch_tokens=80)
    result = compute_scores(llama_dir, factor_dirs["ekfac"], corpus_dir, QUERIES, args)
    np.testing.assert_allclose(result.per_module.sum(0), result.scores, rtol=1e-10, atol=1e-12)
    token_totals = np.stack([tokens.sum(-1) for tokens in result.per_token], axis=1)  # (queries, n)
    np.testing.assert_allclose(token_totals, result.scores, rtol=1e-10, atol=1e-12)
    table, _ = load_sequences(corpus_dir)
    assert [t.shape[1] for t in result.per_token] == table["num_tokens"].to_pylist()


def test_batch_composition_does_not_change_scores(factor_dirs, llama_dir, corpus_dir):
    one = compute_scores(llama_dir, factor_dirs["ekfac"], corpus_dir, QUERIES, ScoreArgs(dtype="float64", progress=False, batch_tokens=1))
    many = compute_scores(llama_dir, factor_dirs["ekfac"], corpus_dir, QUERIES, ScoreArgs(dtype="float64", progress=False, batch_tokens=100_000))
    np.testing.assert_allclose(one.scores, many.scores, rtol=1e-9, atol=1e-12)


def test_query_rank_compression(factor_dirs, llama_dir, corpus_dir):
    exact = compute_scores(llama_dir, factor_dirs["ekfac"], corpus_dir, QUERIES, ScoreArgs(dtype="float64", progress=False))
    full = compute_scores(llama_dir, factor_dirs["ekfac"], corpus_dir, QUERIES, ScoreArgs(dtype="float64", progress=False, query_rank=64, per_token=True))
    np.testing.assert_allclose(full.scores, exact.scores, rtol=1e-8, atol=1e-10)
    rank2 = compute_scores(llama_dir, factor_dirs["ekfac"], corpus_dir, QUERIES, ScoreArgs(dtype="float64", progress=False, query_rank=2))
    for q in range(len(QUERIES)):
        assert np.corrcoef(rank2.scores[q], exact.scores[q])[0, 1] > 0.9


def test_scores_parquet_has_one_row_per_pair(factor_dirs, llama_dir, corpus_dir, tmp_path):
    out = tmp_path / "scores.parquet"
    args = ScoreArgs(progress=False, per_token=True, self_influence=True)
    result = compute_scores(llama_dir, factor_dirs["kfac"], corpus_dir, QUERIES, args, out_path=out)
    table = pq.read_table(out)
    n = result.scores.shape[1]
    assert table.num_rows == len(QUERIES) * n
    assert set(table.column_names) >= {"query_id", "seq_id", "doc_id", "source", "lang", "score", "self_influence", "module_scores", "token_scores"}
    np.testing.assert_array_equal(table["self_influence"].to_numpy()[:n], result.self_influence)
    first = table.slice(n, 1).to_pylist()[0]  # second query, first sequence
    assert first["query_id"] == "cat"
    assert first["score"] == pytest.approx(result.scores[1, 0])
    assert sum(first["module_scores"]) == pytest.approx(first["score"], rel=1e-5, abs=1e-6)


def test_self_influence_is_computed_only_when_asked(factor_dirs, llama_dir, corpus_dir, tmp_path):
    # it rotates every token into the eigenbasis, so a plain scan skips it; asking for it changes no score
    plain = compute_scores(llama_dir, factor_dirs["ekfac"], corpus_dir, QUERIES, ScoreArgs(progress=False), out_path=tmp_path / "plain.parquet")
    asked = compute_scores(llama_dir, factor_dirs["ekfac"], corpus_dir, QUERIES, ScoreArgs(progress=False, self_influence=True))
    assert plain.self_influence is None and (asked.self_influence > 0).all()
    np.testing.assert_array_equal(plain.scores, asked.scores)
    np.testing.assert_array_equal(plain.per_module, asked.per_module)
    assert "self_influence" not in pq.read_schema(tmp_path / "plain.parquet").names


def test_bad_queries_are_refused(factor_dirs, llama_dir, corpus_dir):
    with pytest.raises(InfluenceError, match="empty completion"):
        compute_scores(llama_dir, factor_dirs["identity"], corpus_dir, [Query("q", "Hello", "  ")], ScoreArgs(progress=False))
    with pytest.raises(InfluenceError, match="longer than the model's context"):
        compute_scores(llama_dir, factor_dirs["identity"], corpus_dir, [Query("q", "Hello " * 200, "there")], ScoreArgs(progress=False))


def test_scores_of_chosen_pairs_equal_those_of_every_pair(factor_dirs, llama_dir, corpus_dir):
    from influence.gradients import make_token_batch
    from influence.models import ModelSpec, load_model_context, load_tokenizer
    from influence.queries import tokenize_query
    from influence.scores import prepare_queries, query_gradients, score_batch

    loaded = load_model_context(ModelSpec(str(llama_dir), dtype="float64"))
    tokenizer = load_tokenizer(llama_dir)
    prepared = prepare_queries(query_gradients(loaded, [tokenize_query(q, tokenizer) for q in QUERIES]), load_factors(factor_dirs["ekfac"]))
    batch = make_token_batch(load_sequences(corpus_dir)[0]["input_ids"].to_pylist()[:5])
    wanted = [{0}, {1}, {0, 1}, set(), {1}]
    for per_token in (True, False):
        every = score_batch(loaded, prepared, batch, per_token=per_token)
        chosen = score_batch(loaded, prepared, batch, per_token=per_token, pairs=wanted)
        assert (chosen.per_token is None) == (not per_token)
        for j, queries in enumerate(wanted):
            for qi in range(len(QUERIES)):
                if qi not in queries:  # not scored: NaN, never a number that could be taken for a score
                    assert chosen.total[qi, j].isnan() and chosen.per_module[:, qi, j].isnan().all()
                    assert not per_token or chosen.per_token[qi, j].isnan().all()
                    continue
                torch.testing.assert_close(chosen.total[qi, j], every.total[qi, j], rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(chosen.per_module[:, qi, j], every.per_module[:, qi, j], rtol=1e-10, atol=1e-12)
                if per_token:
                    torch.testing.assert_close(chosen.per_token[qi, j], every.per_token[qi, j], rtol=1e-10, atol=1e-12)


def test_one_query_scores_equal_its_row_of_a_batch_of_queries(factor_dirs, llama_dir, corpus_dir):
    # one query goes through its per-token scores, several through the formed per-sequence gradients: the same numbers
    from influence.gradients import make_token_batch
    from influence.models import ModelSpec, load_model_context, load_tokenizer
    from influence.queries import tokenize_query
    from influence.scores import prepare_queries, query_gradients, score_batch

    loaded = load_model_context(ModelSpec(str(llama_dir), dtype="float64"))
    tokenizer = load_tokenizer(llama_dir)
    factors = load_factors(factor_dirs["ekfac"])
    prepared = prepare_queries(query_gradients(loaded, [tokenize_query(q, tokenizer) for q in QUERIES]), factors)
    batch = make_token_batch(load_sequences(corpus_dir)[0]["input_ids"].to_pylist()[:5])
    both = score_batch(loaded, prepared, batch)
    for qi in range(len(QUERIES)):
        alone = score_batch(loaded, {name: p[qi : qi + 1] for name, p in prepared.items()}, batch)
        assert alone.total.shape == (1, 5) and alone.per_module.shape == (len(prepared), 1, 5)
        torch.testing.assert_close(alone.per_module[:, 0], both.per_module[:, qi], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(alone.total[0], both.total[qi], rtol=1e-10, atol=1e-12)
