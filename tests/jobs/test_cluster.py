"""A Ray cluster of two nodes on this machine (`ray start --head`, then `ray start --address`, one CPU and one temp dir
each): fit and index run there through the CLI, with relative output paths, equal a single process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from indexes.build import build_index
from influence.arguments import FactorArgs, IndexArgs
from influence.factors import fit_factors, load_factors
from tests.jobs.test_ray_jobs import _wait_for
from tests.oracles import assert_same_factors

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "RAY_ADDRESS": ""}
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive_nodes(address: str) -> int:
    code = f"import ray; ray.init(address='{address}', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout.strip() else 0


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """The address of a head node and a second node, each started with --block in its own process group, so that
    the test stops exactly the processes it started (not `ray stop`, which would stop every Ray node here)."""
    root = tmp_path_factory.mktemp("cluster")
    # Ray's socket paths live under --temp-dir and must stay under 107 bytes (AF_UNIX): pytest's own paths can be longer
    short = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port = _free_port()
    common = ["--block", "--num-cpus=1", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    nodes = []
    try:
        nodes.append(subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                                       f"--temp-dir={short / 'h'}", *common], env=ENV, start_new_session=True,
                                      stdout=(root / "head.log").open("w"), stderr=subprocess.STDOUT))
        address = f"127.0.0.1:{port}"
        assert _wait_for(lambda: _alive_nodes(address) == 1, timeout=180, poll=2), (root / "head.log").read_text()[-3000:]
        nodes.append(subprocess.Popen([RAY, "start", f"--address={address}", f"--temp-dir={short / 's'}", *common], env=ENV,
                                      start_new_session=True, stdout=(root / "second.log").open("w"), stderr=subprocess.STDOUT))
        assert _wait_for(lambda: _alive_nodes(address) == 2, timeout=180, poll=2), (root / "second.log").read_text()[-3000:]
        yield address
    finally:
        for node in reversed(nodes):
            try:
                os.killpg(node.pid, signal.SIGTERM)
                node.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        shutil.rmtree(short, ignore_errors=True)


def test_fit_and_index_on_two_nodes_equal_a_single_process(two_nodes, llama_dir, corpus_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cli = [sys.executable, "-m", "jobs.cli"]
    common = ["--address", two_nodes, "--workers", "2", "--no-progress"]
    fit = subprocess.run([*cli, "fit", "--model", str(llama_dir), "--corpus", str(corpus_dir), "--out", "factors", "--num-shards", "3",
                          "--dtype", "float64", *common], cwd=run, env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    reference = fit_factors(llama_dir, corpus_dir, tmp_path / "single", FactorArgs(dtype="float64", progress=False), num_shards=3)
    assert_same_factors(load_factors(reference), load_factors(run / "factors"))

    index = subprocess.run([*cli, "index", "--model", str(llama_dir), "--factors", "factors", "--corpus", str(corpus_dir), "--out", "index",
                            "--shard-size", "4", "--sketch-dim", "128", *common], cwd=run, env={**ENV, "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True, timeout=600)
    assert index.returncode == 0, index.stderr[-3000:]
    single = build_index(llama_dir, run / "factors", corpus_dir, tmp_path / "single_index",
                         IndexArgs(progress=False, shard_size=4, sketch_dim=128))
    for name in ("sketches.npy", "docs.parquet"):
        assert (single / name).read_bytes() == (run / "index" / name).read_bytes(), name


def test_an_address_that_does_not_answer_fails_fast(llama_dir, corpus_dir, tmp_path):
    import time

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "fit", "--model", str(llama_dir), "--corpus", str(corpus_dir),
                           "--out", str(tmp_path / "f"), "--address", f"127.0.0.1:{_free_port()}", "--no-progress"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no Ray cluster answers at" in proc.stderr, proc.stderr[-2000:]
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "f").exists()
