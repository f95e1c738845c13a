"""The hashed sketch against its explicit matrix and exact inner products; the two-sided searches against brute force."""

import faiss
import numpy as np
import pytest
import torch

from indexes.codes import SketchStore, encode_sketches
from indexes.search import search_both_signs, search_index
from influence.factors import load_factors
from influence.gradients import capture_module_io, make_token_batch
from influence.models import ModelSpec, load_model_context, load_tokenizer
from influence.preconditioner import precondition, whiten
from influence.queries import Query, tokenize_query
from influence.scores import query_gradients
from influence.sketches import Sketcher, bucket_and_sign, buckets, hash_seed
from tests.conftest import TEXTS

QUERIES = [Query("a", "The cat sat", " on the mat."), Query("b", "Hello", " there.")]


def parts(llama_dir, ekfac_dir, dtype="float32"):
    loaded = load_model_context(ModelSpec(str(llama_dir), dtype))
    factors = load_factors(ekfac_dir).to(torch.float64 if dtype == "float64" else torch.float32)
    tokenizer = load_tokenizer(llama_dir)
    gradients = query_gradients(loaded, [tokenize_query(q, tokenizer) for q in QUERIES])
    return loaded, factors, gradients


def explicit_matrix(name: str, size: int, dim: int, seed: int) -> torch.Tensor:
    """The count sketch of one module as a dense (dim, size) matrix: column j holds sign(j) in row bucket(j)."""
    buckets, signs = bucket_and_sign(name, size, dim, seed)
    matrix = torch.zeros(dim, size, dtype=torch.float64)
    matrix[buckets, torch.arange(size)] = signs.double()
    return matrix


def test_hashes_are_deterministic_in_range_and_differ_by_module():
    buckets, signs = bucket_and_sign("model.layers.0.mlp.up_proj", 5000, 96, seed=3)
    again, again_signs = bucket_and_sign("model.layers.0.mlp.up_proj", 5000, 96, seed=3)
    assert torch.equal(buckets, again) and torch.equal(signs, again_signs)
    assert buckets.min() >= 0 and buckets.max() < 96 and set(signs.tolist()) == {-1, 1}
    counts = torch.bincount(buckets, minlength=96).double()
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean(), "buckets are close to uniform"
    assert abs(float(signs.double().mean())) < 0.05
    other, _ = bucket_and_sign("model.layers.1.mlp.up_proj", 5000, 96, seed=3)
    reseeded, _ = bucket_and_sign("model.layers.0.mlp.up_proj", 5000, 96, seed=4)
    assert (other != buckets).float().mean() > 0.9 and (reseeded != buckets).float().mean() > 0.9


@pytest.mark.parametrize("dim", [64, 96])
def test_buckets_of_any_range_are_the_whole_modules_and_the_floor_remainder(dim):
    name = "model.layers.0.mlp.up_proj"
    whole = buckets(name, 0, 5000, dim, seed=3)
    j = torch.arange(5000, dtype=torch.int64)
    # the multiply-shift hash as first written (indexes built then must keep answering queries hashed now)
    expected = torch.remainder((j * hash_seed(3, name, "bucket-a") + hash_seed(3, name, "bucket-b")) >> 31, dim)
    assert torch.equal(whole, expected) and torch.equal(bucket_and_sign(name, 5000, dim, seed=3)[0], expected)
    assert torch.equal(torch.cat([buckets(name, 0, 1234, dim, 3), buckets(name, 1234, 5000, dim, 3)]), whole)


