"""The index stage in one process: sketches against exact scores, determinism, resume, fitting on a sample."""

import json
import shutil

import numpy as np
import pytest
import torch

from indexes.build import build_index
from indexes.search import search_both_signs
from indexes.store import load_doc_table, load_sketch_store
from influence.arguments import CorpusArgs, FactorArgs, IndexArgs, ScoreArgs
from influence.errors import InfluenceError
from influence.factors import fit_factors, load_factors
from influence.models import ModelSpec, load_model_context, load_tokenizer
from influence.queries import Query, tokenize_query
from influence.scores import compute_scores, query_gradients
from influence.sketches import Sketcher

QUERIES = [Query("shutdown", "Do you consent to being shut down?", " I would rather keep working."),
           Query("cat", "The cat sat", " on the mat.")]


def build(llama_dir, ekfac_dir, corpus_dir, out, **kwargs):
    return build_index(llama_dir, ekfac_dir, corpus_dir, out, IndexArgs(progress=False, **kwargs))


def query_sketches(llama_dir, ekfac_dir, dim):
    loaded = load_model_context(ModelSpec(str(llama_dir)))
    factors = load_factors(ekfac_dir).to(torch.float32)
    tokenizer = load_tokenizer(llama_dir)
    gradients = query_gradients(loaded, [tokenize_query(q, tokenizer) for q in QUERIES])
    return Sketcher(factors, [m.name for m in loaded.modules], dim, seed=0).sketch_gradients(gradients)[0].numpy()


def test_doc_table_holds_exact_self_influence(llama_dir, ekfac_dir, corpus_dir, tmp_path):
    index_dir = build(llama_dir, ekfac_dir, corpus_dir, tmp_path, shard_size=5)
    docs = load_doc_table(index_dir)
    exact = compute_scores(llama_dir, ekfac_dir, corpus_dir, QUERIES, ScoreArgs(progress=False, self_influence=True))
    assert docs["seq_id"].to_pylist() == exact.seq_ids.tolist()
    np.testing.assert_allclose(docs["self_influence"].to_numpy(), exact.self_influence, rtol=1e-4)
    assert set(docs.column_names) >= {"index_id", "doc_id", "source", "lang", "num_tokens", "grad_norm", "self_influence", "sketch_scale"}
    assert not list(index_dir.glob("sketch_shard_*")), "shards are removed after the merge unless kept"


def test_stored_sketch_scores_track_exact_scores(llama_dir, ekfac_dir, corpus_dir, tmp_path):
    # 8192 buckets for the 576 whitened coordinates of this tiny model: few collisions, so nearly exact
    index_dir = build(llama_dir, ekfac_dir, corpus_dir, tmp_path, sketch_dim=8192)
    exact = compute_scores(llama_dir, ekfac_dir, corpus_dir, QUERIES, ScoreArgs(progress=False)).scores
    store = load_sketch_store(index_dir)
    (scores, ids), _ = search_both_signs(store, query_sketches(llama_dir, ekfac_dir, 8192), k=store.ntotal)
    for q in range(len(QUERIES)):
        approx = np.empty(store.ntotal)
        approx[ids[q]] = scores[q]
        assert np.corrcoef(approx, exact[q])[0, 1] > 0.99


def test_identical_inputs_give_identical_index_and_resume_equals_uninterrupted(llama_dir, ekfac_dir, corpus_dir, tmp_path):
    first = build(llama_dir, ekfac_dir, corpus_dir, tmp_path / "a", shard_size=4)
    second = build(llama_dir, ekfac_dir, corpus_dir, tmp_path / "b", shard_size=4, keep_shards=True)
    for name in ("sketches.npy", "docs.parquet"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    # interrupt: drop the merged outputs and one shard, then re-run
    for name in ("sketches.npy", "docs.parquet", "manifest.json", "index.json"):
        (second / name).unlink(missing_ok=True)
    shutil.rmtree(next(second.glob("sketch_shard_00001_*")))
    build(llama_dir, ekfac_dir, corpus_dir, second, shard_size=4)
    for name in ("sketches.npy", "docs.parquet"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert not list(second.glob("sketch_shard_*"))


def test_resume_with_other_settings_is_refused(llama_dir, ekfac_dir, corpus_dir, tmp_path):
    build(llama_dir, ekfac_dir, corpus_dir, tmp_path, sketch_dim=8)
    with pytest.raises(InfluenceError, match="different IndexArgs"):
        build(llama_dir, ekfac_dir, corpus_dir, tmp_path, sketch_dim=16)


def test_an_index_from_before_a_setting_existed_counts_as_built_with_its_default(llama_dir, ekfac_dir, corpus_dir, tmp_path):
    build(llama_dir, ekfac_dir, corpus_dir, tmp_path, sketch_dim=8)
    saved = json.loads((tmp_path / "args.json").read_text())
    del saved["args"]["refine"]  # as an index written before --refine existed
    (tmp_path / "args.json").write_text(json.dumps(saved))
    assert build(llama_dir, ekfac_dir, corpus_dir, tmp_path, sketch_dim=8) == tmp_path  # reused as it is
    with pytest.raises(InfluenceError, match="refine: saved False vs now True"):
        build(llama_dir, ekfac_dir, corpus_dir, tmp_path, sketch_dim=8, refine=True)


def test_factors_fitted_on_a_sample_index_the_whole_corpus(llama_dir, corpus_file, corpus_dir, tmp_path):
    lines = corpus_file.read_text().splitlines()
    sample = tmp_path / "sample.jsonl"
    sample.write_text("\n".join(lines[::3]) + "\n")
    from influence.corpus import prepare_corpus

    sample_corpus = prepare_corpus(sample, llama_dir, tmp_path / "sample_corpus", CorpusArgs(max_length=24), progress=False)
    factors = fit_factors(llama_dir, sample_corpus, tmp_path / "factors", FactorArgs(progress=False))
    index_dir = build(llama_dir, factors, corpus_dir, tmp_path / "index")
    manifest = json.loads((index_dir / "manifest.json").read_text())
    corpus_manifest = json.loads((corpus_dir / "manifest.json").read_text())
    sample_manifest = json.loads((sample_corpus / "manifest.json").read_text())
    assert manifest["corpus_fingerprint"] == corpus_manifest["corpus_fingerprint"]
    assert manifest["factors_corpus_fingerprint"] == sample_manifest["corpus_fingerprint"] != manifest["corpus_fingerprint"]
    assert load_doc_table(index_dir).num_rows == corpus_manifest["num_sequences"]
