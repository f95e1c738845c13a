"""Smoke test of the index-build benchmark: `--quick` end to end in a subprocess, in a temporary work dir.

Checks only that the JSON is written with the expected keys and finite numbers; no timing, memory or
fidelity thresholds (those are the benchmark's results, not its contract).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
@pytest.mark.ray
def test_index_build_quick_writes_finite_numbers(tmp_path):
    pytest.importorskip("psutil")
    out = tmp_path / "index_build_quick.json"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled"}
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "index_build.py"), "--quick", "--work-dir", str(tmp_path / "work"), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(out.read_text())
    for key in ("settings", "model", "corpora", "index_args", "queries", "throughput", "scaling", "bytes", "memory", "profile",
                "fidelity", "timings", "machine"):
        assert key in result, key
    for key in ("platform", "cpu_count", "ram_gib", "versions", "date"):
        assert key in result["machine"], key

    assert set(result["throughput"]) == {"N", "4N"}
    for label, entry in result["throughput"].items():
        assert "ray job (2 workers)" in entry["runs"], label
        for name, run in entry["runs"].items():
            for group in ("end_to_end", "steady"):
                assert _finite(run[group]["sequences_per_s"]) and _finite(run[group]["tokens_per_s"]), (label, name, group)
            assert _finite(run["seconds"]) and _finite(run["driver_peak_rss_mb"]), (label, name)
        ray = entry["runs"]["ray job (2 workers)"]
        assert _finite(ray["worker_peak_rss_mb"]), label
        assert all(_finite(v) for v in ray["phases"].values()), ray["phases"]
    assert _finite(result["throughput"]["4N"]["runs"]["ray job (2 workers)"]["ratio_to_best_bare"]["steady"])

    for factory in ("Flat", result["settings"]["ivfpq_factory"]):
        assert all(_finite(v) for v in result["bytes"][factory].values()), factory

    for variant in ("current", "current, the other sketch", "patched", "patched + length-sorted calls"):
        assert _finite(result["profile"][variant]["ratio_to_bare"]), variant

    fidelity = result["fidelity"]
    for k in map(str, result["settings"]["sketch_sizes"]):
        for method in fidelity["methods"]:
            entry = fidelity[method][k]
            if "skipped" in entry:
                continue
            for metric in ("pearson", "spearman", "recall10@10", "recall10@50", "recall10@100"):
                assert _finite(entry[metric]), (method, k, metric)
        for method in ("eigen", "kronecker"):
            assert _finite(fidelity[method][k]["index_faiss_bytes_per_sequence"]), (method, k)
    assert "| corpus | run |" in completed.stdout  # the markdown tables are printed
