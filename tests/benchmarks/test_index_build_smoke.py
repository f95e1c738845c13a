"""`benchmarks/index_build.py --quick`: throughput ratios, bytes per document, memory and sketch fidelity in sane ranges."""

from __future__ import annotations

import math

import pytest


def _ratio_ok(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
@pytest.mark.ray
def test_index_build_quick(run_quick):
    result, stdout = run_quick("index_build.py")
    dim = result["index_args"]["sketch_dim"]
    for label, entry in result["throughput"].items():
        sequences = entry["corpus"]["sequences"]
        for where in ("in_process", "ray"):
            run = entry[where]
            assert run["bare"]["sequences"] == sequences, (label, where)
            for kind in ("end_to_end", "steady"):
                assert _ratio_ok(run["ratio_to_bare"][kind]) and run["ratio_to_bare"][kind] < 10, (label, where, kind, run["ratio_to_bare"])
                assert 50 < run[kind]["driver_peak_rss_mb"] < 16_000, (label, where, kind)
            size = run["bytes_per_document"]
            assert size["sequences"] == sequences
            assert size["total"] == pytest.approx(size["expected"], rel=0.10), size  # 4-bit sketch + doc table, nothing else
            assert size["per_file"]["sketches.npy"] == pytest.approx(dim / 2, rel=0.01), size
        assert len(entry["ray"]["workers_peak_rss_mb"]) == result["settings"]["workers"]
        assert all(50 < mb < 16_000 for mb in entry["ray"]["workers_peak_rss_mb"]), entry["ray"]["workers_peak_rss_mb"]
    fidelity = result["fidelity"]
    dims = [str(d) for d in result["settings"]["sketch_dims"]]
    assert fidelity["1024"]["spearman"]["mean"] > 0.3, fidelity["1024"]
    assert fidelity[dims[-1]]["recall10_at_100+"] >= 0.8, fidelity[dims[-1]]
    assert fidelity[dims[0]]["spearman"]["mean"] < fidelity[dims[-1]]["spearman"]["mean"]  # more numbers, less noise
    for d in dims:
        size = fidelity[d]["bytes_per_document"]
        assert size["total"] == pytest.approx(size["expected"], rel=0.10) and size["expected"] > int(d) / 2, (d, size)
        assert all(0 <= fidelity[d][f"recall10_at_{k}{s}"] <= 1 for k in (10, 100) for s in "+-")
    assert "| sketch_dim |" in stdout
