"""The gate every stage passes before it writes, and the lock it holds while it does.

`prepare_output` checks the output (not one of the inputs or inside one, not inside another artifact or a model
directory, holding no other kind of artifact and no unrelated files, writable with room to spare), locks it against
a second writer for the duration, and removes what a failed attempt wrote, except the shards a re-run resumes from.
The checks are also callable alone: a stage checks an output it reuses or resumes with `check_existing`, the score
table (one file) with `check_output_file`.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

from influence.artifacts import NO_SPACE_ERRNOS, ensure_writable_dir, format_bytes, free_bytes, no_space_error
from influence.constants import ARGS_NAME, ARTIFACT_FILES, EIGENVECTORS_NAME, LOCK_NAME, MANIFEST_NAME
from influence.errors import InfluenceError

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
def prepare_output(out: Path, kind: str, inputs: Mapping[str, Optional[Path]], needed_bytes: int = 0,
                   replaces: bool = False) -> Iterator[Path]:
    """`check_output`, then create `out` and hold its lock while the block writes.

    An attempt that fails leaves nothing it wrote but what a re-run resumes from (the shards of a fit or an index, with
    the settings they were made with): every other file it created or replaced is removed, and a directory it created
    and left empty goes too. With `replaces` (a report whose files depend on its inputs: query results, an audit, a
    comparison), an attempt that succeeds removes what an earlier one wrote and this one did not, which would
    otherwise pass for its own.
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
            if replaces:
                _remove_stale(out, before)
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _remove_stale(out: Path, before: dict[str, tuple]) -> None:
    """Remove the entries of `out` that a successful attempt found there and left as they were (atomic writes replace
    an entry: another inode)."""
    after = _entries(out)
    for name, entry in before.items():
        if name != LOCK_NAME and after.get(name) == entry:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


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
