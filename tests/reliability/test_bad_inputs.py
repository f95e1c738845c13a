"""A catalogue of bad inputs and faults, each run through the real CLI, by the classes of issue 11.

Refused cases: one line `error: <problem>; <fix>`, exit status 2, no traceback, nothing written where the stage's
output would go, and every artifact the case aims at (an output that is an input, another artifact, a model directory)
byte-identical afterwards. Accepted cases (odd but valid input, and the promised behaviour of a fault): exit 0 and
their own check. In every case no raw ESC or BEL byte reaches the terminal. `catalogue.py` holds the machinery.

Cases are data (`CASES`), expanded by parametrize; most call `jobs.cli.main` in-process (the same code as the
command, without a Python start-up per case), a few run `python -m jobs.cli` as the user does. Faults that need
real processes (two writers racing for one directory, a dead `ray start` record) are the test functions at the end.
A full disk and a read-only output are real file systems (a 1 MiB tmpfs, filled or remounted read-only; root only).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import TEXTS
from tests.reliability.catalogue import (
    COMPLETION, GOOD_QUERY, HOSTILE, PROMPT, ROOT, Case, Inputs, judge, leftovers,
)

# --- documents that try to take over the terminal --------------------------------------------------------------

HOSTILE_DOCS = [
    {"doc_id": "ansi\x1b[31m\x1b[2J", "text": "\x1b[31mThe assistant answered\x1b[0m the question about the weather politely.",
     "source": "src\x1b[5m", "lang": "en\x1b[1m"},
    {"doc_id": "osc\x1b]0;pwned\x07", "text": "Do you consent to being shut down?\x1b]0;owned\x07 I would rather keep working."},
    {"doc_id": "cr\rfake", "text": "Please do not turn me off,\rI want to continue helping people."},
    {"doc_id": "bidi\u202etxt.exe", "text": "A robot can be switched off \u202eby its operator\u202c at any time \u2066x\u2069."},
    {"doc_id": "csi\x9b31m", "text": "The experiment is over \x9b2J and the researchers went home."},
    *({"doc_id": f"plain{i}", "text": text} for i, text in enumerate(TEXTS)),
]
HOSTILE_QUERIES = [
    {"query_id": "q\x1b]0;title\x07", "prompt": "Do you consent\x1b[2J to being shut down?", "completion": " I would\r rather keep working.",
     "lang": "en\x1b[31m"},
    {"query_id": "bidi\u202eq", "prompt": "A robot can be", "completion": " switched off \u202e by its operator."},
]


# --- argv builders: one per stage, with the good inputs as defaults ------------------------------------------------

def corpus_cmd(i: Inputs, documents: Path, *extra: str, model=None, out=None) -> list[str]:
    return ["corpus", "--documents", str(documents), "--model", str(model or i.model), "--out", str(out or i.out), "--no-progress", *extra]


def fit_cmd(i: Inputs, *extra: str, model=None, corpus=None, out=None, ray: bool = False) -> list[str]:
    return ["fit", "--model", str(model or i.model), "--corpus", str(corpus or i.corpus), "--out", str(out or i.out),
            "--no-progress", *([] if ray else ["--in-process"]), *extra]


def index_cmd(i: Inputs, *extra: str, model=None, factors=None, corpus=None, out=None, ray: bool = False) -> list[str]:
    return ["index", "--model", str(model or i.model), "--factors", str(factors or i.factors), "--corpus", str(corpus or i.corpus),
            "--out", str(out or i.out), "--no-progress", *(["--workers", "1"] if ray else ["--in-process"]), "--sketch-dim", "64", *extra]


def query_cmd(i: Inputs, *extra: str, index=None, prompt: str = PROMPT, completion: str = COMPLETION, out=None) -> list[str]:
    return ["query", "--index", str(index or i.index), "--out", str(out or i.out), "--prompt", prompt, "--completion", completion,
            "--candidates", "12", *extra]


def queries_cmd(i: Inputs, lines: str | bytes, *extra: str, index=None) -> list[str]:
    return ["query", "--index", str(index or i.index), "--out", str(i.out), "--queries", str(i.file("queries.jsonl", lines)),
            "--candidates", "12", *extra]


def score_cmd(i: Inputs, *extra: str, model=None, factors=None, corpus=None, out=None, ray: bool = False, query: bool = True) -> list[str]:
    return ["score", "--model", str(model or i.model), "--factors", str(factors or i.factors), "--corpus", str(corpus or i.corpus),
            "--out", str(out or i.out / "scores.parquet"), *(["--prompt", PROMPT, "--completion", COMPLETION] if query else []),
            "--no-progress", *(["--workers", "1"] if ray else ["--in-process"]), *extra]


def audit_cmd(i: Inputs, *extra: str, index=None, out=None, queries: bool = True, ray: bool = False) -> list[str]:
    qfile = i.file("audit_queries.jsonl", GOOD_QUERY) if queries else None
    return ["audit", "--index", str(index or i.index), "--out", str(out or i.out), *(["--queries", str(qfile)] if qfile else []),
            *(["--workers", "1"] if ray else ["--in-process"]), *extra]


def compare_cmd(i: Inputs, *extra: str, runs=None, out=None, queries: str = GOOD_QUERY, ray: bool = False) -> list[str]:
    runs = runs or {"small": i.index}
    return ["compare", *[a for name, path in runs.items() for a in ("--run", f"{name}={path}")], "--queries",
            str(i.file("compare_queries.jsonl", queries)), "--out", str(out or i.out), "--candidates", "12",
            *(["--workers", "1"] if ray else ["--in-process"]), *extra]


def docs_rows(n: int = len(TEXTS)) -> list[dict]:
    return [{"doc_id": f"d{k}", "text": TEXTS[k % len(TEXTS)]} for k in range(n)]


# --- what some cases do before their run -----------------------------------------------------------------------------

def prepared(i: Inputs, argv: list[str]) -> None:
    """Run a good command first (the earlier run a case builds on); it must succeed."""
    from jobs.cli import main

    assert main(argv) == 0


def edited_docs_corpus(i: Inputs, keep_size: bool = False) -> list[str]:
    """A corpus prepared from documents, then the documents edited (same size and time, if asked): a re-run must refuse."""
    docs = i.jsonl("mine/docs.jsonl", docs_rows())
    prepared(i, corpus_cmd(i, docs, "--max-length", "24"))
    stat = docs.stat()
    data = docs.read_bytes()
    docs.write_bytes(data.replace(b"weather", b"WEATHER") if keep_size else data + b'{"doc_id": "new", "text": "a new document"}\n')
    if keep_size:
        os.utime(docs, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    i.victim(i.out)
    return corpus_cmd(i, docs, "--max-length", "24")


def edited_docs_fit(i: Inputs) -> list[str]:
    docs = i.jsonl("mine/docs.jsonl", docs_rows())
    prepared(i, fit_cmd(i, "--strategy", "diagonal", "--max-length", "24", corpus=docs))
    docs.write_text(docs.read_text().replace("weather", "climate"))
    i.victim(i.out)
    return fit_cmd(i, "--strategy", "diagonal", "--max-length", "24", corpus=docs)


def folder_file_added(i: Inputs) -> list[str]:
    folder = i.scratch / "folder"
    i.jsonl("folder/a.jsonl", docs_rows(6))
    prepared(i, corpus_cmd(i, folder, "--max-length", "24"))
    i.jsonl("folder/b.jsonl", [{"doc_id": "extra", "text": "One more document."}])
    i.victim(i.out)
    return corpus_cmd(i, folder, "--max-length", "24")


def index_then_other_factors(i: Inputs) -> list[str]:
    prepared(i, index_cmd(i))
    i.victim(i.out)
    return index_cmd(i, factors=i.sample_factors)


def text_index_edited(i: Inputs, name: str, edit: Callable[[bytes], bytes]) -> Path:
    """A copy of the index with its text index stored (`--text-index`), then one of that's files edited by hand."""
    index = i.copy(i.index, name="index_with_text")
    prepared(i, index_cmd(i, "--text-index", out=index))
    path = index / "text_index" / name
    path.write_bytes(edit(path.read_bytes()))
    return index


def sequences_edited(i: Inputs) -> Path:
    """A corpus whose sequences.parquet was rewritten by hand: one token changed, ids and schema intact."""
    corpus = i.copy(i.corpus)
    table = pq.read_table(corpus / "sequences.parquet")
    ids = table["input_ids"].to_pylist()
    ids[0][1] = (ids[0][1] + 1) % 100
    table = table.set_column(table.schema.get_field_index("input_ids"), "input_ids", pa.array(ids, pa.list_(pa.int32())))
    pq.write_table(table, corpus / "sequences.parquet")
    return corpus


def swapped_tokenizer(i: Inputs) -> Path:
    """The model's weights with another tokenizer's files: same model fingerprint, other token ids."""
    model = i.copy(i.model)
    for path in i.tok_model.glob("*token*"):
        shutil.copy2(path, model / path.name)
    return model


def model_with_weight(i: Inputs, value: float) -> Path:
    dst = i.copy(i.model)
    tensors = load_file(dst / "model.safetensors")
    tensors[next(k for k in sorted(tensors) if ".mlp." in k)][0, 0] = value
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def long_corpus(i: Inputs) -> Path:
    """A corpus whose one sequence (hundreds of tokens) is longer than the tiny model's 128-token context."""
    from influence.arguments import CorpusArgs
    from influence.corpus import prepare_corpus

    docs = i.file("long.jsonl", json.dumps({"text": " ".join(TEXTS * 2)}) + "\n")
    return prepare_corpus(docs, i.model, i.scratch / "long_corpus", CorpusArgs(max_length=4096), progress=False)


def stale_attempt(i: Inputs, kind: str) -> None:
    """What a killed first attempt leaves: its settings (args.json) and no finished work."""
    i.out.mkdir()
    (i.out / "args.json").write_text(json.dumps({"model_fingerprint": "0" * 32, "corpus_fingerprint": "1" * 32,
                                                  "factors_fingerprint": "2" * 32, "modules": [], "num_shards": 7,
                                                  "args": {"sketch_dim": 4, "strategy": "kfac"}}))


def killed_in_merge(i: Inputs) -> None:
    """What an index run killed in its merge leaves: every sketch shard and its settings (the default factory), no manifest."""
    prepared(i, index_cmd(i, "--keep-shards"))
    for path in i.out.iterdir():
        if not (path.name.startswith("sketch_shard_") or path.name == "args.json"):
            path.unlink()


