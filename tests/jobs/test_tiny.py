"""Tiny models: training in place lowers the loss, deterministically, and leaves a loadable checkpoint."""

import json

import pytest
import torch

from influence.errors import InfluenceError
from influence.models import load_model
from jobs.demo.tiny import build_model, train_model
from tests.conftest import TEXTS


@pytest.fixture
def toy(tmp_path, tokenizer):
    sequences = [tokenizer(text)["input_ids"][:32] for text in TEXTS]
    return build_model(tmp_path / "model", tokenizer, "llama", hidden=16, layers=1, heads=2, intermediate=32), sequences


def _state(model_dir):
    return {k: v.clone() for k, v in load_model(model_dir).state_dict().items()}


def test_training_lowers_the_loss(toy):
    model_dir, sequences = toy
    train_model(model_dir, sequences, steps=60, lr=1e-2, batch_size=4, progress=False)
    record = json.loads((model_dir / "training.json").read_text())
    assert record["steps"] == 60 and record["lr"] == 1e-2
    assert record["final_loss_mean"] < 0.7 * record["initial_loss"]
    assert (model_dir / "tokenizer.json").exists()
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]  # temp dirs cleaned up
    load_model(model_dir)


def test_training_is_deterministic_given_the_seed(toy, tmp_path, tokenizer):
    model_dir, sequences = toy
    twin = build_model(tmp_path / "twin", tokenizer, "llama", hidden=16, layers=1, heads=2, intermediate=32)
    for directory in (model_dir, twin):
        train_model(directory, sequences, steps=5, batch_size=3, seed=1, progress=False)
    first, second = _state(model_dir), _state(twin)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_training_refuses_sequences_longer_than_the_context(toy):
    model_dir, _ = toy
    with pytest.raises(InfluenceError, match="context"):
        train_model(model_dir, [list(range(5)) * 40], steps=1, progress=False)
