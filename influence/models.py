"""Model adapters: load a causal LM from a local directory and find the modules to track.

A tracked module maps an input a (d_in) to an output W a + b (d_out). Both `nn.Linear` (weight
d_out x d_in) and GPT-2's `Conv1D` (weight d_in x d_out) are supported; everything downstream works
in the (d_out, d_in [+1 for the bias]) convention, so the architecture only matters here.
"""

from __future__ import annotations

import logging
import re
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

    def weight_gradient(self, gradient: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Split G (d_out, d_in [+1]) back into the parameters' own layouts (weight, bias)."""
        d_in = self.shape[1] - int(self.has_bias)
        weight = gradient[..., :d_in]
        weight = weight.transpose(-1, -2) if self.transposed else weight
        return weight, (gradient[..., d_in] if self.has_bias else None)


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


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:
        raise InfluenceError(
            f"no usable tokenizer in {model_dir} ({type(exc).__name__}); save one there with tokenizer.save_pretrained(dir)"
        ) from exc
    return tokenizer


def quiet_transformers() -> None:
    """Turn off transformers' per-load/save progress bars: noise next to the stages' own bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_model(model_dir: Path | str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """Load a causal LM saved with `save_pretrained`, in eval mode (no dropout), never from a hub."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise InfluenceError(f"{model_dir} has no config.json: point --model to a directory written by save_pretrained")
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        raise InfluenceError(f"{model_dir} has no weights ({' or '.join(WEIGHT_FILES[:1])}); save the model with save_pretrained")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise InfluenceError(f"cannot load a causal LM from {model_dir} ({type(exc).__name__}: {exc}); "
                             "check that its weight files are complete, or save the model again with save_pretrained") from exc
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            raise InfluenceError(f"{model_dir} has non-finite (NaN/inf) weights in {name}; the checkpoint is corrupt")
    return model.to(device).eval()


def fingerprint_model(model_dir: Path | str) -> str:
    """A content hash of the checkpoint's config and weight files (independent of the load dtype).

    Factors and indexes record it and refuse to be used with another model.
    """
    import hashlib

    model_dir = Path(model_dir)
    digest = hashlib.blake2b(digest_size=16)
    files = sorted(p for p in model_dir.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()
