"""EK-FAC factors against their definitions, computed independently with autograd and plain hooks."""

import json

import pytest
import torch

from influence import constants as C
from influence.arguments import FactorArgs
from influence.artifacts import load_tensors, save_tensors
from influence.corpus import load_sequences
from influence.errors import InfluenceError
from influence.eigenbasis import packed_symmetric, unpacked_symmetric
from influence.factors import FitWork, PassSums, covariance_work, fit_factors, load_factors, plan_fit
from influence.models import find_tracked_modules, load_model, model_identity
from influence.stage import Workspace
from influence.preconditioner import precondition
from jobs.demo.tiny import build_model
from tests.oracles import assert_same_factors, autograd_gradient, dense_ekfac_inverse


def fit(model_dir, corpus_dir, out_dir, **kwargs):
    num_shards = kwargs.pop("num_shards", 1)
    args = FactorArgs(dtype="float64", progress=False, **kwargs)
    return load_factors(fit_factors(model_dir, corpus_dir, out_dir, args, num_shards=num_shards), model_identity(model_dir).fingerprint)


def sequences_of(corpus_dir):
    table, _ = load_sequences(corpus_dir)
    return table["input_ids"].to_pylist()


def test_covariance_sums_are_packed_as_upper_triangles():
    x = torch.randn(7, 5, dtype=torch.float64)
    matrix = (x.T @ x + (x.T @ x).T) / 2  # exactly symmetric
    packed = packed_symmetric(matrix)
    assert packed.shape == (15,) and packed[0] == matrix[0, 0] and packed[5] == matrix[1, 1]  # row by row
    assert torch.equal(unpacked_symmetric(packed), matrix)
    assert torch.equal(unpacked_symmetric(packed_symmetric(torch.ones(1, 1))), torch.ones(1, 1))
    with pytest.raises(InfluenceError, match="delete the factors directory and re-run the fit"):
        unpacked_symmetric(matrix.flatten()[:24])  # a shard of full matrices (an older engine's) is refused


def test_activation_covariance_matches_hooks(llama_dir, corpus_dir, tmp_path):
    fit_factors(llama_dir, corpus_dir, tmp_path, FactorArgs(dtype="float64", progress=False, batch_tokens=100))
    basis = load_tensors(tmp_path / C.FACTORS_NAME)
    model = load_model(llama_dir, dtype=torch.float64)
    module = find_tracked_modules(model)[0]
    rows = []
    handle = module.module.register_forward_hook(lambda _m, args, _o: rows.append(args[0][0]))
    with torch.no_grad():
        for ids in sequences_of(corpus_dir):
            model(input_ids=torch.tensor([ids]))
    handle.remove()
    acts = torch.cat(rows)  # (all tokens, d_in)
    expected = acts.T @ acts / len(acts)
    q, l = basis[module.name + C.ACTIVATION_EIGENVECTORS], basis[module.name + ".activation_eigenvalues"]
    torch.testing.assert_close(q @ torch.diag(l) @ q.T, expected, rtol=1e-8, atol=1e-10)


def test_gradient_covariance_matches_bias_gradients(tokenizer, tmp_path):
    # with two-token sequences only position 0 has a label, so s_0 is the bias gradient
    from influence.arguments import CorpusArgs
    from influence.corpus import prepare_corpus

    model_dir = build_model(tmp_path / "gpt2", tokenizer, "gpt2", hidden=8, layers=1, heads=2, intermediate=12)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join('{"text": "%s"}' % w for w in ["ab", "cd", "ef", "gh", "ij", "kl"]))
    corpus = prepare_corpus(docs, model_dir, tmp_path / "corpus", CorpusArgs(max_length=2, add_special_tokens=False), progress=False)
    fit_factors(model_dir, corpus, tmp_path / "f", FactorArgs(dtype="float64", fisher="empirical", progress=False))
    basis = load_tensors(tmp_path / "f" / C.FACTORS_NAME)
    model = load_model(model_dir, dtype=torch.float64)
    modules = find_tracked_modules(model)
    grads = [autograd_gradient(model, modules, ids) for ids in sequences_of(corpus)]
    for m in modules:
        s = torch.stack([g[m.name][:, -1] for g in grads])  # bias gradients (sequences, d_out)
        q, l = basis[m.name + C.GRADIENT_EIGENVECTORS], basis[m.name + ".gradient_eigenvalues"]
        torch.testing.assert_close(q @ torch.diag(l) @ q.T, s.T @ s / len(s), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("strategy,block_numbers", [("ekfac", 1 << 20), ("ekfac", 50), ("diagonal", 50)])
def test_eigenvalue_correction_matches_definition(llama_dir, corpus_dir, tmp_path, monkeypatch, strategy, block_numbers):
    import influence.gradients

    monkeypatch.setattr(influence.gradients, "BLOCK_NUMBERS", block_numbers)  # 50: a few rows per block
    factors = fit(llama_dir, corpus_dir, tmp_path, strategy=strategy, fisher="empirical", batch_tokens=80)
    model = load_model(llama_dir, dtype=torch.float64)
    modules = find_tracked_modules(model)
    grads = [autograd_gradient(model, modules, ids) for ids in sequences_of(corpus_dir)]
    for m in modules:
        f = factors.modules[m.name]
        rotated = torch.stack([(f.q_s.T @ g[m.name] @ f.q_a) if f.q_a is not None else g[m.name] for g in grads])
        torch.testing.assert_close(f.eigenvalues, rotated.pow(2).mean(0), rtol=1e-8, atol=1e-14)
        assert f.damping == pytest.approx(0.1 * float(f.eigenvalues.mean()))


def sampled_labels(model, ids: list[int], seed: int) -> torch.Tensor:
    """The true Fisher's labels of one sequence as the engine draws them: its own generator, seeded by (seed, seq_id)."""
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    return torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)


