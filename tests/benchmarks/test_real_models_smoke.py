"""`benchmarks/real_models.py --quick` on tiny Llama and Gemma 3 stand-ins: every stage's figures in sane ranges."""

from __future__ import annotations

import math

import pytest

from influence.arguments import IndexArgs


@pytest.mark.slow
def test_real_models_quick(run_quick):
    result, stdout = run_quick("real_models.py")
    assert [r["model"] for r in result["models"]] == ["tiny-llama", "tiny-gemma3"]
    for r in result["models"]:
        assert r["sequences"] > 100 and r["tokens"] > r["sequences"]
        for stage in ("fit", "index"):
            ratio = r[stage]["ratio_to_bare"]
            assert math.isfinite(ratio) and 0 < ratio < 20, (r["model"], stage, ratio)
            memory = r[stage]["memory"]  # --quick runs in this process: no workers, the driver's private memory
            assert memory["machine_used_before_mb"] > 0 and memory["workers_private_mb"] == []
            assert 50 < memory["driver_private_mb"] < r[stage]["peak_rss"]["driver_mb"] + 1, memory
        # the index: a 4-bit sketch per document and its doc-table row, nothing kept beside them
        assert r["index"]["bytes_per_sequence"] == pytest.approx(IndexArgs().sketch_dim / 2 + 64, abs=64), r["index"]
        assert r["index"]["bytes_per_document"] == pytest.approx(r["index"]["bytes_on_disk"] / r["documents"]), r["index"]
        query = r["query"]
        # the quick corpus is small enough for the adaptive re-rank to see every candidate it needs: the exact top-10
        # the adaptive stop trusts the sketch to stop_margin (2) standard deviations: a rare top-10 document whose
        # sketch score is further off is missed (measured at this size: at most one in 30)
        assert min(query["recall_at_10"].values()) >= 0.9, query
        assert 0 < query["seconds"]["p50"] < 30 and query["p50_in_forward_backward_passes"] > 0
        for sign in "+-":  # per query: the recall, and how many queries warned that their top k may be incomplete
            per_query = query["recall_at_10_per_query"][sign]
            assert len(per_query) == query["seconds"]["n"] and sum(per_query) / len(per_query) == pytest.approx(query["recall_at_10"][sign])
            assert 0 <= query["flagged_incomplete"][sign] <= query["seconds"]["n"]
        # the k-th best exact score of each sign over the sketch's noise: positive (the top and bottom 10 have their
        # sign) and finite, for every query
        for sign in "+-":
            separation = query["kth_score_over_sketch_noise"][sign]
            assert separation["n"] == query["seconds"]["n"]
            assert math.isfinite(separation["p50"]) and separation["min"] > 0, (sign, separation)
        if "skipped" not in r["kronfluence"]:
            assert math.isfinite(r["kronfluence"]["fit_time_ratio"]) and r["kronfluence"]["fit_time_ratio"] > 0
    assert "| tiny-gemma3 |" in stdout
    assert all(r["resumed_stages"] == [] for r in result["models"])

    # run again with --resume: every stage's figures come from the first run's log, none is run again
    again, _ = run_quick("real_models.py", "--resume")
    for first, resumed in zip(result["models"], again["models"]):
        assert resumed["resumed_stages"] == ["corpus", "bare", "fit", "index", "exact", "query", "kronfluence"]
        assert {k: v for k, v in resumed.items() if k != "resumed_stages"} == {k: v for k, v in first.items() if k != "resumed_stages"}