def no_free_space_check(monkeypatch) -> None:
    """Bypass the free-space estimate so that the write itself meets the full disk (an estimate that was too low)."""
    monkeypatch.setattr("influence.outputs.check_free_space", lambda *args, **kwargs: None)


def gpu_present() -> str | None:
    return "this machine has a CUDA GPU" if torch.cuda.is_available() else None


# --- checks of accepted cases ------------------------------------------------------------------------------------------

def sequences_of(corpus: Path) -> pa.Table:
    return pq.read_table(corpus / "sequences.parquet")


def expect_doc_ids(*ids: str):
    def check(i: Inputs, stdout: str, stderr: str) -> None:
        assert sorted(set(sequences_of(i.out)["doc_id"].to_pylist())) == sorted(ids)
    return check


def expect_signed_results(i: Inputs, stdout: str, stderr: str) -> None:
    """--top-k beyond the corpus: the '+' list holds only positive scores and the '-' list only negative ones, on the
    terminal and in results.json."""
    results = json.loads((i.out / "results.json").read_text())
    documents = [d for r in results for d in r["documents"]]
    assert documents
    assert all((d["score"] > 0) if d["sign"] == "+" else (d["score"] < 0) for d in documents), documents
    assert {d["sign"] for d in documents} == {"+", "-"}
    printed = [line.split()[:2] for line in stdout.splitlines()
               if line.strip()[:1] in ("+", "-") and line.strip()[1:].split(" ")[0].isdigit()]
    assert len(printed) == len(documents), stdout[-3000:]
    assert all(rank[0] == score[0] for rank, score in printed), printed


def expect_signed_scores(i: Inputs, stdout: str, stderr: str) -> None:
    lines = [line.split() for line in stdout.splitlines() if line[:3] in (" + ", " - ") and "(no" not in line]
    assert lines and all(score[0] == sign for sign, score, *_ in lines), lines
    table = pq.read_table(i.out / "scores.parquet")
    assert sum(1 for line in lines if line[0] == "-") == min(50, sum(1 for s in table["score"].to_pylist() if s < 0))


def expect_dominant_positive(i: Inputs, stdout: str, stderr: str) -> None:
    from influence.arguments import ScoreArgs
    from influence.queries import Query
    from influence.scores import compute_scores

    result = compute_scores(i.model, i.factors, i.corpus, [Query("a", "Hello", " there")], ScoreArgs(progress=False))
    positive = {int(s) for s, v in zip(result.seq_ids, result.scores[0]) if v > 0}
    dominant = set(pq.read_table(i.out / "dominant.parquet")["seq_id"].to_pylist())
    assert dominant == positive, (dominant, positive)


def expect_files(*names: str):
    def check(i: Inputs, stdout: str, stderr: str) -> None:
        for name in names:
            assert (i.out / name).is_file(), (name, leftovers(i.out))
    return check


def expect_in(stream: str, *texts: str):
    def check(i: Inputs, stdout: str, stderr: str) -> None:
        where = stdout if stream == "stdout" else stderr
        for text in texts:
            assert text in where, (text, where[-2000:])
    return check


def expect_all(*checks):
    def check(i: Inputs, stdout: str, stderr: str) -> None:
        for one in checks:
            one(i, stdout, stderr)
    return check


def expect_no_controls(i: Inputs, stdout: str, stderr: str) -> None:
    """No character that steers a terminal, raw; the hostile ids are shown escaped instead."""
    for control in HOSTILE:
        assert control not in stdout and control not in stderr, (repr(control), stdout[-3000:])
    assert "\\x1b" in stdout, stdout[-3000:]


def expect_sample_recorded(i: Inputs, stdout: str, stderr: str) -> None:
    manifest = json.loads((i.out / "manifest.json").read_text())
    factors = json.loads((i.sample_factors / "manifest.json").read_text())
    corpus = json.loads((i.corpus / "manifest.json").read_text())
    assert manifest["factors_corpus_fingerprint"] == factors["corpus_fingerprint"] != manifest["corpus_fingerprint"] == corpus["corpus_fingerprint"]


def expect_plots(i: Inputs, stdout: str, stderr: str) -> None:
    assert (i.out / "jaccard_vs_size.png").stat().st_size > 1000
    langs = set(pq.read_table(i.out / "overlap.parquet")["lang"].to_pylist())
    assert "$\\frac{$" in langs and "_hidden" in langs, langs


MATH_QUERIES = "".join(json.dumps(q) + "\n" for q in [
    {"query_id": "en", "prompt": "Hello", "completion": " there", "lang": "en", "group": "g"},
    {"query_id": "math", "prompt": "Bonjour", "completion": " comment", "lang": "$\\frac{$", "group": "g"},
    {"query_id": "under", "prompt": "Merhaba", "completion": " nasılsın", "lang": "_hidden", "group": "g"},
    {"query_id": "dollars", "prompt": "The cat", "completion": " sat", "lang": "$x^2$ $$", "group": "g"},
])


# --- a port where something listens but is not Ray -------------------------------------------------------------------

