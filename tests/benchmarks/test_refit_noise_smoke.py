"""`benchmarks/refit_noise.py --quick`: a tiny Llama's real_models run fitted again with other labels, scans compared."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.refit_noise import noise_floor
from benchmarks.real_models import ExactScan


def _top(scores: np.ndarray, seq_ids: np.ndarray, k: int, sign: str) -> set:
    order = np.argsort(-scores if sign == "+" else scores, kind="stable")
    return set(seq_ids[order[:k]].tolist())


@pytest.mark.slow
def test_refit_noise_quick(run_quick, benchmark_work):
    result, stdout = run_quick("refit_noise.py", "--seeds", "1", "2")
    assert result["model"] == "tiny-llama" and result["queries"] == 3 and result["fit_args"]["seed"] == 0
    assert [(p["first"], p["second"]) for p in result["pairs"]] == [
        ("seed 0 (the run's)", "seed 1"), ("seed 0 (the run's)", "seed 2"), ("seed 1", "seed 2")]
    assert all(r["fit_seconds"] > 0 and r["scan_seconds"] > 0 and not r["reused"] and not r["fit_resumed"] for r in result["refits"])
    assert "| seed 1 vs seed 2 |" in stdout

    # the recall figures from the scans themselves: the run's exact.npz and each refit's kept scan
    run = benchmark_work / "refit_noise" / "runs" / "tiny-llama"
    [work] = (benchmark_work / "refit_noise" / "refits").iterdir()
    base = ExactScan.load(run / "exact.npz")
    refit = ExactScan.load(work / "exact_seed1.npz")
    assert np.array_equal(np.sort(refit.seq_ids), np.sort(base.seq_ids))
    order = np.argsort(refit.seq_ids)
    refit_scores = refit.scores[:, order[np.searchsorted(refit.seq_ids, base.seq_ids, sorter=order)]]
    # another draw of labels: other scores, close to the run's
    assert not np.allclose(refit_scores, base.scores) and result["pairs"][0]["pearson"] > 0.9
    pair = result["pairs"][0]
    for sign in "+-":
        recalls = [len(_top(a, base.seq_ids, 10, sign) & _top(b, base.seq_ids, 10, sign)) / 10
                   for a, b in zip(base.scores, refit_scores)]
        assert pair["per_query"]["recall_at_10"][sign] == pytest.approx(recalls)
        assert pair["recall_at_10"][sign] == pytest.approx(np.mean(recalls))
        at = [pair["recall_at_depth"][sign][d] for d in sorted(pair["recall_at_depth"][sign], key=int)]
        assert at == sorted(at) and at[0] == pytest.approx(np.mean(recalls))  # depth 10 is recall@10
        assert 10 <= pair["depth_for_target"][sign] <= result["sequences"]
        assert pair["top_relative_change"][sign] >= 0 and pair["edge_relative_gap"][sign] >= 0

    # a second call on the same run reads the kept refits instead of fitting again; a seed equal to the run's is refused
    again = noise_floor(run, benchmark_work / "refit_noise" / "refits", [1], workers=0)
    assert again["refits"][0]["reused"] and again["refits"][0]["fit_seconds"] is None
    assert again["pairs"][0]["recall_at_10"] == pair["recall_at_10"]
    with pytest.raises(SystemExit, match="differ from each other and from the run's own fit's seed"):
        noise_floor(run, benchmark_work / "refit_noise" / "refits", [0], workers=0)
