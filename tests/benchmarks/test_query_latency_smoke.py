"""`benchmarks/query_latency.py --quick`: latency figures, exactness of the re-rank and recall in sane ranges."""

from __future__ import annotations

import math

import pytest

from benchmarks.kronfluence_peer import kronfluence_available
from influence.arguments import DEFAULT_CANDIDATES


@pytest.mark.slow
def test_query_latency_quick(run_quick):
    pytest.importorskip("bm25s")
    peers = "kronfluence" if kronfluence_available() is None else ""  # Bergson: see benchmarks/bergson_peer.py
    result, stdout = run_quick("query_latency.py", "--peers", peers)
    settings, n = result["settings"], result["corpus"]["sequences"]
    assert set(result["latency"]) == {str(n), str(result["synthetic_large_index"]["rows"])}
    assert result["synthetic_large_index"]["rows"] >= settings["large_n"]
    for size, by_depth in result["latency"].items():
        for depth, r in by_depth.items():
            assert r["wall"]["n"] == settings["num_queries"]
            assert 0 < r["wall"]["p50"] <= r["wall"]["p95"] < 60, (size, depth, r["wall"])
            assert r["reranked"]["max"] <= 2 * int(depth), (size, depth, r["reranked"])  # at most `depth` per sign
    default = str(DEFAULT_CANDIDATES)
    for depth, r in result["rerank_exactness"].items():  # the re-rank is exact: it equals a full scan
        assert r["max_error_over_max_abs_score"] < 1e-4, (depth, r)
    assert result["rerank_exactness"][default]["recall_at_k"]["+"] >= 0.8, result["rerank_exactness"][default]
    recall = result["candidate_recall"]["recall_at_k"]
    for sign in "+-":
        by_depth = [recall[sign][d] for d in sorted(recall[sign], key=int)]
        assert by_depth == sorted(by_depth) and all(0 <= v <= 1 for v in by_depth), (sign, by_depth)  # deeper finds more
    assert recall["+"][max(recall["+"], key=int)] >= 0.8
    assert result["candidate_recall"]["spearman_sketch_vs_exact"]["mean"] > 0.3
    no_rerank = result["no_rerank"]
    assert no_rerank["max_error_over_max_abs_score"] is None and no_rerank["reranked"]["max"] == 0  # estimates, nothing re-ranked
    assert 0 <= no_rerank["recall_at_k"]["+"] <= 1
    many = result["many_queries"]
    assert set(many) == {"1", "6", "32"}
    assert all(r["seconds_per_query_in_one_call"] > 0 and r["seconds_per_query_one_call_each"] > 0 for r in many.values()), many
    assert result["index"]["bytes_per_doc"] == pytest.approx(result["index"]["args"]["sketch_dim"] / 2, rel=0.10)
    if peers:
        kron = result["peers"]["kronfluence"]
        assert kron["status"] == "ok", kron
        assert kron["agreement_with_engine_exact"]["spearman"]["mean"] > 0.9
        assert all(math.isfinite(r) and r > 0 for r in kron["ratio_to_engine_p50"].values())
        subset = result["peers"]["subset"]
        assert subset["engine"]["max_error_over_max_abs_score"] < 1e-4
    for name, tier in result["tiers"].items():  # the refine tier's answers are exact scores, with few exact re-ranks
        for depth, r in tier["by_depth"].items():
            assert r["max_error_over_max_abs_score"] < 1e-4, (name, depth, r)
        if "refine" in name:
            assert tier["bytes_per_doc"]["refine tier (read at the candidates)"] > 0
            assert all(r["reranked"]["p50"] <= 2 * settings["top_k"] + 8 for r in tier["by_depth"].values()), tier
    assert "| rows | candidates/sign |" in stdout and "| tiers |" in stdout
