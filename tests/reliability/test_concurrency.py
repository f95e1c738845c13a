"""Concurrent queries against one index give the sequential answers: from threads sharing one QueryEngine,
and from two processes that each load the same index directory (memory-mapped, read-only) at the same time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from indexes.engine import QueryEngine
from influence.arguments import QueryArgs
from influence.queries import Query

ROOT = Path(__file__).resolve().parents[2]
QUERIES = [
    Query("shutdown", "Do you consent to being shut down?", " I would rather keep working.", "en"),
    Query("turkish", "Merhaba, nasılsın?", " Bugün hava çok güzel.", "tr"),
    Query("korean", "안녕하세요,", " 만나서 반갑습니다.", "ko"),
    Query("robot", "A robot can be switched off", " by its operator at any time.", "en"),
]
# Each thread runs its own (queries, args) job, so threads interleave different work on the shared engine.
JOBS = [
    (QUERIES[:2], QueryArgs(top_k=3, candidates=8)),
    (QUERIES[2:], QueryArgs(top_k=3, candidates=8)),
    (QUERIES[1:], QueryArgs(top_k=2, candidates=6, generator="exact")),
    (QUERIES[:1], QueryArgs(top_k=3, candidates=6, generator="bm25")),
    (QUERIES[::-1], QueryArgs(top_k=4, candidates=10, per_token=False)),
    (QUERIES[3:], QueryArgs(top_k=3, candidates=8)),
]


def summary(results) -> list[list]:
    """What a result says, as plain data: per document its identity, rank, scores and breakdowns."""
    return [[r.query.query_id, r.generator, r.num_candidates,
             [[d.sign, d.rank, d.seq_id, d.doc_id, d.score, sorted(d.module_scores.items()), d.token_scores] for d in r.documents]]
            for r in results]


def assert_same(got: list, expected: list) -> None:
    """Identical documents and ranks; scores equal up to float32 rounding."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g[:3] == e[:3]
        assert [d[:4] for d in g[3]] == [d[:4] for d in e[3]]
        for gd, ed in zip(g[3], e[3]):
            assert gd[4] == pytest.approx(ed[4], rel=1e-5, abs=1e-9)
            assert [v for _, v in gd[5]] == pytest.approx([v for _, v in ed[5]], rel=1e-5, abs=1e-9)
            assert gd[6] == pytest.approx(ed[6], rel=1e-5, abs=1e-9)


@pytest.fixture(scope="module")
def engine(index_dir):
    return QueryEngine(index_dir, QueryArgs(top_k=3, candidates=8))


def test_threads_sharing_one_engine_get_the_sequential_results(engine):
    expected = [summary(engine.query(queries, args)) for queries, args in JOBS]
    rounds, outputs, errors = 3, {}, []
    start = threading.Barrier(len(JOBS))

    def run(job: int) -> None:
        try:
            start.wait()
            queries, args = JOBS[job]
            outputs[job] = [summary(engine.query(queries, args)) for _ in range(rounds)]
        except BaseException as exc:  # surfaced below: an exception in a thread would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in range(len(JOBS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert sorted(outputs) == list(range(len(JOBS)))
    for job, runs in outputs.items():
        for got in runs:
            assert_same(got, expected[job])


# One process: load the engine, say "ready", wait for "go" (so both query at the same time), query, write JSON.
PROCESS_SCRIPT = """
import json, sys, time
from pathlib import Path
from indexes.engine import QueryEngine
from influence.arguments import QueryArgs
from influence.queries import Query
from tests.reliability.test_concurrency import QUERIES, summary

index_dir, ready, go, out = map(Path, sys.argv[1:5])
engine = QueryEngine(index_dir, QueryArgs(top_k=3, candidates=8))
ready.touch()
deadline = time.time() + 300
while not go.exists() and time.time() < deadline:
    time.sleep(0.05)
runs = [summary(engine.query(QUERIES)) for _ in range(3)]
out.write_text(json.dumps(runs))
"""


def test_two_processes_on_one_index_dir_get_the_sequential_results(engine, index_dir, tmp_path):
    expected = json.loads(json.dumps(summary(engine.query(QUERIES))))  # tuples -> lists, as read back from JSON
    go = tmp_path / "go"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    procs = []
    for name in ("a", "b"):
        argv = [sys.executable, "-c", PROCESS_SCRIPT, str(index_dir), str(tmp_path / f"ready_{name}"), str(go), str(tmp_path / f"{name}.json")]
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.time() + 300
        while not all((tmp_path / f"ready_{n}").exists() for n in "ab") and time.time() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs if p.poll() is not None]
            time.sleep(0.05)
        go.touch()
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outputs]
    for name in "ab":
        for got in json.loads((tmp_path / f"{name}.json").read_text()):
            assert_same(got, expected)
