"""The sketch store against numpy brute force: shards, merge, load, search and the exact oracle."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from indexes import (
    SKETCH_SHARD_NAME,
    exact_topk,
    finished_shards,
    index_exists,
    iterate_shard_sketches,
    load_doc_table,
    load_index,
    load_sketch_store,
    merge_sketch_shards,
    search_index,
    sketch_shard_exists,
    write_sketch_shard,
)
from influence.errors import InfluenceError

NUM_ROWS, DIM, NUM_QUERIES, K = 1200, 32, 12, 10
# Uneven boundaries, one single-row shard: offsets that are off by one show up as wrong ids.
FOUR_SHARDS = (0, 500, 501, 900, NUM_ROWS)

# Approximate factories: (factory, search settings, least recall@10 against the exact top-10).
APPROXIMATE_CASES = {
    "ivf-all-lists": ("IVF16,Flat", {"nprobe": 16}, 1.0),
    "ivf-few-lists": ("IVF16,Flat", {"nprobe": 4}, 0.4),
    "hnsw": ("HNSW32", {"ef_search": 128}, 0.95),
    "ivf-pq": ("IVF8,PQ8x4", {"nprobe": 8}, 0.2),
}
# Factory -> FAISS thread counts of the two builds compared. PQ training with 2 threads is byte-identical
# too, but takes ~10 s on a busy 2-core machine (OpenMP barriers in every k-means step), so it runs on 1.
DETERMINISM_CASES = {
    "Flat": (1, 2),
    "IVF16,Flat": (1, 2),
    "HNSW32": (1, 2),
    "PCA16,IVF8,Flat": (1, 2),
    "IVF8,PQ8x4": (1, 1),
}


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """Tiny indexes build faster on one thread; tests that need more threads ask for them."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(previous)


@pytest.fixture(scope="module")
def corpus() -> tuple[np.ndarray, pa.Table, np.ndarray]:
    """Seeded sketches, their rows (shuffled seq ids and metadata) and queries."""
    rng = np.random.default_rng(0)
    sketches = rng.standard_normal((NUM_ROWS, DIM)).astype(np.float32)  # (n, d)
    rows = pa.table(
        {
            "seq_id": pa.array(rng.permutation(NUM_ROWS) + 10_000, pa.int64()),
            "doc_id": [f"doc-{i // 3}" for i in range(NUM_ROWS)],
            "lang": rng.choice(["en", "fr", "de"], NUM_ROWS).tolist(),
            "self_influence": rng.random(NUM_ROWS),
        }
    )
    queries = rng.standard_normal((NUM_QUERIES, DIM)).astype(np.float32)  # (q, d)
    return sketches, rows, queries


