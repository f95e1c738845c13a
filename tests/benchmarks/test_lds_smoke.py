"""`benchmarks/lds.py --quick`: every method's linear datamodeling score on retrained subsets, in sane ranges."""

from __future__ import annotations

import importlib.util
import math

import pytest


@pytest.mark.slow
def test_lds_quick(run_quick):
    pytest.importorskip("scipy")
    result, stdout = run_quick("lds.py")
    methods = result["methods"]
    assert set(methods) == {"ekfac", "kfac", "identity", "index_sketch", "kronfluence_ekfac", "trak"}
    for name in ("ekfac", "kfac", "identity", "index_sketch"):  # the engine's own methods always run
        assert methods[name]["status"] == "ok", methods[name]
    for name, package in (("kronfluence_ekfac", "kronfluence"), ("trak", "trak")):
        installed = importlib.util.find_spec(package) is not None
        assert methods[name]["status"] == ("ok" if installed else "skipped"), methods[name]
    for name, method in methods.items():
        if method["status"] == "ok":
            assert -1 <= method["lds"]["mean"] <= 1 and method["lds"]["not_finite"] == 0, (name, method["lds"])
            assert len(method["lds_per_query"]) == result["corpus"]["num_queries"]
    # the retrained models agree with each other (the ground truth is signal), and EK-FAC predicts them
    assert result["ground_truth"]["seed_agreement"]["mean"] > 0.3, result["ground_truth"]["seed_agreement"]
    assert methods["ekfac"]["lds"]["mean"] > 0, methods["ekfac"]["lds"]
    # same curvature, other scale or estimator: nearly the same document ranking as the engine's EK-FAC
    assert methods["kfac"]["doc_spearman_with_ekfac"] > 0.9
    assert methods["index_sketch"]["doc_spearman_with_ekfac"] > 0.3
    if methods["kronfluence_ekfac"]["status"] == "ok":
        assert methods["kronfluence_ekfac"]["doc_spearman_with_ekfac"] > 0.9
    assert all(math.isfinite(v) for m in methods.values() if m["status"] == "ok" for v in m["seconds"].values())
    assert "| ekfac |" in stdout
