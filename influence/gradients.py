"""Per-token activations and pre-activation gradients of the tracked modules, and what is built from them.

For a tracked module and a batch, `capture_module_io` returns a (batch, tokens, d_in [+1]) — the
module's inputs with a constant 1 appended for the bias — and s (batch, tokens, d_out) — the gradient
of the summed loss with respect to the module's outputs. A sequence's weight gradient is then
G = sum_t s_t a_t^T, and every quantity of the method (covariances, eigenvalue corrections, scores,
per-token contributions) is a contraction of a and s, so per-sequence gradients are never formed
where they are not needed.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from influence.errors import InfluenceError
from influence.models import TrackedModule

LOG = logging.getLogger(__name__)


@dataclass
class TokenBatch:
    """Right-padded token ids with the positions that carry a next-token label.

    `label_mask[b, t]` is True when position t's prediction of token t+1 is part of the loss.
    """

    input_ids: torch.Tensor       # (batch, tokens) int64
    attention_mask: torch.Tensor  # (batch, tokens) bool
    label_mask: torch.Tensor      # (batch, tokens) bool; last column always False
    seq_ids: Optional[list[int]] = None

    @property
    def labels(self) -> torch.Tensor:
        """Next-token labels, aligned with positions: labels[:, t] = input_ids[:, t+1]."""
        return torch.cat([self.input_ids[:, 1:], torch.zeros_like(self.input_ids[:, :1])], dim=1)


def make_token_batch(sequences: Sequence[Sequence[int]], completion_starts: Optional[Sequence[int]] = None,
                     seq_ids: Optional[list[int]] = None, device: str | torch.device = "cpu") -> TokenBatch:
    """Pad sequences on the right. Labels cover every next token, or only those from `completion_starts` on."""
    lengths = [len(s) for s in sequences]
    if min(lengths) < 2:
        raise InfluenceError("a sequence needs at least 2 tokens to have a next-token loss")
    width = max(lengths)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
    positions = torch.arange(width)
    lengths_t = torch.as_tensor(lengths)
    attention_mask = positions[None, :] < lengths_t[:, None]
    label_mask = positions[None, :] < (lengths_t[:, None] - 1)
    if completion_starts is not None:
        # the token at completion_start is predicted by position completion_start - 1
        label_mask &= positions[None, :] >= (torch.as_tensor(completion_starts)[:, None] - 1)
    return TokenBatch(input_ids.to(device), attention_mask.to(device), label_mask.to(device), seq_ids)


#: Logits formed at once by `capture_module_io` (128 MiB of float32): the output layer runs over a few hundred labelled
#: positions at a time, so a batch's (tokens x vocabulary) logits, their log-softmax and both their gradients are never
#: all in memory (Gemma-3's 262k-word head: 0.5 GB each at 512 tokens, most of a capture's transient memory).
LOGIT_CHUNK_NUMBERS = 1 << 25

#: Per model object: its (body, output layer) when the logits are exactly the output layer applied to the body's last
#: hidden state, else None (see `output_layer_split`).
_OUTPUT_LAYER_SPLITS: "weakref.WeakKeyDictionary[nn.Module, Optional[tuple[nn.Module, nn.Module]]]" = weakref.WeakKeyDictionary()


def output_layer_split(model: nn.Module) -> Optional[tuple[nn.Module, nn.Module]]:
    """(body, output layer) when `model`'s logits are exactly output_layer(body(...).last_hidden_state); else None.

    Checked once per model object on a short probe, bitwise: a model that transforms its logits after the output layer
    (Gemma 2's soft-capping, a logit scale) or whose body does not return its last hidden state is never split, and
    `capture_module_io` computes its logits whole, as the model does.
    """
    if model in _OUTPUT_LAYER_SPLITS:
        return _OUTPUT_LAYER_SPLITS[model]
    split = None
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is not None and body is not model and isinstance(head, nn.Linear):
        ids = (torch.arange(8, device=head.weight.device) * 7919 % head.out_features)[None]  # a few distinct valid tokens
        mask = torch.ones_like(ids)
        try:
            with torch.no_grad():
                whole = model(input_ids=ids, attention_mask=mask).logits
                hidden = getattr(body(input_ids=ids, attention_mask=mask), "last_hidden_state", None)
                if hidden is not None and torch.equal(head(hidden), whole):
                    split = (body, head)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the model whole, the path that always works
            LOG.debug("the output layer of %s is not split off (%s: %s)", type(model).__name__, type(exc).__name__, exc)
    _OUTPUT_LAYER_SPLITS[model] = split
    return split


def label_chunks(label_mask: torch.Tensor, positions_per_chunk: int) -> list[list[tuple[int, torch.Tensor]]]:
    """A batch's labelled positions in chunks of at most `positions_per_chunk`, each a list of (row, positions) pieces.

    A sequence is cut at multiples of `positions_per_chunk` of its own labelled positions and its pieces are packed in
    order, so how a sequence is cut never depends on the batch it is in: the labels it samples piece by piece from its
    own generator are the same in every batch.
    """
    chunks: list[list[tuple[int, torch.Tensor]]] = []
    current: list[tuple[int, torch.Tensor]] = []
    size = 0
    rows, columns = label_mask.nonzero(as_tuple=True)
    # one device sync for the whole batch: the split sizes come to the host once, not a `nonzero()` per row
    counts = torch.bincount(rows, minlength=label_mask.shape[0]).tolist()
    for row, positions in enumerate(torch.split(columns, counts)):
        for start in range(0, len(positions), positions_per_chunk):
            piece = positions[start:start + positions_per_chunk]
            if current and size + len(piece) > positions_per_chunk:
                chunks.append(current)
                current, size = [], 0
            current.append((row, piece))
            size += len(piece)
    if current:
        chunks.append(current)
    return chunks


def labelled_loss_gradient(body_out: torch.Tensor, output_layer: Optional[nn.Module], batch: TokenBatch,
                           labels: Optional[torch.Tensor] = None, sample_seed: Optional[int] = None,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed next-token cross-entropy over the labelled positions, and its gradient with respect to `body_out`.

    `body_out` is (batch, tokens, width): the last hidden state, turned into logits by `output_layer`, or the logits
    themselves (`output_layer` None). Logits are formed `LOGIT_CHUNK_NUMBERS` at a time, only at labelled positions.
    Labels are `labels`, the real next tokens, or, with `sample_seed`, drawn from the model's own predictive
    distribution (the true Fisher) by a generator seeded by (seed, seq_id): a sequence's labels do not depend on the
    batch it is in, so 1 batch and many batches fit the same factors.
    """
    batch_size, tokens = body_out.shape[:2]
    flat = body_out.detach().flatten(0, 1)  # (batch * tokens, width)
    gradient = torch.zeros_like(flat)
    total = flat.new_zeros((), dtype=torch.float64)  # chunk losses add up in float64, whatever the model dtype
    vocabulary = output_layer.out_features if output_layer is not None else flat.shape[-1]
    targets = (labels if labels is not None else batch.labels).flatten()
    seq_ids = batch.seq_ids if batch.seq_ids is not None else list(range(batch_size))
    generators: dict[int, torch.Generator] = {}
    for chunk in label_chunks(batch.label_mask, max(1, LOGIT_CHUNK_NUMBERS // vocabulary)):
        index = torch.cat([row * tokens + positions for row, positions in chunk])
        inputs = flat[index].requires_grad_(True)
        with torch.enable_grad():
            logits = inputs if output_layer is None else output_layer(inputs)  # (positions, vocabulary)
            if sample_seed is None:
                target = targets[index]
            else:
                probs = torch.softmax(logits.detach().float(), dim=-1).cpu()
                drawn, offset = [], 0
                for row, positions in chunk:
                    if row not in generators:
                        generators[row] = torch.Generator().manual_seed(int(sample_seed) * 1_000_003 + int(seq_ids[row]))
                    drawn.append(torch.multinomial(probs[offset:offset + len(positions)], 1, generator=generators[row]).squeeze(-1))
                    offset += len(positions)
                target = torch.cat(drawn).to(logits.device)
            loss = F.cross_entropy(logits, target, reduction="sum")
            gradient[index] = torch.autograd.grad(loss, inputs)[0]
        total += loss.detach().double()
    return total, gradient.view(batch_size, tokens, -1)


def capture_module_io(model: nn.Module, modules: list[TrackedModule], batch: TokenBatch,
                      labels: Optional[torch.Tensor] = None, sample_seed: Optional[int] = None,
                      ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Run forward and backward once; return {module: (a, s)} and the summed loss.

    Labels are the real next tokens, `labels` if given, or samples from the model when `sample_seed` is set
    (`labelled_loss_gradient`). Inputs at padded positions are zeroed, so sums over tokens ignore padding. Works with
    frozen parameters (the default of `models.load_model`): no weight gradient is ever formed. Where the output layer
    can be split off (`output_layer_split`), the body runs whole and the logits are formed a chunk at a time.
    """
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable:
        def hook(_module, args, output):
            if name in outputs:
                raise InfluenceError(f"module {name} is called twice in one forward pass; shared modules cannot be tracked")
            inputs[name] = args[0].detach()
            if not output.requires_grad:
                # Parameters are frozen (only a and s are needed, not weight gradients), so below the first tracked
                # module nothing requires grad: its output becomes a leaf, and the backward pass stops there.
                output = output.detach().requires_grad_(True)
            outputs[name] = output
            return output
        return hook

    split = output_layer_split(model)
    handles = [m.module.register_forward_hook(hook_for(m.name)) for m in modules]
    try:
        with torch.enable_grad():
            arguments = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask.long(), "use_cache": False}
            if split is not None:
                body, output_layer = split
                body_out = body(**arguments).last_hidden_state  # (batch, tokens, hidden)
            else:
                body_out, output_layer = model(**arguments).logits, None  # (batch, tokens, vocabulary)
            missing = [m.name for m in modules if m.name not in outputs]
            if missing:
                raise InfluenceError(f"tracked modules {missing[:4]} were not called in the forward pass")
            loss, body_gradient = labelled_loss_gradient(body_out, output_layer, batch, labels, sample_seed)
            grads = torch.autograd.grad(body_out, [outputs[m.name] for m in modules], grad_outputs=body_gradient,
                                        allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    mask = batch.attention_mask.unsqueeze(-1)  # (batch, tokens, 1)
    result = {}
    for module, grad in zip(modules, grads):
        a = inputs[module.name] * mask.to(inputs[module.name].dtype)  # (batch, tokens, d_in)
        if module.has_bias:
            a = torch.cat([a, mask.to(a.dtype)], dim=-1)  # (batch, tokens, d_in + 1)
        s = torch.zeros_like(outputs[module.name]) if grad is None else grad.detach()  # (batch, tokens, d_out)
        if a.dtype in (torch.float16, torch.bfloat16):  # curvature sums need float32 accumulation
            a, s = a.float(), s.float()
        result[module.name] = (a, s)
    return result, loss


def sequence_gradients(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """G_n = sum_t s_t a_t^T for every sequence: (batch, d_out, d_in)."""
    return torch.bmm(s.transpose(1, 2), a)


def rotated_gradients(a: torch.Tensor, s: torch.Tensor, q_a: Optional[torch.Tensor], q_s: Optional[torch.Tensor]) -> torch.Tensor:
    """Q_S^T G_n Q_A for every sequence (the EK-FAC eigenbasis), or G_n when there is no basis.

    Each token's a and s are rotated first (tokens x (d_in^2 + d_out^2) work), then multiplied: cheaper than rotating
    G_n (d_out d_in (d_out + d_in)) whenever a sequence has fewer tokens than the module is wide.
    """
    if q_a is None:
        return sequence_gradients(a, s)
    return torch.bmm((s @ q_s).transpose(1, 2), a @ q_a)  # (batch, d_out, d_in)


#: Numbers in one block of `rotated_gradient_blocks` (4 MiB of float32). A block stays in the cache while it is squared,
#: whitened and hashed; a whole batch of a 135M model's MLP gradients (60-110 MB per module) went to memory and back for
#: every one of those steps, freshly mapped by the allocator each time: about half the index's sketching time.
BLOCK_NUMBERS = 1 << 20


def rotated_gradient_blocks(a: torch.Tensor, s: torch.Tensor, q_a: Optional[torch.Tensor], q_s: Optional[torch.Tensor],
                            block_numbers: Optional[int] = None) -> Iterator[tuple[slice, torch.Tensor]]:
    """`rotated_gradients` a few output rows at a time: (rows, block) with block = (Q_S^T G_n Q_A)[:, rows, :] of shape
    (batch, len(rows), d_in), for work that reduces each block before the next (sums, norms, sketches). On a GPU, one
    block: kernel launches cost more there than memory traffic."""
    s_rotated = s if q_s is None else s @ q_s  # (batch, tokens, d_out)
    a_rotated = a if q_a is None else a @ q_a  # (batch, tokens, d_in)
    batch, _, d_out = s_rotated.shape
    numbers = block_numbers or BLOCK_NUMBERS
    step = d_out if s.device.type != "cpu" else max(1, numbers // max(1, batch * a_rotated.shape[-1]))
    for start in range(0, d_out, step):
        rows = slice(start, min(d_out, start + step))
        yield rows, torch.bmm(s_rotated[:, :, rows].transpose(1, 2), a_rotated)


#: What one forward and backward batch costs on a CPU beyond its padded tokens, in tokens' worth: on 2 cores,
#: SmolLM2-135M captured a lone 32-token sequence in ~400 ms and each of 8 or more batched in ~215 ms (module hooks,
#: small GEMMs), i.e. a batch is worth ~30 tokens of padding. A GPU's is far higher (a batch of few tokens leaves it
#: idle; not measured here): there a batch holds as many sequences as the budget allows, the planner's rule before.
CPU_BATCH_OVERHEAD_TOKENS = 32
#: What one batch's captured module inputs and output gradients may hold on a CPU: `batch_tokens` is lowered for a model
#: whose tracked modules would take more (SmolLM2-135M's 90 MLP modules: 0.76 MB per token in float32, 1,412 tokens;
#: an 8B Llama's 96: 7 MB, 151 tokens), so the default of 2,048 does not exhaust a machine's memory as models grow.
#: The autograd graph of the batch comes on top: SmolLM2's re-rank peaked at 7.5 GB with 2,048 tokens per batch and
#: 4.8 GB with 512, in the same time (one CPU query over 430 candidates: on a CPU a batch's size stops paying long
#: before). A GPU's batches do pay, and its memory is its own: there the budget is a share of the device's memory.
CAPTURE_BUDGET_BYTES = 1 << 30
CAPTURE_BUDGET_GPU_SHARE = 8  # an eighth of the device: an 8B Llama's batch holds 1,517 tokens on an 80 GB card, 455 on 24 GB


def batch_token_budget(batch_tokens: int, modules: Sequence[TrackedModule]) -> int:
    """`batch_tokens`, or fewer where a batch's captured inputs and output gradients would pass the capture budget
    (CAPTURE_BUDGET_BYTES on a CPU; a share of the device's memory on a GPU)."""
    if not modules:
        return int(batch_tokens)
    weight = modules[0].module.weight
    budget = CAPTURE_BUDGET_BYTES
    if weight.device.type == "cuda":
        budget = torch.cuda.get_device_properties(weight.device).total_memory // CAPTURE_BUDGET_GPU_SHARE
    per_token = sum((m.shape[0] + m.shape[1]) * m.module.weight.element_size() for m in modules)
    return max(1, min(int(batch_tokens), budget // max(1, per_token)))


def plan_model_batches(lengths: Sequence[int], batch_tokens: int, modules: Sequence[TrackedModule]) -> list[list[int]]:
    """`plan_batches` for a model whose `modules` are captured: `batch_tokens` lowered to the capture budget
    (`batch_token_budget`), on the device their weights are on. Every stage that captures a model plans with this."""
    device = modules[0].module.weight.device if modules else "cpu"
    return plan_batches(lengths, batch_token_budget(batch_tokens, modules), device)


def plan_batches(lengths: Sequence[int], batch_tokens: int, device: str | torch.device = "cpu") -> list[list[int]]:
    """Positions of sequences grouped into forward/backward batches of at most `batch_tokens` padded tokens.

    Sequences are taken longest first and cut into consecutive batches (a batch's first sequence is its longest)
    that minimise the padded tokens plus a per-batch overhead (`CPU_BATCH_OVERHEAD_TOKENS` on a CPU, the whole
    budget elsewhere): a batch is cut where the lengths drop enough that padding would cost more than another batch.
    A re-rank's few dozen candidates of 12 to 64 tokens padded into one batch spent half their time on padding. A
    sequence longer than the budget goes alone. Callers put results back in input order with the returned positions.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if not order:
        return []
    overhead = CPU_BATCH_OVERHEAD_TOKENS if torch.device(device).type == "cpu" else batch_tokens
    longest = np.asarray([lengths[i] for i in order], np.int64)  # sorted, so each batch's first is its longest
    n = len(order)
    # cost[j]: the cheapest plan of the first j sorted sequences; start[j]: where its last batch starts
    cost, start = np.zeros(n + 1), np.zeros(n + 1, np.int64)
    for j in range(1, n + 1):
        first = np.arange(max(0, j - max(1, batch_tokens // max(1, int(longest[j - 1])))), j)
        fits = (j - first) * longest[first] <= batch_tokens
        fits[-1] = True  # a sequence alone always goes, however long
        first = first[fits]
        totals = cost[first] + (j - first) * longest[first] + overhead
        best = int(np.argmin(totals))
        cost[j], start[j] = totals[best], first[best]
    batches: list[list[int]] = []
    j = n
    while j > 0:
        batches.append(order[start[j]:j])
        j = int(start[j])
    return batches[::-1]