def brute_force(queries: np.ndarray, sketches: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The independent oracle: full float64 scores, full sort."""
    scores = queries.astype(np.float64) @ sketches.astype(np.float64).T  # (q, n)
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


def write_shards(index_dir: Path, sketches: np.ndarray, rows: pa.Table, bounds: tuple[int, ...]) -> int:
    num_shards = len(bounds) - 1
    for shard, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        write_sketch_shard(index_dir, shard, num_shards, sketches[start:stop], rows.slice(start, stop - start))
    return num_shards


def build(index_dir: Path, corpus, factory: str = "Flat", bounds=FOUR_SHARDS, **kwargs) -> Path:
    sketches, rows, _ = corpus
    num_shards = write_shards(index_dir, sketches, rows, bounds)
    merge_sketch_shards(index_dir, num_shards, factory, progress=False, **kwargs)
    return index_dir


def test_exact_topk_equals_numpy_sort(corpus):
    sketches, _, queries = corpus
    blocks = [sketches[a:b] for a, b in zip(FOUR_SHARDS[:-1], FOUR_SHARDS[1:])]
    scores, ids = exact_topk(queries, blocks, K)
    want_scores, want_ids = brute_force(queries, sketches, K)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (NUM_QUERIES, K)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)


def test_flat_search_equals_exact_topk_and_ids_map_to_rows(tmp_path, corpus):
    sketches, rows, queries = corpus
    index_dir = build(tmp_path, corpus, "Flat")
    scores, ids = search_index(load_index(index_dir), queries, K)
    exact_scores, exact_ids = exact_topk(queries, iterate_shard_sketches(index_dir, 4), K)
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_array_equal(ids, brute_force(queries, sketches, K)[1])
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)
    # FAISS id i is row i of docs.parquet, which is row i of the rows the shards were given.
    docs = load_doc_table(index_dir)
    np.testing.assert_array_equal(docs.column("index_id").to_numpy(), np.arange(NUM_ROWS))
    assert docs.drop_columns(["index_id", "sketch_scale"]).equals(rows)
    # the 4-bit store gives each sketch back to within half its row's step, the step being max |x| / 7
    store = load_sketch_store(index_dir)
    np.testing.assert_allclose(store.steps, np.abs(sketches).max(1) / 7, rtol=1e-6)
    assert (np.abs(store.decode(slice(None)) - sketches) <= store.steps[:, None] * (0.5 + 1e-5)).all()


def test_iterate_shard_sketches_returns_stored_rows(tmp_path, corpus):
    sketches, rows, _ = corpus
    write_shards(tmp_path, sketches, rows, FOUR_SHARDS)
    for block_size in (None, 64, 10_000):
        blocks = list(iterate_shard_sketches(tmp_path, 4, block_size=block_size))
        assert all(isinstance(block, np.memmap) for block in blocks)
        np.testing.assert_array_equal(np.concatenate(blocks), sketches)


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_one_shard_and_four_shards_build_the_same_index(tmp_path, corpus, factory):
    _, _, queries = corpus
    one = build(tmp_path / "one", corpus, factory, bounds=(0, NUM_ROWS), train_size=700)
    four = build(tmp_path / "four", corpus, factory, bounds=FOUR_SHARDS, train_size=700)
    for name in ("index.faiss", "docs.parquet"):
        assert (one / name).read_bytes() == (four / name).read_bytes(), name
    results_one = search_index(load_index(one), queries, K, nprobe=4)
    results_four = search_index(load_index(four), queries, K, nprobe=4)
    for got, want in zip(results_four, results_one):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", list(APPROXIMATE_CASES), ids=list(APPROXIMATE_CASES))
def test_approximate_factories_recall_against_exact(tmp_path, corpus, case):
    factory, settings, least_recall = APPROXIMATE_CASES[case]
    sketches, _, queries = corpus
    index = load_index(build(tmp_path, corpus, factory))
    scores, ids = search_index(index, queries, K, **settings)
    exact_scores, exact_ids = brute_force(queries, sketches, K)
    assert recall(ids, exact_ids) >= least_recall
    if least_recall == 1.0:  # IVF visiting every list is an exhaustive search
        np.testing.assert_array_equal(ids, exact_ids)
        np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)
    if "PQ" in factory:
        # PQ scores are exact inner products with the decoded vectors: check against those.
        decoded = index.sa_decode(index.sa_encode(sketches))  # (n, d)
        np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, decoded[ids]), rtol=1e-4, atol=1e-4)
        assert recall(ids, brute_force(queries, decoded, K)[1]) >= 0.95


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW32"])
def test_mmap_load_gives_identical_results(tmp_path, corpus, factory):
    _, _, queries = corpus
    index_dir = build(tmp_path, corpus, factory)
    in_ram = search_index(load_index(index_dir, mmap=False), queries, K, nprobe=4)
    mapped_index = load_index(index_dir, mmap=True)
    mapped = search_index(mapped_index, queries, K, nprobe=4)
    for got, want in zip(mapped, in_ram):
        np.testing.assert_array_equal(got, want)
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: the index file is really mapped, not read into RAM
        assert str(index_dir / "index.faiss") in maps.read_text()


@pytest.mark.parametrize("factory", list(DETERMINISM_CASES))
def test_builds_are_byte_identical_across_runs_and_thread_counts(tmp_path, corpus, factory):
    outputs = []
    for run, threads in enumerate(DETERMINISM_CASES[factory]):
        faiss.omp_set_num_threads(threads)
        index_dir = build(tmp_path / str(run), corpus, factory, train_size=700)
        outputs.append([(index_dir / name).read_bytes() for name in ("index.faiss", "docs.parquet")])
    assert faiss.omp_get_max_threads() == DETERMINISM_CASES[factory][-1], "the merge must restore the thread count"
    assert outputs[0] == outputs[1]


def test_training_sample_follows_seed(tmp_path, corpus):
    # Guards the determinism test against a vacuous pass: the seed does reach the trained index.
    first = build(tmp_path / "a", corpus, "IVF16,Flat", train_size=300, seed=0)
    second = build(tmp_path / "b", corpus, "IVF16,Flat", train_size=300, seed=1)
    assert (first / "index.faiss").read_bytes() != (second / "index.faiss").read_bytes()


@pytest.mark.parametrize("factory", ["Foo", "IVF,Flat", "PQ7"])
def test_invalid_factory_is_refused(tmp_path, corpus, factory):
    with pytest.raises(InfluenceError, match=r'"Flat".*"IVF64,Flat"') as error:
        build(tmp_path, corpus, factory)
    assert repr(factory) in str(error.value)
    assert not index_exists(tmp_path)


@pytest.mark.parametrize(
    "factory, message",
    [("IVF64,Flat", r"at least 64 training rows.*smaller nlist.*Flat"), ("PQ8", r"codebooks of 256 centroids.*at least 256 training rows.*Flat")],
)
def test_too_few_rows_to_train_are_refused(tmp_path, corpus, factory, message):
    with pytest.raises(InfluenceError, match=message):
        build(tmp_path, corpus, factory, bounds=(0, 20, 40))
    assert not (tmp_path / "index.faiss").exists()


def test_idmap_factory_is_refused(tmp_path, corpus):
    # Ids are row positions by construction; an IDMap would need add_with_ids and could break that.
    with pytest.raises(InfluenceError, match="drop the 'IDMap' prefix"):
        build(tmp_path, corpus, "IDMap,Flat")


def test_mismatched_sketch_dims_are_refused(tmp_path, corpus):
    sketches, rows, _ = corpus
    write_sketch_shard(tmp_path, 0, 2, sketches[:10], rows.slice(0, 10))
    write_sketch_shard(tmp_path, 1, 2, sketches[10:20, :16].copy(), rows.slice(10, 10))
    with pytest.raises(InfluenceError, match=r"dimensions differ.*\[32, 16\]"):
        merge_sketch_shards(tmp_path, 2, progress=False)


def test_duplicate_seq_ids_are_refused(tmp_path, corpus):
    sketches, rows, _ = corpus
    with pytest.raises(InfluenceError, match="duplicate seq_id"):
        write_sketch_shard(tmp_path, 0, 1, sketches[:2], rows.slice(0, 2).set_column(0, "seq_id", pa.array([7, 7], pa.int64())))
    # Across shards: shard 1 repeats a sequence of shard 0.
    write_sketch_shard(tmp_path, 0, 2, sketches[:10], rows.slice(0, 10))
    repeated = rows.slice(10, 10).set_column(0, "seq_id", pa.array(rows["seq_id"].to_numpy()[5:15], pa.int64()))
    write_sketch_shard(tmp_path, 1, 2, sketches[10:20], repeated)
    with pytest.raises(InfluenceError, match="more than one shard"):
        merge_sketch_shards(tmp_path, 2, progress=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_sketches_are_refused(tmp_path, corpus, bad):
    sketches, rows, _ = corpus
    broken = sketches[:10].copy()
    broken[3, 5] = bad
    with pytest.raises(InfluenceError, match=r"NaN or inf \(first rows \[3\]\)"):
        write_sketch_shard(tmp_path, 0, 1, broken, rows.slice(0, 10))
    assert finished_shards(tmp_path, 1) == [] and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "sketches, rows, message",
    [
        (np.zeros((3, 4), np.float64), pa.table({"seq_id": pa.array([1, 2, 3], pa.int64())}), "float32"),
        (np.zeros(4, np.float32), pa.table({"seq_id": pa.array([1], pa.int64())}), "2-D"),
        (np.zeros((3, 4), np.float32), pa.table({"seq_id": pa.array([1, 2], pa.int64())}), "2 rows for 3 sketches"),
        (np.zeros((2, 4), np.float32), pa.table({"seq_id": pa.array([1, 2], pa.int32())}), "int64 'seq_id'"),
        (np.zeros((2, 4), np.float32), pa.table({"doc_id": ["a", "b"]}), "int64 'seq_id'"),
        (np.zeros((2, 4), np.float32), pa.table({"seq_id": pa.array([1, 2], pa.int64()), "index_id": [0, 1]}), "reserved"),
    ],
)
def test_malformed_shards_are_refused(tmp_path, sketches, rows, message):
    with pytest.raises(InfluenceError, match=message):
        write_sketch_shard(tmp_path, 0, 1, sketches, rows)
    assert not sketch_shard_exists(tmp_path, 0, 1)


def test_half_written_shard_is_not_finished(tmp_path, corpus):
    sketches, rows, queries = corpus
    bounds = list(zip(FOUR_SHARDS[:-1], FOUR_SHARDS[1:]))
    for shard in (0, 2, 3):
        start, stop = bounds[shard]
        write_sketch_shard(tmp_path, shard, 4, sketches[start:stop], rows.slice(start, stop - start))
    # What a worker killed mid-write leaves: a hidden temporary directory with partial files.
    partial = tmp_path / f".{SKETCH_SHARD_NAME.format(shard=1, num_shards=4)}.x1y2.tmp"
    partial.mkdir()
    np.save(partial / "sketches.npy", sketches[:3])
    assert finished_shards(tmp_path, 4) == [0, 2, 3]
    assert not sketch_shard_exists(tmp_path, 1, 4)
    with pytest.raises(InfluenceError, match=r"1 of 4 sketch shards are missing .*shards 1\)"):
        merge_sketch_shards(tmp_path, 4, "Flat", progress=False)
    # Resuming writes the missing shard; the result equals an uninterrupted build.
    start, stop = bounds[1]
    write_sketch_shard(tmp_path, 1, 4, sketches[start:stop], rows.slice(start, stop - start))
    merge_sketch_shards(tmp_path, 4, "Flat", progress=False)
    np.testing.assert_array_equal(search_index(load_index(tmp_path), queries, K)[1], brute_force(queries, sketches, K)[1])


def test_rewriting_a_shard_replaces_it(tmp_path, corpus):
    sketches, rows, _ = corpus
    write_sketch_shard(tmp_path, 0, 1, sketches[:5], rows.slice(0, 5))
    write_sketch_shard(tmp_path, 0, 1, sketches[5:8], rows.slice(5, 3))
    np.testing.assert_array_equal(np.concatenate(list(iterate_shard_sketches(tmp_path, 1))), sketches[5:8])
    assert sorted(p.name for p in tmp_path.iterdir()) == [SKETCH_SHARD_NAME.format(shard=0, num_shards=1)]


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_k_larger_than_index_is_clamped(tmp_path, corpus, factory):
    sketches, _, queries = corpus
    index_dir = build(tmp_path, corpus, factory, bounds=(0, 4, 7))
    scores, ids = search_index(load_index(index_dir), queries, 50)
    exact_scores, exact_ids = exact_topk(queries, iterate_shard_sketches(index_dir, 2), 50)
    want_scores, want_ids = brute_force(queries, sketches[:7], 7)
    assert ids.shape == exact_ids.shape == (NUM_QUERIES, 7)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(exact_ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
    np.testing.assert_allclose(exact_scores, want_scores, rtol=1e-6)


def test_docs_table_is_written_with_index_ids_first(tmp_path, corpus):
    _, rows, _ = corpus
    build(tmp_path, corpus, "Flat")
    schema = pq.read_schema(tmp_path / "docs.parquet")
    assert schema.names == ["index_id", *rows.column_names, "sketch_scale"]
    assert faiss.read_index(str(tmp_path / "index.faiss")).ntotal == NUM_ROWS


def test_using_an_unfinished_index_is_refused(tmp_path, corpus):
    _, _, queries = corpus
    with pytest.raises(InfluenceError, match="merge_sketch_shards"):
        load_index(tmp_path)
    with pytest.raises(InfluenceError, match="3 of 3 sketch shards are missing"):
        merge_sketch_shards(tmp_path, 3, progress=False)
    index = load_index(build(tmp_path, corpus, "Flat"))
    with pytest.raises(InfluenceError, match="same projection"):
        search_index(index, queries[:, :16], K)
    with pytest.raises(InfluenceError, match="k must be at least 1"):
        search_index(index, queries, 0)


def test_a_store_of_an_earlier_format_is_refused(tmp_path, corpus):
    index_dir = build(tmp_path, corpus, "none")
    meta = json.loads((index_dir / "index.json").read_text())
    (index_dir / "index.json").write_text(json.dumps({**meta, "store_dtype": "float16"}))
    with pytest.raises(InfluenceError, match=r"float16 sketch store written by an earlier version.*rebuild the index"):
        load_sketch_store(index_dir)
