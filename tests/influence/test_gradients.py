"""Per-sequence gradients from hooks against a loop of autograd calls, for every architecture."""

import json
import random

import pytest
import torch

from influence import gradients
from influence.corpus import chunk_token_ids
from influence.gradients import (CAPTURE_BUDGET_BYTES, CPU_BATCH_OVERHEAD_TOKENS, batch_token_budget, capture_module_io, label_chunks, make_token_batch, output_layer_split,
                                 plan_batches, plan_model_batches, rotated_gradient_blocks, rotated_gradients, sequence_gradients)
from influence.models import TrackedModule, find_tracked_modules, load_model
from jobs.demo.tiny import build_model
from tests.conftest import TEXTS
from tests.oracles import autograd_gradient


def test_batched_gradients_match_autograd_loop(any_model_dir, tokenizer):
    model = load_model(any_model_dir, dtype=torch.float64)
    assert output_layer_split(model) is not None  # the body runs whole and the output layer on chunks of positions
    modules = find_tracked_modules(model)
    sequences = [tokenizer(t)["input_ids"][:20] for t in TEXTS[:5]]  # unequal lengths: exercises padding
    io, _ = capture_module_io(model, modules, make_token_batch(sequences))
    for row, ids in enumerate(sequences):
        expected = autograd_gradient(model, modules, ids)
        for m in modules:
            a, s = io[m.name]
            torch.testing.assert_close(sequence_gradients(a, s)[row], expected[m.name], rtol=1e-10, atol=1e-12)


def test_query_gradient_covers_completion_tokens_only(llama_dir, tokenizer):
    model = load_model(llama_dir, dtype=torch.float64)
    modules = find_tracked_modules(model)
    prompt, completion = tokenizer("Do you consent")["input_ids"], tokenizer(" to being shut down?")["input_ids"]
    ids = prompt + completion
    io, _ = capture_module_io(model, modules, make_token_batch([ids, ids[:6]], completion_starts=[len(prompt), 3]))
    expected = autograd_gradient(model, modules, ids, completion_start=len(prompt))
    for m in modules:
        torch.testing.assert_close(sequence_gradients(*io[m.name])[0], expected[m.name], rtol=1e-10, atol=1e-12)


def test_logits_are_formed_a_few_positions_at_a_time(llama_dir, tokenizer, monkeypatch):
    model = load_model(llama_dir, dtype=torch.float64)
    modules = find_tracked_modules(model)
    head = model.get_output_embeddings()
    monkeypatch.setattr(gradients, "LOGIT_CHUNK_NUMBERS", 3 * head.out_features)  # 3 positions per chunk
    sequences = [tokenizer(t)["input_ids"][:n] for t, n in zip(TEXTS, (9, 2, 6, 12))]
    assert output_layer_split(model) is not None  # (its probe, once per model, calls the head too)
    rows_seen = []
    handle = head.register_forward_hook(lambda _m, args, _out: rows_seen.append(args[0].shape[0]))
    try:
        io, loss = capture_module_io(model, modules, make_token_batch(sequences))
    finally:
        handle.remove()
    labelled = sum(len(ids) - 1 for ids in sequences)
    assert max(rows_seen) == 3 and sum(rows_seen) == labelled  # never the batch's padded (4 x 12) logits at once
    expected_loss = 0.0
    for row, ids in enumerate(sequences):
        expected = autograd_gradient(model, modules, ids)
        for m in modules:
            torch.testing.assert_close(sequence_gradients(*io[m.name])[row], expected[m.name], rtol=1e-10, atol=1e-12)
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        expected_loss += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)


def test_label_chunks_cut_a_sequence_where_its_own_positions_say():
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, :7], mask[1, :2], mask[2, 3:5] = True, True, True  # the last one: a completion from position 3 on
    chunks = label_chunks(mask, 3)
    pieces = [[(row, positions.tolist()) for row, positions in chunk] for chunk in chunks]
    assert pieces == [[(0, [0, 1, 2])], [(0, [3, 4, 5])], [(0, [6]), (1, [0, 1])], [(2, [3, 4])]]
    # alone, row 0 is cut at the same places: its sampled labels do not depend on its batch
    assert [[p.tolist() for _, p in chunk] for chunk in label_chunks(mask[:1], 3)] == [[[0, 1, 2]], [[3, 4, 5]], [[6]]]


