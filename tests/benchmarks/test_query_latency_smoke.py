"""Smoke test of the query-latency benchmark: `--quick` end to end in a subprocess, in a temporary work dir.

Checks only that the JSON is written with the expected keys and finite values; no timing or recall
thresholds (those are the benchmark's results, not its contract). Bergson runs in the full benchmark only
(its subprocess alone imports for longer than this test may take); Kronfluence runs when installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _finite_numbers(value, path="") -> list[str]:
    """Paths of every non-finite number inside a JSON value."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [] if math.isfinite(value) else [path]
    if isinstance(value, dict):
        return [bad for key, item in value.items() for bad in _finite_numbers(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [bad for i, item in enumerate(value) for bad in _finite_numbers(item, f"{path}[{i}]")]
    return [path]


@pytest.mark.slow
def test_query_latency_quick_writes_finite_results(tmp_path):
    pytest.importorskip("scipy")
    peers = "kronfluence" if importlib.util.find_spec("kronfluence") else ""
    out = tmp_path / "query_latency_quick.json"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "query_latency.py"), "--quick", "--work-dir", str(tmp_path / "work"),
         "--out", str(out), "--peers", peers, "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(out.read_text())
    for key in ("settings", "corpus", "model", "index", "synthetic_large_index", "queries", "latency", "quality",
                "profile_large_n", "peers", "goals", "timings", "machine"):
        assert key in result, key
    settings = result["settings"]
    sizes = {str(result["corpus"]["num_sequences"]), str(settings["large_n"])}
    assert set(result["latency"]) == sizes
    for by_depth in result["latency"].values():
        assert set(by_depth) == {str(d) for d in settings["latency_depths"]}
        for run in by_depth.values():
            assert run["wall"]["n"] == settings["num_queries"]
            assert set(run["stages"]) == {"gradient", "search", "rerank", "total"}
    recall = result["quality"]["recall_at_k"]
    assert set(recall) == {"index", "bm25"}
    for generator in recall.values():
        assert set(generator) == {"+", "-"}
        assert all(0.0 <= v <= 1.0 for by_depth in generator.values() for v in by_depth.values())
    assert result["profile_large_n"]["top_cumulative"]
    assert "load_average_at_end" in result["machine"]
    if peers:
        assert result["peers"]["kronfluence"]["status"] in ("ok", "failed")
        assert "engine_same_subset" in result["peers"]
    bad = _finite_numbers({k: v for k, v in result.items() if k != "peers"})
    bad += _finite_numbers({k: v for k, v in result["peers"].items() if v.get("status", "ok") == "ok"})
    assert not bad, bad
    assert "| docs | candidates/sign |" in completed.stdout  # the markdown table is printed
