"""Where models come from: turn what a user points at into a local `save_pretrained` directory.

Every stage loads its model with `from_pretrained(local_dir)`. `resolve_model` accepts the three
places users keep models and returns such a directory:

- a directory written by `save_pretrained`: returned as is;
- a `.gguf` file (llama.cpp's format, how many small models are shipped): dequantized once through
  transformers' GGUF loader and saved as float32 safetensors in a cache, reused on later calls;
- a Hub id such as `HuggingFaceTB/SmolLM2-135M-Instruct`: downloaded into the cache when there is a
  network, with a short timeout and a one-line error when there is not.
"""

from __future__ import annotations

import copy
import functools
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from influence.errors import InfluenceError

LOG = logging.getLogger(__name__)

CACHE_ENV = "INFLUENCE_CACHE_DIR"
GGUF_EXTRA = 'pip install -e ".[gguf]"'
HUB_TIMEOUT_S = 5.0  # one metadata request; without it huggingface_hub's requests wait forever on a silent network
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# What a causal LM needs from a Hub repository; skips the duplicate .bin, .gguf, ONNX and TF weights many repos carry.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
GGUF_RECORD = "gguf.json"


def default_cache_dir() -> Path:
    """`$INFLUENCE_CACHE_DIR`, else `~/.cache/influence-engine`: where converted and downloaded models live."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "influence-engine"


def resolve_model(reference: str | Path, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """A local directory that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load.

    Args:
        reference: a `save_pretrained` directory, a `.gguf` file, or a Hub id (`owner/name`).
        cache_dir: where GGUF conversions and Hub downloads are kept; default `default_cache_dir()`.
        progress: show progress bars while converting or downloading.

    Returns:
        The absolute path of the directory.

    Raises:
        InfluenceError: the reference is none of the three, the GGUF extra is not installed, the GGUF
            file cannot be converted, or the Hub id cannot be downloaded (no network, unknown id).
    """
    text = str(reference)
    path = Path(text).expanduser()
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve()
        raise InfluenceError(f"{path} is a directory without config.json, so not a save_pretrained directory; "
                             "point to the directory model.save_pretrained(dir) wrote, or to a .gguf file")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return convert_gguf(path, cache_dir, progress=progress)
        raise InfluenceError(f"{path} is a file but not a .gguf file; pass a save_pretrained directory, "
                             "a .gguf file or a Hub id (owner/name)")
    if HUB_ID.match(text) and path.suffix.lower() != ".gguf":  # `models/x.gguf` is a missing file, not a repository
        return download_hub_model(text, cache_dir, progress=progress)
    raise InfluenceError(f"{text} is neither a save_pretrained directory, a .gguf file nor a Hub id (no such path); "
                         "check the path, or pass a Hub id as owner/name")


def gguf_cache_path(gguf_path: Path, cache_dir: Path) -> Path:
    """`<cache_dir>/gguf/<stem>-<hash>`, the hash of the file's resolved path, size and mtime_ns.

    Path, size and modification time identify the file without reading its gigabyte; a file
    replaced in place gets a new entry rather than a stale conversion.
    """
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.blake2b(f"{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode(), digest_size=6).hexdigest()
    return Path(cache_dir) / "gguf" / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path, cache_dir: Path, progress: bool = True) -> Path:
    """Dequantize a GGUF file once into a `save_pretrained` directory in the cache; reuse it later.

    The directory is written under a temporary sibling name and renamed into place, so a killed
    conversion leaves no half-written entry; when two processes convert the same file, the first
    rename wins and the other uses its result.

    Raises:
        InfluenceError: the GGUF extra (gguf, accelerate) is missing, or transformers cannot read the file.
    """
    gguf_path = Path(gguf_path).resolve()
    target = gguf_cache_path(gguf_path, cache_dir)
    if (target / "config.json").is_file():
        LOG.info("reusing the conversion of %s in %s", gguf_path.name, target)
        return target
    _require_gguf_extra()
    stat = gguf_path.stat()
    tmp = temporary_sibling(target)
    try:
        start = time.perf_counter()
        with _hf_progress(progress):
            model, tokenizer = _load_gguf(gguf_path)
            loaded = time.perf_counter() - start
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        record = {"gguf_file": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                  "dtype": "float32", "dequantize_seconds": round(loaded, 3),
                  "seconds": round(time.perf_counter() - start, 3), "transformers": _version("transformers"),
                  "gguf": _version("gguf")}
        (tmp / GGUF_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        make_readable(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that finished first
                raise
        LOG.info("dequantized %s in %.1f s (%.1f s with saving) into %s", gguf_path.name, loaded, record["seconds"], target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def temporary_sibling(target: Path) -> Path:
    """A new empty directory beside `target`, named `.<name>.<host>.<pid>.<random>`, to be renamed into `target`.

    A killed writer cannot remove its temporary directory, and a GGUF conversion's is about a gigabyte:
    siblings left by processes of this machine that no longer run are removed first. The host is in the
    name because a cache on a shared filesystem also holds other machines' writers, whose pids mean nothing here.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
    for stale in target.parent.glob(f".{glob.escape(target.name)}.{glob.escape(host)}.*"):
        pid = stale.name[len(target.name) + len(host) + 3:].split(".")[0]
        if stale.is_dir() and pid.isdigit() and not _process_alive(int(pid)):
            LOG.info("removing %s, left by a killed process", stale)
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{host}.{os.getpid()}.", dir=target.parent))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def make_readable(directory: Path) -> None:
    """Give a finished directory and its files the modes `mkdir` and `open` would (0755, 0644).

    `tempfile.mkdtemp` makes a 0700 directory and the weights come out 0600, which would hide a public
    model from the other users and the Ray workers that read a shared cache or output directory.
    """
    directory.chmod(0o755)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o644)