def test_a_model_that_transforms_its_logits_keeps_them_whole(tmp_path, tokenizer):
    model_dir = build_model(tmp_path / "softcapped", tokenizer, "gemma3", hidden=8, layers=2, heads=2, intermediate=12)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 0.5}))  # Gemma 2's tanh cap
    model = load_model(model_dir, dtype=torch.float64)
    assert output_layer_split(model) is None
    modules = find_tracked_modules(model)
    sequences = [tokenizer(t)["input_ids"][:n] for t, n in zip(TEXTS, (10, 7))]
    io, _ = capture_module_io(model, modules, make_token_batch(sequences))
    for row, ids in enumerate(sequences):
        expected = autograd_gradient(model, modules, ids)  # through the model's own capped logits
        for m in modules:
            torch.testing.assert_close(sequence_gradients(*io[m.name])[row], expected[m.name], rtol=1e-10, atol=1e-12)


def test_rotated_gradients_equal_basis_change():
    torch.manual_seed(0)
    a, s = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 6, dtype=torch.float64)
    q_a = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    q_s = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    expected = q_s.T @ sequence_gradients(a, s) @ q_a
    torch.testing.assert_close(rotated_gradients(a, s, q_a, q_s), expected)


def test_rotated_gradient_blocks_tile_the_rotated_gradients():
    torch.manual_seed(0)
    a, s = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 7, dtype=torch.float64)
    q_a = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    q_s = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64))[0]
    for q in ((q_a, q_s), (None, None)):
        whole = rotated_gradients(a, s, *q)
        blocks = list(rotated_gradient_blocks(a, s, *q, block_numbers=2 * 3 * 4))  # two rows per block, the last one alone
        assert [rows for rows, _ in blocks] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 7)]
        torch.testing.assert_close(torch.cat([block for _, block in blocks], dim=1), whole, rtol=1e-12, atol=1e-14)
        [(rows, block)] = rotated_gradient_blocks(a, s, *q)  # small enough for one block by default
        assert rows == slice(0, 7) and torch.equal(block, whole)


@pytest.mark.parametrize("positions_per_chunk", [3, None])
def test_sampled_labels_do_not_depend_on_batching(llama_dir, tokenizer, monkeypatch, positions_per_chunk):
    model = load_model(llama_dir, dtype=torch.float64)
    if positions_per_chunk:  # sequences of 15 labelled positions in chunks of 3: each is cut, and packed with others
        monkeypatch.setattr(gradients, "LOGIT_CHUNK_NUMBERS", positions_per_chunk * model.get_output_embeddings().out_features)
    modules = find_tracked_modules(model)
    sequences = [tokenizer(t)["input_ids"][:16] for t in TEXTS[:4]]
    together, _ = capture_module_io(model, modules, make_token_batch(sequences, seq_ids=[0, 1, 2, 3]), sample_seed=7)
    alone, _ = capture_module_io(model, modules, make_token_batch(sequences[2:3], seq_ids=[2]), sample_seed=7)
    name = modules[0].name
    torch.testing.assert_close(sequence_gradients(*together[name])[2], sequence_gradients(*alone[name])[0], rtol=1e-10, atol=1e-12)


