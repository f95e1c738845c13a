"""The chatterbot-corpus documents, read from the installed package's real data."""

import pyarrow.parquet as pq
import pytest

pytest.importorskip("chatterbot_corpus")

from jobs.demo.chatterbot import (  # noqa: E402
    LANGUAGE_CODES, available_languages, chatterbot_documents, render_conversation, write_chatterbot_corpus,
)
from influence.documents import load_documents  # noqa: E402
from influence.errors import InfluenceError  # noqa: E402


@pytest.fixture(scope="module")
def documents():
    return chatterbot_documents(("english", "korean", "turkish"))


def test_languages_load_with_codes(documents):
    rows = documents.to_pylist()
    assert documents.column_names == ["doc_id", "text", "source", "lang"]
    assert {r["lang"] for r in rows} == {"en", "ko", "tr"}
    for language, code in (("english", "en"), ("korean", "ko"), ("turkish", "tr")):
        mine = [r for r in rows if r["doc_id"].startswith(language + "/")]
        assert len(mine) > 20 and all(r["lang"] == code for r in mine)


def test_doc_ids_unique_and_traceable(documents):
    ids = documents["doc_id"].to_pylist()
    assert len(set(ids)) == len(ids)
    assert "english/ai/0" in ids
    assert all(len(i.split("/")) == 3 and i.split("/")[2].isdigit() for i in ids)


def test_ai_topic_and_turn_format(documents):
    first = next(r for r in documents.to_pylist() if r["doc_id"] == "english/ai/0")
    assert first["source"] == "ai"
    assert first["text"].startswith("User: What is AI?\nAssistant: Artificial Intelligence")
    lines = first["text"].split("\n")
    assert [line.split(": ")[0] for line in lines] == ["User", "Assistant"][: len(lines)]
    custom = chatterbot_documents("english", turn_format="Q: {} | A: {}")
    assert custom["text"][0].as_py().startswith("Q: What is AI? | A: Artificial")


def test_every_shipped_language_has_a_code():
    assert set(available_languages()) <= set(LANGUAGE_CODES)
    assert len(set(LANGUAGE_CODES.values())) == len(LANGUAGE_CODES)


def test_language_codes_are_accepted_too():
    assert chatterbot_documents("ko")["doc_id"].to_pylist() == chatterbot_documents("korean")["doc_id"].to_pylist()


def test_unknown_language_lists_the_available_ones():
    with pytest.raises(InfluenceError, match="available: .*english.*korean"):
        chatterbot_documents(("english", "klingon"))


def test_bad_turn_format():
    with pytest.raises(InfluenceError, match="two"):
        chatterbot_documents("english", turn_format="User: {}")


def test_render_odd_turns_and_yaml_oddities():
    from jobs.demo.chatterbot import _turns

    assert render_conversation(["a", "b", "c"]) == "User: a\nAssistant: b\nUser: c"
    assert _turns([1984, None, "  ", " yes "]) == ["1984", "yes"]
    assert _turns("folded - into one string") == ["folded - into one string"]
    assert _turns([]) == [] and _turns(None) == []


def test_write_parquet_reads_back_as_a_corpus(tmp_path):
    path = write_chatterbot_corpus(tmp_path / "chatterbot.parquet", ["turkish"])
    assert pq.read_table(path).num_rows == chatterbot_documents("turkish").num_rows
    table = load_documents(path)
    assert set(table["lang"].to_pylist()) == {"tr"}
    assert not list(tmp_path.glob("*.tmp"))
