"""The stored text index: BM25 over the corpus's text, written by the index stage and read by every query engine."""

import json
import logging
import shutil

import numpy as np
import pytest

pytest.importorskip("bm25s")

from indexes.build import build_index  # noqa: E402
from indexes.engine import QueryEngine  # noqa: E402
from indexes.text import TEXT_INDEX_DIR, TEXT_META_NAME, TextIndex, text_index_exists, write_text_index  # noqa: E402
from influence.arguments import IndexArgs, QueryArgs  # noqa: E402
from influence.corpus import load_sequences  # noqa: E402
from influence.errors import InfluenceError  # noqa: E402
from influence.queries import Query  # noqa: E402

QUERIES = [Query("shutdown", "Do you consent to being shut down?", " I would rather keep working.", "en"),
           Query("turkish", "Merhaba, nasılsın?", " Bugün hava çok güzel.", "tr")]
ARGS = dict(progress=False, sketch_dim=256)


@pytest.fixture(scope="module")
def plain_index(llama_dir, ekfac_dir, corpus_dir, tmp_path_factory):
    return build_index(llama_dir, ekfac_dir, corpus_dir, tmp_path_factory.mktemp("plain"), IndexArgs(**ARGS))


def _files(directory):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir() if p.is_file()}


def test_a_finished_index_gets_its_text_index_added_and_queries_read_it(plain_index, llama_dir, ekfac_dir, corpus_dir, tmp_path):
    index_dir = tmp_path / "index"
    shutil.copytree(plain_index, index_dir)
    in_memory = QueryEngine(index_dir, QueryArgs(top_k=3, candidates=4))
    everything = len(in_memory.seq_ids)
    before = in_memory.bm25_candidates(QUERIES, everything)
    assert not in_memory.text_index.stored  # no stored one yet: built in this engine's memory

    sketches = _files(index_dir)
    build_index(llama_dir, ekfac_dir, corpus_dir, index_dir, IndexArgs(**ARGS, text_index=True))
    assert text_index_exists(index_dir)
    assert _files(index_dir) == sketches  # the sketches, doc table and manifest stay as they were: only the text is added
    assert not list(index_dir.glob(f".{TEXT_INDEX_DIR}-*"))  # its temporary name is gone

    stored = QueryEngine(index_dir, QueryArgs(top_k=3, candidates=4))
    after = stored.bm25_candidates(QUERIES, everything)
    assert stored.text_index.stored
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old, new)
    # the query's own words rank a sequence of their document first, and both engines answer the hybrid alike
    first = [stored.sequences["text"][int(ranked[0])].as_py() for ranked in after]
    assert "consent" in first[0] and "hava" in first[1], first
    fixed = QueryArgs(top_k=3, candidates=4, generator="hybrid", text_candidates=5)
    for old, new in zip(in_memory.query(QUERIES, fixed), stored.query(QUERIES, fixed)):
        assert [(d.sign, d.seq_id) for d in old.documents] == [(d.sign, d.seq_id) for d in new.documents]

    # asked again, nothing is rewritten
    text_files = _files(index_dir / TEXT_INDEX_DIR)
    build_index(llama_dir, ekfac_dir, corpus_dir, index_dir, IndexArgs(**ARGS, text_index=True))
    assert _files(index_dir / TEXT_INDEX_DIR) == text_files


def test_an_index_built_with_its_text_index(llama_dir, ekfac_dir, corpus_dir, plain_index, tmp_path):
    index_dir = build_index(llama_dir, ekfac_dir, corpus_dir, tmp_path / "index", IndexArgs(**ARGS, text_index=True))
    assert text_index_exists(index_dir) and (index_dir / "manifest.json").is_file()
    meta = json.loads((index_dir / TEXT_INDEX_DIR / TEXT_META_NAME).read_text())
    sequences, corpus = load_sequences(corpus_dir)
    assert meta["num_rows"] == sequences.num_rows and meta["corpus_fingerprint"] == corpus["corpus_fingerprint"]
    # the text index is no setting of the sketches: the same bytes as an index built without it
    assert (index_dir / "sketches.npy").read_bytes() == (plain_index / "sketches.npy").read_bytes()


def test_a_text_index_of_another_corpus_is_refused(plain_index, tmp_path):
    index_dir = tmp_path / "index"
    shutil.copytree(plain_index, index_dir)
    sequences, corpus = load_sequences(QueryEngine(index_dir).corpus_dir)
    write_text_index(index_dir, sequences["text"].to_pylist(), corpus["corpus_fingerprint"], progress=False)
    meta_path = index_dir / TEXT_INDEX_DIR / TEXT_META_NAME
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "corpus_fingerprint": "another corpus"}))
    engine = QueryEngine(index_dir, QueryArgs(top_k=2, candidates=3))
    with pytest.raises(InfluenceError, match=r"corpus mismatch.*--text-index"):
        engine.query(QUERIES[:1], QueryArgs(top_k=2, candidates=3, generator="bm25"))
    engine.query(QUERIES[:1], QueryArgs(top_k=2, candidates=3))  # the sketches still answer