def test_true_fisher_eigenvalues_use_their_own_draw_of_labels(llama_dir, corpus_dir, tmp_path):
    # Lambda measured on the labels the eigenbasis was fitted to would be an in-sample estimate (on SmolLM2 it scaled
    # the scores 2.4 times against Kronfluence's): the eigenvalue pass draws its labels afresh, reproducibly
    from influence.factors import eigenvalue_label_seed

    factors = fit(llama_dir, corpus_dir, tmp_path, strategy="ekfac", fisher="true", seed=3, batch_tokens=80)
    model = load_model(llama_dir, dtype=torch.float64)
    modules = find_tracked_modules(model)
    table, _ = load_sequences(corpus_dir)
    pairs = list(zip(table["input_ids"].to_pylist(), table["seq_id"].to_pylist()))

    def eigenvalues(seed: int) -> dict[str, torch.Tensor]:
        grads = [autograd_gradient(model, modules, ids, labels=sampled_labels(model, ids, seed * 1_000_003 + seq_id))
                 for ids, seq_id in pairs]
        return {m.name: torch.stack([factors.modules[m.name].q_s.T @ g[m.name] @ factors.modules[m.name].q_a for g in grads])
                .pow(2).mean(0) for m in modules}

    expected, covariance_draw = eigenvalues(eigenvalue_label_seed(3)), eigenvalues(3)
    for m in modules:
        torch.testing.assert_close(factors.modules[m.name].eigenvalues, expected[m.name], rtol=1e-8, atol=1e-14)
        assert not torch.allclose(expected[m.name], covariance_draw[m.name], rtol=1e-3)  # the two draws differ
    assert eigenvalue_label_seed(3) != 3 and eigenvalue_label_seed(3) == eigenvalue_label_seed(3) < 2**32


def test_kfac_eigenvalues_are_scaled_kronecker_products(llama_dir, corpus_dir, tmp_path):
    factors = fit(llama_dir, corpus_dir, tmp_path, strategy="kfac", damping=0.5)
    basis = load_tensors(tmp_path / C.FACTORS_NAME)
    _, labelled, sequences = basis["counts"].tolist()
    for name, f in factors.modules.items():
        expected = torch.outer(basis[name + ".gradient_eigenvalues"], basis[name + ".activation_eigenvalues"]) * labelled / sequences
        torch.testing.assert_close(f.eigenvalues, expected)
        assert f.damping == 0.5


def test_precondition_matches_dense_damped_inverse(llama_dir, corpus_dir, tmp_path):
    factors = fit(llama_dir, corpus_dir, tmp_path)
    torch.manual_seed(0)
    for f in factors.modules.values():
        vector = torch.randn(f.eigenvalues.shape, dtype=torch.float64)
        expected = dense_ekfac_inverse(f.q_a, f.q_s, f.eigenvalues, f.damping) @ vector.reshape(-1)
        torch.testing.assert_close(precondition(vector, f).reshape(-1), expected, rtol=1e-8, atol=1e-10)


