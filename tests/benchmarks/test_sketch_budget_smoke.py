"""`benchmarks/sketch_budget.py --quick`: a tiny Llama's real_models run, then recall by depth for folded sketches."""

from __future__ import annotations

import pytest


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
        assert row["passes_at_target"] == pytest.approx(
            max(row["depth_for_target"].values()) * 2 * result["rerank_seconds_per_candidate"] / result["bare_seconds_per_sequence"])
    assert "| 4096 |" in stdout
