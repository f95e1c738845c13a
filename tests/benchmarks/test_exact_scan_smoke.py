"""`benchmarks/exact_scan.py --quick`: an exact scan's cost, plain and with each optional output, on a tiny Llama's run."""

from __future__ import annotations

import pytest

from benchmarks.exact_scan import VARIANTS, middle_rows


def test_middle_rows():
    assert middle_rows(10, 4) == range(3, 7) and middle_rows(3, 8) == range(0, 3)


@pytest.mark.slow
def test_exact_scan_quick(run_quick):
    result, stdout = run_quick("exact_scan.py", "--sequences", "40", "--rounds", "2")
    assert result["model"] == "tiny-llama" and result["sequences"] == 40 and result["queries"] == 3
    assert result["bare"]["sequences"] == 40 and result["bare"]["workers_seen"] == 1  # the same rows, in this process
    assert set(result["variants"]) == set(VARIANTS)
    for name, variant in result["variants"].items():
        assert len(variant["rounds"]) == 2 and variant["seconds"] > 0
        # past the fixed part (the queries' preparation), timed as a scan of one row
        assert variant["seconds_per_sequence"] == pytest.approx((variant["seconds"] - result["fixed_seconds"]) / 39)
        assert variant["in_bare_passes_per_sequence"] == pytest.approx(variant["seconds_per_sequence"] / result["bare_seconds_per_sequence"])
        # the optional outputs change no score: the same GEMMs (self-influence) or float32 sums per token
        assert variant["score_difference_from_plain"] <= (0 if name == "self_influence" else 1e-5), name
        assert f"| {name} |" in stdout
    assert 0 < result["fixed_seconds"] < result["variants"]["scores"]["seconds"]
    assert result["self_influence_over_plain"] == pytest.approx(
        result["variants"]["self_influence"]["seconds_per_sequence"] / result["variants"]["scores"]["seconds_per_sequence"])
