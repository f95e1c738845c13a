"""Atomic writes, manifests, output guards and locks: what makes every artifact directory self-describing and safe.

A manifest records what an artifact was built from (model and corpus fingerprints, tracked modules, the stage's
arguments, package versions). Stages compare manifests before reading each other's output and refuse mismatches
with an error that says which input differs and how to fix it.

`prepare_output` is the one gate every stage passes before it writes: the output may not be one of the inputs (or
inside one), may not lie inside another artifact or a model directory, may not hold another kind of artifact or
unrelated files, must be writable with room to spare, and is locked against a second writer for the duration; an
attempt that fails removes what it wrote, except the shards a re-run resumes from. Every write goes through
`atomic_path` (temporary file, then rename); a disk that fills becomes one error naming the file and the size.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import logging
import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from influence.constants import ARGS_NAME, ARTIFACT_FILES, EIGENVECTORS_NAME, LOCK_NAME, MANIFEST_NAME
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


# --- the gate before any write ----------------------------------------------------------------------------------

# Every stage writes at least a lock, a manifest or a small table: an output disk with less free space than this is
# refused up front even by a stage that cannot estimate its output.
MIN_FREE_BYTES = 256 * 1024
# Shards and saved settings of an interrupted fit or index: kept when an attempt fails, so a re-run resumes.
RESUMABLE = ("*_shard_*", EIGENVECTORS_NAME, ARGS_NAME)


def check_writable(path: Path) -> Path:
    """Refuse a path that cannot be created (a file in the way, a read-only parent or disk) before any work; returns the
    nearest existing directory at or above it."""
    path = Path(path).resolve()
    probe = next(p for p in (path, *path.parents) if p.exists())
    if not probe.is_dir():
        raise InfluenceError(f"cannot create output directory {path}: {probe} is a file; choose a writable path")
    if not os.access(probe, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only_fs(probe) else "is not writable"
        raise InfluenceError(f"cannot create output directory {path}: {probe} {why}; choose a writable path")
    return probe


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_free_space(out: Path, kind: str, needed_bytes: int) -> None:
    """Refuse an output whose disk cannot hold what the stage will write (at least MIN_FREE_BYTES)."""
    needed = max(int(needed_bytes), MIN_FREE_BYTES)
    free = free_bytes(out)
    if free < needed:
        raise InfluenceError(f"not enough space for the {kind} output {out}: it needs about {format_bytes(needed)} but only "
                             f"{format_bytes(free)} are free on that disk; free some space or choose another --out")


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def artifact_kind(directory: Path) -> Optional[str]:
    """What a directory holds: an artifact kind from its manifest, 'model' for a save_pretrained directory, else None."""
    directory = Path(directory)
    manifest = directory / MANIFEST_NAME
    if manifest.is_file():
        try:
            found = json.loads(manifest.read_text(encoding="utf-8")).get("kind")
        except (ValueError, UnicodeDecodeError, AttributeError, OSError):
            found = None
        return found if isinstance(found, str) else "unreadable"
    if (directory / "config.json").is_file() and (any(directory.glob("*.safetensors")) or any(directory.glob("*.bin"))):
        return "model"
    return None


def _nested_allowed(kind: str, out: Path, parent_kind: Optional[str]) -> bool:
    """The one artifact that lives inside another: the corpus `fit --corpus DOCUMENTS` prepares in its factors directory."""
    return kind == "corpus" and out.name == "corpus" and parent_kind == "factors"


def check_output(out: Path, kind: str, inputs: Mapping[str, Optional[Path]], needed_bytes: int = 0) -> None:
    """Refuse, before anything is written, an output that would overwrite an input, another artifact or unrelated files.

    The rules, in order: the output is not an input, nor inside one; it is not inside another artifact or a model
    directory; it is not an existing file; an existing directory holds only this kind's files (and, for the fit
    stage, the corpus it prepares); it is writable; its disk has room for `needed_bytes` (at least MIN_FREE_BYTES).

    Args:
        out: the output directory.
        kind: the artifact kind the stage writes (a key of `constants.ARTIFACT_FILES`).
        inputs: name -> path of every input (documents, model, corpus, factors, index); None entries are skipped.
        needed_bytes: an estimate of what the stage will write, checked against the free space.
    """
    out = check_existing(out, kind, inputs)
    check_writable(out)
    check_free_space(out, kind, needed_bytes)


def check_existing(out: Path, kind: str, inputs: Mapping[str, Optional[Path]]) -> Path:
    """The rules of `check_output` that do not depend on writing (the output is not an input, not inside another artifact,
    and holds nothing of another kind): what a stage checks before it reuses or resumes an output. Returns it resolved."""
    out = check_output_location(out, kind, inputs)
    if out.is_dir():
        found = artifact_kind(out)
        if found is not None and found != kind:
            what = "a model directory" if found == "model" else f"a '{found}' artifact, not '{kind}'"
            raise InfluenceError(f"the output {out} holds {what}; choose another --out (or delete that directory)")
        known = ARTIFACT_FILES.get(kind, ())
        strangers = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")
                           and not any(fnmatch.fnmatch(p.name, pattern) for pattern in known))
        if strangers:
            shown = ", ".join(strangers[:5]) + (" ..." if len(strangers) > 5 else "")
            raise InfluenceError(f"the output {out} holds files the {kind} stage does not write ({shown}); "
                                 "choose an empty or new directory for --out")
    return out


def _input_holding(out: Path, inputs: Mapping[str, Optional[Path]]) -> tuple[Optional[str], Optional[Path]]:
    """The first input (name, resolved path) that `out` is or lies inside, else (None, None)."""
    for name, path in inputs.items():
        if path is not None and _inside(out, Path(path).resolve()):
            return name, Path(path).resolve()
    return None, None


def _artifact_holding(out: Path, allowed: Callable[[Path, str], bool]) -> tuple[Optional[Path], str]:
    """The first artifact or model directory above `out` that `allowed(parent, kind)` does not permit, and how to name it."""
    for parent in out.parents:
        found = artifact_kind(parent)
        if found is not None and not allowed(parent, found):
            return parent, "a model directory" if found == "model" else f"the '{found}' artifact"
    return None, ""


def check_output_location(out: Path, kind: str, inputs: Mapping[str, Optional[Path]]) -> Path:
    """The rules of `check_output` about where the output is (not what it already holds); returns it resolved."""
    out = Path(out).resolve()
    name, path = _input_holding(out, inputs)
    if name is not None:
        raise InfluenceError(f"the output {out} is the {name} input {path}{' or inside it' if out != path else ''}; "
                             "writing there would overwrite it: choose another --out")
    parent, where = _artifact_holding(out, lambda parent, found: parent == out.parent and _nested_allowed(kind, out, found))
    if parent is not None:
        raise InfluenceError(f"the output {out} lies inside {where} {parent}; writing there would mix its files with "
                             "another artifact's: choose an --out outside it")
    if out.exists() and not out.is_dir():
        raise InfluenceError(f"the output {out} is an existing file; the {kind} stage writes a directory: choose another --out")
    return out


def check_output_file(out: Path, kind: str, suffix: str, inputs: Mapping[str, Optional[Path]],
                      same_kind: Callable[[Path], bool], what: str, needed_bytes: int = 0) -> Path:
    """`check_output` for a stage whose output is one file (the score table): a `suffix` path that is not an input or
    inside one, not inside an artifact or a model directory, not an existing directory, not an existing file of another
    kind (`same_kind` says which may be replaced), on a writable disk with room for `needed_bytes`. Returns it resolved."""
    out = Path(out).resolve()
    if out.suffix != suffix:
        raise InfluenceError(f"--out must name a {suffix} file, got {out}; give a path ending in {suffix}")
    name, path = _input_holding(out, inputs)
    if name is not None:
        raise InfluenceError(f"--out {out} is {'the' if out == path else 'inside the'} {name} input {path}; "
                             "choose a path outside it")
    parent, where = _artifact_holding(out, lambda parent, found: False)
    if parent is not None:
        raise InfluenceError(f"--out {out} lies inside {where} {parent}; writing there could overwrite its files: "
                             "choose a path outside it")
    if out.is_dir():
        raise InfluenceError(f"--out {out} is an existing directory; name a {suffix} file")
    if out.exists() and not same_kind(out):
        raise InfluenceError(f"--out {out} is an existing file that is not {what}; choose another --out (or delete it)")
    check_writable(out.parent)
    check_free_space(out.parent, kind, needed_bytes)
    return out


def _entries(directory: Path) -> dict[str, tuple]:
    """Each entry of a directory with what tells a rewrite (inode, size, modification time)."""
    if not directory.is_dir():
        return {}
    return {p.name: (stat.st_ino, stat.st_size, stat.st_mtime_ns) for p in directory.iterdir() for stat in (p.lstat(),)}


@contextmanager
def prepare_output(out: Path, kind: str, inputs: Mapping[str, Optional[Path]], needed_bytes: int = 0) -> Iterator[Path]:
    """`check_output`, then create `out` and hold its lock while the block writes.

    An attempt that fails leaves nothing it wrote but what a re-run resumes from (the shards of a fit or an index, with
    the settings they were made with): every other file it created or replaced is removed, and a directory it created
    and left empty goes too.
    """
    out = Path(out).resolve()
    check_output(out, kind, inputs, needed_bytes)
    created = not out.exists()
    ensure_writable_dir(out)
    try:
        with lock_directory(out):
            before = _entries(out)
            try:
                yield out
            except BaseException:
                _remove_partial(out, before)
                raise
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _remove_partial(out: Path, before: dict[str, tuple]) -> None:
    """Remove what a failed attempt wrote into `out`, except what a re-run resumes from."""
    try:
        entries = list(out.iterdir())
    except OSError:
        return
    after = _entries(out)
    has_shards = any(fnmatch.fnmatch(p.name, "*_shard_*") or p.name == EIGENVECTORS_NAME for p in entries)
    for path in entries:
        if path.name == LOCK_NAME or before.get(path.name) == after.get(path.name):
            continue
        if has_shards and any(fnmatch.fnmatch(path.name, pattern) for pattern in RESUMABLE):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextmanager
def lock_directory(directory: Path) -> Iterator[None]:
    """An exclusive lock on an artifact directory for one writer; a second one gets a clear error, not a race.

    The lock is `flock` on a hidden file: the kernel releases it when its holder exits, even by kill -9, so a lock file
    left behind never blocks a re-run. The file is removed on release; a writer that locked a file another one had just
    removed retries on the new file, so two writers never both hold "the" lock.
    """
    path = Path(directory) / LOCK_NAME
    while True:
        try:  # unbuffered: nothing is left to flush on close, so a full disk cannot fail the release
            handle = open(path, "a+b", buffering=0)
        except OSError as exc:
            if exc.errno in NO_SPACE_ERRNOS:
                raise no_space_error(path) from exc
            raise InfluenceError(f"cannot write to {directory} ({exc.strerror}); choose a writable --out") from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            holder = handle.read(200).decode("utf-8", "replace").strip()[:80] or "another process"
            handle.close()
            raise InfluenceError(f"{directory} is being written by {holder}; wait for it to finish or choose another --out") from exc
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()  # we locked a file its previous holder had just removed: lock the new one
    try:
        try:  # who holds the lock, for the second writer's message: nice to have, not worth failing for (a full disk)
            os.ftruncate(handle.fileno(), 0)
            os.write(handle.fileno(), f"influence (pid {os.getpid()})".encode())
        except OSError:
            pass
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
