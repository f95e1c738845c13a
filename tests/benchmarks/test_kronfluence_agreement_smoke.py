"""`benchmarks/kronfluence_agreement.py --quick`: the engine's scores agree with Kronfluence's on the same inputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks.kronfluence_peer import kronfluence_available
from tests.benchmarks.conftest import ROOT


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


@pytest.mark.slow
@pytest.mark.skipif(kronfluence_available() is not None, reason=str(kronfluence_available()))
def test_kronfluence_agreement_on_a_given_model(tmp_path):
    """`--model`: nothing trained, both sides fit EK-FAC on the real-models corpus's first documents and agree."""
    from benchmarks.real_models import quick_models

    model_dir = quick_models(tmp_path / "models", ("gemma3",))["tiny-gemma3"]
    out = tmp_path / "agreement.json"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kronfluence_agreement.py"), "--model", str(model_dir),
                           "--docs", "12", "--batch-size", "4", "--work-dir", str(tmp_path / "work"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "pretrained" and result["settings"]["model"]["model_type"] == "gemma3_text"
    assert result["settings"]["corpus"]["num_documents"] == 12 and result["settings"]["corpus"]["first_documents"] == 12
    results = {(r["strategy"], r["fisher"]): r for r in result["results"]}
    assert set(results) == {("ekfac", "empirical"), ("ekfac", "true")}  # EK-FAC only, by default, with --model
    empirical = results["ekfac", "empirical"]
    assert empirical["pearson"] > 0.9999 and empirical["top10_overlap_mean"] == 1.0, empirical
    assert empirical["scale"] == pytest.approx(1.0, rel=1e-4)
    true = results["ekfac", "true"]
    assert true["pearson"] > 0.95 and true["engine_seed_to_seed"]["pearson"] > 0.95  # the sampled labels' noise floor
    assert "engine_seed_to_seed" not in empirical
