"""Every stage on a CUDA device equals the CPU (skipped where there is no GPU; `-m gpu` selects it)."""

import numpy as np
import pytest
import torch

from indexes.build import build_index
from indexes.engine import QueryEngine
from indexes.store import load_sketch_store
from influence.arguments import FactorArgs, IndexArgs, QueryArgs, ScoreArgs
from influence.factors import fit_factors, load_factors
from influence.queries import Query
from influence.scores import compute_scores

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
QUERIES = [Query("q", "Do you consent to being shut down?", " I would rather keep working.")]


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-3), ("bfloat16", 5e-2)])
def test_fit_index_score_and_query_on_cuda_equal_the_cpu(llama_dir, corpus_dir, tmp_path, dtype, rtol):
    cpu = fit_factors(llama_dir, corpus_dir, tmp_path / "cpu", FactorArgs(progress=False))
    gpu = fit_factors(llama_dir, corpus_dir, tmp_path / "gpu", FactorArgs(progress=False, device="cuda", dtype=dtype))
    for name, f in load_factors(cpu).modules.items():
        g = load_factors(gpu).modules[name]
        torch.testing.assert_close(g.eigenvalues, f.eigenvalues, rtol=rtol * 10, atol=1e-6)
    index_cpu = build_index(llama_dir, cpu, corpus_dir, tmp_path / "index_cpu", IndexArgs(progress=False, sketch_dim=256))
    index_gpu = build_index(llama_dir, cpu, corpus_dir, tmp_path / "index_gpu", IndexArgs(progress=False, sketch_dim=256, device="cuda"))
    a, b = load_sketch_store(index_cpu), load_sketch_store(index_gpu)
    # a 4-bit code can flip where the two devices' sketches straddle a rounding boundary: one step at most
    np.testing.assert_allclose(b.decode(slice(None)), a.decode(slice(None)), rtol=rtol, atol=1.01 * float(a.steps.max()))
    here = compute_scores(llama_dir, cpu, corpus_dir, QUERIES, ScoreArgs(progress=False))
    there = compute_scores(llama_dir, cpu, corpus_dir, QUERIES, ScoreArgs(progress=False, device="cuda", dtype=dtype))
    np.testing.assert_allclose(there.scores, here.scores, rtol=rtol * 10, atol=rtol * np.abs(here.scores).max())
    [answer] = QueryEngine(index_cpu, QueryArgs(top_k=3, candidates=10, device="cuda")).query(QUERIES)
    order = np.argsort(-here.scores[0])
    assert [d.seq_id for d in answer.positive] == here.seq_ids[order[:3]].tolist()


def test_a_gpu_s_batch_budget_is_a_share_of_its_memory(llama_dir):
    from influence.gradients import CAPTURE_BUDGET_GPU_SHARE, batch_token_budget
    from influence.models import find_tracked_modules, load_model

    modules = find_tracked_modules(load_model(llama_dir).to("cuda"))
    per_token = sum((m.shape[0] + m.shape[1]) * m.module.weight.element_size() for m in modules)
    share = torch.cuda.get_device_properties(0).total_memory // CAPTURE_BUDGET_GPU_SHARE
    assert batch_token_budget(2048, modules) == min(2048, share // per_token)
