"""Tiny causal LMs built from configs, never downloaded: what tests, demos and benchmarks run on.

`build_tokenizer` trains a byte-level BPE on the given texts (so any language round-trips);
`build_model` writes a randomly initialised GPT-2, GPT-NeoX or Llama with that tokenizer to a
directory with `save_pretrained`, from which every stage loads it like any other checkpoint;
`train_model` trains such a model in place, so benchmarks get meaningful gradients.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable

import torch

ARCHITECTURES = ("gpt2", "gpt_neox", "llama", "gemma3", "qwen2")


def build_tokenizer(texts: Iterable[str], vocab_size: int = 256):
    """A byte-level BPE tokenizer trained on `texts`, with <|endoftext|> as BOS, EOS and padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special, eos_token=special, pad_token=special)


def model_config(architecture: str, vocab_size: int, hidden: int = 16, layers: int = 2, heads: int = 2,
                 intermediate: int | None = None, context: int = 128):
    """A transformers config of the given architecture and size.

    `gemma3` is Gemma-3-270M's text architecture (SmolLM2, the other real model, is a `llama`); `qwen2`
    (Qwen2/Qwen2.5: biased q/k/v projections) is a common GGUF architecture. Both shrunk so tests stay fast.
    """
    from transformers import Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    intermediate = intermediate or 4 * hidden
    if architecture == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate,
                          n_positions=context, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if architecture == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=intermediate, max_position_embeddings=context, bos_token_id=0, eos_token_id=0,
                             rotary_pct=1.0, hidden_dropout=0.0, attention_dropout=0.0)
    if architecture == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=heads, intermediate_size=intermediate, max_position_embeddings=context,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    if architecture == "gemma3":
        # Layer 0 slides and layer 1 attends globally (Gemma 3 alternates 5:1), and the window is shorter than
        # test sequences, so both attention paths run. Embeddings are tied, as in every Gemma 3; the query
        # scale follows head_dim as in the real configs.
        head_dim = max(4, hidden // heads)
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
        return Gemma3TextConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                num_key_value_heads=heads, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                intermediate_size=intermediate, max_position_embeddings=context, sliding_window=8,
                                layer_types=types, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                tie_word_embeddings=True, attention_dropout=0.0)
    if architecture == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=heads, intermediate_size=intermediate, max_position_embeddings=context,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False, attention_dropout=0.0)
    raise ValueError(f"unknown architecture {architecture!r}; choose one of {ARCHITECTURES}")


def build_model(out_dir: Path | str, tokenizer, architecture: str = "llama", seed: int = 0, **config_kwargs) -> Path:
    """Write a seeded, randomly initialised causal LM and its tokenizer to `out_dir`."""
    from transformers import AutoModelForCausalLM

    from influence.models import quiet_transformers

    quiet_transformers()
    torch.manual_seed(seed)
    config = model_config(architecture, vocab_size=len(tokenizer), **config_kwargs)
    model = AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def train_model(model_dir: Path | str, sequences: list[list[int]], steps: int, lr: float = 3e-3, batch_size: int = 16,
                seed: int = 0, progress: bool = True) -> Path:
    """Train the causal LM in `model_dir` in place on token sequences; returns `model_dir`.

    AdamW (weight decay 0.01) with a cosine decay of the learning rate to lr/10 over `steps`; batches
    are right-padded, padding carries label -100. Batches walk through seeded shuffles of the
    sequences, so a run is deterministic given `seed` (and the thread count). The trained weights are
    written to a temporary sibling directory with the tokenizer files, which then replaces
    `model_dir`, with `training.json` (steps, lr, losses) beside the weights.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from influence.errors import InfluenceError

    model_dir = Path(model_dir)
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise InfluenceError(f"steps, batch_size and lr must be positive, got {steps}, {batch_size}, {lr}")
    sequences = [list(s) for s in sequences if len(s) >= 2]
    if not sequences:
        raise InfluenceError("train_model needs at least one sequence of 2 or more tokens")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if context and max(len(s) for s in sequences) > context:
        raise InfluenceError(f"a sequence has {max(len(s) for s in sequences)} tokens, more than the context of {context}; chunk it")
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []

    def next_batch() -> dict[str, torch.Tensor]:
        nonlocal order
        picked = []
        while len(picked) < batch_size:
            if not order:
                order = torch.randperm(len(sequences), generator=generator).tolist()
            picked.append(sequences[order.pop()])
        width = max(len(s) for s in picked)
        input_ids = torch.full((len(picked), width), pad_id, dtype=torch.long)
        labels = torch.full((len(picked), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(picked), width), dtype=torch.long)
        for row, ids in enumerate(picked):
            input_ids[row, : len(ids)] = labels[row, : len(ids)] = torch.as_tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    with tqdm(range(steps), desc="train", unit="step", disable=not progress) as bar:
        for _ in bar:
            loss = model(**next_batch()).loss  # mean over labelled tokens
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    window = max(1, min(20, steps // 10))
    record = {
        "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "optimizer": "AdamW(weight_decay=0.01), cosine to lr/10",
        "num_sequences": len(sequences), "initial_loss": losses[0], "final_loss": losses[-1],
        "final_loss_mean": sum(losses[-window:]) / window, "loss_window": window, "seconds": time.perf_counter() - start,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", dir=model_dir.parent))
    try:
        for path in model_dir.iterdir():  # tokenizer and any other files travel with the weights
            if path.is_file() and path.suffix not in (".safetensors", ".bin") and path.name != "config.json":
                shutil.copy2(path, tmp / path.name)
        model.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        old = model_dir.with_name(f".{model_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        model_dir.rename(old)
        tmp.rename(model_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir
