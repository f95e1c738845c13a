"""Ray jobs equal their single-process stages, and survive real process kills."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from indexes.build import build_index
from influence.arguments import FactorArgs, IndexArgs, ScoreArgs
from influence.factors import fit_factors, load_factors
from influence.queries import Query
from influence.scores import compute_scores
from jobs.runner import RayExecutor
from tests.oracles import assert_same_factors

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_fit_on_ray_equals_single_process_fit(ray_local, llama_dir, corpus_dir, tmp_path):
    args = FactorArgs(dtype="float64", progress=False, batch_tokens=60)
    reference = load_factors(fit_factors(llama_dir, corpus_dir, tmp_path / "single", args))
    for label, workers, shards in (("one_worker", 1, 1), ("two_workers_four_shards", 2, 4)):
        with RayExecutor(workers) as executor:
            out = fit_factors(llama_dir, corpus_dir, tmp_path / label, args, executor, num_shards=shards)
        assert_same_factors(reference, load_factors(out))


def _slow_first_task(workspace, shared, task: int) -> int:
    time.sleep(3.0 if task == 0 else 0.01)
    return task


@pytest.mark.parametrize("in_order", [False, True])
def test_an_in_order_pass_is_never_sent_far_beyond_its_oldest_unfinished_task(ray_local, in_order):
    """A pass whose save sums in task order (the fit's) holds the results that arrive early; with `in_order` the
    executor sends no task more than 3 per worker beyond the oldest unfinished one, so it holds few of them."""
    from influence.stage import Pass

    arrived = []
    step = Pass("slow first", list(range(30)), _slow_first_task, save=lambda task, result: None, in_order=in_order)
    with RayExecutor(2) as executor:
        for task, result in executor.map(step):
            assert task == result
            arrived.append(task)
    assert sorted(arrived) == list(range(30))
    early = arrived.index(0)  # results that arrived while task 0 ran
    assert early <= 3 * 2 - 1 if in_order else early > 3 * 2


def test_index_and_scores_on_ray_equal_a_single_process(ray_local, llama_dir, ekfac_dir, corpus_dir, tmp_path):
    args = IndexArgs(progress=False, shard_size=3, sketch_dim=128)
    single = build_index(llama_dir, ekfac_dir, corpus_dir, tmp_path / "single", args)
    queries = [Query("q", "Do you consent to being shut down?", " I would rather keep working.")]
    here = compute_scores(llama_dir, ekfac_dir, corpus_dir, queries, ScoreArgs(progress=False, per_token=True))
    with RayExecutor(2) as executor:
        distributed = build_index(llama_dir, ekfac_dir, corpus_dir, tmp_path / "ray", args, executor)
        executor.release()  # the workers go with what they loaded; the scores run on fresh ones
        there = compute_scores(llama_dir, ekfac_dir, corpus_dir, queries, ScoreArgs(progress=False, per_token=True), executor=executor)
    for name in ("sketches.npy", "docs.parquet"):
        assert (single / name).read_bytes() == (distributed / name).read_bytes()
    np.testing.assert_array_equal(here.seq_ids, there.seq_ids)
    np.testing.assert_allclose(there.scores, here.scores, rtol=1e-5, atol=1e-7)
    for a, b in zip(here.per_token, there.per_token):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def _mapping_of(tensor) -> str:
    """The line of /proc/self/maps holding a tensor's data: its fourth permission letter is 's' for shared memory."""
    address = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        low, high = (int(bound, 16) for bound in line.split()[0].split("-"))
        if low <= address < high:
            return line
    raise AssertionError(f"no mapping holds address {address:#x}")


def test_factors_reach_ray_workers_as_views_of_the_object_store(ray_local, ekfac_dir):
    """A worker's factors are the object store's shared memory, not a private copy per worker (Ray copies tensors,
    and shares only numpy arrays); their values arrive unchanged."""
    import ray
    import torch

    factors = load_factors(ekfac_dir)

    @ray.remote
    def received(box):
        shipped = ray.get(box[0])
        return {name: {part: (_mapping_of(t).split()[1], t.clone()) for part, t in
                       (("eigenvalues", f.eigenvalues), ("q_a", f.q_a), ("q_s", f.q_s))}
                for name, f in shipped.modules.items()}, _mapping_of(ray.get(box[1])).split()[1]

    boxed = [ray.put(factors), ray.put(torch.ones(256, 256))]
    parts, plain_tensor = ray.get(received.remote(boxed))
    assert plain_tensor[3] == "p"  # the check tells the two apart: a tensor shipped as it is lands in private memory
    assert parts.keys() == factors.modules.keys()
    for name, by_part in parts.items():
        for part, (permissions, values) in by_part.items():
            assert permissions[3] == "s", (name, part, permissions)
            assert torch.equal(values, getattr(factors.modules[name], part))


def _index_command(llama_dir, ekfac_dir, corpus_dir, out, *extra):
    return [sys.executable, "-m", "jobs.cli", "index", "--model", str(llama_dir), "--factors", str(ekfac_dir), "--corpus",
            str(corpus_dir), "--out", str(out), "--shard-size", "1", "--batch-tokens", "1", "--sketch-dim", "64", "--no-progress",
            "--keep-shards", *extra]


def _wait_for(condition, timeout=180, poll=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(poll)
    return False


def test_killed_driver_resumes_to_the_uninterrupted_index(llama_dir, ekfac_dir, corpus_dir, tmp_path):
    reference = build_index(llama_dir, ekfac_dir, corpus_dir, tmp_path / "ref", IndexArgs(progress=False, shard_size=1, batch_tokens=1, sketch_dim=64))
    out = tmp_path / "killed"
    proc = subprocess.Popen(_index_command(llama_dir, ekfac_dir, corpus_dir, out, "--workers", "1"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill at the first finished shard (rows arrive a few at a time, so most shards are still to come)
    assert _wait_for(lambda: any(out.glob("sketch_shard_*")), poll=0.01), "the job never wrote a shard"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len([p for p in out.glob("sketch_shard_*") if not p.name.startswith(".")])
    total = pq.read_table(reference / "docs.parquet").num_rows  # one sequence per shard
    assert not (out / "sketches.npy").exists() and finished < total
    subprocess.run(_index_command(llama_dir, ekfac_dir, corpus_dir, out, "--in-process"), check=True, capture_output=True)
    for name in ("sketches.npy", "docs.parquet"):
        assert (reference / name).read_bytes() == (out / name).read_bytes()


def test_killed_worker_is_replaced_and_the_index_is_complete(llama_dir, ekfac_dir, corpus_dir, tmp_path):
    reference = build_index(llama_dir, ekfac_dir, corpus_dir, tmp_path / "ref", IndexArgs(progress=False, shard_size=1, batch_tokens=1, sketch_dim=64))
    out = tmp_path / "worker_killed"
    proc = subprocess.Popen(_index_command(llama_dir, ekfac_dir, corpus_dir, out, "--workers", "1"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def worker_pids():
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
        return [int(line.split()[0]) for line in ps if "StageWorker" in line and "ray::" in line]

    assert _wait_for(lambda: worker_pids() and len(list(out.glob("sketch_shard_*"))) >= 1), "no worker started"
    for pid in worker_pids():
        os.kill(pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    for name in ("sketches.npy", "docs.parquet"):
        assert (reference / name).read_bytes() == (out / name).read_bytes()