@pytest.mark.parametrize("block_numbers", [1 << 20, 50])  # one block per module; many (a few rows each)
def test_sketch_equals_the_explicit_count_sketch_of_the_whitened_gradient(llama_dir, ekfac_dir, monkeypatch, block_numbers):
    import influence.gradients

    monkeypatch.setattr(influence.gradients, "BLOCK_NUMBERS", block_numbers)
    loaded, factors, gradients = parts(llama_dir, ekfac_dir, "float64")
    names = [m.name for m in loaded.modules]
    sketcher = Sketcher(factors, names, dim=40, seed=1)
    sketches, norms = sketcher.sketch_gradients(gradients)
    expected = 0
    for name in names:
        whitened = whiten(gradients[name], factors.modules[name]).flatten(1)  # (queries, D)
        expected = expected + whitened @ explicit_matrix(name, whitened.shape[1], 40, 1).T
    torch.testing.assert_close(sketches.double(), expected, rtol=1e-5, atol=1e-6)
    # the training side (from captured a and s) is the same linear map
    tokenizer = load_tokenizer(llama_dir)
    sequences = [tokenizer(t)["input_ids"][:20] for t in TEXTS[:4]]
    io, _ = capture_module_io(loaded.model, loaded.modules, make_token_batch(sequences))
    batch = sketcher.sketch_io(io)
    for row, ids in enumerate(sequences):
        single, _ = capture_module_io(loaded.model, loaded.modules, make_token_batch([ids]))
        full = {name: torch.einsum("bto,bti->boi", s, a) for name, (a, s) in single.items()}
        alone, norm = sketcher.sketch_gradients(full)
        torch.testing.assert_close(batch.sketches[row].double(), alone[0].double(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(batch.self_influence[row].item(), norm[0] ** 2, rtol=1e-8)
        grad_norm = sum(g.pow(2).sum() for g in full.values()).sqrt()
        np.testing.assert_allclose(batch.gradient_norm[row].item(), grad_norm.item(), rtol=1e-8)


@pytest.mark.parametrize("dim,dtype,block_numbers", [(64, "float32", 1 << 20), (96, "float64", 50), (40, "float32", 300)])
def test_cpu_kernel_equals_the_torch_operations(llama_dir, ekfac_dir, monkeypatch, dim, dtype, block_numbers):
    """`kernels.whiten_and_hash` (one numba pass) against torch's norms, multiply and index_add_ (the GPU's path)."""
    import influence.gradients
    import influence.sketches

    monkeypatch.setattr(influence.gradients, "BLOCK_NUMBERS", block_numbers)
    loaded, factors, _ = parts(llama_dir, ekfac_dir, dtype)
    sketcher = Sketcher(factors, [m.name for m in loaded.modules], dim=dim, seed=5)
    tokenizer = load_tokenizer(llama_dir)
    io, _ = capture_module_io(loaded.model, loaded.modules, make_token_batch([tokenizer(t)["input_ids"][:20] for t in TEXTS[:5]]))
    io = {name: (a.to(factors.modules[name].eigenvalues.dtype), s.to(factors.modules[name].eigenvalues.dtype)) for name, (a, s) in io.items()}
    kernel = sketcher.sketch_io(io, whitened=True)
    monkeypatch.setattr(influence.sketches, "CPU_KERNEL", False)
    reference = sketcher.sketch_io(io, whitened=True)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kernel.sketches, reference.sketches, **tolerance)
    torch.testing.assert_close(kernel.whitened, reference.whitened, rtol=0, atol=0)
    torch.testing.assert_close(kernel.self_influence, reference.self_influence, **tolerance)
    torch.testing.assert_close(kernel.gradient_norm, reference.gradient_norm, **tolerance)
    assert kernel.sketches.abs().sum() > 0 and (kernel.sketches != 0).float().mean() > 0.5


def test_sketch_inner_products_are_unbiased_with_the_stated_noise(llama_dir, ekfac_dir):
    loaded, factors, gradients = parts(llama_dir, ekfac_dir, "float64")
    names = [m.name for m in loaded.modules]
    exact = sum((gradients[n][0] * precondition(gradients[n][1], factors.modules[n])).sum() for n in names).item()
    estimates, noise = [], None
    for seed in range(300):
        sketcher = Sketcher(factors, names, dim=32, seed=seed)
        sketches, norms = sketcher.sketch_gradients(gradients)
        estimates.append(float(sketches[0].double() @ sketches[1].double()))
        noise = sketcher.noise_scale(norms[0], norms[1])
    estimates = np.asarray(estimates)
    assert abs(estimates.mean() - exact) < 4 * estimates.std() / np.sqrt(len(estimates))
    assert estimates.std() < 1.5 * noise, (estimates.std(), noise)  # the bound the adaptive re-rank relies on


def test_query_norms_are_the_square_root_of_g_preconditioned_g(llama_dir, ekfac_dir):
    loaded, factors, gradients = parts(llama_dir, ekfac_dir)
    sketcher = Sketcher(factors, [m.name for m in loaded.modules], 64, seed=0)
    _, norms = sketcher.sketch_gradients(gradients)
    expected = sum((gradients[m.name] * precondition(gradients[m.name], factors.modules[m.name])).double().sum((1, 2))
                   for m in loaded.modules).sqrt().numpy()  # ||W(g)||^2 = g^T (F + lambda I)^-1 g
    np.testing.assert_allclose(norms, expected, rtol=1e-4)


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


@pytest.mark.parametrize("num_queries", [1, 4, 6, 9])  # FAISS's 4-bit scalar quantizer up to 4 queries, the GEMMs above
def test_store_scan_equals_brute_force_over_the_stored_rows(monkeypatch, num_queries):
    import indexes.search as search

    monkeypatch.setattr(search, "_SCAN_BLOCK", 97)  # many blocks, one partial
    monkeypatch.setattr(search, "_SCAN_CHUNK", 300)  # and several chunks: the running top-k across chunks
    rng = np.random.default_rng(1)
    sketches = rng.standard_normal((1000, 25)) * rng.uniform(0.1, 10, (1000, 1))  # an odd dimension: one padded nibble
    store = SketchStore(*encode_sketches(sketches), 25)
    queries = rng.standard_normal((num_queries, 25)).astype(np.float32)
    (high, high_ids), (low, low_ids) = search_both_signs(store, queries, 15)
    stored = store.decode(slice(None)).astype(np.float64)
    scores = queries.astype(np.float64) @ stored.T  # (q, n)
    for found, got, sign in ((high_ids, high, 1.0), (low_ids, low, -1.0)):
        # float32 on both paths: the exact order and scores, whichever path a number of queries takes
        exact = np.argsort(-sign * scores, axis=1, kind="stable")[:, :15]
        np.testing.assert_array_equal(found, exact)
        np.testing.assert_allclose(got, np.take_along_axis(scores, exact, 1), rtol=1e-5, atol=1e-5)
        assert (np.diff(sign * got, axis=1) <= 0).all()  # best first
    # and a query's scores do not depend on the queries scanned with it
    (alone_high, alone_ids), _ = search_both_signs(store, queries[-1:], 15)
    np.testing.assert_array_equal(alone_ids[0], high_ids[-1])
    np.testing.assert_allclose(alone_high[0], high[-1], rtol=1e-6, atol=1e-6)
