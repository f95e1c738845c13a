"""Tiny causal LMs built from configs, never downloaded: what tests, demos and benchmarks run on.

`build_tokenizer` trains a byte-level BPE on the given texts (so any language round-trips);
`build_model` writes a randomly initialised GPT-2, GPT-NeoX or Llama with that tokenizer to a
directory with `save_pretrained`, from which every stage loads it like any other checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

ARCHITECTURES = ("gpt2", "gpt_neox", "llama")


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
    """A transformers config of the given architecture and size."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

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
    raise ValueError(f"unknown architecture {architecture!r}; choose one of {ARCHITECTURES}")


def build_model(out_dir: Path | str, tokenizer, architecture: str = "llama", seed: int = 0, **config_kwargs) -> Path:
    """Write a seeded, randomly initialised causal LM and its tokenizer to `out_dir`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = model_config(architecture, vocab_size=len(tokenizer), **config_kwargs)
    model = AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