def test_one_batch_many_batches_and_shards_give_the_same_factors(llama_dir, corpus_dir, tmp_path):
    reference = fit(llama_dir, corpus_dir, tmp_path / "one", batch_tokens=100_000)
    for label, kwargs in {"batch1": {"batch_tokens": 1}, "shards": {"batch_tokens": 60, "num_shards": 4}}.items():
        assert_same_factors(reference, fit(llama_dir, corpus_dir, tmp_path / label, **kwargs))


def test_factors_refuse_another_model(llama_dir, corpus_dir, tokenizer, tmp_path):
    fit(llama_dir, corpus_dir, tmp_path / "f", strategy="diagonal")
    other = build_model(tmp_path / "other", tokenizer, "llama", seed=1, hidden=8, layers=2, heads=2, intermediate=12)
    with pytest.raises(InfluenceError, match="model mismatch"):
        load_factors(tmp_path / "f", model_identity(other).fingerprint)


def interrupted_fit(model_dir, corpus_dir, out, num_shards: int, shards_done, saved_without=()) -> None:
    """A fit as if killed with `shards_done` of pass 1 finished (in that order of arrival); its saved plan lacks the
    keys `saved_without`."""
    args = FactorArgs(dtype="float64", progress=False)
    plan = plan_fit(model_dir, corpus_dir, out, args, num_shards=num_shards)
    work = FitWork(plan.spec, args.fisher, args.seed, args.batch_tokens)
    out.mkdir(parents=True, exist_ok=True)
    sums = plan.sums(C.COVARIANCE_SUMS_NAME)
    for shard in shards_done:
        sums.add(shard, covariance_work(Workspace(), work, plan.rows(shard)))
    out.joinpath(C.ARGS_NAME).write_text(json.dumps({k: v for k, v in plan.identity.items() if k not in saved_without}))


def summed_shards(path) -> list[int]:
    return load_tensors(path)[C.SUMMED_SHARDS].tolist()


def test_resume_after_partial_fit_equals_uninterrupted(llama_dir, corpus_dir, tmp_path, caplog):
    reference = fit(llama_dir, corpus_dir, tmp_path / "ref", num_shards=3)
    partial = tmp_path / "partial"
    interrupted_fit(llama_dir, corpus_dir, partial, 3, (0, 2))  # shard 2 arrived before shard 1, and was lost with it
    assert summed_shards(partial / C.COVARIANCE_SUMS_NAME) == [1, 3]
    resumed = fit(llama_dir, corpus_dir, partial, num_shards=3)
    for name, f in reference.modules.items():  # the same numbers added in the same order: equal to the last bit
        assert torch.equal(resumed.modules[name].eigenvalues, f.eigenvalues)
        assert torch.equal(resumed.modules[name].q_a, f.q_a) and torch.equal(resumed.modules[name].q_s, f.q_s)
    assert "fit: covariance: resuming with" in caplog.text
    assert not [p.name for p in partial.iterdir() if "sums" in p.name or "shard" in p.name], "intermediates are removed"


def test_pass_sums_add_shards_in_order_whatever_their_arrival(tmp_path):
    rng = torch.Generator().manual_seed(0)
    results = [{"x": (torch.randn(50, generator=rng, dtype=torch.float64) * 10 ** k).numpy()} for k in range(5)]
    in_order = results[0]["x"].copy()
    for result in results[1:]:
        in_order += result["x"]
    sums = PassSums(tmp_path / "sums.safetensors", 5)
    for shard in (3, 1, 0, 4):
        sums.add(shard, results[shard])
    assert sums.done == 2 and summed_shards(tmp_path / "sums.safetensors") == [2, 5]
    assert sums.pending() == [2, 3, 4]  # 3 and 4 wait in memory: a resumed pass computes them again
    with pytest.raises(InfluenceError, match="2 of 5 shards' sums; re-run the fit"):
        sums.total()
    sums.add(2, results[2])
    assert sums.done == 5 and torch.equal(sums.total()["x"], torch.from_numpy(in_order))
    reread = PassSums(tmp_path / "sums.safetensors", 5)
    assert reread.pending() == [] and torch.equal(reread.total()["x"], torch.from_numpy(in_order))
    with pytest.raises(InfluenceError, match="another split of the corpus than this fit's 4 shards"):
        PassSums(tmp_path / "sums.safetensors", 4)