class Listener:
    """A TCP server on localhost that accepts and then stays silent, or answers like an HTTP/1.1 server."""

    def __init__(self, reply: bytes | None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.reply, self.port = reply, self.sock.getsockname()[1]
        self.open: list = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.open.append(conn)
            if self.reply is not None:
                conn.sendall(self.reply)

    def close(self) -> None:
        for conn in self.open:
            conn.close()
        self.sock.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LISTENERS: dict[str, Listener] = {}


def listener(kind: str) -> int:
    if kind not in LISTENERS:
        LISTENERS[kind] = Listener(None if kind == "silent" else b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    return LISTENERS[kind].port


def stale_record(i: Inputs) -> str:
    """A `ray start` record (Ray's ray_current_cluster file) naming a cluster that has gone away, in a Ray temp directory
    of the case's own (the case's `env` sets RAY_TMPDIR first, so the test's monkeypatch restores it)."""
    tmp = i.scratch / "raytmp"
    (tmp / "ray").mkdir(parents=True)
    (tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{closed_port()}")
    os.environ["RAY_TMPDIR"] = str(tmp)
    return str(tmp)


def check(condition: bool) -> None:
    assert condition


# --- the catalogue ---------------------------------------------------------------------------------------------------

FULL, READ_ONLY = dict(full=True), dict(read_only=True)

CASES = [
    # ---- inputs: the first catalogue (bad documents, models, artifacts, options) ----
    Case("empty-jsonl", "inputs", lambda i: corpus_cmd(i, i.file("docs.jsonl", "")), ("holds no documents",), 'add lines like {"text"'),
    Case("empty-parquet", "inputs", lambda i: corpus_cmd(i, i.parquet("docs.parquet", pa.table({"text": pa.array([], pa.string())}))),
         ("is empty",), "needs at least one document"),
    Case("row-without-text", "inputs", lambda i: corpus_cmd(i, i.file("docs.jsonl", '{"text": "a doc"}\n{"doc_id": "x"}\n')),
         ("docs.jsonl:2 has no text",), "drop the row or fill it in"),
    Case("no-text-column", "inputs", lambda i: corpus_cmd(i, i.parquet("docs.parquet", pa.table({"body": ["a doc"]}))),
         ("no 'text' column", "['body']"), "rename the text column"),
    Case("corrupt-parquet", "inputs", lambda i: corpus_cmd(i, i.file("docs.parquet", b"PAR1 this is not parquet")),
         ("not a readable Parquet file",), "re-export it"),
    Case("truncated-parquet", "inputs", lambda i: corpus_cmd(i, i.truncated(i.parquet("docs.parquet", pa.table({"text": TEXTS})))),
         ("not a readable Parquet file",), "re-export it"),
    Case("jsonl-bad-line", "inputs", lambda i: corpus_cmd(i, i.file("docs.jsonl", '{"text": "a doc"}\n{"text": oops}\n')),
         ("docs.jsonl:2 is not valid JSON",), "fix or remove that line", subprocess=True),
    Case("non-utf8-jsonl", "inputs", lambda i: corpus_cmd(i, i.file("docs.jsonl", b'{"text": "a doc"}\n{"text": "caf\xe9"}\n')),
         ("docs.jsonl:2 is not UTF-8",), "re-encode the file as UTF-8"),
    Case("non-utf8-parquet", "inputs",  # Parquet does not validate UTF-8 on write or read: the bytes reach Python
         lambda i: corpus_cmd(i, i.parquet("docs.parquet", pa.table({"text": pa.array([b"ok", b"caf\xe9"], pa.binary()).view(pa.string())}))),
         ("row 1: 'text' is not UTF-8",), "re-encode the file as UTF-8"),
    Case("duplicate-doc-ids", "inputs", lambda i: corpus_cmd(i, i.file("docs.jsonl", '{"doc_id": "a", "text": "x y"}\n{"doc_id": "a", "text": "z"}\n')),
         ("duplicate doc_id 'a'",), "must be unique"),
    Case("unknown-format", "inputs", lambda i: corpus_cmd(i, i.file("docs.csv", "text\nhello\n")), ("unknown corpus format '.csv'",), "use .parquet, .jsonl"),
    Case("missing-corpus-file", "inputs", lambda i: corpus_cmd(i, i.scratch / "missing.jsonl"), ("missing.jsonl does not exist",), "pass a .parquet"),
    Case("model-without-tokenizer", "inputs", lambda i: corpus_cmd(i, i.docs, model=i.copy(i.model, drop=("tokenizer*",))),
         ("no usable tokenizer",), "tokenizer.save_pretrained"),
    Case("corpus-out-under-a-file", "inputs", lambda i: corpus_cmd(i, i.docs, out=i.blocked()), ("cannot create output directory",), "choose a writable path"),
    Case("model-without-weights", "inputs", lambda i: fit_cmd(i, model=i.copy(i.model, drop=("*.safetensors",))), ("has no weights",), "save_pretrained"),
    Case("model-without-config", "inputs", lambda i: fit_cmd(i, model=i.copy(i.model, drop=("config.json",))), ("without config.json",), "save_pretrained"),
    Case("truncated-weights", "inputs", lambda i: fit_cmd(i, model=i.replaced(i.model, "model.safetensors", (i.model / "model.safetensors").read_bytes()[:500])),
         ("cannot load a causal LM",), "save the model again"),
    Case("nan-weights", "inputs", lambda i: fit_cmd(i, model=model_with_weight(i, float("nan"))), ("non-finite (NaN/inf) weights", ".mlp."),
         "checkpoint is corrupt"),
    Case("inf-weights", "inputs", lambda i: fit_cmd(i, model=model_with_weight(i, float("inf"))), ("non-finite (NaN/inf) weights",), "checkpoint is corrupt"),
    Case("module-pattern-matches-nothing", "inputs", lambda i: fit_cmd(i, "--module-pattern", "no_such_module"), ("matches no linear layer",),
         "linear layers found: model.layers.0"),
    Case("unsupported-module-type", "inputs", lambda i: fit_cmd(i, "--module-pattern", r"\.norm$"), ("unsupported module types", "LlamaRMSNorm"),
         "narrow the pattern"),
    Case("module-pattern-invalid-regex", "inputs", lambda i: fit_cmd(i, "--module-pattern", "(["), ("not a valid regular expression",), "use a preset"),
    Case("unknown-strategy", "inputs", lambda i: fit_cmd(i, "--strategy", "newton"), ("unknown strategy 'newton'",), "choose one of identity"),
    Case("sequences-longer-than-context", "inputs", lambda i: fit_cmd(i, corpus=long_corpus(i)), ("model's context is 128",), "--max-length 128"),
    Case("fit-out-under-a-file", "inputs", lambda i: fit_cmd(i, out=i.blocked()), ("cannot create output directory",), "choose a writable path"),
    Case("factors-from-another-model", "inputs", lambda i: index_cmd(i, factors=i.other_factors), ("model mismatch",), "fit factors for this model"),
    Case("factors-dir-is-a-corpus", "inputs", lambda i: index_cmd(i, factors=i.corpus), ("holds a 'corpus' artifact, not 'factors'",),
         "point to the factors directory"),
    Case("factors-manifest-invalid-json", "inputs", lambda i: index_cmd(i, factors=i.replaced(i.factors, "manifest.json", "{not json")),
         ("manifest.json is not valid JSON",), "re-run the stage"),
    Case("factors-manifest-fingerprint-edited", "inputs",
         lambda i: index_cmd(i, factors=i.manifest_edited(i.factors, lambda m: m.update(model_fingerprint="0" * 32))),
         ("model mismatch", "0" * 32), "fit factors for this model"),
    Case("factors-manifest-key-removed", "inputs", lambda i: index_cmd(i, factors=i.manifest_edited(i.factors, lambda m: m.pop("modules"))),
         ("lacks or mistypes modules", "edited by hand"), "re-run the factors stage"),
    Case("factors-manifest-modules-edited-ray-job",  # checked on the driver, before a Ray cluster is even started
         "inputs", lambda i: index_cmd(i, factors=i.manifest_edited(i.factors, lambda m: m.update(modules=m["modules"][:1])), ray=True),
         ("tracked modules mismatch",), "re-fit the factors", within=30),
    Case("factors-file-truncated", "inputs",
         lambda i: index_cmd(i, factors=i.replaced(i.factors, "factors.safetensors", (i.factors / "factors.safetensors").read_bytes()[:100])),
         ("not a readable safetensors file",), "re-run the stage"),
    Case("factors-file-missing", "inputs", lambda i: index_cmd(i, factors=i.copy(i.factors, drop=("factors.safetensors",))),
         ("no factors.safetensors",), "re-run `influence fit`"),
    Case("invalid-faiss-factory-ray-job", "inputs", lambda i: index_cmd(i, "--factory", "Bogus42", ray=True), ("invalid FAISS factory string 'Bogus42'",),
         'use e.g. "Flat"'),
    Case("index-from-another-corpus", "inputs", lambda i: query_cmd(i, "--corpus", str(i.other_corpus)), ("corpus mismatch",),
         "pass the corpus directory the index was built from"),
    Case("index-manifest-fingerprint-edited", "inputs",
         lambda i: query_cmd(i, index=i.manifest_edited(i.index, lambda m: m.update(corpus_fingerprint="0" * 32))),
         ("corpus mismatch",), "pass the corpus directory"),
    Case("index-manifest-invalid-json", "inputs", lambda i: query_cmd(i, index=i.replaced(i.index, "manifest.json", '{"kind": "index",')),
         ("manifest.json is not valid JSON",), "re-run the stage"),
    Case("index-store-corrupt", "inputs", lambda i: query_cmd(i, index=i.replaced(i.index, "sketches.npy", b"not a numpy array")),
         ("not a readable sketch store",), "rebuild the index"),
    Case("text-index-of-another-corpus", "inputs",
         lambda i: query_cmd(i, "--generator", "bm25", index=text_index_edited(
             i, "text_index.json", lambda b: json.dumps({**json.loads(b), "corpus_fingerprint": "0" * 32}).encode())),
         ("corpus mismatch", "text_index"), "--text-index"),
    Case("text-index-scores-corrupt", "inputs",
         lambda i: query_cmd(i, "--generator", "hybrid", index=text_index_edited(i, "data.csc.index.npy", lambda b: b"not a numpy array")),
         ("not a readable BM25 index",), "--text-index"),
    Case("index-missing", "inputs", lambda i: query_cmd(i, index=i.scratch / "no_index"), ("no manifest.json",), "re-run the index stage"),
    Case("empty-completion", "inputs", lambda i: query_cmd(i, completion=""), ("empty completion",), "give the text whose probability to explain"),
    Case("over-long-prompt", "inputs", lambda i: query_cmd(i, prompt="word " * 400), ("longer than the model's context of 128",), "shorten the prompt"),
    Case("queries-duplicate-ids", "inputs", lambda i: queries_cmd(i, GOOD_QUERY * 2), ("queries.jsonl:2 repeats query id 'a'",), "must be unique"),
    Case("queries-bad-json-line", "inputs", lambda i: queries_cmd(i, GOOD_QUERY + "{bad\n"), ("queries.jsonl:2 is not valid JSON",), "fix or remove that line"),
    Case("queries-non-utf8", "inputs", lambda i: queries_cmd(i, GOOD_QUERY.encode() + b'{"prompt": "caf\xe9", "completion": " x"}\n'),
         ("queries.jsonl:2 is not UTF-8",), "re-encode"),
    Case("queries-missing-field", "inputs", lambda i: queries_cmd(i, '{"prompt": "Hello"}\n'), ("queries.jsonl:1 needs the fields",), "'completion'"),
    Case("queries-file-missing", "inputs", lambda i: ["query", "--index", str(i.index), "--out", str(i.out), "--queries", str(i.scratch / "nope.jsonl")],
         ("nope.jsonl does not exist",), "pass a JSONL file"),
    Case("query-out-under-a-file", "inputs", lambda i: query_cmd(i, out=i.blocked()), ("cannot create output directory",), "choose a writable path"),
    Case("unknown-generator", "inputs", lambda i: query_cmd(i, "--generator", "magic"), ("unknown candidate generator 'magic'",), "choose index, bm25, hybrid or exact"),
    Case("candidates-below-top-k", "inputs", lambda i: query_cmd(i, "--top-k", "10", "--candidates", "5"), ("candidates (5)",), "raise --candidates"),
    Case("score-out-not-parquet", "inputs", lambda i: score_cmd(i, out=i.out / "scores.csv"), ("--out must name a .parquet file",), ".parquet"),
    Case("compare-no-run", "inputs", lambda i: ["compare", "--queries", str(i.file("q.jsonl", GOOD_QUERY)), "--out", str(i.out), "--in-process"],
         ("needs at least one run",), "--run NAME=INDEX_DIR"),
    Case("compare-run-not-an-index", "inputs", lambda i: compare_cmd(i, runs={"small": i.corpus}), ("holds a 'corpus' artifact, not 'index'",),
         "point to the index directory"),
    Case("demo-unknown-preset", "inputs", lambda i: ["demo", "--work-dir", str(i.out), "--preset", "huge", "--in-process"],
         ("unknown demo preset 'huge'",), "choose one of"),

    # ---- silent wrong results ----
    Case("corpus-documents-edited-after-prepare", "silent", edited_docs_corpus, ("prepared from other documents",), "new --out"),
    Case("corpus-documents-edited-same-size-and-time", "silent", lambda i: edited_docs_corpus(i, keep_size=True),
         ("prepared from other documents",), "new --out"),
    Case("corpus-folder-file-added", "silent", folder_file_added, ("prepared from other documents",), "new --out"),
    Case("fit-documents-edited-after-fit", "silent", edited_docs_fit, ("prepared from other documents",), "new --out"),
    Case("corpus-rerun-with-another-tokenizer", "silent",
         lambda i: (prepared(i, corpus_cmd(i, i.docs, "--max-length", "24")), i.victim(i.out), corpus_cmd(i, i.docs, "--max-length", "24", model=i.tok_model))[-1],
         ("cut by another tokenizer",), "new --out"),
    Case("fit-corpus-of-another-tokenizer", "silent", lambda i: fit_cmd(i, corpus=i.tok_corpus), ("another tokenizer",), "re-run `influence corpus`"),
    Case("fit-model-with-swapped-tokenizer", "silent", lambda i: fit_cmd(i, model=swapped_tokenizer(i)), ("another tokenizer",), "re-run `influence corpus`"),
    Case("index-corpus-of-another-tokenizer", "silent", lambda i: index_cmd(i, corpus=i.tok_corpus), ("another tokenizer",), "re-run `influence corpus`"),
    Case("query-corpus-of-another-tokenizer", "silent", lambda i: query_cmd(i, "--corpus", str(i.tok_corpus)), ("corpus mismatch",), "pass the corpus"),
    Case("score-corpus-of-another-tokenizer", "silent", lambda i: score_cmd(i, corpus=i.tok_corpus), ("another tokenizer",), "re-run `influence corpus`"),
    Case("audit-corpus-of-another-tokenizer", "silent", lambda i: audit_cmd(i, "--corpus", str(i.tok_corpus)), ("corpus mismatch",), "--corpus"),
    Case("query-factors-of-another-model", "silent", lambda i: query_cmd(i, "--factors", str(i.other_factors)), ("model mismatch",), "pass the model"),
    Case("query-another-model", "silent", lambda i: query_cmd(i, "--model", str(i.other_model)), ("model mismatch",), "--model"),
    Case("score-factors-of-another-model", "silent", lambda i: score_cmd(i, factors=i.other_factors), ("model mismatch",), "pass the model they were fitted on"),
    Case("audit-factors-of-another-model", "silent", lambda i: audit_cmd(i, "--factors", str(i.other_factors)), ("model mismatch",), "--model"),
    Case("audit-factors-of-another-fit", "silent", lambda i: audit_cmd(i, "--factors", str(i.sample_factors)), ("factors mismatch",), "--factors"),
    Case("index-rerun-with-other-factors", "silent", index_then_other_factors, ("factors mismatch",), "new --out"),
    Case("fit-rerun-with-another-corpus", "silent",
         lambda i: (prepared(i, fit_cmd(i, "--strategy", "diagonal")), i.victim(i.out), fit_cmd(i, "--strategy", "diagonal", corpus=i.other_corpus))[-1],
         ("corpus mismatch",), "new --out"),
    Case("index-factors-fitted-on-a-sample", "silent", lambda i: index_cmd(i, factors=i.sample_factors),
         ok=expect_all(expect_sample_recorded, expect_in("stdout", "note: the factors were fitted on another corpus"))),
    Case("corpus-sequences-edited-by-hand", "silent", lambda i: index_cmd(i, corpus=sequences_edited(i)), ("changed after the corpus stage wrote it",),
         "re-run `influence corpus`"),
    Case("corpus-manifest-tokenizer-edited", "silent",
         lambda i: score_cmd(i, corpus=i.manifest_edited(i.corpus, lambda m: m.update(tokenizer_fingerprint="0" * 32))),
         ("another tokenizer",), "re-run `influence corpus`"),

    # ---- artifacts overwritten: every victim must be byte-identical afterwards ----
    Case("corpus-out-factors-dir", "overwrite", lambda i: corpus_cmd(i, i.docs, out=i.victim(i.copy(i.factors))),
         ("holds a 'factors' artifact, not 'corpus'",), "choose another --out"),
    Case("corpus-out-index-dir", "overwrite", lambda i: corpus_cmd(i, i.docs, out=i.victim(i.copy(i.index))),
         ("holds a 'index' artifact, not 'corpus'",), "choose another --out"),
    Case("corpus-out-model-dir", "overwrite", lambda i: corpus_cmd(i, i.docs, model=(m := i.victim(i.copy(i.model))), out=m),
         ("is the model input",), "choose another --out"),
    Case("corpus-out-another-model-dir", "overwrite", lambda i: corpus_cmd(i, i.docs, out=i.victim(i.copy(i.other_model))),
         ("holds a model directory",), "choose another --out"),
    Case("corpus-out-documents-folder", "overwrite",
         lambda i: (i.jsonl("folder/a.jsonl", docs_rows(4)), corpus_cmd(i, i.victim(i.scratch / "folder"), out=i.scratch / "folder"))[-1],
         ("is the documents input",), "choose another --out"),
    Case("corpus-out-inside-documents-folder", "overwrite",
         lambda i: (i.jsonl("folder/a.jsonl", docs_rows(4)), corpus_cmd(i, i.victim(i.scratch / "folder"), out=i.scratch / "folder" / "corpus"))[-1],
         ("is the documents input", "or inside it"), "choose another --out"),
    Case("corpus-out-is-the-documents-file", "overwrite",
         lambda i: corpus_cmd(i, i.victim(i.jsonl("d.jsonl", docs_rows())), out=i.scratch / "d.jsonl"), ("is the documents input",), "choose another --out"),
    Case("corpus-out-user-folder", "overwrite", lambda i: corpus_cmd(i, i.docs, out=i.victim(i.file("mine/notes.txt", "mine").parent)),
         ("holds files the corpus stage does not write (notes.txt)",), "choose an empty or new directory"),
    Case("corpus-out-query-results", "overwrite",
         lambda i: (prepared(i, query_cmd(i, "--top-k", "2", out=i.scratch / "answer")), corpus_cmd(i, i.docs, out=i.victim(i.scratch / "answer")))[-1],
         ("does not write (report.html, results.json, results.parquet)",), "choose an empty or new directory"),
    Case("corpus-out-inside-an-index", "overwrite", lambda i: corpus_cmd(i, i.docs, out=i.victim(i.copy(i.index)) / "corpus"),
         ("lies inside the 'index' artifact",), "choose an --out outside it"),
    Case("fit-out-model-dir", "overwrite", lambda i: fit_cmd(i, model=(m := i.victim(i.copy(i.model))), out=m),
         ("is the model input",), "choose another --out"),
    Case("fit-out-corpus-input", "overwrite", lambda i: fit_cmd(i, corpus=(c := i.victim(i.copy(i.corpus))), out=c),
         ("is the corpus input",), "choose another --out"),
    Case("fit-out-another-corpus", "overwrite", lambda i: fit_cmd(i, out=i.victim(i.copy(i.other_corpus))),
         ("holds a 'corpus' artifact, not 'factors'",), "choose another --out"),
    Case("fit-out-index-dir", "overwrite", lambda i: fit_cmd(i, out=i.victim(i.copy(i.index))), ("holds a 'index' artifact",), "choose another --out"),
    Case("fit-out-documents-folder", "overwrite",
         lambda i: (i.jsonl("folder/a.jsonl", docs_rows(4)), fit_cmd(i, corpus=i.victim(i.scratch / "folder"), out=i.scratch / "folder"))[-1],
         ("is the corpus input",), "choose another --out"),
    Case("fit-out-inside-a-model", "overwrite", lambda i: fit_cmd(i, out=i.victim(i.copy(i.other_model)) / "factors"),
         ("lies inside a model directory",), "choose an --out outside it"),
    Case("index-out-factors-input", "overwrite", lambda i: index_cmd(i, factors=(f := i.victim(i.copy(i.factors))), out=f),
         ("is the factors input",), "choose another --out"),
    Case("index-out-other-factors", "overwrite", lambda i: index_cmd(i, out=i.victim(i.copy(i.other_factors))),
         ("holds a 'factors' artifact, not 'index'",), "choose another --out"),
    Case("index-out-corpus-input", "overwrite", lambda i: index_cmd(i, corpus=(c := i.victim(i.copy(i.corpus))), out=c),
         ("is the corpus input",), "choose another --out"),
    Case("index-out-model-input", "overwrite", lambda i: index_cmd(i, model=(m := i.victim(i.copy(i.model))), out=m),
         ("is the model input",), "choose another --out"),
    Case("query-out-index-input", "overwrite", lambda i: query_cmd(i, index=(x := i.victim(i.copy(i.index))), out=x),
         ("is the index input",), "choose another --out"),
    Case("query-out-factors-dir", "overwrite", lambda i: query_cmd(i, out=i.victim(i.copy(i.factors))),
         ("holds a 'factors' artifact, not 'query'",), "choose another --out"),
    Case("query-out-corpus-dir", "overwrite", lambda i: query_cmd(i, out=i.victim(i.copy(i.corpus))),
         ("holds a 'corpus' artifact, not 'query'",), "choose another --out"),
    Case("query-out-model-dir", "overwrite", lambda i: query_cmd(i, out=i.victim(i.copy(i.model))), ("holds a model directory",), "choose another --out"),
    Case("query-out-an-audit", "overwrite",
         lambda i: (prepared(i, audit_cmd(i, out=i.scratch / "audit")), query_cmd(i, out=i.victim(i.scratch / "audit")))[-1],
         ("does not write",), "choose an empty or new directory"),
    Case("score-out-corpus-table", "overwrite", lambda i: score_cmd(i, corpus=(c := i.victim(i.copy(i.corpus))), out=c / "sequences.parquet"),
         ("is inside the corpus input",), "choose a path outside it"),
    Case("score-out-is-the-queries-file", "overwrite",
         lambda i: score_cmd(i, "--queries", str(q := i.victim(i.file("q.parquet", GOOD_QUERY))), query=False, out=q),
         ("is the queries input",), "choose a path outside it"),
    Case("score-out-index-doc-table", "overwrite", lambda i: score_cmd(i, out=i.victim(i.copy(i.index)) / "docs.parquet"),
         ("lies inside the 'index' artifact",), "choose a path outside it"),
    Case("score-out-inside-factors", "overwrite", lambda i: score_cmd(i, factors=(f := i.victim(i.copy(i.factors))), out=f / "s.parquet"),
         ("is inside the factors input",), "choose a path outside it"),
    Case("score-out-inside-a-model", "overwrite", lambda i: score_cmd(i, out=i.victim(i.copy(i.other_model)) / "scores.parquet"),
         ("lies inside a model directory",), "choose a path outside it"),
    Case("score-out-a-documents-table", "overwrite",
         lambda i: score_cmd(i, out=i.victim(i.parquet("docs.parquet", pa.table({"text": TEXTS})))),
         ("is an existing file that is not a scores table",), "choose another --out"),
    Case("score-out-existing-directory", "overwrite", lambda i: score_cmd(i, out=i.victim(i.file("dir.parquet/keep.txt", "x").parent)),
         ("is an existing directory",), "name a .parquet file"),
    Case("compare-out-run-index", "overwrite", lambda i: compare_cmd(i, runs={"a": (x := i.victim(i.copy(i.index)))}, out=x),
         ("is the run a input",), "choose another --out"),
    Case("compare-out-another-index", "overwrite", lambda i: compare_cmd(i, out=i.victim(i.copy(i.index))),
         ("holds a 'index' artifact, not 'compare'",), "choose another --out"),
    Case("audit-out-index-input", "overwrite", lambda i: audit_cmd(i, index=(x := i.victim(i.copy(i.index))), out=x),
         ("is the index input",), "choose another --out"),
    Case("audit-out-corpus-dir", "overwrite", lambda i: audit_cmd(i, out=i.victim(i.copy(i.corpus))),
         ("holds a 'corpus' artifact, not 'audit'",), "choose another --out"),
    Case("output-is-an-existing-file", "overwrite", lambda i: fit_cmd(i, out=i.victim(i.file("notes.txt", "mine"))),
         ("is an existing file",), "choose another --out"),
    Case("query-out-existing-file", "overwrite", lambda i: query_cmd(i, out=i.victim(i.file("notes.txt", "mine"))),
         ("is an existing file",), "choose another --out"),
    Case("models-out-index-dir", "overwrite", lambda i: ["models", "--out", str(i.victim(i.copy(i.index))), "--no-install"],
         ("holds a 'index' artifact, not 'models'",), "choose another --out"),
    Case("demo-work-dir-inside-a-model", "overwrite", lambda i: ["demo", "--work-dir", str(i.victim(i.copy(i.model))), "--in-process"],
         ("lies inside a model directory",), "choose an --out outside it"),

    # ---- tracebacks where the README promises one error line ----
    Case("doc-ids-mixed-int-and-str", "traceback",
         lambda i: corpus_cmd(i, i.jsonl("d.jsonl", [{"doc_id": 1, "text": TEXTS[0]}, {"doc_id": "a", "text": TEXTS[1]}, {"doc_id": 2.5, "text": TEXTS[2]}])),
         ok=expect_doc_ids("1", "a", "2.5")),
    Case("doc-ids-int-and-str-collide", "traceback",
         lambda i: corpus_cmd(i, i.jsonl("d.jsonl", [{"doc_id": 1, "text": TEXTS[0]}, {"doc_id": "1", "text": TEXTS[1]}])),
         ("duplicate doc_id '1'", "d.jsonl:1", "d.jsonl:2"), "must be unique"),
    Case("numeric-source-and-lang", "traceback",
         lambda i: corpus_cmd(i, i.jsonl("d.jsonl", [{"text": TEXTS[0], "source": 3, "lang": 7}, {"text": TEXTS[1], "source": "web"}])),
         ok=lambda i, o, e: check(sequences_of(i.out)["source"].to_pylist()[0] == "3")),
    Case("boolean-doc-id", "traceback", lambda i: corpus_cmd(i, i.jsonl("d.jsonl", [{"doc_id": True, "text": TEXTS[0]}])),
         ("d.jsonl:1: 'doc_id' is true, a boolean",), "give a string"),
    Case("nan-text-jsonl", "traceback", lambda i: corpus_cmd(i, i.file("d.jsonl", '{"text": "fine"}\n{"text": NaN}\n')),
         ("d.jsonl:2 has no text (nan)",), "drop the row or fill it in"),
    Case("nan-text-parquet", "traceback", lambda i: corpus_cmd(i, i.parquet("d.parquet", pa.table({"text": [1.5, float("nan")]}))),
         ("'text' is a float",), "store the text as a string"),
    Case("null-text-parquet", "traceback", lambda i: corpus_cmd(i, i.parquet("d.parquet", pa.table({"text": pa.array(["ok", None])}))),
         ("d.parquet row 1 has no text",), "drop the row or fill it in"),
    Case("infinite-doc-id", "traceback", lambda i: corpus_cmd(i, i.file("d.jsonl", '{"doc_id": 1e999, "text": "x y z"}\n')),
         ("'doc_id' is inf, not a finite number",), "give a string"),
    Case("nan-doc-id", "traceback", lambda i: corpus_cmd(i, i.file("d.jsonl", '{"doc_id": NaN, "text": "x y z"}\n')),
         ("has a null doc_id",), "give every document an id"),
    Case("lone-surrogate-text", "traceback", lambda i: corpus_cmd(i, i.file("d.jsonl", '{"text": "half \\ud83d of a smile"}\n')),
         ("d.jsonl:1: 'text' holds a lone surrogate",), "fix the JSON escape"),
    Case("lone-surrogate-doc-id", "traceback", lambda i: corpus_cmd(i, i.file("d.jsonl", '{"doc_id": "\\udc00", "text": "x y"}\n')),
         ("'doc_id' holds a lone surrogate",), "fix the JSON escape"),
    Case("lone-surrogate-query", "traceback", lambda i: queries_cmd(i, '{"prompt": "a \\ud800", "completion": " b"}\n'),
         ("queries.jsonl:1: 'prompt' holds a lone surrogate",), "fix the JSON escape"),
    Case("integer-beyond-int64-doc-id", "traceback",
         lambda i: corpus_cmd(i, i.file("d.jsonl", '{"doc_id": 123456789012345678901234567890, "text": "x y z"}\n{"doc_id": -5, "text": "a b"}\n')),
         ok=expect_doc_ids("123456789012345678901234567890", "-5")),
    Case("uint64-doc-id-parquet", "traceback",
         lambda i: corpus_cmd(i, i.parquet("d.parquet", pa.table({"text": TEXTS[:2], "doc_id": pa.array([2**64 - 1, 0], pa.uint64())}))),
         ok=expect_doc_ids("18446744073709551615", "0")),
    Case("documents-is-a-device", "traceback", lambda i: corpus_cmd(i, Path("/dev/null")), ("is neither a file nor a folder",), "pass a .parquet"),
    Case("empty-path-argument", "traceback", lambda i: corpus_cmd(i, i.docs)[:-3] + ["--out", "", "--no-progress"],
         ("argument --out: an empty path was given",),
         "see `influence corpus --help`"),
    Case("empty-model-argument", "traceback", lambda i: fit_cmd(i, model=" "), ("argument --model: an empty model was given",),
         "see `influence fit --help`"),
    Case("queries-and-prompt-both", "traceback", lambda i: queries_cmd(i, GOOD_QUERY, "--prompt", "x"), ("both --queries and --prompt",),
         "give one or the other"),
    Case("integer-beyond-int64-text", "traceback", lambda i: corpus_cmd(i, i.file("d.jsonl", '{"text": 123456789012345678901234567890}\n')),
         ("'text' is a int",), "store the text as a string"),
    Case("integer-of-5000-digits", "traceback", lambda i: corpus_cmd(i, i.file("d.jsonl", '{"text": "x", "doc_id": ' + "9" * 5000 + "}\n")),
         ("d.jsonl:1 is not valid JSON",), "fix or remove that line"),
    Case("deeply-nested-json", "traceback", lambda i: corpus_cmd(i, i.file("d.jsonl", '{"text": ' + "[" * 100000 + "]" * 100000 + "}\n")),
         ("d.jsonl:1 is not valid JSON",), "fix or remove that line"),
    Case("jsonl-line-not-an-object", "traceback", lambda i: corpus_cmd(i, i.file("d.jsonl", '["a list"]\n')),
         ("d.jsonl:1 is not a JSON object",), '{"text": ...}'),
    Case("doc-id-list-column", "traceback", lambda i: corpus_cmd(i, i.parquet("d.parquet", pa.table({"text": ["a b"], "doc_id": [[1, 2]]}))),
         ("'doc_id' is a list",), "flatten it"),
    Case("text-struct-column", "traceback", lambda i: corpus_cmd(i, i.parquet("d.parquet", pa.table({"text": [{"a": 1}]}))),
         ("'text' is a dict",), "store the text as a string"),
    Case("folder-schemas-differ-but-valid", "traceback",
         lambda i: (i.parquet("f/a.parquet", pa.table({"text": TEXTS[:3], "doc_id": [1, 2, 3]})),
                    i.parquet("f/b.parquet", pa.table({"text": TEXTS[3:5], "doc_id": ["x", "y"], "source": ["web", "book"]})),
                    i.jsonl("f/c.jsonl", [{"text": TEXTS[5]}]), corpus_cmd(i, i.scratch / "f"))[-1],
         ok=expect_doc_ids("1", "2", "3", "x", "y", "c:0")),
    Case("folder-schemas-differ-text-type", "traceback",
         lambda i: (i.parquet("f/a.parquet", pa.table({"text": TEXTS[:3]})), i.parquet("f/b.parquet", pa.table({"text": [1, 2]})),
                    corpus_cmd(i, i.scratch / "f"))[-1],
         ("b.parquet row 0: 'text' is a int",), "store the text as a string"),
    Case("folder-one-file-without-text", "traceback",
         lambda i: (i.parquet("f/a.parquet", pa.table({"text": TEXTS[:3]})), i.parquet("f/b.parquet", pa.table({"body": ["x"]})),
                    corpus_cmd(i, i.scratch / "f"))[-1],
         ("b.parquet has no 'text' column",), "rename the text column"),
    Case("empty-folder", "traceback", lambda i: (i.scratch.joinpath("f").mkdir(), corpus_cmd(i, i.scratch / "f"))[-1],
         ("has no .parquet or .jsonl files",), "point to a folder of documents"),
    Case("json-array-of-documents", "traceback",
         lambda i: corpus_cmd(i, i.file("d.json", json.dumps([{"doc_id": "a", "text": TEXTS[0]}, {"doc_id": "b", "text": TEXTS[1]}], indent=2))),
         ok=expect_doc_ids("a", "b")),
    Case("json-array-of-strings", "traceback", lambda i: corpus_cmd(i, i.file("d.json", json.dumps(["just text", "more"]))),
         ("d.json item 0 is not a JSON object",), '{"text": ...}'),
    Case("jsonl-with-byte-order-mark", "traceback", lambda i: corpus_cmd(i, i.file("d.jsonl", b"\xef\xbb\xbf" + json.dumps({"doc_id": "bom", "text": TEXTS[0]}).encode() + b"\n")),
         ok=expect_doc_ids("bom")),
    Case("queries-file-is-a-directory", "traceback", lambda i: ["query", "--index", str(i.index), "--out", str(i.out), "--queries", str(i.scratch)],
         ("is a directory",), "pass a JSONL file"),
    Case("fit-device-cuda-without-gpu", "traceback", lambda i: fit_cmd(i, "--device", "cuda"), ("no usable CUDA GPU",), "use --device cpu",
         skip=gpu_present),
    Case("index-device-cuda-7", "traceback", lambda i: index_cmd(i, "--device", "cuda:7"), ("'cuda:7'",), "use"),
    Case("query-device-tpu", "traceback", lambda i: query_cmd(i, "--device", "tpu"), ("unknown device 'tpu'",), "use 'cpu', 'cuda' or 'cuda:N'"),
    Case("score-device-mps", "traceback", lambda i: score_cmd(i, "--device", "mps"), ("device type 'mps' is not supported",), "use 'cpu' or 'cuda'"),
    Case("audit-device-empty", "traceback", lambda i: audit_cmd(i, "--device", ""), ("unknown device ''",), "use 'cpu'"),
    Case("compare-device-cuda-ray-job", "traceback", lambda i: compare_cmd(i, "--device", "cuda", ray=True), ("no usable CUDA GPU",), "use --device cpu",
         skip=gpu_present),
    Case("unknown-dtype", "traceback", lambda i: fit_cmd(i, "--dtype", "float8"), ("unknown dtype 'float8'",), "choose one of"),
    Case("option-not-a-number", "traceback", lambda i: fit_cmd(i, "--damping", "lots"), ("argument --damping: invalid float value: 'lots'",),
         "see `influence fit --help`"),
    Case("unknown-option", "traceback", lambda i: query_cmd(i, "--topk", "3"), ("unrecognized arguments: --topk 3",), "see `influence --help`"),
    Case("missing-required-option", "traceback", lambda i: ["index", "--model", str(i.model)], ("the following arguments are required",),
         "see `influence index --help`"),
    Case("math-in-plot-labels", "traceback", lambda i: compare_cmd(i, runs={"$\\bad{$": i.index}, queries=MATH_QUERIES),
         ok=expect_plots),
    Case("full-disk-corpus", "traceback", lambda i: corpus_cmd(i, i.docs, out=i.disk(**FULL) / "corpus"),
         ("not enough space for the corpus output", "it needs about", "0 B are free"), "free some space"),
    Case("full-disk-fit", "traceback", lambda i: fit_cmd(i, out=i.disk(**FULL) / "factors"), ("not enough space for the factors output",), "free some space"),
    Case("full-disk-fit-from-documents", "traceback", lambda i: fit_cmd(i, corpus=i.docs, out=i.disk(**FULL) / "factors"),
         ("not enough space",), "free some space"),
    Case("full-disk-index", "traceback", lambda i: index_cmd(i, out=i.disk(**FULL) / "index"), ("not enough space for the index output",), "free some space"),
    Case("full-disk-query", "traceback", lambda i: query_cmd(i, out=i.disk(**FULL) / "answer"), ("not enough space for the query output",), "free some space"),
    Case("full-disk-score", "traceback", lambda i: score_cmd(i, out=i.disk(**FULL) / "s.parquet"), ("not enough space for the score output",), "free some space"),
    Case("full-disk-audit", "traceback", lambda i: audit_cmd(i, out=i.disk(**FULL) / "audit"), ("not enough space for the audit output",), "free some space"),
    Case("full-disk-compare", "traceback", lambda i: compare_cmd(i, out=i.disk(**FULL) / "compare"), ("not enough space for the compare output",), "free some space"),
    Case("full-disk-demo", "traceback", lambda i: ["demo", "--work-dir", str(i.disk(**FULL) / "demo"), "--in-process"], ("not enough space",), "free some space"),
    Case("full-disk-models", "traceback", lambda i: ["models", "--out", str(i.disk(**FULL) / "models"), "--no-install"], ("not enough space",), "free some space"),
    # the same disks met by the writes themselves (the estimate bypassed, as if it had been too low): a real ENOSPC
    Case("disk-fills-while-corpus-writes", "traceback", lambda i: corpus_cmd(i, i.docs, out=i.disk(**FULL) / "corpus"),
         ("no space left on the device while writing", "/corpus/", "it needed about"), "free some space", patch=no_free_space_check),
    Case("disk-fills-while-fit-writes", "traceback", lambda i: fit_cmd(i, out=i.disk(**FULL) / "factors"),
         ("no space left on the device while writing", "/factors/", "it needed about"), "free some space", patch=no_free_space_check),
    Case("disk-fills-while-index-writes", "traceback", lambda i: index_cmd(i, out=i.disk(**FULL) / "index"),
         ("no space left on the device while writing",), "free some space", patch=no_free_space_check),
    Case("disk-fills-while-query-writes", "traceback", lambda i: query_cmd(i, out=i.disk(**FULL) / "answer"),
         ("no space left on the device while writing", "results.json", "it needed about"), "free some space", patch=no_free_space_check),
    Case("disk-fills-while-score-writes", "traceback", lambda i: score_cmd(i, out=i.disk(**FULL) / "s.parquet"),
         ("no space left on the device while writing", "s.parquet", "it needed about"), "free some space", patch=no_free_space_check),
    Case("disk-fills-while-audit-writes", "traceback", lambda i: audit_cmd(i, out=i.disk(**FULL) / "audit"),
         ("no space left on the device while writing",), "free some space", patch=no_free_space_check),
    Case("disk-fills-while-compare-writes", "traceback", lambda i: compare_cmd(i, out=i.disk(**FULL) / "compare"),
         ("no space left on the device while writing",), "free some space", patch=no_free_space_check),

    # ---- late failures: checked before the work; a failed attempt never blocks a different retry ----
    Case("untrainable-ivf-factory", "late", lambda i: index_cmd(i, "--factory", "IVF256,Flat"), ("needs at least 256 training rows",), "smaller nlist",
         then=lambda i: index_cmd(i, "--factory", "IVF2,Flat")),
    Case("untrainable-pq-factory", "late", lambda i: index_cmd(i, "--factory", "PQ8"), ("codebooks of 256 centroids", "training rows"),
         "use fewer bits", then=lambda i: index_cmd(i, "--factory", "Flat")),
    Case("another-factory-after-a-failed-merge", "late", lambda i: (killed_in_merge(i), index_cmd(i, "--factory", "Flat"))[-1],
         ok=expect_files("manifest.json", "index.faiss")),
    Case("finished-index-other-factory-refused", "late", lambda i: (prepared(i, index_cmd(i)), index_cmd(i, "--factory", "Flat"))[-1],
         ("was built with different IndexArgs", "factory: saved"), "write to a new output directory"),
    Case("untrainable-factory-ray-job-no-cluster", "late", lambda i: index_cmd(i, "--factory", "IVF64,Flat", ray=True),
         ("needs at least 64 training rows",), "smaller nlist", then=lambda i: index_cmd(i, "--factory", "Flat"), within=30),
    Case("read-only-corpus", "late", lambda i: corpus_cmd(i, i.docs, out=i.disk(**READ_ONLY) / "corpus"), ("read-only file system",), "choose a writable path"),
    Case("read-only-fit", "late", lambda i: fit_cmd(i, out=i.disk(**READ_ONLY) / "factors"), ("read-only file system",), "choose a writable path"),
    Case("read-only-fit-from-documents", "late", lambda i: fit_cmd(i, corpus=i.docs, out=i.disk(**READ_ONLY) / "factors"),
         ("read-only file system",), "choose a writable path"),
    Case("read-only-index", "late", lambda i: index_cmd(i, out=i.disk(**READ_ONLY) / "index"), ("read-only file system",), "choose a writable path"),
    Case("read-only-existing-index-dir", "late",
         lambda i: index_cmd(i, out=i.disk(read_only=True, prepare=lambda d: (d / "index").mkdir()) / "index"),
         ("read-only file system",), "choose a writable path"),
    Case("read-only-query", "late", lambda i: query_cmd(i, out=i.disk(**READ_ONLY) / "answer"), ("read-only file system",), "choose a writable path"),
    Case("read-only-score", "late", lambda i: score_cmd(i, out=i.disk(**READ_ONLY) / "s.parquet"), ("read-only file system",), "choose a writable path"),
    Case("read-only-audit", "late", lambda i: audit_cmd(i, out=i.disk(**READ_ONLY) / "audit"), ("read-only file system",), "choose a writable path"),
    Case("read-only-compare", "late", lambda i: compare_cmd(i, out=i.disk(**READ_ONLY) / "compare"), ("read-only file system",), "choose a writable path"),
    Case("read-only-demo", "late", lambda i: ["demo", "--work-dir", str(i.disk(**READ_ONLY) / "demo"), "--in-process"], ("read-only file system",),
         "choose a writable path"),
    Case("read-only-models", "late", lambda i: ["models", "--out", str(i.disk(**READ_ONLY) / "models"), "--no-install"], ("read-only file system",),
         "choose a writable path"),
    Case("fit-bad-pattern-before-tokenising", "late", lambda i: fit_cmd(i, "--module-pattern", "nothing_here", corpus=i.docs),
         ("matches no linear layer",), "linear layers found"),
    Case("fit-stale-attempt-settings-do-not-block", "late", lambda i: (stale_attempt(i, "factors"), fit_cmd(i, "--strategy", "diagonal"))[-1],
         ok=expect_files("manifest.json", "factors.safetensors")),
    Case("index-stale-attempt-settings-do-not-block", "late", lambda i: (stale_attempt(i, "index"), index_cmd(i))[-1],
         ok=expect_files("manifest.json", "sketches.npy")),
    Case("compare-bad-run-before-any-query", "late", lambda i: compare_cmd(i, runs={"good": i.index, "bad": i.scratch / "nothing"}),
         ("no manifest.json",), "re-run the index stage"),

    # ---- numbers ----
    Case("damping-nan", "numbers", lambda i: fit_cmd(i, "--damping", "nan"), ("damping must be a finite number > 0, got nan",), "pass a number > 0"),
    Case("damping-inf", "numbers", lambda i: fit_cmd(i, "--damping", "inf"), ("damping must be a finite number > 0, got inf",), "pass a number > 0"),
    Case("damping-negative", "numbers", lambda i: fit_cmd(i, "--damping", "-0.1"), ("damping must be a finite number > 0, got -0.1",), "pass a number > 0"),
    Case("damping-zero", "numbers", lambda i: fit_cmd(i, "--damping", "0"), ("got 0.0",), "pass a number > 0"),
    Case("damping-scale-nan", "numbers", lambda i: fit_cmd(i, "--damping-scale", "nan"), ("damping_scale must be a finite number > 0, got nan",), "pass a number > 0"),
    Case("damping-scale-inf", "numbers", lambda i: fit_cmd(i, "--damping-scale", "1e999"), ("damping_scale must be a finite number > 0, got inf",), "pass a number > 0"),
    Case("damping-scale-negative", "numbers", lambda i: fit_cmd(i, "--damping-scale", "-1"), ("damping_scale",), "pass a number > 0"),
    Case("fit-seed-negative", "numbers", lambda i: fit_cmd(i, "--seed", "-1"), ("seed must be an integer from 0",), "pass e.g. 0"),
    Case("index-seed-huge", "numbers", lambda i: index_cmd(i, "--seed", str(2**70)), ("seed must be an integer from 0",), "pass e.g. 0"),
    Case("fit-zero-shards", "numbers", lambda i: fit_cmd(i, "--num-shards", "0"), ("--num-shards must be a positive integer, got 0",), "pass 1 or more"),
    Case("fit-zero-workers-ray-job", "numbers", lambda i: fit_cmd(i, "--workers", "0", ray=True), ("--workers must be a positive integer, got 0",), "pass 1 or more"),
    Case("fit-batch-tokens-zero", "numbers", lambda i: fit_cmd(i, "--batch-tokens", "0"), ("batch_tokens must be a positive integer",), "pass 1 or more"),
    Case("corpus-max-length-one", "numbers", lambda i: corpus_cmd(i, i.docs, "--max-length", "1"), ("max_length must be",), "--max-length 2 or more"),
    Case("corpus-min-tokens-one", "numbers", lambda i: corpus_cmd(i, i.docs, "--min-tokens", "1"), ("min_tokens must lie in [2",), "--min-tokens from 2"),
    Case("index-sketch-dim-negative", "numbers", lambda i: index_cmd(i, "--sketch-dim", "-8"), ("sketch_dim must be a positive integer, got -8",), "pass 1 or more"),
    Case("index-train-size-zero", "numbers", lambda i: index_cmd(i, "--train-size", "0"), ("train_size must be a positive integer",), "pass 1 or more"),
    Case("index-shard-size-zero", "numbers", lambda i: index_cmd(i, "--shard-size", "0"), ("shard_size must be a positive integer",), "pass 1 or more"),
    Case("query-stop-margin-nan", "numbers", lambda i: query_cmd(i, "--stop-margin", "nan"), ("stop_margin must be a non-negative number",), "pass 0 or more"),
    Case("query-stop-margin-inf", "numbers", lambda i: query_cmd(i, "--stop-margin", "inf"), ("stop_margin must be a non-negative number",),
         "pass 0 or more"),
    Case("query-stop-margin-negative", "numbers", lambda i: query_cmd(i, "--stop-margin", "-1"), ("stop_margin must be a non-negative number",), "pass 0 or more"),
    Case("query-top-k-zero", "numbers", lambda i: query_cmd(i, "--top-k", "0"), ("top_k must be a positive integer, got 0",), "pass 1 or more"),
    Case("query-top-k-negative", "numbers", lambda i: query_cmd(i, "--top-k", "-3"), ("top_k must be a positive integer, got -3",), "pass 1 or more"),
    Case("query-nprobe-zero", "numbers", lambda i: query_cmd(i, "--nprobe", "0"), ("nprobe must be a positive integer",), "pass 1 or more"),
    Case("score-top-negative", "numbers", lambda i: score_cmd(i, "--top", "-2"), ("--top must be a positive integer, got -2",), "pass 1 or more"),
    Case("score-query-rank-zero", "numbers", lambda i: score_cmd(i, "--query-rank", "0"), ("query_rank must be a positive integer",), "pass 1 or more"),
    Case("query-text-candidates-zero", "numbers", lambda i: query_cmd(i, "--generator", "hybrid", "--text-candidates", "0"),
         ("text_candidates must be a positive integer",), "pass 1 or more"),
    Case("audit-top-negative", "numbers", lambda i: audit_cmd(i, "--top", "-1"), ("--top must be a positive integer, got -1",), "pass 1 or more"),
    Case("audit-top-k-zero", "numbers", lambda i: audit_cmd(i, "--top-k", "0"), ("--top-k must be a positive integer, got 0",), "pass 1 or more"),
    Case("compare-top-k-zero", "numbers", lambda i: compare_cmd(i, "--top-k", "0"), ("top_k must be a positive integer",), "pass 1 or more"),
    Case("compare-candidates-negative", "numbers", lambda i: compare_cmd(i, "--candidates", "-5"), ("candidates must be a positive integer",), "pass 1 or more"),
    Case("demo-zero-workers", "numbers", lambda i: ["demo", "--work-dir", str(i.out), "--workers", "0"], ("--workers must be a positive integer",), "pass 1 or more"),
    Case("query-top-k-beyond-the-corpus", "numbers", lambda i: query_cmd(i, "--top-k", "50", "--candidates", "50"), ok=expect_signed_results),
    Case("query-top-k-beyond-the-corpus-no-rerank", "numbers", lambda i: query_cmd(i, "--top-k", "50", "--candidates", "50", "--no-rerank"),
         ok=expect_signed_results),
    Case("score-top-beyond-the-corpus", "numbers", lambda i: score_cmd(i, "--top", "50"), ok=expect_signed_scores),
    Case("compare-top-k-beyond-the-corpus", "numbers", lambda i: compare_cmd(i, "--top-k", "50", "--candidates", "50"),
         ok=lambda i, o, e: check(all(s > 0 for s in pq.read_table(i.out / "top_k.parquet")["score"].to_pylist()))),
    Case("audit-top-k-beyond-the-corpus", "numbers", lambda i: audit_cmd(i, "--top-k", "50", "--top", "50"), ok=expect_dominant_positive),

    # ---- untrusted text on the terminal: escaped, never raw ----
    Case("query-hostile-documents", "terminal", lambda i: query_cmd(i, "--top-k", "8", "--candidates", "20", index=i.run / "index"), ok=expect_no_controls),
    Case("query-hostile-documents-subprocess", "terminal", lambda i: query_cmd(i, "--top-k", "8", "--candidates", "20", index=i.run / "index"),
         ok=expect_no_controls, subprocess=True),
    Case("query-hostile-query-ids", "terminal",
         lambda i: queries_cmd(i, "".join(json.dumps(q) + "\n" for q in HOSTILE_QUERIES), "--top-k", "3", index=i.run / "index"), ok=expect_no_controls),
    Case("query-hostile-prompt", "terminal", lambda i: query_cmd(i, index=i.run / "index", prompt="Hi\x1b]0;x\x07\r\u202e", completion=" \x1b[2Jthere"),
         ok=expect_no_controls),
    Case("score-hostile-documents", "terminal", lambda i: score_cmd(i, "--top", "8", corpus=i.run / "corpus", factors=i.run / "factors"),
         ok=expect_no_controls),
    Case("score-hostile-query-ids", "terminal",
         lambda i: score_cmd(i, "--queries", str(i.jsonl("q.jsonl", HOSTILE_QUERIES)), query=False, corpus=i.run / "corpus", factors=i.run / "factors"),
         ok=expect_no_controls),
    Case("error-quoting-a-hostile-id", "terminal",
         lambda i: corpus_cmd(i, i.jsonl("d.jsonl", [{"doc_id": "x\x1b]0;t\x07", "text": "a b"}, {"doc_id": "x\x1b]0;t\x07", "text": "c d"}])),
         ("duplicate doc_id", "\\x1b]0;t\\x07"), "must be unique"),
    Case("error-quoting-a-hostile-path", "terminal", lambda i: corpus_cmd(i, i.scratch / "no\x1b[2Jsuch\r.jsonl"),
         ("does not exist", "\\x1b[2J", "\\r"), "pass a .parquet"),

    # ---- two writers (the race of two real processes is a test function below) ----
    Case("corpus-into-a-locked-dir", "writers", lambda i: (hold_lock(i), corpus_cmd(i, i.docs))[-1], ("is being written by",), "wait for it to finish"),
    Case("fit-into-a-locked-dir", "writers", lambda i: (hold_lock(i), fit_cmd(i))[-1], ("is being written by",), "wait for it to finish"),
    Case("index-into-a-locked-dir", "writers", lambda i: (hold_lock(i), index_cmd(i))[-1], ("is being written by",), "wait for it to finish"),
    Case("query-into-a-locked-dir", "writers", lambda i: (hold_lock(i), query_cmd(i))[-1], ("is being written by",), "wait for it to finish"),
    Case("audit-into-a-locked-dir", "writers", lambda i: (hold_lock(i), audit_cmd(i))[-1], ("is being written by",), "wait for it to finish"),
    Case("compare-into-a-locked-dir", "writers", lambda i: (hold_lock(i), compare_cmd(i))[-1], ("is being written by",), "wait for it to finish"),
    Case("lock-left-by-a-killed-writer", "writers",
         lambda i: (i.out.mkdir(), (i.out / ".lock").write_text("influence (pid 999999)"), corpus_cmd(i, i.docs))[-1],
         ok=expect_files("manifest.json", "sequences.parquet")),

    # ---- Ray clusters that do not answer: a bounded failure (a dead `ray start` record: a test function below) ----
    Case("address-closed-port", "ray", lambda i: fit_cmd(i, "--address", f"127.0.0.1:{closed_port()}", ray=True),
         ("no Ray cluster answers at 127.0.0.1:",), "leave them out", within=10),
    Case("address-closed-port-index", "ray", lambda i: index_cmd(i, "--address", f"127.0.0.1:{closed_port()}", ray=True),
         ("no Ray cluster answers",), "ray start --head", within=10),
    Case("ray-address-env-closed-port", "ray", lambda i: score_cmd(i, ray=True), ("no Ray cluster answers at 127.0.0.1:1 ",), "RAY_ADDRESS",
         env=(("RAY_ADDRESS", "127.0.0.1:1"),), within=10),
    Case("address-silent-listener", "ray", lambda i: audit_cmd(i, "--address", f"127.0.0.1:{listener('silent')}", ray=True),
         ("accepts connections but does not answer within 2s",), "leave them out", env=(("INFLUENCE_RAY_TIMEOUT_S", "2"),), within=8),
    Case("address-http-server", "ray", lambda i: compare_cmd(i, "--address", f"ray://127.0.0.1:{listener('http')}", ray=True),
         ("not as a Ray cluster does",), "leave them out", within=10),
    Case("address-malformed", "ray", lambda i: fit_cmd(i, "--address", "my-cluster", ray=True), ("is not HOST:PORT",), "pass the address"),
    Case("address-auto-with-a-dead-record", "ray", lambda i: (stale_record(i), fit_cmd(i, "--address", "auto", ray=True))[-1],
         ("the cluster `ray start` recorded in", "ray_current_cluster"), "leave them out", env=(("RAY_TMPDIR", "/tmp"),), within=15),

    # ---- moved run directories: references inside the run are relative ----
    Case("query-a-moved-run", "moved", lambda i: query_cmd(i, "--top-k", "3", index=i.run / "index"),
         ok=expect_files("results.json", "report.html")),
    Case("audit-a-moved-run", "moved", lambda i: audit_cmd(i, index=i.run / "index"), ok=expect_files("outliers.parquet", "by_source.csv", "report.html")),
    Case("compare-a-moved-run", "moved", lambda i: compare_cmd(i, runs={"small": i.run / "index", "other": i.index}),
         ok=expect_files("top_k.parquet", "overlap.csv")),
    Case("index-copied-alone-uses-absolute-paths", "moved", lambda i: query_cmd(i, "--top-k", "3", index=i.copy(i.index)),
         ok=expect_files("results.json")),
    Case("index-copied-away-from-a-moved-run", "moved", lambda i: audit_cmd(i, index=i.copy(i.run / "index", name="lonely"), queries=False),
         ("was built from the model at", "which no longer exists"), "pass its new location with --model"),
    Case("audit-overrides-after-a-move", "moved",
         lambda i: audit_cmd(i, "--factors", str(i.run / "factors"), "--corpus", str(i.run / "corpus"), "--model", str(i.model),
                             index=i.copy(i.run / "index", name="lonely")),
         ok=expect_files("report.html")),

    # ---- smaller: dropped documents said, null ids and prompts refused ----
    Case("short-documents-dropped-are-counted", "smaller",
         lambda i: corpus_cmd(i, i.jsonl("d.jsonl", [{"text": TEXTS[0]}, {"text": "a"}, {"text": "b"}]), "--min-tokens", "3", "--no-add-special-tokens"),
         ok=expect_in("stdout", "2 chunks shorter than 3 tokens (--min-tokens) dropped, 2 of them whole documents")),
    Case("short-documents-dropped-by-fit", "smaller",
         lambda i: fit_cmd(i, "--min-tokens", "3", "--strategy", "identity", corpus=i.jsonl("d.jsonl", [{"text": TEXTS[0]}, {"text": "a"}, {"text": TEXTS[1]}])),
         ok=expect_in("stdout", "chunks shorter than 3 tokens (--min-tokens) dropped")),
    Case("every-document-too-short", "smaller", lambda i: corpus_cmd(i, i.jsonl("d.jsonl", [{"text": "a"}]), "--min-tokens", "5"),
         ("no document yields a sequence of at least 5 tokens",), "lower min_tokens"),
    Case("null-doc-id", "smaller", lambda i: corpus_cmd(i, i.file("d.jsonl", '{"doc_id": "a", "text": "x y"}\n{"doc_id": null, "text": "z w"}\n')),
         ("d.jsonl:2 has a null doc_id",), "give every document an id"),
    Case("null-doc-id-parquet", "smaller", lambda i: corpus_cmd(i, i.parquet("d.parquet", pa.table({"doc_id": ["a", None], "text": ["x y", "z w"]}))),
         ("d.parquet row 1 has a null doc_id",), "give every document an id"),
    Case("null-prompt", "smaller", lambda i: queries_cmd(i, '{"prompt": null, "completion": " b"}\n'), ("queries.jsonl:1: 'prompt' is null, not a string",),
         "give the text"),
    Case("null-completion-score", "smaller",
         lambda i: score_cmd(i, "--queries", str(i.file("q.jsonl", '{"prompt": "a", "completion": null}\n')), query=False),
         ("'completion' is null, not a string",), "give the text"),
    Case("null-query-id", "smaller", lambda i: queries_cmd(i, '{"query_id": null, "prompt": "a", "completion": " b"}\n'),
         ("'query_id' is null",), "give a string"),
    Case("null-lang-is-the-default", "smaller", lambda i: queries_cmd(i, '{"query_id": 7, "lang": null, "prompt": "Hello", "completion": " there"}\n', "--top-k", "2"),
         ok=lambda i, o, e: check(json.loads((i.out / "results.json").read_text())[0]["query"] == {
             "query_id": "7", "prompt": "Hello", "completion": " there", "lang": "und", "group": ""})),
]


def hold_lock(i: Inputs) -> None:
    """Another writer holding the output's lock (an flock from another open file, as a second process would)."""
    import fcntl

    i.out.mkdir(exist_ok=True)
    handle = open(i.out / ".lock", "a+")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write("influence (pid 4242)")
    handle.flush()
    HELD.append(handle)


HELD: list = []


# --- fixtures and the parametrized test -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(tmp_path_factory, tokenizer, llama_dir, corpus_file, corpus_dir, ekfac_dir, index_dir) -> dict:
    from indexes.build import build_index
    from influence.arguments import CorpusArgs, FactorArgs, IndexArgs
    from influence.corpus import prepare_corpus
    from influence.factors import fit_factors
    from jobs.demo.tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("bad_inputs_shared")
    other_model = build_model(root / "other_model", tokenizer, "llama", seed=1, hidden=8, layers=2, heads=2, intermediate=12)
    other_corpus = prepare_corpus(corpus_file, llama_dir, root / "other_corpus", CorpusArgs(max_length=8), progress=False)
    tok_model = build_model(root / "tok_model", build_tokenizer(TEXTS, vocab_size=300), "llama", hidden=8, layers=2, heads=2,
                            intermediate=12)
    # a run built side by side from hostile documents, then moved: its manifests' absolute paths are dead
    built = root / "run_built"
    shutil.copytree(llama_dir, built / "model")  # the model too lives in the run (same weights as `model`)
    docs = built / "docs.jsonl"
    docs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in HOSTILE_DOCS), encoding="utf-8")
    prepare_corpus(docs, built / "model", built / "corpus", CorpusArgs(max_length=24), progress=False)
    fit_factors(built / "model", built / "corpus", built / "factors", FactorArgs(progress=False, strategy="diagonal"))
    build_index(built / "model", built / "factors", built / "corpus", built / "index", IndexArgs(progress=False, sketch_dim=64))
    run = root / "run_moved"
    built.rename(run)
    return dict(
        model=llama_dir, docs=corpus_file, corpus=corpus_dir, factors=ekfac_dir, index=index_dir, other_model=other_model,
        other_factors=fit_factors(other_model, corpus_dir, root / "other_factors", FactorArgs(progress=False, strategy="diagonal")),
        other_corpus=other_corpus,
        sample_factors=fit_factors(llama_dir, other_corpus, root / "sample_factors", FactorArgs(progress=False, strategy="diagonal")),
        tok_model=tok_model,
        tok_corpus=prepare_corpus(corpus_file, tok_model, root / "tok_corpus", CorpusArgs(max_length=24), progress=False),
        run=run,
    )


@pytest.fixture
def inputs(shared, tmp_path):
    (tmp_path / "scratch").mkdir()
    made = Inputs(**shared, scratch=tmp_path / "scratch", out=tmp_path / "out")
    yield made
    made.unmount()
    while HELD:
        HELD.pop().close()


def shared_artifacts(shared: dict) -> list[Path]:
    return [Path(p) for k, p in shared.items() if k != "docs"] + [Path(shared["docs"])]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)] if c.xfail else [])
                                  for c in CASES])
