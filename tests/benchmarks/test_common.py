"""The benchmarks' shared helpers: statistics against scipy and by hand, JSON output, memory readings, the bare loop."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks import common


def test_statistics_match_references():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    y[:5] = y[5]  # ties
    assert common.pearson(x, y) == pytest.approx(scipy_stats.pearsonr(x, y).statistic, abs=1e-12)
    assert common.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(common.pearson(x, np.ones(50)))
    stats = common.percentiles([4.0, 1.0, 3.0, 2.0])
    assert (stats["p50"], stats["min"], stats["max"], stats["n"]) == (2.5, 1.0, 4.0, 4)
    summary = common.mean_sem([1.0, 3.0, float("nan")])
    assert (summary["mean"], summary["not_finite"]) == (2.0, 1) and summary["sem"] == pytest.approx(1.0)


def test_top_ids_recall_and_overlap():
    scores = np.array([0.5, -2.0, 3.0, 0.0, -1.0])
    assert common.top_ids(scores, 2).tolist() == [2, 0]
    assert common.top_ids(scores, 2, "-").tolist() == [1, 4]
    assert common.recall_at_k([2, 7, 9], [2, 0]) == 0.5
    assert common.topk_overlap(scores, -scores, 2) == 0.0
    assert common.topk_overlap(scores, 2 * scores, 3, "-") == 1.0


def test_write_results_is_strict_json_with_the_command(tmp_path):
    path = common.write_results(tmp_path / "out.json", {"nan": float("nan"), "array": np.arange(3), "x": np.float32(1.5)},
                                common.command_line("lds.py", ["--quick"]))
    data = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert data == {"command": "python benchmarks/lds.py --quick", "nan": None, "array": [0, 1, 2], "x": 1.5}
    assert common.default_out("lds", quick=True).parent != common.RESULTS  # quick runs never overwrite recorded results


def test_peak_rss_sees_an_allocation_and_machine_facts_are_complete():
    before = common.peak_rss_mb()
    if before is None or not common.reset_peak_rss():
        pytest.skip("this kernel does not expose or reset VmHWM")
    low = common.peak_rss_mb()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    del block
    assert common.peak_rss_mb() - low >= 60, (low, common.peak_rss_mb())  # the peak outlives the allocation
    child = subprocess.Popen([sys.executable, "-c", "import sys, numpy; b = numpy.ones(2**24); del b; print('freed', flush=True); "
                              "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"freed\n"  # it has touched and freed 128 MiB
        peaks = [p for p in common.process_peaks("numpy.ones") if p["pid"] == child.pid]
        assert peaks and peaks[0]["peak_rss_mb"] > 120, peaks
        common.reset_peaks("numpy.ones")  # a child's peak is reset too
        assert common.peak_rss_mb(child.pid) < peaks[0]["peak_rss_mb"] - 100, (common.peak_rss_mb(child.pid), peaks)
    finally:
        child.communicate(b"")
    facts = common.finish_machine(common.machine_facts())
    assert facts["cores"] >= 1 and len(facts["load_average_at_end"]) == 3 and facts["versions"]["torch"]


def test_bare_loop_counts_every_sequence(corpus_dir, llama_dir):
    from influence import load_sequences

    sequences, _ = load_sequences(corpus_dir)
    result = common.bare_forward_backward(llama_dir, sequences, batch_tokens=64, shard_size=5)
    assert result["sequences"] == sequences.num_rows and result["tokens"] == sum(sequences["num_tokens"].to_pylist())
    assert result["shards"] == -(-sequences.num_rows // 5) and result["sequences_per_s"] > 0
    assert 0 < result["padding_efficiency"] <= 1


def test_memory_sampler_sees_private_peaks_of_this_process_and_of_children():
    if common.machine_used_mb() is None or common._status_kib("self", "RssAnon") is None:
        pytest.skip("no /proc/meminfo or RssAnon here")
    child = subprocess.Popen([sys.executable, "-c", "import sys, numpy; b = numpy.ones(2**24); print('held', flush=True); "
                              "sys.stdin.readline(); del b; sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"held\n"  # 128 MiB, touched
        with common.MemorySampler("numpy.ones", interval=0.02) as sampler:
            low = common._status_kib("self", "RssAnon") / 1024
            # 1 GiB, touched, held past the kernel's per-second memory counts: large enough to stand out of the
            # machine total's noise (~100 MiB here: a 128 MiB block showed as 36 MiB)
            block = np.ones(2**30 // 8)
            time.sleep(2.5)
            del block
        figures = sampler.figures()
    finally:
        child.communicate(b"\n")
    assert figures["driver_private_mb"] - low >= 1000, (low, figures)  # this process's allocation, private
    assert len(figures["workers_private_mb"]) == 1 and figures["workers_private_mb"][0] >= 120, figures  # the child's
    # the machine's total rose with the 1 GiB (half of it, leaving room for other processes' changes meanwhile)
    assert figures["machine_used_mb"] - figures["machine_used_before_mb"] >= 512 and figures["machine_used_before_mb"] > 0, figures
