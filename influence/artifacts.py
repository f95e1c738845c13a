"""Atomic writes and manifests: what makes every artifact directory self-describing.

A manifest records what an artifact was built from (model and corpus fingerprints, tracked modules, the stage's
arguments, package versions). Stages compare manifests before reading each other's output and refuse mismatches
with an error that says which input differs and how to fix it; an artifact records where its inputs were
(`references`) and finds them again when moved with them (`resolve_reference`). Every write goes through
`atomic_path` (temporary file, then rename); a disk that fills becomes one error naming the file and the size.
What a stage checks before it writes, and the lock it holds while it does, are in `outputs.py`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from influence.constants import MANIFEST_NAME
from influence.errors import InfluenceError

LOG = logging.getLogger(__name__)


def _process_umask() -> int:
    """This process's umask, read without changing it (os.umask can only set it, which races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


_FILE_MODE = 0o666 & ~_process_umask()


def format_bytes(count: float) -> str:
    """A size as people read it: 512 B, 64.0 KiB, 3.2 MiB, 1.5 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{int(count)} B"


def free_bytes(path: Path) -> int:
    """Free space on the disk of `path` (or of its nearest existing parent)."""
    path = Path(path).resolve()
    probe = next((p for p in (path, *path.parents) if p.exists()), Path.cwd())
    return shutil.disk_usage(probe).free


def no_space_error(path: Path, written: int = 0, size: int = 0) -> InfluenceError:
    """The one message for a disk that filled while `path` was written: where, how much it needed, what is free."""
    if size > written:
        needed = f"it needed about {format_bytes(size)}"
    elif written:
        needed = f"it needed more than the {format_bytes(written)} written when the disk filled"
    else:
        needed = "it needed more room"
    return InfluenceError(f"no space left on the device while writing {path}: {needed}, and {format_bytes(free_bytes(path))} "
                          "are free there; free some space or choose an output on another disk, then re-run (finished shards are kept)")


# A write that failed while this little space was left on its disk failed because the disk is full, whatever the
# writer raised (FAISS raises RuntimeError, Arrow an OSError without an errno).
FULL_DISK_MARGIN = 64 * 1024
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def _write_failure(path: Path, tmp_path: Path, exc: BaseException, size: int) -> Optional[InfluenceError]:
    """The user's error for a failed write of `path`, or None when the failure is not the disk's (a bug, an interrupt)."""
    if isinstance(exc, InfluenceError) or not isinstance(exc, Exception):
        return None
    written = tmp_path.stat().st_size if tmp_path.is_file() else 0
    code = getattr(exc, "errno", None)
    if code in NO_SPACE_ERRNOS or free_bytes(path.parent) < FULL_DISK_MARGIN:
        return no_space_error(path, written, size)
    if code in READ_ONLY_ERRNOS:
        return InfluenceError(f"cannot write {path} ({exc.strerror}); choose a writable --out or fix its permissions")
    return None


@contextmanager
def atomic_path(path: Path, size: int = 0) -> Iterator[Path]:
    """Yield an unused temporary sibling of `path`; rename it onto `path` only if the block succeeds.

    The temporary file is created by the writer in the block, so it gets the usual permissions (umask), and it is
    removed whatever happens. A full disk becomes an InfluenceError that names the path and, given `size` (what the
    block writes, about), how much it needed.
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp_path
        if tmp_path.is_file():  # some writers (safetensors) create private 0600 files; artifacts get the usual mode
            os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, path)
    except BaseException as exc:
        failure = _write_failure(path, tmp_path, exc, size)
        if failure is not None:
            raise failure from exc
        raise
    finally:
        if tmp_path.is_dir():
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists():
            tmp_path.unlink()


def ensure_writable_dir(directory: Path) -> Path:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InfluenceError(f"{directory} is a file, not a directory; choose a directory path for the output")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InfluenceError(f"cannot create output directory {directory}: {exc.strerror}; choose a writable path") from exc
    if not os.access(directory, os.W_OK):
        raise InfluenceError(f"output directory {directory} is not writable; choose a writable path or fix its permissions")
    return directory


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    with atomic_path(path, len(text.encode("utf-8"))) as tmp:
        tmp.write_text(text, encoding="utf-8")


