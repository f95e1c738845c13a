"""The fit job under real `kill -9`s: of a Ray worker mid-fit, and of the driver mid-fit.

Many one-sequence shards (`--num-shards` = the corpus size) with `--batch-size 1` make the fit long enough to be
killed in the middle. Either way the result must equal an uninterrupted fit in float64 (eigenvalues and the
preconditioner applied to random vectors), and a re-run must resume from the sums saved before the kill, not redo
those shards. The index job's kills are covered by tests/jobs/test_ray_jobs.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from influence import constants as C
from influence.arguments import FactorArgs
from influence.artifacts import load_tensors
from influence.factors import fit_factors, load_factors
from tests.jobs.test_ray_jobs import _wait_for
from tests.oracles import assert_same_factors

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def fit_command(model, corpus, out, num_shards, *extra):
    return [sys.executable, "-m", "jobs.cli", "fit", "--model", str(model), "--corpus", str(corpus), "--out", str(out),
            "--num-shards", str(num_shards), "--batch-tokens", "1", "--dtype", "float64", "--no-progress", "--keep-shards", *extra]


def summed_shards(out: Path) -> tuple[int, int]:
    """Shards summed into each pass's saved sums (covariance, eigenvalues), as a resumed fit would find them."""
    def done(name: str) -> int:
        path = out / name
        return int(load_tensors(path)[C.SUMMED_SHARDS][0]) if path.exists() else 0
    return done(C.COVARIANCE_SUMS_NAME), done(C.EIGENVALUE_SUMS_NAME)


def resumed_from(stderr: str) -> dict[str, int]:
    """What a re-run found done, per pass, from its warning 'fit: <pass>: resuming with N of M seqs done'."""
    return {name: int(n) for name, n in re.findall(r"fit: (\w+): resuming with (\d+) of", stderr)}


def assert_resumed_where_killed(killed_at: tuple[int, int], num_shards: int, stderr: str) -> None:
    """A re-run starts each unfinished pass from no fewer shards than were saved at the kill (one sequence each). (A
    kill after the covariance pass's last shard leaves nothing of it to redo, whether or not its eigenvectors were
    written.)"""
    resumed = resumed_from(stderr)
    covariance, eigenvalues = killed_at
    if eigenvalues:
        assert resumed.get("eigenvalues", 0) >= eigenvalues and "covariance" not in resumed, stderr[-2000:]
    elif 0 < covariance < num_shards:
        assert resumed.get("covariance", 0) >= covariance, stderr[-2000:]


def fit_worker_pids() -> list[int]:
    lines = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [int(line.split()[0]) for line in lines if "ray::" in line and "StageWorker" in line]


@pytest.fixture(scope="module")
def num_shards(corpus_dir) -> int:
    return pq.read_metadata(corpus_dir / "sequences.parquet").num_rows  # one sequence per shard


@pytest.fixture(scope="module")
def reference(llama_dir, corpus_dir, num_shards, tmp_path_factory):
    """The uninterrupted fit, in this process, with the same shards and batch size."""
    args = FactorArgs(dtype="float64", batch_tokens=1, progress=False)
    return load_factors(fit_factors(llama_dir, corpus_dir, tmp_path_factory.mktemp("uninterrupted"), args, num_shards=num_shards))


def test_killed_worker_mid_fit_is_replaced_or_resumed(llama_dir, corpus_dir, num_shards, reference, tmp_path):
    out = tmp_path / "worker_killed"
    command = fit_command(llama_dir, corpus_dir, out, num_shards, "--workers", "1")
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: fit_worker_pids() and sum(summed_shards(out)) >= 2), "the fit never started a worker"
        victims = fit_worker_pids()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        assert not (out / "manifest.json").exists(), "the fit finished before the kill: make it longer"
        killed_at = summed_shards(out)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert victims and sum(killed_at) < 2 * num_shards
    if proc.returncode != 0:  # Ray gave up on the actor: the same command must then resume and finish
        rerun = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert_resumed_where_killed(killed_at, num_shards, rerun.stderr)
    assert summed_shards(out) == (num_shards, num_shards)
    assert_same_factors(reference, load_factors(out))


def test_killed_driver_mid_fit_resumes_to_the_uninterrupted_factors(llama_dir, corpus_dir, num_shards, reference, tmp_path):
    out = tmp_path / "driver_killed"
    proc = subprocess.Popen(fit_command(llama_dir, corpus_dir, out, num_shards, "--workers", "1"), cwd=ROOT, env=ENV,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: sum(summed_shards(out)) >= 2), "the fit never saved its sums"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        proc.wait()
    killed_at = summed_shards(out)
    assert not (out / "manifest.json").exists() and not (out / "factors.safetensors").exists()
    assert sum(killed_at) < 2 * num_shards, "the fit finished before the kill: make it longer"

    rerun = subprocess.run(fit_command(llama_dir, corpus_dir, out, num_shards, "--in-process"), cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_resumed_where_killed(killed_at, num_shards, rerun.stderr)
    assert summed_shards(out) == (num_shards, num_shards)
    assert_same_factors(reference, load_factors(out))


def test_a_worker_error_reaches_the_cli_as_one_line(llama_dir, corpus_dir, tmp_path):
    """An InfluenceError raised inside a Ray worker (here: weights the driver never reads, truncated) is printed like any
    other bad input, one `error:` line and exit 2, not as Ray's wrapped traceback."""
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "factors"
    command = [sys.executable, "-m", "jobs.cli", "fit", "--model", str(model), "--corpus", str(corpus_dir), "--out", str(out),
               "--num-shards", "1", "--workers", "1", "--no-progress"]
    proc = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "cannot load a causal LM" in errors[0], proc.stderr[-3000:]
    assert "ray::" not in proc.stderr and 'File "' not in proc.stderr, proc.stderr[-3000:]
    assert not out.exists(), "a failed first attempt leaves no output directory"
