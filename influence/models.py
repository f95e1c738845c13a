"""Model adapters: what a model is (its identity), which of its modules are tracked, and loading it once per process.

A tracked module maps an input a (d_in) to an output W a + b (d_out). Both `nn.Linear` (weight d_out x d_in) and
GPT-2's `Conv1D` (weight d_in x d_out) are supported; everything downstream works in the (d_out, d_in [+1 for the
bias]) convention, so the architecture only matters here.

Three views of a model, from cheapest to dearest:
- `model_identity`: a content hash of the checkpoint, computed once per set of files and cached by their sizes
  and modification times, plus a quick fingerprint (config, file sizes, safetensors headers, sampled blocks) that
  every worker re-checks in milliseconds;
- `describe_model`: module names and shapes and the context length, from the config alone (the model is built on
  PyTorch's "meta" device: no weights are read), which is all the driver of a stage needs;
- `load_model_context`: the weights, frozen, with the tracked modules: what a worker computes with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from influence.errors import InfluenceError

LOG = logging.getLogger(__name__)

try:  # transformers keeps GPT-2's transposed linear layer here
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment]

# Presets for `module_pattern`; anything else is a regular expression searched in module names.
MODULE_PRESETS = {
    "mlp": r"\.(mlp|feed_forward|ffn)\.",
    "attention": r"\.(attn|attention|self_attn)\.",
    "all": r".",
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TrackedModule:
    """A linear-like module: its name, the module, and whether its weight is stored transposed."""

    name: str
    module: nn.Module
    transposed: bool  # GPT-2 Conv1D stores (d_in, d_out)

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in + bias) of the gradient matrix G."""
        weight = self.module.weight
        d_out, d_in = (weight.shape[1], weight.shape[0]) if self.transposed else tuple(weight.shape)
        return int(d_out), int(d_in) + int(self.has_bias)


def _is_supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def find_tracked_modules(model: nn.Module, pattern: Optional[str] = None) -> list[TrackedModule]:
    """Modules whose names match `pattern` (a preset name or a regex; default: the MLP layers).

    Raises:
        InfluenceError: the pattern matches nothing, or matches a module type that is not supported.
    """
    regex_text = MODULE_PRESETS.get(pattern or "mlp", pattern)
    try:
        regex = re.compile(regex_text)
    except re.error as exc:
        raise InfluenceError(f"module pattern {pattern!r} is not a valid regular expression ({exc}); fix it, or use a preset: "
                             f"{', '.join(MODULE_PRESETS)}") from exc
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tracked, unsupported = [], []
    for name, module in model.named_modules():
        if not name or not regex.search(name) or module is output_embeddings:
            continue
        if _is_supported(module):
            tracked.append(TrackedModule(name, module, transposed=not isinstance(module, nn.Linear)))
        elif pattern not in (None, "mlp", "attention", "all") and not list(module.children()):
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise InfluenceError(
            f"module pattern {pattern!r} matches unsupported module types: {', '.join(unsupported[:8])}; "
            "only nn.Linear and GPT-2 Conv1D layers can be tracked, narrow the pattern to those"
        )
    if not tracked:
        available = [n for n, m in model.named_modules() if n and _is_supported(m)]
        raise InfluenceError(
            f"module pattern {pattern or 'mlp'!r} ({regex_text}) matches no linear layer of {type(model).__name__}; "
            f"linear layers found: {', '.join(available[:12])}{' ...' if len(available) > 12 else ''}"
        )
    return tracked


