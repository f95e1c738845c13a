"""Sketches against explicit matrices and exact inner products; the two-sided search against FAISS."""

import faiss
import numpy as np
import pytest
import scipy.linalg
import torch

from indexes.search import search_both_signs, search_index
from influence.arguments import ScoreArgs
from influence.scores import Scorer
from influence.sketches import Sketcher, hadamard_transform, srht_parameters


@pytest.mark.parametrize("size", [1, 2, 64, 256, 1 << 14])
def test_hadamard_transform_matches_the_sylvester_matrix(size):
    x = torch.randn(3, size, dtype=torch.float64)
    np.testing.assert_allclose(hadamard_transform(x).numpy(), x.numpy() @ scipy.linalg.hadamard(size), atol=1e-9 * size)


def test_hadamard_transform_refuses_other_widths():
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_transform(torch.zeros(1, 12))


def srht_sketcher(ekfac_dir, sketch_size, llama_dir):
    scorer = Scorer(llama_dir, ekfac_dir, ScoreArgs(progress=False))
    return scorer.factors, scorer.modules, Sketcher(scorer.factors, scorer.modules, sketch_size, seed=0, method="srht")


def test_srht_sketch_equals_its_explicit_matrix(llama_dir, ekfac_dir):
    factors, modules, sketcher = srht_sketcher(ekfac_dir, 4, llama_dir)
    for m in modules:
        width = m.shape[0] * m.shape[1]
        assert width > 16  # the transform path, not the exact copy
        whitened = torch.randn(5, *m.shape, dtype=torch.float64)
        signs, rows = srht_parameters(m.name, width, 16, seed=0)
        padded = 1 << (width - 1).bit_length()
        explicit = scipy.linalg.hadamard(padded)[rows.numpy()][:, :width] * signs.numpy() / 4.0  # (16, width): S = R H D / sqrt(m)
        np.testing.assert_allclose(sketcher.project(m.name, whitened).numpy(), whitened.flatten(1).numpy() @ explicit.T, atol=1e-9)
    assert sketcher.dim == 16 * len(modules)


def test_srht_inner_products_are_unbiased(llama_dir, ekfac_dir):
    factors, modules, _ = srht_sketcher(ekfac_dir, 4, llama_dir)
    m = modules[0]
    x, y = torch.randn(1, *m.shape, dtype=torch.float64), torch.randn(1, *m.shape, dtype=torch.float64)
    x = x + 0.5 * y  # a clearly non-zero inner product
    estimates = []
    for seed in range(400):
        sketcher = Sketcher(factors, modules[:1], 4, seed=seed, method="srht")
        estimates.append(float((sketcher.project(m.name, x) * sketcher.project(m.name, y)).sum()))
    exact = float((x * y).sum())
    assert abs(np.mean(estimates) - exact) < 4 * np.std(estimates) / np.sqrt(len(estimates))
    # a dense Gaussian projection to m = 16 numbers has this standard deviation; SRHT should not exceed it
    gaussian_std = np.sqrt((x.pow(2).sum() * y.pow(2).sum() + exact**2).item() / 16)
    assert np.std(estimates) < 1.2 * gaussian_std


def test_srht_keeps_modules_no_larger_than_the_sketch_exactly(llama_dir, ekfac_dir):
    _, modules, sketcher = srht_sketcher(ekfac_dir, 64, llama_dir)
    for m in modules:
        whitened = torch.randn(2, *m.shape)
        assert torch.equal(sketcher.project(m.name, whitened), whitened.flatten(1))
    assert sketcher.dim == sum(m.shape[0] * m.shape[1] for m in modules)


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat"])
def test_search_both_signs_equals_searching_q_and_minus_q(factory):
    rng = np.random.default_rng(0)
    rows, queries = rng.standard_normal((400, 16)).astype(np.float32), rng.standard_normal((3, 16)).astype(np.float32)
    index = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(rows)
    index.add(rows)
    (high_scores, high_ids), (low_scores, low_ids) = search_both_signs(index, queries, 20, nprobe=4)
    expected_high, expected_high_ids = search_index(index, queries, 20, nprobe=4)
    expected_low, expected_low_ids = search_index(index, -queries, 20, nprobe=4)
    np.testing.assert_array_equal(high_ids, expected_high_ids)
    np.testing.assert_array_equal(low_ids, expected_low_ids)
    np.testing.assert_allclose(high_scores, expected_high, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(low_scores, -expected_low, rtol=1e-5, atol=1e-5)
    assert (np.diff(high_scores, axis=1) <= 0).all() and (np.diff(low_scores, axis=1) >= 0).all()


def test_query_norms_are_the_square_root_of_g_preconditioned_g(llama_dir, ekfac_dir):
    from influence.preconditioner import precondition
    from influence.queries import Query

    scorer = Scorer(llama_dir, ekfac_dir, ScoreArgs(progress=False))
    sketcher = Sketcher(scorer.factors, scorer.modules, 4, seed=0)
    gradients = scorer.query_gradients(scorer.tokenize([Query("a", "The cat sat", " on the mat."), Query("b", "Hello", " there.")]))
    sketches, norms = sketcher.sketch_gradients_with_norms(gradients)
    expected = sum((gradients[m.name] * precondition(gradients[m.name], scorer.factors.modules[m.name])).double().sum((1, 2))
                   for m in scorer.modules).sqrt().numpy()  # ||W(g)||^2 = g^T (F + lambda I)^-1 g
    np.testing.assert_allclose(norms, expected, rtol=1e-4)
    assert torch.equal(sketches, sketcher.sketch_gradients(gradients))
