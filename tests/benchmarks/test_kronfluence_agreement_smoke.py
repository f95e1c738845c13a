"""`benchmarks/kronfluence_agreement.py --quick`: the engine's scores agree with Kronfluence's on the same inputs."""

from __future__ import annotations

import math

import pytest

from benchmarks.kronfluence_peer import kronfluence_available


@pytest.mark.slow
@pytest.mark.skipif(kronfluence_available() is not None, reason=str(kronfluence_available()))
def test_kronfluence_agreement_quick(run_quick):
    result, stdout = run_quick("kronfluence_agreement.py")
    results = {(r["strategy"], r["fisher"]): r for r in result["results"]}
    assert set(results) == {("ekfac", "empirical"), ("ekfac", "true"), ("kfac", "empirical"), ("kfac", "true"),
                            ("diagonal", "empirical"), ("diagonal", "true"), ("identity", "n/a")}
    corpus = result["settings"]["corpus"]
    tokens_per_sequence = corpus["num_tokens"] / corpus["num_sequences"]
    for (strategy, fisher), r in results.items():
        assert r["pearson"] > 0.99 and r["spearman"] > 0.98, (strategy, fisher, r["pearson"], r["spearman"])
        for key in ("fit_ratio", "score_ratio", "fit_cpu_ratio", "score_cpu_ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (strategy, fisher, key, r[key])
        if fisher != "true":  # real labels on both sides: equal up to float32 round-off
            assert r["pearson"] > 0.9999 and r["top10_overlap_mean"] == 1.0, (strategy, r)
            # K-FAC is on the per-sequence scale of EK-FAC in the engine: Kronfluence's scores / tokens per sequence
            expected = 1 / tokens_per_sequence if strategy == "kfac" else 1.0
            assert r["scale"] == pytest.approx(expected, rel=0.05 if strategy == "kfac" else 1e-4), (strategy, r["scale"])
    assert "| ekfac | empirical |" in stdout