def download_hub_model(repo_id: str, cache_dir: Path, progress: bool = True) -> Path:
    """A Hub model's snapshot directory: from huggingface_hub's own cache, else downloaded into `cache_dir/hub`.

    One metadata request with a `HUB_TIMEOUT_S` timeout decides whether the Hub can be reached, so a
    machine without network gets its answer in seconds; the download then pins the commit it named.

    Raises:
        InfluenceError: no network, or no such (accessible) model on the Hub.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    for where in (None, cache_dir / "hub"):  # a model the user already downloaded with transformers counts
        try:
            snapshot = Path(snapshot_download(repo_id, cache_dir=where, allow_patterns=HUB_PATTERNS, local_files_only=True))
        except (LocalEntryNotFoundError, OSError):
            continue
        if (snapshot / "config.json").is_file() and (any(snapshot.glob("*.safetensors")) or any(snapshot.glob("*.bin"))):
            return snapshot.resolve()  # else only a config was fetched there (AutoConfig): download the rest
    fix = "download it on a machine with network and pass the directory (save_pretrained or snapshot), or pass a local .gguf file"
    try:
        info = HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise InfluenceError(f"{repo_id} is not a local path, and the Hub has no accessible model of that id "
                             f"({type(exc).__name__}); check the id or the token, or {fix}") from exc
    except Exception as exc:  # ConnectError, timeouts, offline mode: all mean the Hub cannot be reached
        raise InfluenceError(f"{repo_id} is not a local path and could not be downloaded from the Hub: no network "
                             f"({type(exc).__name__}: {exc}); {fix}") from exc
    start = time.perf_counter()
    with _hf_progress(progress):
        snapshot = snapshot_download(repo_id, revision=info.sha, cache_dir=cache_dir / "hub",
                                     allow_patterns=HUB_PATTERNS, etag_timeout=HUB_TIMEOUT_S)
    LOG.info("downloaded %s@%s in %.1f s into %s", repo_id, info.sha, time.perf_counter() - start, snapshot)
    path = Path(snapshot).resolve()
    if not (path / "config.json").is_file():
        raise InfluenceError(f"the Hub repository {repo_id} has no config.json, so it is not a transformers model; "
                             "pass a save_pretrained directory or a .gguf file")
    return path


def _load_gguf(gguf_path: Path):
    """The dequantized model (rebuilt without its quantization config) and tokenizer of a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    where, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
        # dequantize=True: a transformers that can keep some blocks packed (GgufLinear, with `kernels`)
        # must still give plain nn.Linear weights here, which is what the engine tracks and saves.
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, local_files_only=True, dtype=torch.float32,
                                                      quantization_config=GgufConfig(dequantize=True))
    except (ImportError, ValueError, KeyError, NotImplementedError, OSError) as exc:
        raise InfluenceError(f"transformers cannot load {gguf_path} ({type(exc).__name__}: {exc}); "
                             "check that the file is complete and its architecture is one transformers reads from GGUF "
                             "(llama, qwen2, gemma3, ...), or convert the model to a save_pretrained directory elsewhere"
                             ) from exc
    # A model that carries a quantization_config refuses save_pretrained, though its weights are plain
    # tensors now; a fresh model from the same config without it takes the same state dict.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # transformers files the GGUF's `general.name` under this made-up key; it names no path, so drop it.
    if hasattr(config, "_model_name_or_path"):
        delattr(config, "_model_name_or_path")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # float32, not bfloat16: dequantized blocks are scale x small integer (+ offset) in float32, which
    # bfloat16's 8-bit mantissa would round off; the engine computes in float32 anyway, at twice the disk.
    model.load_state_dict({k: v.float() for k, v in loaded.state_dict().items()}, strict=True)
    model.eval()
    return model, tokenizer


def _require_gguf_extra() -> None:
    try:
        import accelerate  # noqa: F401  (transformers refuses a gguf_file without it)
        import gguf  # noqa: F401
    except ImportError as exc:
        raise InfluenceError(f"reading .gguf files needs the gguf and accelerate packages ({exc}); "
                             f"install them with {GGUF_EXTRA}") from exc


@contextmanager
def _hf_progress(progress: bool) -> Iterator[None]:
    """Turn the Hub's and transformers' progress bars off for the duration, when `progress` is False."""
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_loader
    except ImportError:  # a transformers without the legacy GGUF loader
        gguf_loader = None
    was_enabled = hf_logging.is_progress_bar_enabled()
    # The GGUF loader's per-tensor bar is a bare tqdm that ignores the switch above.
    bare_tqdm = getattr(gguf_loader, "tqdm", None)
    if not progress:
        hf_logging.disable_progress_bar()
        if bare_tqdm is not None:
            gguf_loader.tqdm = functools.partial(bare_tqdm, disable=True)
    try:
        yield
    finally:
        if not progress:
            if bare_tqdm is not None:
                gguf_loader.tqdm = bare_tqdm
            if was_enabled:
                hf_logging.enable_progress_bar()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
