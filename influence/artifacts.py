"""Atomic writes, manifests, output guards and locks: what makes every artifact directory self-describing and safe.

A manifest records what an artifact was built from (model and corpus fingerprints, tracked modules, the stage's
arguments, package versions). Stages compare manifests before reading each other's output and refuse mismatches
with an error that says which input differs and how to fix it.

`prepare_output` is the one gate every stage passes before it writes: the output may not be one of the inputs (or
inside one), may not hold another kind of artifact or unrelated files, must be writable with room to spare, and
is locked against a second writer for the duration.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from influence.constants import ARGS_NAME, ARTIFACT_FILES, LOCK_NAME, MANIFEST_NAME
from influence.errors import InfluenceError

LOG = logging.getLogger(__name__)


def _no_space(path: Path, exc: OSError) -> InfluenceError:
    free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    return InfluenceError(f"no space left on the device while writing {path} ({free / 2**20:.0f} MiB free there); "
                          "free some space or choose an output on another disk, then re-run (finished shards are kept)")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield an unused temporary sibling of `path`; rename it onto `path` only if the block succeeds.

    The temporary file is created by the writer in the block, so it gets the usual permissions (umask), and it is
    removed whatever happens. A full disk becomes an InfluenceError that names the path.
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise _no_space(path, exc) from exc
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
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


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
    """The input an artifact recorded under `name`: relative to the artifact if it is there, else the absolute path."""
    relative = manifest.get(f"{name}_relative")
    if isinstance(relative, str) and (Path(artifact_dir) / relative).exists():
        return (Path(artifact_dir) / relative).resolve()
    return Path(manifest[name])


# --- the gate before any write ----------------------------------------------------------------------------------

def check_writable(path: Path) -> Path:
    """Refuse a path that cannot be created (a file in the way, a read-only parent) before any work; returns the
    nearest existing directory at or above it."""
    path = Path(path).resolve()
    probe = next(p for p in (path, *path.parents) if p.exists())
    if not probe.is_dir():
        raise InfluenceError(f"cannot create output directory {path}: {probe} is a file; choose a writable path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InfluenceError(f"cannot create output directory {path}: {probe} is not writable; choose a writable path")
    return probe


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_output(out: Path, kind: str, inputs: Mapping[str, Optional[Path]], needed_bytes: int = 0) -> None:
    """Refuse, before anything is written, an output that would overwrite an input, another artifact or unrelated files.

    Args:
        out: the output directory.
        kind: the artifact kind the stage writes ("corpus", "factors", "index", "scores", "report" ...).
        inputs: name -> path of every input (documents, model, corpus, factors, index); None entries are skipped.
        needed_bytes: an estimate of what the stage will write, checked against the free space.
    """
    out = Path(out).resolve()
    for name, path in inputs.items():
        if path is None:
            continue
        path = Path(path).resolve()
        if _inside(out, path) or (path.is_file() and out == path):
            raise InfluenceError(f"the output {out} is the {name} input {path}{' or inside it' if out != path else ''}; "
                                 "writing there would overwrite it: choose another --out")
    if out.exists() and not out.is_dir():
        raise InfluenceError(f"the output {out} is an existing file; the {kind} stage writes a directory: choose another --out")
    if out.is_dir():
        manifest = out / MANIFEST_NAME
        if manifest.is_file():
            try:
                found = json.loads(manifest.read_text(encoding="utf-8")).get("kind")
            except (ValueError, UnicodeDecodeError, AttributeError):
                found = None
            if found != kind:
                raise InfluenceError(f"the output {out} holds a '{found}' artifact, not '{kind}'; choose another --out "
                                     "(or delete that directory)")
        known = ARTIFACT_FILES.get(kind, ())
        strangers = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")
                           and not any(p.match(pattern) for pattern in known))
        if strangers:
            shown = ", ".join(strangers[:5]) + (" ..." if len(strangers) > 5 else "")
            what = "a model directory" if "config.json" in strangers else f"files the {kind} stage does not write ({shown})"
            raise InfluenceError(f"the output {out} holds {what}; choose an empty or new directory for --out")
    probe = check_writable(out)
    if needed_bytes:
        free = shutil.disk_usage(probe).free
        if free < needed_bytes:
            raise InfluenceError(f"the {kind} stage needs about {needed_bytes / 2**20:.0f} MiB but only {free / 2**20:.0f} MiB are "
                                 f"free on the disk of {out}; free some space or choose another --out")


@contextmanager
def prepare_output(out: Path, kind: str, inputs: Mapping[str, Optional[Path]], needed_bytes: int = 0) -> Iterator[Path]:
    """`check_output`, then create `out` and hold its lock while the block writes; a first attempt that fails before it
    finished any work (only its settings were written) leaves no directory behind."""
    out = Path(out).resolve()
    check_output(out, kind, inputs, needed_bytes)
    created = not out.exists()
    ensure_writable_dir(out)
    try:
        with lock_directory(out):
            yield out
    except BaseException:
        if created and out.is_dir() and not any(p for p in out.iterdir() if p.name not in (LOCK_NAME, ARGS_NAME)):
            shutil.rmtree(out, ignore_errors=True)
        raise


@contextmanager
def lock_directory(directory: Path) -> Iterator[None]:
    """An exclusive lock on an artifact directory for one writer; a second one gets a clear error, not a race.

    The lock file is removed on release; a writer that locked a file another one has just removed retries on the
    new file, so two writers never both hold "the" lock.
    """
    path = Path(directory) / LOCK_NAME
    while True:
        try:
            handle = open(path, "a+")
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _no_space(path, exc) from exc
            raise InfluenceError(f"cannot write to {directory} ({exc.strerror}); choose a writable --out") from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise InfluenceError(f"{directory} is being written by {holder}; wait for it to finish or choose another --out") from exc
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()  # we locked a file its previous holder had just removed: lock the new one
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"influence (pid {os.getpid()})")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