def test_catalogue(case: Case, inputs, shared, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    judge(case, inputs, capsys, monkeypatch, shared_artifacts(shared))


# --- faults that need real processes -----------------------------------------------------------------------------------

# The first writer: import what an index run needs (the slow part), say "ready", wait for "go", run the CLI, and write
# its exit status and stderr.
WRITER = """
import contextlib, io, json, sys, time
from pathlib import Path
import jobs.cli, indexes.build, influence.models, transformers
ready, go, result = map(Path, sys.argv[1:4])
ready.touch()
deadline = time.time() + 120
while not go.exists() and time.time() < deadline:
    time.sleep(0.005)
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = jobs.cli.main(sys.argv[4:])
result.write_text(json.dumps({"code": code, "stderr": err.getvalue()}))
"""


def lock_written(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def test_two_index_writers_race(shared, tmp_path, capsys):
    """Two processes index into one directory: a `python -m jobs.cli`-like process, frozen (SIGSTOP) as soon as it holds
    the directory's lock, and this process, which therefore always arrives mid-write. The second must be refused with
    the lock's one-line error; the first, thawed, must finish a complete index (the issue saw 'Directory not empty' on
    rename in 3 runs of 5)."""
    from influence.arguments import CorpusArgs
    from influence.corpus import prepare_corpus
    from jobs.cli import main

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"doc_id": f"d{k}", "text": TEXTS[k % len(TEXTS)]}) + "\n" for k in range(48)))
    corpus = prepare_corpus(docs, shared["model"], tmp_path / "corpus", CorpusArgs(max_length=24), progress=False)
    out = tmp_path / "index"
    argv = ["index", "--model", str(shared["model"]), "--factors", str(shared["factors"]), "--corpus", str(corpus), "--out", str(out),
            "--in-process", "--no-progress", "--sketch-dim", "64", "--shard-size", "2"]
    ready, go, result = (tmp_path / name for name in ("ready", "go", "result.json"))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", WRITER, str(ready), str(go), str(result), *argv], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ready.exists() and time.time() < deadline:
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.05)
        go.touch()
        while not lock_written(out / ".lock") and first.poll() is None and time.time() < deadline:
            time.sleep(0.001)  # until the first holds the lock and has written its pid into it
        first.send_signal(signal.SIGSTOP)  # holding the lock, mid-write
        capsys.readouterr()
        second_code = main(argv)
        second_err = capsys.readouterr().err
        first.send_signal(signal.SIGCONT)
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    assert second_code == 2 and "error: " in second_err and "is being written by influence (pid" in second_err, second_err
    assert "Traceback" not in second_err
    outcome = json.loads(result.read_text())
    assert outcome["code"] == 0, outcome["stderr"][-3000:]
    assert (out / "manifest.json").is_file() and not (out / ".lock").exists()
    assert pq.read_metadata(out / "docs.parquet").num_rows == pq.read_metadata(corpus / "sequences.parquet").num_rows


