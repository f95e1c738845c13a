"""`benchmarks/real_models.py --resume`: a finished stage is not run again, an unfinished one starts from scratch, and
a log started with other settings is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.real_models import ExactScan, StageLog

IDENTITY = {"commit": "abc", "settings": {"docs": 10}, "model": "m", "model_dir": "/m"}


def test_a_resumed_log_keeps_finished_stages_and_reruns_the_rest_from_scratch(tmp_path):
    work = tmp_path / "run"
    log = StageLog(work, IDENTITY, resume=False)
    calls = []
    assert log.run("fit", [], lambda: calls.append("fit") or {"seconds": 1.5})["seconds"] == 1.5
    partial = work / "index"
    partial.mkdir()
    (partial / "shard-0").write_text("left by an interrupted run")

    resumed = StageLog(work, IDENTITY, resume=True)
    assert resumed.run("fit", [], lambda: calls.append("fit again") or {"seconds": 9.0})["seconds"] == 1.5
    seen = []
    figures = resumed.run("index", [partial], lambda: seen.append(partial.exists()) or {"seconds": 2.0})
    assert calls == ["fit"] and seen == [False]  # the interrupted stage's outputs were gone before it ran again
    assert resumed.resumed == ["fit"] and figures["finished_at"]
    assert set(json.loads((work / "stages.json").read_text())["stages"]) == {"fit", "index"}


def test_without_resume_the_run_starts_over(tmp_path):
    work = tmp_path / "run"
    StageLog(work, IDENTITY, resume=False).run("fit", [], lambda: {"seconds": 1.0})
    fresh = StageLog(work, IDENTITY, resume=False)
    assert fresh.stages == {} and not (work / "stages.json").exists()
    assert fresh.run("fit", [], lambda: {"seconds": 3.0})["seconds"] == 3.0


@pytest.mark.parametrize("changed", [{"commit": "def"}, {"settings": {"docs": 20}}, {"model": "other"}])
def test_a_log_started_otherwise_is_refused(tmp_path, changed):
    work = tmp_path / "run"
    StageLog(work, IDENTITY, resume=False).run("fit", [], lambda: {"seconds": 1.0})
    with pytest.raises(SystemExit, match=f"{next(iter(changed))}=.*--resume to start over"):
        StageLog(work, {**IDENTITY, **changed}, resume=True)


def test_exact_scan_round_trips(tmp_path):
    scan = ExactScan(np.arange(5, dtype=np.int64), np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32))
    scan.save(tmp_path / "exact.npz")
    loaded = ExactScan.load(tmp_path / "exact.npz")
    assert np.array_equal(loaded.seq_ids, scan.seq_ids) and np.array_equal(loaded.scores, scan.scores)
    assert loaded.scores.dtype == np.float32