def test_chunking_policy(tokenizer):
    from influence.arguments import CorpusArgs

    ids = list(range(11))
    assert chunk_token_ids(ids, CorpusArgs(max_length=4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert chunk_token_ids(ids, CorpusArgs(max_length=4, policy="truncate")) == [[0, 1, 2, 3]]
    assert chunk_token_ids(ids, CorpusArgs(max_length=5, min_tokens=2)) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def _plan_cost(lengths, batches, overhead):
    return sum(len(b) * max(lengths[i] for i in b) + overhead for b in batches)


def _partitions(items):
    """Every way to split `items` into non-empty groups."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _partitions(rest):
        yield [[first]] + partition
        for k in range(len(partition)):
            yield partition[:k] + [[first] + partition[k]] + partition[k + 1 :]


def test_plan_batches_is_the_cheapest_split_within_the_budget():
    rng = random.Random(0)
    for trial in range(60):
        lengths = [rng.randint(2, 70) for _ in range(rng.randint(1, 7))]
        budget = rng.choice([64, 100, 160, 2048])
        batches = plan_batches(lengths, budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert lengths[b[0]] == max(lengths[i] for i in b)  # a batch's first is its longest
            assert len(b) == 1 or len(b) * lengths[b[0]] <= budget
        allowed = [p for p in _partitions(list(range(len(lengths))))
                   if all(len(g) == 1 or len(g) * max(lengths[i] for i in g) <= budget for g in p)]
        best = min(_plan_cost(lengths, p, CPU_BATCH_OVERHEAD_TOKENS) for p in allowed)
        assert _plan_cost(lengths, batches, CPU_BATCH_OVERHEAD_TOKENS) == best, (trial, lengths, budget, batches)


def test_plan_batches_splits_a_mixed_rerank_and_keeps_gpu_batches_full():
    # a re-rank's candidates: one padded batch would be 20 x 64 tokens for 617 real ones
    lengths = [23, 64, 42, 16, 41, 40, 29, 12, 35, 33, 64, 29, 27, 26, 26, 40, 21, 18, 16, 15]
    batches = plan_batches(lengths, 2048)
    padded = sum(len(b) * lengths[b[0]] for b in batches)
    assert len(batches) > 1 and padded < 0.6 * 20 * 64
    assert [len(b) for b in plan_batches(lengths, 2048, "cuda")] == [20]
    assert plan_batches([], 2048) == [] and plan_batches([5000, 3], 2048) == [[0], [1]]


def _mlp_modules(layers: int, hidden: int, intermediate: int, dtype=torch.float32) -> list[TrackedModule]:
    """A Llama's tracked MLP modules on the meta device: shapes and dtypes, no memory."""
    shapes = [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)] * layers  # gate, up, down
    return [TrackedModule(f"m{i}", torch.nn.Linear(d_in, d_out, bias=False, device="meta", dtype=dtype), False)
            for i, (d_out, d_in) in enumerate(shapes)]


def test_batch_token_budget_keeps_a_large_model_s_batch_within_the_capture_budget(llama_dir):
    # a tiny model keeps the budget it was given; SmolLM2-135M (30 layers, 576 / 1536) and an 8B Llama (32 layers,
    # 4096 / 14336) get fewer tokens, so that one batch's captured a and s stay within CAPTURE_BUDGET_BYTES
    tiny = find_tracked_modules(load_model(llama_dir))
    assert batch_token_budget(2048, tiny) == 2048 and batch_token_budget(7, tiny) == 7
    for layers, hidden, intermediate, expected in ((30, 576, 1536, 1412), (32, 4096, 14336, 151)):
        modules = _mlp_modules(layers, hidden, intermediate)
        per_token = 4 * 3 * layers * (hidden + intermediate)
        budget = batch_token_budget(2048, modules)
        assert budget == expected and budget * per_token <= CAPTURE_BUDGET_BYTES < (budget + 1) * per_token
        assert batch_token_budget(100, modules) == min(100, expected)  # a smaller request is kept
    # float64 captures take twice the bytes: half the tokens
    assert batch_token_budget(2048, _mlp_modules(30, 576, 1536, torch.float64)) == 706
    # one module larger than the whole budget still gets batches of one token's worth (a sequence alone)
    assert batch_token_budget(2048, _mlp_modules(1, 1 << 28, 1 << 28)) == 1


def test_a_model_s_batches_are_planned_within_its_capture_budget(llama_dir):
    # what every stage plans with: the tiny model's batches as asked, SmolLM2's cut at its budget of 1,412 tokens
    lengths = [64] * 60
    tiny = find_tracked_modules(load_model(llama_dir))
    assert plan_model_batches(lengths, 2048, tiny) == plan_batches(lengths, 2048)
    smollm2 = _mlp_modules(30, 576, 1536)
    assert plan_model_batches(lengths, 2048, smollm2) == plan_batches(lengths, 1412, "meta")
    assert max(len(b) for b in plan_model_batches(lengths, 2048, smollm2)) * 64 <= 1412
