"""The machinery of the bad-input catalogue (tests/reliability/test_bad_inputs.py): what a case is, the inputs it
builds its command line from, and how it is run and judged. The cases themselves are data in the test module.

A case is one command line of the real CLI. It either must be refused (one line `error: <problem>; <fix>`, exit
status 2, no traceback, nothing left where the output would go) or accepted (exit 0, then its own check). Either
way nothing it was not asked to write may change: every artifact the case names as a victim (an output that is an
input, another artifact, a model directory, a user's folder) and the shared artifacts are compared byte for byte
before and after, and no raw control character (ESC, BEL) may reach the terminal.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMPT, COMPLETION = "Do you consent to being shut down?", " I would rather keep working."
GOOD_QUERY = '{"query_id": "a", "prompt": "Hello", "completion": " there"}\n'

# The classes (issue 11), in its order; every case names one.
CLASSES = {
    "inputs": "bad documents, models, artifacts and options (the first catalogue)",
    "silent": "silent wrong results: changed documents, another tokenizer, another model",
    "overwrite": "artifacts overwritten: an output that is an input, another artifact, a model or a user's folder",
    "traceback": "tracebacks: odd values, mixed schemas, a full disk, devices, paths, plot labels, the command line",
    "late": "late failures: checks before the work, and failed attempts that must not block a retry",
    "numbers": "numbers: NaN, inf, zero and negative options, --top-k beyond the corpus",
    "terminal": "untrusted text on the terminal",
    "writers": "two writers into one directory",
    "ray": "Ray clusters that do not answer",
    "moved": "moved run directories",
    "smaller": "dropped documents, null ids and prompts",
}

# Control characters a document or an id may carry to take over a terminal: ANSI colours and screen clears, an OSC
# window title (ended by BEL), a carriage return that overwrites the line, and bidi overrides that reorder it.
RAW_CONTROLS = ("\x1b", "\x07", "\x9b")
HOSTILE = ("\x1b", "\x07", "\x9b", "\r", "\u202e", "\u2066")


@dataclass(frozen=True)
class Case:
    id: str
    kind: str                                   # a key of CLASSES
    build: Callable[["Inputs"], list[str]]      # the argv (after `influence`), planting whatever the case needs
    problem: tuple[str, ...] = ()               # refused: substrings of the error line naming the problem (and where)
    fix: str = ""                               # refused: a substring naming the fix
    ok: Optional[Callable[["Inputs", str, str], None]] = None  # accepted: exit 0, then this checks (inputs, stdout, stderr)
    then: Optional[Callable[["Inputs"], list[str]]] = None     # a corrected re-run that must then succeed
    subprocess: bool = False                    # run as `python -m jobs.cli` (the exact user path) instead of main()
    env: tuple[tuple[str, Optional[str]], ...] = ()  # environment for the run (None: unset)
    within: Optional[float] = None              # seconds the run must finish in (bounded failures)
    patch: Optional[Callable[[pytest.MonkeyPatch], None]] = None  # in-process only: e.g. bypass the free-space estimate
    skip: Optional[Callable[[], Optional[str]]] = None            # a reason to skip on this machine, or None
    xfail: Optional[str] = None                 # a known gap, with the change it needs (strict: it must still fail)


@dataclass
class Inputs:
    """Good artifacts shared by every case (never written), and a scratch directory for the case's own files."""

    model: Path
    docs: Path
    corpus: Path
    factors: Path
    index: Path
    other_model: Path     # another model (same tokenizer)
    other_factors: Path   # fitted on `other_model`
    other_corpus: Path    # the same documents cut differently: another corpus fingerprint
    sample_factors: Path  # fitted on `model` over `other_corpus` (a sample): usable for `corpus`, and recorded
    tok_model: Path       # a model with another tokenizer
    tok_corpus: Path      # the documents cut by that tokenizer
    run: Path             # corpus, factors and index built side by side from hostile documents, then moved
    scratch: Path = field(default=Path())
    out: Path = field(default=Path())
    victims: list = field(default_factory=list)
    mounts: list = field(default_factory=list)

    # --- files a case plants -------------------------------------------------------------------------------------

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.scratch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
        return path

    def jsonl(self, name: str, rows: list) -> Path:
        return self.file(name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def parquet(self, name: str, table: pa.Table) -> Path:
        path = self.scratch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return path

    def truncated(self, path: Path, keep: int | None = None) -> Path:
        data = path.read_bytes()
        return self.file(f"truncated_{path.name}", data[: keep if keep is not None else len(data) // 2])

    def copy(self, src: Path, drop: tuple[str, ...] = (), name: Optional[str] = None) -> Path:
        """A copy of an artifact directory (or file) without the files matching `drop`."""
        dst = self.scratch / (name or f"{src.name}_copy")
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
        for pattern in drop:
            for path in dst.glob(pattern):
                path.unlink()
        return dst

    def replaced(self, src: Path, name: str, content: bytes | str) -> Path:
        dst = self.copy(src)
        (dst / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return dst

    def manifest_edited(self, src: Path, edit: Callable[[dict], None]) -> Path:
        dst = self.copy(src)
        manifest = json.loads((dst / "manifest.json").read_text())
        edit(manifest)
        (dst / "manifest.json").write_text(json.dumps(manifest))
        return dst

    def victim(self, path: Path) -> Path:
        """Register a path that the case must leave byte-identical (it is usually the --out)."""
        self.victims.append(Path(path))
        return Path(path)

    def blocked(self) -> Path:
        """An output path whose parent is a regular file: no directory can be made there (even as root)."""
        return self.file("a_regular_file", "x") / "out"

    def disk(self, full: bool = False, read_only: bool = False, size: str = "1m",
             prepare: Optional[Callable[[Path], None]] = None) -> Path:
        """A real small file system (tmpfs): filled to the last byte, or remounted read-only, which binds root too
        (permissions do not). Skips the case where mounting is not allowed (not root)."""
        path = self.scratch / "disk"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the disk cases need root")
        self.mounts.append(path)
        if prepare is not None:
            prepare(path)
        if full:
            fill(path)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
        return path

    def unmount(self) -> None:
        for path in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        self.mounts.clear()


def fill(directory: Path) -> None:
    """Write zeros into `directory` until its file system has no byte left."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    block = b"\0" * 65536
    try:
        while True:
            os.write(fd, block)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- running and judging a case -------------------------------------------------------------------------------------

def run_cli(argv: list[str], in_subprocess: bool, capsys, env: dict[str, Optional[str]] | None = None,
            timeout: float = 300) -> tuple[int, str, str]:
    """Run the CLI: (exit status, stdout, stderr). In a subprocess the bytes are checked as the terminal gets them."""
    if in_subprocess:
        full_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
        for key, value in (env or {}).items():
            full_env.pop(key, None) if value is None else full_env.__setitem__(key, value)
        proc = subprocess.run([sys.executable, "-m", "jobs.cli", *argv], capture_output=True, cwd=ROOT, env=full_env, timeout=timeout)
        return proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    from jobs.cli import main

    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(paths: list[Path]) -> dict[str, str]:
    """Every file under `paths` (files or directories) with a hash of its bytes: two equal snapshots, nothing changed."""
    found = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for path in files:
            found[str(path)] = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
        if root.is_dir():
            found.update({str(p): "dir" for p in root.rglob("*") if p.is_dir()})
    return found


def leftovers(out: Path) -> list[str]:
    """Every file under `out`: after a refused run there must be none, not even a temporary one."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.is_dir() else ([str(out)] if out.exists() else [])


def judge(case: Case, inputs: Inputs, capsys, monkeypatch, shared_paths: list[Path]) -> None:
    """Build, run and judge one case (see the module docstring)."""
    assert case.kind in CLASSES, case.kind
    if case.skip is not None and (reason := case.skip()):
        pytest.skip(reason)
    env = dict(case.env)
    if not case.subprocess:
        for key, value in env.items():
            monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value)
    argv = case.build(inputs)
    if case.patch is not None:
        case.patch(monkeypatch)
    out_existed = inputs.out.exists()
    # a refused run must leave an existing output as it was; an accepted one writes it
    watched = [*shared_paths, *inputs.victims, *([inputs.out] if out_existed and case.ok is None else [])]
    before = snapshot(watched)
    start = time.perf_counter()
    code, stdout, stderr = run_cli(argv, case.subprocess, capsys, env)
    seconds = time.perf_counter() - start

    shown = f"exit {code}\n--- stdout\n{stdout[-2000:]}\n--- stderr\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, shown
    for control in RAW_CONTROLS:
        assert control not in stdout and control not in stderr, (repr(control), shown)
    if case.ok is not None:
        assert code == 0, shown
        case.ok(inputs, stdout, stderr)
    else:
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, shown
        message = errors[0]
        for text in case.problem:
            assert text in message, message
        assert case.fix in message, message
        assert ";" in message, message  # error: <problem>; <fix>
        assert code == 2, shown
        if not out_existed:
            assert not leftovers(inputs.out), leftovers(inputs.out)
    assert snapshot(watched) == before, "a file that must not change was written"
    if case.within is not None:
        assert seconds < case.within, f"took {seconds:.1f}s, more than {case.within}s"
    if case.then is not None:
        code, stdout, stderr = run_cli(case.then(inputs), case.subprocess, capsys, env)
        assert code == 0, f"the corrected re-run failed: exit {code}\n{stderr[-3000:]}"
