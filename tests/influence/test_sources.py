"""Model sources: save_pretrained directories as they are, GGUF files converted once, Hub ids refused offline."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from influence.errors import InfluenceError
from influence.sources import default_cache_dir, gguf_cache_path, resolve_model, temporary_sibling
from jobs.demo.tiny import build_model, build_tokenizer
from tests.conftest import TEXTS


def test_a_save_pretrained_directory_is_returned_as_is(llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(llama_dir.parent)
    resolved = resolve_model(llama_dir.name, cache_dir=tmp_path / "cache")
    assert resolved == llama_dir.resolve() and resolved.is_absolute()
    assert not (tmp_path / "cache").exists()  # nothing copied or converted


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing" / "model", "neither a save_pretrained directory"),
    (lambda tmp: "no-such-model-dir", "neither a save_pretrained directory"),
    (lambda tmp: "no-such-dir/model.gguf", "neither a save_pretrained directory"),  # a missing file, not a Hub id
    (lambda tmp: _write(tmp / "weights.bin", b"\0" * 8), "not a .gguf file"),
    (lambda tmp: _mkdir(tmp / "empty"), "without config.json"),
])
def test_what_is_not_a_model_is_refused_in_one_line(tmp_path, make, message):
    with pytest.raises(InfluenceError, match=message) as error:
        resolve_model(make(tmp_path), cache_dir=tmp_path / "cache")
    assert "\n" not in error.value.args[0] and ";" in error.value.args[0]  # the problem; the fix


def test_a_hub_id_is_refused_quickly_in_one_line_without_network(tmp_path, monkeypatch):
    # The real request is made, to a port where nothing listens, so the refusal is the code path a machine
    # without network takes (and a machine with network cannot download anything here).
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(InfluenceError) as error:
        resolve_model("influence-engine-tests/no-such-model", cache_dir=tmp_path / "cache")
    assert time.perf_counter() - start < 10
    message = error.value.args[0]
    assert "\n" not in message
    assert "influence-engine-tests/no-such-model" in message and "no network" in message
    assert "pass the directory" in message and ".gguf" in message


def test_a_hub_id_already_in_the_cache_needs_no_network(llama_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    repo = tmp_path / "cache" / "hub" / "models--influence-engine-tests--cached"  # huggingface_hub's cache layout
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(llama_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    assert resolve_model("influence-engine-tests/cached", cache_dir=tmp_path / "cache") == snapshot.resolve()


def test_the_cache_defaults_to_the_environment_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("INFLUENCE_CACHE_DIR")
    assert default_cache_dir().parts[-2:] == (".cache", "influence-engine")


# --- a real GGUF round trip: a tiny Llama written with gguf's own writer, read back by transformers' loader ---


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _mkdir(path):
    path.mkdir()
    return path


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary reordering of q/k rows (convert_hf_to_gguf.py), which transformers' loader undoes."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(model, tokenizer, path) -> None:
    """A float32 GGUF of a Llama model with a byte-level BPE tokenizer: the keys transformers' loader reads."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    special = set(tokenizer.all_special_ids)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        stem, suffix = name.rsplit(".", 1)
        data = tensor.detach().float().numpy().copy()
        if stem.endswith("q_proj"):
            data = _permute(data, config.num_attention_heads)
        elif stem.endswith("k_proj"):
            data = _permute(data, config.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(stem)}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    # Its own tokenizer: the session's 120-token one learns no merges (the byte alphabet alone is 256),
    # and transformers cannot rebuild a byte-level BPE from a GGUF that lists none.
    tokenizer = build_tokenizer(TEXTS, vocab_size=400)
    root = tmp_path_factory.mktemp("gguf")
    model_dir = build_model(root / "model", tokenizer, "llama", hidden=8, layers=2, heads=2, intermediate=12)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    write_llama_gguf(model, tokenizer, root / "tiny.gguf")
    return root / "tiny.gguf", model, tokenizer


def test_a_gguf_file_converts_to_the_same_model_and_tokenizer(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, original, tokenizer = tiny_gguf
    converted = resolve_model(gguf_file, cache_dir=tmp_path, progress=False)
    assert converted == gguf_cache_path(gguf_file, tmp_path) and converted.parent == tmp_path / "gguf"
    assert not [p.name for p in converted.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"

    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    expected, got = original.state_dict(), model.state_dict()
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    text = TEXTS[1] + " " + TEXTS[7]  # English and Korean: multi-byte characters through the byte-level BPE
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert AutoTokenizer.from_pretrained(converted)(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():  # the architecture round-trips too: head_dim, rope base, untied head
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_gguf_conversion_is_reused_and_follows_the_file(tiny_gguf, tmp_path):
    gguf_file = tiny_gguf[0]
    first = resolve_model(gguf_file, cache_dir=tmp_path, progress=False)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert resolve_model(gguf_file, cache_dir=tmp_path, progress=False) == first
    assert time.perf_counter() - start < 0.5 and (first / "model.safetensors").stat().st_mtime_ns == stamp

    copy = tmp_path / "moved" / gguf_file.name  # another file (path, size, mtime) is another cache entry
    copy.parent.mkdir()
    copy.write_bytes(gguf_file.read_bytes())
    assert resolve_model(copy, cache_dir=tmp_path, progress=False) != first


def test_an_unreadable_gguf_file_is_refused_and_leaves_no_cache_entry(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    broken = _write(tmp_path / "broken.gguf", b"GGUF" + b"\0" * 64)
    with pytest.raises(InfluenceError, match="cannot load") as error:
        resolve_model(broken, cache_dir=tmp_path / "cache", progress=False)
    assert "\n" not in error.value.args[0]
    assert not list((tmp_path / "cache" / "gguf").iterdir())


def test_a_gguf_file_without_the_extra_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` meets when the extra is not installed
    with pytest.raises(InfluenceError, match=r'pip install -e "\.\[gguf\]"'):
        resolve_model(_write(tmp_path / "model.gguf", b"GGUF"), cache_dir=tmp_path / "cache")


def test_temporary_directories_of_killed_writers_on_this_machine_are_removed(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
    killed, running = tmp_path / f".model.{host}.{finished.pid}.a", tmp_path / f".model.{host}.{os.getpid()}.b"
    elsewhere = tmp_path / f".model.another_host.{finished.pid}.c"  # a writer on another machine of a shared cache
    for path in (killed, running, elsewhere):
        path.mkdir()
    fresh = temporary_sibling(tmp_path / "model")
    assert not killed.exists() and running.is_dir() and elsewhere.is_dir() and fresh.is_dir() and not any(fresh.iterdir())
