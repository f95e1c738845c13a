"""`benchmarks/sketch_budget.py --quick`: a tiny Llama's real_models run, then recall by depth for folded sketches."""

from __future__ import annotations

import pytest

from benchmarks.sketch_budget import BARE_SAMPLE


@pytest.mark.slow
def test_sketch_budget_quick(run_quick):
    result, stdout = run_quick("sketch_budget.py")
    assert result["model"] == "tiny-llama" and result["sequences"] > 100 and result["queries"] == 3
    dims = [row["dim"] for row in result["dims"]]
    assert dims == [1024, 2048, 4096] and result["index"]["dim"] == 4096 and result["index"]["seconds"] > 0
    for row in result["dims"]:
        # 4-bit codes, two per byte, and a float32 step per row
        assert row["sketch_bytes_per_sequence"] == row["dim"] // 2 + 4
        for sign in "+-":
            recall = [row["recall_at"][sign][d] for d in sorted(row["recall_at"][sign], key=int)]
            assert recall == sorted(recall) and all(0 <= r <= 1 for r in recall), recall  # more candidates never find fewer
            depth = row["depth_for_target"][sign]
            assert 10 <= depth <= result["sequences"]
            if str(depth) in row["recall_at"][sign]:
                assert row["recall_at"][sign][str(depth)] >= result["target_recall"]
        depth = max(row["depth_for_target"].values())
        assert row["passes_at_target"] == pytest.approx(
            (result["rerank"]["fixed_seconds"] + 2 * depth * result["rerank_seconds_per_candidate"]) / result["bare_seconds_per_sequence"])
    # the re-rank's cost from two answers per query on the run's own index: 10 and 30 candidates per sign, all re-ranked
    probes = result["rerank"]["probes"]
    assert [p["candidates_per_sign"] for p in probes] == [10, 30] * 3 and result["rerank"]["index"].endswith("index")
    assert all(low["candidates"] < high["candidates"] <= 60 for low, high in zip(probes[::2], probes[1::2]))
    assert result["passes_with_a_perfect_sketch"] == pytest.approx(
        (result["rerank"]["fixed_seconds"] + 20 * result["rerank_seconds_per_candidate"]) / result["bare_seconds_per_sequence"])
    assert "| 4096 |" in stdout and "with a perfect sketch" in stdout
    # passes are in units of a bare loop timed in this call, over a sample of the run's sequences
    bare = result["bare"]
    assert bare["sequences"] == min(BARE_SAMPLE, result["sequences"]) and bare["workers_seen"] == 1
    assert result["bare_seconds_per_sequence"] == pytest.approx(bare["seconds"] / bare["sequences"])
    assert result["run_bare_seconds_per_sequence"] > 0
    for figures in result["default_query"].values():
        assert figures["bare_seconds_per_sequence"] == pytest.approx(result["bare_seconds_per_sequence"])
    # BM25 over the text ranks every sequence: the same depth figures, as a first stage that stores no gradient
    text = result["bm25"]
    for sign in "+-":
        recall = [text["recall_at"][sign][d] for d in sorted(text["recall_at"][sign], key=int)]
        assert recall == sorted(recall) and 10 <= text["depth_for_target"][sign] <= result["sequences"]
    assert text["passes_at_target"] == pytest.approx(
        (result["rerank"]["fixed_seconds"] + 2 * max(text["depth_for_target"].values()) * result["rerank_seconds_per_candidate"])
        / result["bare_seconds_per_sequence"])
    assert "| BM25 over the text |" in stdout
    # the default query answered end to end with each generator; the hybrid re-ranks BM25's top 50 whatever the sketch says
    answered = result["default_query"]
    assert set(answered) == {"index", "hybrid"} and "| hybrid |" in stdout
    for figures in answered.values():
        assert all(0 <= figures["recall_at_10"][sign] <= 1 for sign in "+-") and figures["seconds"]["p50"] > 0
    assert answered["hybrid"]["candidates_reranked"]["min"] >= 50

    # the large index read again, not rebuilt, when it holds the same factors' sketches of the same corpus
    again, _ = run_quick("sketch_budget.py", "--reuse-index")
    assert again["index"]["reused"] and again["index"]["seconds"] is None and not result["index"]["reused"]