def hash_file(digest, path: Path) -> None:
    """Feed one file's bytes to a hashlib `digest`, 4 MiB at a time (about a second per GB)."""
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)


def file_fingerprint(path: Path) -> str:
    """A content hash of one file (blake2b, 128 bits): what a manifest records to notice a file changed after it."""
    digest = hashlib.blake2b(digest_size=16)
    hash_file(digest, path)
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # e.g. a binary file put in its place
        raise InfluenceError(f"{path} is not valid JSON ({exc}); delete it and re-run the stage that wrote it") from exc


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write tensors as safetensors, atomically. Tensors that share memory (one eigendecomposition serving two modules)
    are written as copies: safetensors refuses shared storage."""
    seen: set[int] = set()
    plain = {}
    for key, value in tensors.items():
        value = value.detach().contiguous().cpu()
        pointer = value.untyped_storage().data_ptr()
        plain[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    with atomic_path(path, sum(t.numel() * t.element_size() for t in plain.values())) as tmp:
        save_file(plain, str(tmp))


def read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over a read-only array (memory-mapped, or from Ray's object store) without copying it; its users only
    read it. A copy would double the memory of what it holds: a fit's float64 sums, a basis, a store's codes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise InfluenceError(f"{path} is not a readable safetensors file ({exc}); delete it and re-run the stage") from exc


def write_parquet(path: Path, table: pa.Table) -> None:
    with atomic_path(path, table.nbytes) as tmp:
        pq.write_table(table, tmp)


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
    "factors": {"model_fingerprint": str, "corpus_fingerprint": str, "factors_fingerprint": str, "modules": list, "args": dict,
                "tokenizer_fingerprint": str},
    "index": {"model_fingerprint": str, "corpus_fingerprint": str, "factors_fingerprint": str, "modules": list, "args": dict,
              "model_dir": str, "factors_dir": str, "corpus_dir": str, "sketch_dim": int},
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


def require_same_plan(saved: Any, saved_path: Path, plan_identity: dict, keys: Sequence[str], out_dir: Path, others: str,
                      args) -> None:
    """Refuse to resume `out_dir` whose saved settings (read from `saved_path`) came from other inputs (`keys` of
    `plan_identity`, e.g. model and corpus fingerprints) or other stage arguments."""
    if not isinstance(saved, dict) or not isinstance(saved.get("args"), dict):
        raise InfluenceError(f"{saved_path} was edited by hand or written by another version; use a new --out")
    for key in keys:
        require_same(key.replace("_fingerprint", ""), plan_identity[key], saved.get(key), out_dir,
                     f"use a new --out directory for another {others} (or delete the old one)")
    args.require_matches(saved["args"], str(out_dir))


# --- references between artifacts ------------------------------------------------------------------------------

def references(artifact_dir: Path, **targets: Path) -> dict[str, str]:
    """How an artifact records the ones it was built from: each absolute (`NAME`) and, when both live under one parent,
    relative to the artifact (`NAME_relative`), so a run directory moved as a whole, or one artifact copied elsewhere,
    still finds its inputs."""
    artifact_dir = Path(artifact_dir).resolve()
    recorded = {}
    for name, target in targets.items():
        target = Path(target).resolve()
        recorded[name] = str(target)
        if artifact_dir.parent in target.parents or target.parent == artifact_dir.parent:
            recorded[f"{name}_relative"] = os.path.relpath(target, artifact_dir)
    return recorded


def resolve_reference(manifest: Mapping[str, Any], name: str, artifact_dir: Path) -> Path:
    """The input an artifact recorded under `name`: relative to the artifact if it is there, else the absolute path.

    Raises:
        InfluenceError: neither exists (the inputs were moved or deleted); the message names the override option.
    """
    relative = manifest.get(f"{name}_relative")
    if isinstance(relative, str) and (Path(artifact_dir) / relative).exists():
        return (Path(artifact_dir) / relative).resolve()
    recorded = Path(manifest[name])
    if not recorded.exists():
        option = "--" + name.removesuffix("_dir")
        where = f"{recorded}" + (f" (or {relative} relative to it)" if isinstance(relative, str) else "")
        raise InfluenceError(f"{artifact_dir} was built from the {name.removesuffix('_dir')} at {where}, which no longer exists; "
                             f"pass its new location with {option}")
    return recorded

