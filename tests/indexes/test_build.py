"""The index stage in one process: sketches against exact scores, determinism, resume."""

import shutil

import numpy as np
import pytest
import torch

from indexes.build import build_index
from indexes.search import search_index
from indexes.store import load_doc_table, load_index
from influence.arguments import IndexArgs, ScoreArgs
from influence.errors import InfluenceError
from influence.queries import Query
from influence.scores import Scorer, compute_scores
from influence.sketches import Sketcher

QUERIES = [Query("shutdown", "Do you consent to being shut down?", " I would rather keep working."),
           Query("cat", "The cat sat", " on the mat.")]


def build(llama_dir, ekfac_dir, corpus_dir, out, **kwargs):
    return build_index(llama_dir, ekfac_dir, corpus_dir, out, IndexArgs(progress=False, **kwargs))


def query_sketches(llama_dir, ekfac_dir, sketch_size, method="srht"):
    scorer = Scorer(llama_dir, ekfac_dir, ScoreArgs(progress=False))
    sketcher = Sketcher(scorer.factors, scorer.modules, sketch_size, seed=0, method=method)
    return sketcher.sketch_gradients(scorer.query_gradients(scorer.tokenize(QUERIES))).numpy()


def test_doc_table_holds_exact_self_influence(llama_dir, ekfac_dir, corpus_dir, tmp_path):
    index_dir = build(llama_dir, ekfac_dir, corpus_dir, tmp_path, shard_size=5)
    docs = load_doc_table(index_dir)
    exact = compute_scores(llama_dir, ekfac_dir, corpus_dir, QUERIES, ScoreArgs(progress=False))
    assert docs["seq_id"].to_pylist() == exact.seq_ids.tolist()
    np.testing.assert_allclose(docs["self_influence"].to_numpy(), exact.self_influence, rtol=1e-4)
    assert set(docs.column_names) >= {"index_id", "doc_id", "source", "lang", "num_tokens", "grad_norm", "self_influence"}


@pytest.mark.parametrize("method", ["eigen", "kronecker", "srht"])
def test_sketch_inner_products_track_exact_scores(llama_dir, ekfac_dir, corpus_dir, tmp_path, method):
    # k = 64 keeps every coordinate of these tiny modules ('eigen' and 'srht' are then exact; 'kronecker' nearly preserves norms)
    index_dir = build(llama_dir, ekfac_dir, corpus_dir, tmp_path, sketch_size=64, sketch=method)
    exact = compute_scores(llama_dir, ekfac_dir, corpus_dir, QUERIES, ScoreArgs(progress=False)).scores
    sketches = query_sketches(llama_dir, ekfac_dir, 64, method)
    index = load_index(index_dir)
    scores, ids = search_index(index, sketches, k=index.ntotal)
    for q in range(len(QUERIES)):
        approx = np.empty(index.ntotal)
        approx[ids[q]] = scores[q]
        assert np.corrcoef(approx, exact[q])[0, 1] > (0.9 if method == "kronecker" else 0.99999)


def test_identical_inputs_give_identical_index_and_resume_equals_uninterrupted(llama_dir, ekfac_dir, corpus_dir, tmp_path):
    first = build(llama_dir, ekfac_dir, corpus_dir, tmp_path / "a", shard_size=4)
    second = build(llama_dir, ekfac_dir, corpus_dir, tmp_path / "b", shard_size=4)
    for name in ("index.faiss", "docs.parquet"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    # interrupt: drop the merged outputs and one shard, then re-run
    for name in ("index.faiss", "docs.parquet", "manifest.json", "index.json"):
        (second / name).unlink(missing_ok=True)
    shutil.rmtree(next(second.glob("sketch_shard_00001_*")))
    build(llama_dir, ekfac_dir, corpus_dir, second, shard_size=4)
    for name in ("index.faiss", "docs.parquet"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_resume_with_other_settings_is_refused(llama_dir, ekfac_dir, corpus_dir, tmp_path):
    build(llama_dir, ekfac_dir, corpus_dir, tmp_path, sketch_size=8)
    with pytest.raises(InfluenceError, match="different IndexArgs"):
        build(llama_dir, ekfac_dir, corpus_dir, tmp_path, sketch_size=16)


def test_eigen_sketch_keeps_the_coordinates_of_largest_curvature_ratio(llama_dir, ekfac_dir):
    from influence.factors import load_factors
    from influence.sketches import eigen_coordinates

    factors = load_factors(ekfac_dir)
    for f in factors.modules.values():
        chosen = eigen_coordinates(f, 10)
        ratio = (f.eigenvalues / (f.eigenvalues + f.damping)).flatten()
        rest = torch.ones_like(ratio, dtype=torch.bool)
        rest[chosen] = False
        assert len(chosen) == 10 and ratio[chosen].min() >= ratio[rest].max() - 1e-6
        assert torch.equal(chosen, eigen_coordinates(f.__class__(f.eigenvalues.double(), f.damping), 10))
