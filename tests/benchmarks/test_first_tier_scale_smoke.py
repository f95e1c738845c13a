"""`benchmarks/first_tier_scale.py --quick`: a streamed IVF-PQ first tier is compact, fast and finds the scan's top rows."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_first_tier_scale_quick(run_quick):
    result, _ = run_quick("first_tier_scale.py")
    settings = result["settings"]
    # codes (pq_bytes) and ids (8 bytes) per row, plus the centroids spread over the rows: tens of bytes, not kilobytes
    assert settings["pq_bytes"] + 8 <= result["bytes_per_row"] < settings["pq_bytes"] + 8 + 16, result["bytes_per_row"]
    assert result["build"]["rows_per_s"] > 1000
    for figures in result["search_ms"].values():
        assert 0 < figures["p50"] < 50, figures
    recall = result["real"]["recall_of_scan_top10"]
    for entry in recall.values():
        assert 0.5 <= entry["+"] <= 1.0 and 0.3 <= entry["-"] <= 1.0, recall
