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


@pytest.mark.parametrize("architecture, model_class", [("gemma3", "Gemma3ForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_gemma3_and_qwen2_track_every_mlp_layer_and_capture_its_gradient(tmp_path, tokenizer, architecture, model_class):
    from influence.gradients import capture_module_io, make_token_batch, sequence_gradients
    from influence.models import find_tracked_modules

    model_dir = build_model(tmp_path / architecture, tokenizer, architecture, hidden=16, layers=2, heads=2, intermediate=32)
    model = load_model(model_dir)
    assert type(model).__name__ == model_class
    modules = find_tracked_modules(model)
    projections = ("gate_proj", "up_proj", "down_proj")
    assert [m.name for m in modules] == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in projections]
    assert [m.shape for m in modules[:3]] == [(32, 16), (32, 16), (16, 32)]
    # Longer than Gemma 3's sliding window of 8, and padded, so the windowed and the masked paths both run.
    batch = make_token_batch([tokenizer(text)["input_ids"][:n] for text, n in zip(TEXTS, (24, 19, 13))])
    captured, _ = capture_module_io(model, modules, batch)
    model.requires_grad_(True)  # the oracle: autograd's weight gradients of the same loss
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none")
    grads = torch.autograd.grad((losses * batch.label_mask.flatten()).sum(), [m.module.weight for m in modules])
    for module, grad in zip(modules, grads):
        a, s = captured[module.name]
        assert s.abs().sum() > 0
        torch.testing.assert_close(sequence_gradients(a, s).sum(0), grad, rtol=1e-4, atol=1e-6, msg=module.name)