def test_a_failed_text_index_leaves_nothing(plain_index, tmp_path):
    index_dir = tmp_path / "index"
    shutil.copytree(plain_index, index_dir)
    (index_dir / f".{TEXT_INDEX_DIR}-deadbeef").mkdir()  # what a killed attempt leaves: removed by the next
    with pytest.raises(Exception):
        write_text_index(index_dir, ["a text", None], "fingerprint", progress=False)  # bm25s cannot tokenise None
    assert not text_index_exists(index_dir) and not (index_dir / TEXT_INDEX_DIR).exists()
    assert not list(index_dir.glob(f".{TEXT_INDEX_DIR}-*"))


def test_text_index_search_is_capped_at_the_corpus():
    texts = ["the cat sat on the mat", "a dog barked at the moon", "the cat and the dog"]
    built = TextIndex.build(texts)
    [rows] = built.search(["cat"], 10)
    assert sorted(rows.tolist()) == [0, 1, 2] and set(rows[:2].tolist()) == {0, 2}


def test_the_command_line_stores_it_and_a_hybrid_query_uses_it(plain_index, llama_dir, ekfac_dir, corpus_dir, tmp_path, capsys):
    from jobs.cli import main

    index_dir = tmp_path / "index"
    shutil.copytree(plain_index, index_dir)
    assert main(["index", "--model", str(llama_dir), "--factors", str(ekfac_dir), "--corpus", str(corpus_dir), "--out", str(index_dir),
                 "--sketch-dim", "256", "--text-index", "--in-process", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "text index (BM25" in printed.out and text_index_exists(index_dir)
    assert "was already complete" in printed.out and "nothing re-sketched" in printed.out  # no throughput of an index not built
    assert logging.getLogger("bm25s").getEffectiveLevel() >= logging.WARNING  # bm25s sets DEBUG on import: not our terminal's
    out = tmp_path / "answer"
    assert main(["query", "--index", str(index_dir), "--prompt", QUERIES[0].prompt, "--completion", QUERIES[0].completion,
                 "--generator", "hybrid", "--top-k", "2", "--out", str(out), "--no-progress"]) == 0
    [result] = json.loads((out / "results.json").read_text())
    assert result["generator"] == "hybrid" and result["documents"]


def test_a_large_corpus_without_a_stored_text_index_warns_before_building(plain_index, monkeypatch, caplog):
    import indexes.text

    monkeypatch.setattr(indexes.text, "BUILD_WARNING_ROWS", 5)  # this corpus's dozen sequences count as large
    engine = QueryEngine(plain_index, QueryArgs(top_k=2, candidates=3, progress=False))
    with caplog.at_level("WARNING", logger="indexes.text"):
        engine.bm25_candidates(QUERIES[:1], 3)
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "building BM25 over" in warning and "--text-index" in warning


def test_sequences_sharing_no_word_with_the_query_are_no_text_candidates(plain_index):
    # a query in a script the corpus does not hold: BM25 scores every sequence 0, so neither text generator proposes
    # any (re-ranking arbitrary sequences would cost a forward and backward pass each), and the hybrid is the index
    engine = QueryEngine(plain_index, QueryArgs(top_k=2, candidates=3, progress=False))
    greek = Query("greek", "Καλημέρα, τι κάνεις;", " Είμαι καλά.", "el")
    [ranked] = engine.bm25_candidates([greek], 5)
    assert len(ranked) == 5  # ranked anyway (benchmarks read BM25's full ranking), in no meaningful order
    assert [len(found) for found in engine.bm25_candidates([greek], 5, matching_only=True)] == [0]
    fixed = dict(top_k=2, candidates=3, adaptive=False)
    [hybrid] = engine.query([greek], QueryArgs(generator="hybrid", text_candidates=5, **fixed))
    [index] = engine.query([greek], QueryArgs(generator="index", **fixed))
    assert hybrid.num_candidates == index.num_candidates
    assert [(d.sign, d.seq_id) for d in hybrid.documents] == [(d.sign, d.seq_id) for d in index.documents]
    [text] = engine.query([greek], QueryArgs(generator="bm25", **fixed))
    assert text.num_candidates == 0 and text.documents == []
