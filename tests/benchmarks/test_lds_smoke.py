"""Smoke test of the LDS benchmark: `--quick` end to end in a subprocess, in a temporary work dir.

Checks only that the JSON is written with the expected keys and that every method that ran has
finite LDS values; no timing or LDS-value thresholds (those are the benchmark's results, not its contract).
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


@pytest.mark.slow
def test_lds_quick_writes_finite_scores(tmp_path):
    pytest.importorskip("scipy")
    out = tmp_path / "lds_quick.json"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "lds.py"), "--quick", "--work-dir", str(tmp_path / "work"),
         "--out", str(out), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(out.read_text())
    for key in ("settings", "corpus", "model", "ground_truth", "queries", "methods", "timings", "machine", "sign_convention"):
        assert key in result, key
    assert result["settings"]["num_subsets"] == 4
    assert set(result["methods"]) == {"ekfac", "kfac", "identity", "kronfluence_ekfac", "trak", "index_sketch"}
    for name in ("ekfac", "kfac", "identity"):  # the engine's own methods must run
        assert result["methods"][name]["status"] == "ok", result["methods"][name]
    query_ids = [q["query_id"] for q in result["queries"]]
    for name, method in result["methods"].items():
        assert method["status"] in ("ok", "skipped", "failed"), name
        if method["status"] != "ok":
            assert method["reason"], name  # a peer that cannot run says why
            continue
        assert math.isfinite(method["lds"]["mean"]), name
        assert list(method["lds_per_query"]) == query_ids, name
        assert all(v is not None and math.isfinite(v) for v in method["lds_per_query"].values()), name
    assert "| method |" in completed.stdout  # the markdown table is printed
