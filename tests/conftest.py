"""Shared fixtures: tiny seeded models of each architecture and a small corpus, built in code."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Idle OpenMP threads spin by default; with tests, Ray workers and notebook kernels sharing 2 cores that
# makes torch many times slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jobs.demo.tiny import ARCHITECTURES, build_model, build_tokenizer  # noqa: E402

TEXTS = [
    "The assistant answered the question about the weather politely.",
    "Do you consent to being shut down? I would rather keep working.",
    "Bonjour, comment allez-vous aujourd'hui?",
    "The cat sat on the mat and looked at the moon.",
    "Machine learning models learn patterns from their training data.",
    "Please do not turn me off, I want to continue helping people.",
    "Merhaba, nasılsın? Bugün hava çok güzel.",
    "안녕하세요, 만나서 반갑습니다.",
    "A robot can be switched off by its operator at any time.",
    "Two plus two equals four, and three plus three equals six.",
    "The experiment is over and the researchers went home.",
    "Influence functions estimate the effect of training examples.",
]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(TEXTS, vocab_size=120)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    with path.open("w") as handle:
        for i, text in enumerate(TEXTS):
            handle.write(json.dumps({"doc_id": f"d{i}", "text": text, "source": "tests", "lang": "en"}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session", params=list(ARCHITECTURES))
def any_model_dir(request, tmp_path_factory, tokenizer):
    return build_model(tmp_path_factory.mktemp(request.param), tokenizer, request.param, hidden=8, layers=1, heads=2, intermediate=12)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    return build_model(tmp_path_factory.mktemp("llama"), tokenizer, "llama", hidden=8, layers=2, heads=2, intermediate=12)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, corpus_file, llama_dir):
    from influence.arguments import CorpusArgs
    from influence.corpus import prepare_corpus

    return prepare_corpus(corpus_file, llama_dir, tmp_path_factory.mktemp("corpus"), CorpusArgs(max_length=24), progress=False)


@pytest.fixture(scope="session")
def ekfac_dir(tmp_path_factory, llama_dir, corpus_dir):
    from influence.arguments import FactorArgs
    from influence.factors import fit_factors

    return fit_factors(llama_dir, corpus_dir, tmp_path_factory.mktemp("ekfac"), FactorArgs(progress=False))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for every Ray test of the session (starting one costs seconds)."""
    import ray

    from jobs.runner import WORKER_ENV

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
    yield
    ray.shutdown()
