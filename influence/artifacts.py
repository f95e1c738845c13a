"""Atomic writes, fingerprints and manifests: what makes every artifact directory self-describing.

A manifest records what an artifact was built from (model and corpus fingerprints, tracked modules,
the stage's arguments, package versions). Stages compare manifests before reading each other's output
and refuse mismatches with an error that says which input differs and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from influence.constants import MANIFEST_NAME
from influence.errors import InfluenceError

LOG = logging.getLogger(__name__)
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp creates 0600; artifacts get the usual permissions
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def ensure_writable_dir(directory: Path) -> Path:
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InfluenceError(f"cannot create output directory {directory}: {exc.strerror}; choose a writable path") from exc
    if not os.access(directory, os.W_OK):
        raise InfluenceError(f"output directory {directory} is not writable; choose a writable path or fix its permissions")
    return directory


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # e.g. a binary file put in its place
        raise InfluenceError(f"{path} is not valid JSON ({exc}); delete it and re-run the stage that wrote it") from exc


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise InfluenceError(f"{path} is not a readable safetensors file ({exc}); delete it and re-run the stage") from exc


def write_parquet(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_tables(directory: Path, tables: Mapping[str, pa.Table]) -> None:
    """Each table as NAME.parquet (for programs) and NAME.csv (for spreadsheets), atomically."""
    import pyarrow.csv as pacsv

    for name, table in tables.items():
        write_parquet(Path(directory) / f"{name}.parquet", table)
        with atomic_path(Path(directory) / f"{name}.csv") as tmp:
            pacsv.write_csv(table, tmp)


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """A content hash of named tensors (dtype, shape and bytes), independent of dict order."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for name in ("influence-engine", "torch", "transformers", "pyarrow", "safetensors", "faiss-cpu", "ray"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions


def write_manifest(directory: Path, kind: str, **fields: Any) -> dict:
    manifest = {"kind": kind, **fields, "versions": package_versions()}
    write_json(Path(directory) / MANIFEST_NAME, manifest)
    return manifest


# Keys the stages read from each kind of manifest (with their types): checked on load, so a manifest
# edited by hand or written by another version fails with a message instead of a KeyError.
MANIFEST_KEYS: dict[str, dict[str, type]] = {
    "corpus": {"corpus_fingerprint": str, "tokenizer_fingerprint": str, "documents": str, "args": dict},
    "factors": {"model_fingerprint": str, "corpus_fingerprint": str, "modules": list, "args": dict},
    "index": {"model_fingerprint": str, "corpus_fingerprint": str, "factors_fingerprint": str, "modules": list, "args": dict,
              "model_dir": str, "factors_dir": str, "corpus_dir": str},
}


def read_manifest(directory: Path, kind: str) -> dict:
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        raise InfluenceError(f"{directory} has no {MANIFEST_NAME}: it is not a finished {kind} artifact; re-run the {kind} stage")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        found = manifest.get("kind") if isinstance(manifest, dict) else type(manifest).__name__
        raise InfluenceError(f"{directory} holds a '{found}' artifact, not '{kind}'; point to the {kind} directory")
    bad = [key for key, kind_of in MANIFEST_KEYS.get(kind, {}).items() if not isinstance(manifest.get(key), kind_of)]
    if bad:
        raise InfluenceError(f"{path} lacks or mistypes {', '.join(bad)}: it was edited by hand or written by another version; "
                             f"re-run the {kind} stage into a new directory")
    return manifest


def require_same(what: str, expected: Any, found: Any, where: Path, fix: str) -> None:
    """Refuse to mix artifacts: `expected` comes from the caller's inputs, `found` from an artifact on disk."""
    if expected != found:
        raise InfluenceError(f"{what} mismatch: {where} was built from {found!r} but the inputs give {expected!r}; {fix}")
