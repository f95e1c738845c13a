"""Runs a benchmark script with `--quick` in a subprocess, into a temporary work directory and output path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# scripts that build on another one's setup, and so share its work directory
SHARED_SETUP = {"first_tier_scale": "query_latency", "exact_scan": "sketch_budget"}


@pytest.fixture(scope="session")
def benchmark_work(tmp_path_factory):
    """One work directory for every smoke test: the scripts cache models, corpora and indexes there by content, so a
    script reusing another's setup (first_tier_scale reads query_latency's index) does not build it again."""
    return tmp_path_factory.mktemp("benchmark_work")


@pytest.fixture
def run_quick(tmp_path, benchmark_work):
    """`run_quick("index_build.py", *extra_args)` -> (the JSON it wrote, its stdout); fails with the script's stderr."""

    def run(script: str, *extra: str, timeout: float = 600) -> tuple[dict, str]:
        out = tmp_path / f"{Path(script).stem}.json"
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE"}
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--work-dir", str(benchmark_work / SHARED_SETUP.get(Path(script).stem, Path(script).stem)),
                               "--out", str(out), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-4000:]
        result = json.loads(out.read_text())
        assert result["command"].startswith(f"python benchmarks/{script} --quick")
        assert result["machine"]["cores"] >= 1 and result["machine"]["versions"]["torch"], result["machine"]
        return result, done.stdout

    return run