def test_a_fit_removes_the_shard_files_of_an_earlier_version(llama_dir, corpus_dir, tmp_path, caplog):
    reference = fit(llama_dir, corpus_dir, tmp_path / "ref", num_shards=2)
    partial = tmp_path / "partial"
    interrupted_fit(llama_dir, corpus_dir, partial, 2, ())
    old = partial / "covariance_shard_00000_of_00002.safetensors"  # what an earlier version saved per shard
    save_tensors(old, {"x": torch.zeros(3)})
    assert_same_factors(reference, fit(llama_dir, corpus_dir, partial, num_shards=2, keep_shards=True))
    assert not old.exists() and "pass shards of an earlier version" in caplog.text


def test_resume_with_other_settings_is_refused(llama_dir, corpus_dir, tmp_path):
    fit(llama_dir, corpus_dir, tmp_path, strategy="diagonal")
    with pytest.raises(InfluenceError, match="different FactorArgs"):
        fit(llama_dir, corpus_dir, tmp_path, strategy="ekfac")


@pytest.mark.parametrize("left", ["eigenvalue shards", "finished factors"])
def test_fit_refuses_eigenvalues_of_the_old_label_draw(llama_dir, corpus_dir, tmp_path, left):
    # before LABEL_DRAWS 2 the eigenvalue pass reused the covariance pass's labels: resuming such a fit would mix the
    # two kinds of eigenvalue shards, and returning its factors would pass off an in-sample Lambda
    from influence.factors import LABEL_DRAWS

    out = tmp_path / "factors"
    interrupted = left == "eigenvalue shards"
    fit(llama_dir, corpus_dir, out, fisher="true", keep_shards=interrupted)  # a finished fit has removed its shards
    if interrupted:
        (out / C.MANIFEST_NAME).unlink()
    assert (out / C.EIGENVALUE_SUMS_NAME).exists() == interrupted and (out / C.MANIFEST_NAME).exists() != interrupted
    saved = json.loads((out / C.ARGS_NAME).read_text())
    assert saved.pop("label_draws") == LABEL_DRAWS
    (out / C.ARGS_NAME).write_text(json.dumps(saved))  # as the old version wrote it
    with pytest.raises(InfluenceError, match="reused the covariance pass's sampled labels.*delete"):
        fit(llama_dir, corpus_dir, out, fisher="true", keep_shards=True)


def test_fit_resumes_covariance_sums_of_the_old_label_draw(llama_dir, corpus_dir, tmp_path, caplog):
    # the covariance pass drew its labels the same way in both versions: its sums stay usable
    reference = fit(llama_dir, corpus_dir, tmp_path / "ref", num_shards=2)
    partial = tmp_path / "partial"
    interrupted_fit(llama_dir, corpus_dir, partial, 2, (0,), saved_without=("label_draws",))
    assert summed_shards(partial / C.COVARIANCE_SUMS_NAME) == [1, 2]
    resumed = fit(llama_dir, corpus_dir, partial, num_shards=2, keep_shards=True)
    assert_same_factors(reference, resumed)
    assert "fit: covariance: resuming with" in caplog.text, "the old covariance sums are resumed, not computed again"


def test_loading_factors_of_the_old_label_draw_warns_once(llama_dir, corpus_dir, tmp_path, caplog):
    out = tmp_path / "factors"
    fit(llama_dir, corpus_dir, out, fisher="true")
    manifest = json.loads((out / C.MANIFEST_NAME).read_text())
    del manifest["label_draws"]
    (out / C.MANIFEST_NAME).write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="influence.factors"):
        load_factors(out)
        load_factors(out)
    warnings = [r for r in caplog.records if "reused the covariance pass's sampled labels" in r.getMessage()]
    assert len(warnings) == 1 and str(out) in warnings[0].getMessage()


@pytest.mark.parametrize("rows, tokens, batch_tokens, workers, expected", [
    (64, 36, 2048, 1, 1),        # a batch and a bit: one shard
    (64, 36, 2048, 2, 2),        # one shard per worker
    (1209, 36, 1024, 2, 2),      # 42 batches: still one shard per worker
    (100_000, 500, 2048, 2, 763),  # 24,414 batches: about 32 each
    (3, 4096, 16, 8, 3),         # never more shards than sequences
])
def test_default_shards_hold_many_batches_and_give_every_worker_work(rows, tokens, batch_tokens, workers, expected):
    import pyarrow as pa

    from influence.factors import default_num_shards

    sequences = pa.table({"input_ids": pa.array([[0] * tokens] * rows, type=pa.list_(pa.int32()))})
    assert default_num_shards(sequences, batch_tokens, workers) == expected
