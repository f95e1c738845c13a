"""The first tier: folded sketches are sketches, the tiered search equals the exact scan at full depth, and an index with
a first tier answers queries like a full exact scan."""

import faiss
import numpy as np
import pytest
import torch

from indexes.build import build_index, first_tier_factory
from indexes.engine import QueryEngine
from indexes.codes import SketchStore, encode_sketches
from indexes.search import fold, tiered_both_signs
from influence.arguments import IndexArgs, QueryArgs, ScoreArgs
from influence.factors import load_factors
from influence.queries import Query
from influence.scores import compute_scores
from influence.sketches import Sketcher

QUERIES = [Query("shutdown", "Do you consent to being shut down?", " I would rather keep working.", "en"),
           Query("turkish", "Merhaba, nasılsın?", " Bugün hava çok güzel.", "tr")]


def test_a_folded_sketch_is_the_sketch_of_the_smaller_size(ekfac_dir):
    factors = load_factors(ekfac_dir).to(torch.float64)
    names = list(factors.modules)
    generator = torch.Generator().manual_seed(0)  # not the global stream: its state depends on the tests run before
    gradients = {n: torch.randn(3, *factors.modules[n].eigenvalues.shape, dtype=torch.float64, generator=generator) for n in names}
    big, _ = Sketcher(factors, names, 512, seed=2).sketch_gradients(gradients)
    small, _ = Sketcher(factors, names, 64, seed=2).sketch_gradients(gradients)
    # float32 sketches summed in another order: an entry that cancels to near zero keeps the rounding of its terms,
    # so the absolute tolerance follows the sketch's scale (an unseeded draw once left 1.3e-5 on an entry of -0.094)
    np.testing.assert_allclose(fold(big.numpy(), 64), small.numpy(), rtol=1e-5, atol=1e-6 * np.abs(small.numpy()).max())
    assert fold(big.numpy(), 4096).shape == (3, 512)  # nothing to fold


def test_tiered_search_at_full_depth_equals_the_scan():
    rng = np.random.default_rng(0)
    store = SketchStore(*encode_sketches(rng.standard_normal((600, 96)) * rng.uniform(0.5, 2, (600, 1))), 96)
    queries = rng.standard_normal((3, 96)).astype(np.float32)
    first = faiss.index_factory(32, "Flat", faiss.METRIC_INNER_PRODUCT)
    first.add(fold(store.decode(slice(None)), 32))
    got = tiered_both_signs(first, store, queries, 10, depth=600)
    exact = queries.astype(np.float64) @ store.decode(slice(None)).astype(np.float64).T  # (q, n)
    for (gs, gi), sign in zip(got, (1.0, -1.0)):
        want = np.argsort(-sign * exact, axis=1, kind="stable")[:, :10]
        np.testing.assert_array_equal(gi, want)
        np.testing.assert_allclose(gs, np.take_along_axis(exact, want, 1), rtol=1e-5)
    (shallow_scores, shallow_ids), _ = tiered_both_signs(first, store, queries, 10, depth=20)
    assert (np.diff(shallow_scores, axis=1) <= 0).all() and (shallow_ids >= 0).all()


def test_auto_first_tier_scans_small_corpora_and_compresses_large_ones():
    assert first_tier_factory("auto", 5_000, 256) == "none"
    assert first_tier_factory("auto", 1_000_000, 256) == "IVF1024,PQ32"
    assert first_tier_factory("HNSW32", 10, 256) == "HNSW32"


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_an_index_with_a_first_tier_answers_like_the_exact_scan(llama_dir, ekfac_dir, corpus_dir, tmp_path, factory):
    index_dir = build_index(llama_dir, ekfac_dir, corpus_dir, tmp_path / "index",
                            IndexArgs(progress=False, sketch_dim=512, factory=factory, fold_dim=64))
    assert (index_dir / "index.faiss").exists()
    exact = compute_scores(llama_dir, ekfac_dir, corpus_dir, QUERIES, ScoreArgs(progress=False))
    # every candidate re-ranked: the adaptive stop is a 2-sigma rule (a document whose sketch is 2.4 sigma off can be left
    # out, as with the factors of 51d6385), tested on its own; here the tier must hand over every sequence
    engine = QueryEngine(index_dir, QueryArgs(top_k=3, candidates=len(exact.seq_ids), nprobe=4, adaptive=False))
    for qi, result in enumerate(engine.query(QUERIES)):
        order = np.argsort(-exact.scores[qi], kind="stable")
        assert [d.seq_id for d in result.positive] == exact.seq_ids[order[:3]].tolist()
        assert [d.seq_id for d in result.negative] == exact.seq_ids[order[::-1][:3]].tolist()