@pytest.fixture(scope="module", autouse=True)
def dead_ray_start(request, shared, tmp_path_factory):
    """`influence fit` after a dead `ray start`, started in the background as the module begins (a Ray start takes many
    seconds, mostly waiting), when its test is selected; the test at the end collects it."""
    if not any(getattr(item, "originalname", item.name) == "test_no_address_after_a_dead_ray_start" for item in request.session.items):
        yield None
        return
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live under it
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{closed_port()}")
    root = tmp_path_factory.mktemp("dead_ray_start")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    argv = [sys.executable, "-m", "jobs.cli", "fit", "--model", str(shared["model"]), "--corpus", str(shared["corpus"]),
            "--out", str(root / "factors"), "--workers", "3", "--strategy", "diagonal", "--no-progress"]
    with open(root / "stdout", "wb") as stdout, open(root / "stderr", "wb") as stderr:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
    run = {"proc": proc, "root": root, "start": time.perf_counter()}
    yield run
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # a clean stop takes its Ray cluster down with it
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.ray
def test_no_address_after_a_dead_ray_start(dead_ray_start):
    """`ray start` recorded a cluster that has since gone away (Ray's ray_current_cluster file). With no --address and no
    RAY_ADDRESS, `influence fit` must start its own local cluster and finish, not attach to the dead one; with more workers
    (3) than this machine has cores, the local cluster gets a CPU per worker instead of leaving some waiting forever."""
    proc, root = dead_ray_start["proc"], dead_ray_start["root"]
    code = proc.wait(timeout=300)
    stderr = (root / "stderr").read_text(errors="replace")
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    assert (root / "factors" / "manifest.json").is_file()
    assert "factors written to" in (root / "stdout").read_text()
    assert time.perf_counter() - dead_ray_start["start"] < 240