def quiet_transformers() -> None:
    """Turn off transformers' per-load/save progress bars: noise next to the stages' own bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def require_model_dir(model_dir: Path | str) -> Path:
    """The model directory, absolute, if it holds a config and weights; else a one-line error."""
    model_dir = Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise InfluenceError(f"model directory {model_dir} does not exist; pass a directory written by save_pretrained "
                             "(or a .gguf file)")
    if not (model_dir / "config.json").is_file():
        raise InfluenceError(f"{model_dir} has no config.json: point --model to a directory written by save_pretrained")
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        raise InfluenceError(f"{model_dir} has no weights ({' or '.join(WEIGHT_FILES[:1])}); save the model with save_pretrained")
    return model_dir


def load_tokenizer(model_dir: Path | str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise InfluenceError(
            f"no usable tokenizer in {model_dir} ({type(exc).__name__}); save one there with tokenizer.save_pretrained(dir)"
        ) from exc
    return tokenizer


def load_config(model_dir: Path | str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise InfluenceError(f"{model_dir}/config.json is not a usable transformers config ({type(exc).__name__}: {exc}); "
                             "save the model again with save_pretrained") from exc


def load_model(model_dir: Path | str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """Load a causal LM saved with `save_pretrained`, in eval mode with every parameter frozen, never from a hub.

    Frozen: influence needs the tracked modules' inputs and output gradients, never the weights' gradients
    (`gradients.capture_module_io` makes the outputs the leaves of the backward pass).
    """
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    model_dir = require_model_dir(model_dir)
    check_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise InfluenceError(f"cannot load a causal LM from {model_dir} ({type(exc).__name__}: {exc}); "
                             "check that its weight files are complete, or save the model again with save_pretrained") from exc
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            raise InfluenceError(f"{model_dir} has non-finite (NaN/inf) weights in {name}; the checkpoint is corrupt")
    model.requires_grad_(False)
    return model.to(device).eval()


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before any model is loaded."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InfluenceError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InfluenceError(f"device {device!r} was asked for but this machine has no usable CUDA GPU; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise InfluenceError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s); "
                             "use cuda:0 .. cuda:N-1")
    if parsed.type not in ("cpu", "cuda"):
        raise InfluenceError(f"device type {parsed.type!r} is not supported; use 'cpu' or 'cuda'")


def context_length(config) -> Optional[int]:
    """The longest sequence the model takes (from its config), or None when it states none."""
    config = getattr(config, "config", config)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# --- identity ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelIdentity:
    """What a model is: a content hash of its checkpoint, and a quick fingerprint workers re-check cheaply."""

    fingerprint: str
    quick: str


def _model_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix in (".safetensors", ".bin")))


def quick_fingerprint(model_dir: Path | str) -> str:
    """config.json, each weight file's name and size, its safetensors header and 16 sampled 4 KiB blocks.

    Milliseconds for any size: what a worker checks to know it reads the same checkpoint as the driver.
    """
    model_dir = Path(model_dir)
    digest = hashlib.blake2b(digest_size=16)
    for path in _model_files(model_dir):
        size = path.stat().st_size
        digest.update(f"{path.name}\x00{size}\x00".encode())
        with path.open("rb") as handle:
            if path.name == "config.json":
                digest.update(handle.read())
                continue
            if path.suffix == ".safetensors" and size >= 8:
                header_length = int.from_bytes(handle.read(8), "little")
                digest.update(handle.read(min(header_length, 1 << 26)))
            for k in range(16):
                handle.seek(size * k // 16)
                digest.update(handle.read(4096))
    return digest.hexdigest()


def _content_fingerprint(model_dir: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for path in _model_files(model_dir):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def model_identity(model_dir: Path | str, cache_dir: Path | None = None) -> ModelIdentity:
    """The model's content hash, read from a cache keyed by its files' paths, sizes and modification times.

    A multi-GB checkpoint is hashed once, not by every stage and worker (the content hash is what manifests record
    and compare); an edited file has a new modification time and is hashed again.
    """
    from influence.sources import default_cache_dir

    model_dir = Path(model_dir).resolve()
    files = _model_files(model_dir)
    stats = {p.name: [p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino] for p in files}
    cache = Path(cache_dir or default_cache_dir()) / "fingerprints" / (hashlib.blake2b(str(model_dir).encode(), digest_size=12).hexdigest() + ".json")
    try:
        cached = json.loads(cache.read_text())
        if cached.get("stats") == stats:
            return ModelIdentity(cached["fingerprint"], quick_fingerprint(model_dir))
    except (OSError, ValueError, AttributeError):
        pass  # no cache entry, or an unreadable one: hash again
    start = time.perf_counter()
    identity = ModelIdentity(_content_fingerprint(model_dir), quick_fingerprint(model_dir))
    LOG.info("hashed %s in %.1fs", model_dir, time.perf_counter() - start)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"model_dir": str(model_dir), "stats": stats, "fingerprint": identity.fingerprint}))
        os.replace(tmp, cache)
    except OSError as exc:  # a read-only home: correct, only slower next time
        LOG.debug("cannot cache the fingerprint of %s: %s", model_dir, exc)
    return identity


# --- what the driver needs: names, shapes, context --------------------------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    """A model's tracked modules and limits, known from its config without reading any weight."""

    model_dir: str
    modules: tuple[tuple[str, tuple[int, int]], ...]   # (name, (d_out, d_in [+1]))
    context: Optional[int]
    vocab_size: int
    parameters: int

    @property
    def module_names(self) -> list[str]:
        return [name for name, _ in self.modules]


def describe_model(model_dir: Path | str, module_pattern: Optional[str] = None) -> ModelInfo:
    """Tracked modules (names, gradient shapes), context length and size of a model, from its config alone."""
    from transformers import AutoModelForCausalLM

    model_dir = require_model_dir(model_dir)
    config = load_config(model_dir)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise InfluenceError(f"{model_dir}/config.json does not describe a causal LM transformers can build "
                             f"({type(exc).__name__}: {exc}); save the model again with save_pretrained") from exc
    modules = find_tracked_modules(model, module_pattern)
    return ModelInfo(str(model_dir), tuple((m.name, m.shape) for m in modules), context_length(config),
                     int(getattr(config, "vocab_size", 0) or 0), sum(p.numel() for p in model.parameters()))


# --- what a worker needs: the weights, once per process ---------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to load a model and check it is the driver's: picklable, hashable."""

    model_dir: str
    dtype: str = "float32"
    device: str = "cpu"
    module_pattern: Optional[str] = None
    quick: str = ""


@dataclass
class LoadedModel:
    """A model loaded in this process with its tracked modules."""

    spec: ModelSpec
    model: nn.Module
    modules: list[TrackedModule]

    @property
    def device(self) -> str:
        return self.spec.device


def load_model_context(spec: ModelSpec) -> LoadedModel:
    """Load the model of `spec` and find its tracked modules, refusing a checkpoint that is not the driver's."""
    import socket

    model_dir = Path(spec.model_dir)
    if not model_dir.is_dir():
        raise InfluenceError(f"a worker on {socket.gethostname()} cannot read the model directory {model_dir}; every machine of "
                             "the cluster must see the model at the same path (a shared filesystem or a copy)")
    if spec.quick and quick_fingerprint(model_dir) != spec.quick:
        raise InfluenceError(f"the model at {model_dir} on {socket.gethostname()} differs from the driver's (another checkpoint "
                             "at the same path, or it changed during the run); make the copies identical and re-run")
    model = load_model(model_dir, DTYPES[spec.dtype], spec.device)
    return LoadedModel(spec, model, find_tracked_modules(model, spec.module_pattern))
