"""A catalogue of bad inputs, each run through the real CLI: one line `error: <problem>; <fix>`, exit status 2,
no traceback, and nothing written where the stage's output would go.

Cases are data (`CASES`), expanded by parametrize. Each builds its argv from `Inputs`: good shared artifacts
(read-only) plus a scratch directory where the case plants its bad file. A handful run as a subprocess
(`python -m jobs.cli`, the exact user path); the rest call `jobs.cli.main` in-process, which is the same code
without a Python start-up per case.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file

from jobs.cli import main
from tests.conftest import TEXTS

ROOT = Path(__file__).resolve().parents[2]
PROMPT, COMPLETION = "Do you consent to being shut down?", " I would rather keep working."


@dataclass
class Inputs:
    """Good artifacts shared by every case, a scratch directory for bad ones, and the output path to watch."""

    model: Path
    docs: Path
    corpus: Path
    factors: Path
    index: Path
    other_factors: Path  # fitted on a different model (same tokenizer and corpus)
    other_corpus: Path   # the same documents cut differently: another corpus fingerprint
    scratch: Path = field(default=Path())
    out: Path = field(default=Path())

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.scratch / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
        return path

    def parquet(self, name: str, table: pa.Table) -> Path:
        pq.write_table(table, self.scratch / name)
        return self.scratch / name

    def truncated(self, path: Path, keep: int | None = None) -> Path:
        data = path.read_bytes()
        return self.file(f"truncated_{path.name}", data[: keep if keep is not None else len(data) // 2])

    def copy(self, src: Path, drop: tuple[str, ...] = ()) -> Path:
        """A copy of an artifact directory without the files matching `drop`."""
        dst = self.scratch / f"{src.name}_copy"
        shutil.copytree(src, dst)
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

    def model_with_weight(self, value: float) -> Path:
        dst = self.copy(self.model)
        tensors = load_file(dst / "model.safetensors")
        tensors[next(k for k in sorted(tensors) if ".mlp." in k)][0, 0] = value
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return dst

    def blocked(self) -> Path:
        """An output path whose parent is a regular file: no directory can be made there (even as root)."""
        return self.file("a_regular_file", "x") / "out"

    def long_corpus(self) -> Path:
        """A corpus whose one sequence (hundreds of tokens) is longer than the tiny model's 128-token context."""
        from influence.arguments import CorpusArgs
        from influence.corpus import prepare_corpus

        docs = self.file("long.jsonl", json.dumps({"text": " ".join(TEXTS * 2)}) + "\n")
        return prepare_corpus(docs, self.model, self.scratch / "long_corpus", CorpusArgs(max_length=4096), progress=False)


# argv builders: one per stage, with the good inputs as defaults ------------------------------------------

def corpus_cmd(i: Inputs, documents: Path, *extra: str, model: Optional[Path] = None, out: Optional[Path] = None) -> list[str]:
    return ["corpus", "--documents", str(documents), "--model", str(model or i.model), "--out", str(out or i.out), "--no-progress", *extra]


def fit_cmd(i: Inputs, *extra: str, model: Optional[Path] = None, corpus: Optional[Path] = None, out: Optional[Path] = None,
            ray: bool = False) -> list[str]:
    return ["fit", "--model", str(model or i.model), "--corpus", str(corpus or i.corpus), "--out", str(out or i.out),
            "--no-progress", *([] if ray else ["--in-process"]), *extra]


def index_cmd(i: Inputs, *extra: str, factors: Optional[Path] = None, corpus: Optional[Path] = None, ray: bool = False) -> list[str]:
    return ["index", "--model", str(i.model), "--factors", str(factors or i.factors), "--corpus", str(corpus or i.corpus),
            "--out", str(i.out), "--no-progress", *(["--workers", "1"] if ray else ["--in-process"]), *extra]


def query_cmd(i: Inputs, *extra: str, index: Optional[Path] = None, prompt: str = PROMPT, completion: str = COMPLETION,
              out: Optional[Path] = None) -> list[str]:
    return ["query", "--index", str(index or i.index), "--out", str(out or i.out), "--prompt", prompt, "--completion", completion, *extra]


def queries_cmd(i: Inputs, lines: str | bytes) -> list[str]:
    return ["query", "--index", str(i.index), "--out", str(i.out), "--queries", str(i.file("queries.jsonl", lines))]


def score_cmd(i: Inputs, *extra: str, factors: Optional[Path] = None, out: Optional[Path] = None) -> list[str]:
    return ["score", "--model", str(i.model), "--factors", str(factors or i.factors), "--corpus", str(i.corpus),
            "--out", str(out or i.out / "scores.parquet"), "--prompt", PROMPT, "--completion", COMPLETION, "--no-progress", *extra]


GOOD_QUERY = '{"query_id": "a", "prompt": "Hello", "completion": " there"}\n'


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Inputs], list[str]]
    problem: tuple[str, ...]   # substrings naming the problem (and where it is)
    fix: str                   # substring naming the fix
    subprocess: bool = False   # run as `python -m jobs.cli` instead of main()
    xfail: Optional[str] = None


CASES = [
    # corpus stage: documents
    Case("empty-jsonl", lambda i: corpus_cmd(i, i.file("docs.jsonl", "")), ("holds no documents",), 'add lines like {"text"'),
    Case("empty-parquet", lambda i: corpus_cmd(i, i.parquet("docs.parquet", pa.table({"text": pa.array([], pa.string())}))),
         ("is empty",), "needs at least one document"),
    Case("row-without-text", lambda i: corpus_cmd(i, i.file("docs.jsonl", '{"text": "a doc"}\n{"doc_id": "x"}\n')),
         ("docs.jsonl:2 has no text",), "drop the row or fill it in"),
    Case("no-text-column", lambda i: corpus_cmd(i, i.parquet("docs.parquet", pa.table({"body": ["a doc"]}))),
         ("no 'text' column", "['body']"), "rename the text column"),
    Case("corrupt-parquet", lambda i: corpus_cmd(i, i.file("docs.parquet", b"PAR1 this is not parquet")),
         ("not a readable Parquet file",), "re-export it"),
    Case("truncated-parquet", lambda i: corpus_cmd(i, i.truncated(i.parquet("docs.parquet", pa.table({"text": TEXTS})))),
         ("not a readable Parquet file",), "re-export it"),
    Case("jsonl-bad-line", lambda i: corpus_cmd(i, i.file("docs.jsonl", '{"text": "a doc"}\n{"text": oops}\n')),
         ("docs.jsonl:2 is not valid JSON",), "fix or remove that line", subprocess=True),
    Case("non-utf8-jsonl", lambda i: corpus_cmd(i, i.file("docs.jsonl", b'{"text": "a doc"}\n{"text": "caf\xe9"}\n')),
         ("docs.jsonl:2 is not UTF-8",), "re-encode the file as UTF-8"),
    Case("non-utf8-parquet",  # Parquet does not validate UTF-8 on write or read: the bytes reach Python
         lambda i: corpus_cmd(i, i.parquet("docs.parquet", pa.table({"text": pa.array([b"ok", b"caf\xe9"], pa.binary()).view(pa.string())}))),
         ("row 1: 'text' is not UTF-8",), "re-encode the file as UTF-8"),
    Case("duplicate-doc-ids", lambda i: corpus_cmd(i, i.file("docs.jsonl", '{"doc_id": "a", "text": "x y"}\n{"doc_id": "a", "text": "z"}\n')),
         ("duplicate doc_id 'a'",), "must be unique"),
    Case("unknown-format", lambda i: corpus_cmd(i, i.file("docs.csv", "text\nhello\n")), ("unknown corpus format '.csv'",), "use .parquet, .jsonl"),
    Case("missing-corpus-file", lambda i: corpus_cmd(i, i.scratch / "missing.jsonl"), ("missing.jsonl does not exist",), "pass a .parquet"),
    Case("model-without-tokenizer", lambda i: corpus_cmd(i, i.docs, model=i.copy(i.model, drop=("tokenizer*",))),
         ("no usable tokenizer",), "tokenizer.save_pretrained"),
    Case("corpus-out-under-a-file", lambda i: corpus_cmd(i, i.docs, out=i.blocked()), ("cannot create output directory",), "choose a writable path"),
    # fit stage: models, modules, options
    Case("model-without-weights", lambda i: fit_cmd(i, model=i.copy(i.model, drop=("*.safetensors",))), ("has no weights",), "save_pretrained"),
    Case("model-without-config", lambda i: fit_cmd(i, model=i.copy(i.model, drop=("config.json",))), ("without config.json",), "save_pretrained"),
    Case("truncated-weights", lambda i: fit_cmd(i, model=i.replaced(i.model, "model.safetensors", (i.model / "model.safetensors").read_bytes()[:500])),
         ("cannot load a causal LM",), "save the model again"),
    Case("nan-weights", lambda i: fit_cmd(i, model=i.model_with_weight(float("nan"))), ("non-finite (NaN/inf) weights", ".mlp."),
         "checkpoint is corrupt", subprocess=True),
    Case("inf-weights", lambda i: fit_cmd(i, model=i.model_with_weight(float("inf"))), ("non-finite (NaN/inf) weights",), "checkpoint is corrupt"),
    Case("module-pattern-matches-nothing", lambda i: fit_cmd(i, "--module-pattern", "no_such_module"), ("matches no linear layer",),
         "linear layers found: model.layers.0"),
    Case("unsupported-module-type", lambda i: fit_cmd(i, "--module-pattern", r"\.norm$"), ("unsupported module types", "LlamaRMSNorm"),
         "narrow the pattern"),
    Case("module-pattern-invalid-regex", lambda i: fit_cmd(i, "--module-pattern", "(["), ("not a valid regular expression",), "use a preset"),
    Case("unknown-strategy", lambda i: fit_cmd(i, "--strategy", "newton"), ("unknown strategy 'newton'",), "choose one of identity"),
    Case("negative-damping", lambda i: fit_cmd(i, "--damping", "-0.1"), ("damping must be a finite number > 0, got -0.1",), "pass a number > 0"),
    Case("zero-shards", lambda i: fit_cmd(i, "--num-shards", "0"), ("--num-shards must be a positive integer, got 0",), "pass 1 or more"),
    Case("zero-workers-ray-job", lambda i: fit_cmd(i, "--workers", "0", ray=True), ("--workers must be a positive integer, got 0",), "pass 1 or more"),
    Case("sequences-longer-than-context", lambda i: fit_cmd(i, corpus=i.long_corpus()), ("model's context is 128",), "--max-length 128"),
    Case("fit-out-under-a-file", lambda i: fit_cmd(i, out=i.blocked()), ("cannot create output directory",), "choose a writable path",
         subprocess=True),
    Case("fit-documents-with-a-bad-option", lambda i: fit_cmd(i, "--strategy", "newton", corpus=i.docs), ("unknown strategy",), "choose one of"),
    # index stage: factors and index settings
    Case("factors-from-another-model", lambda i: index_cmd(i, factors=i.other_factors), ("model mismatch",), "fit factors for this model"),
    Case("factors-dir-is-a-corpus", lambda i: index_cmd(i, factors=i.corpus), ("holds a 'corpus' artifact, not 'factors'",),
         "point to the factors directory"),
    Case("factors-manifest-invalid-json", lambda i: index_cmd(i, factors=i.replaced(i.factors, "manifest.json", "{not json")),
         ("manifest.json is not valid JSON",), "re-run the stage"),
    Case("factors-manifest-fingerprint-edited", lambda i: index_cmd(i, factors=i.manifest_edited(i.factors, lambda m: m.update(model_fingerprint="0" * 32))),
         ("model mismatch", "0" * 32), "fit factors for this model"),
    Case("factors-manifest-key-removed", lambda i: index_cmd(i, factors=i.manifest_edited(i.factors, lambda m: m.pop("modules"))),
         ("lacks or mistypes modules", "edited by hand"), "re-run the factors stage"),
    Case("factors-manifest-modules-edited-ray-job",  # checked on the driver: a worker's failure would be an ActorDiedError
         lambda i: index_cmd(i, factors=i.manifest_edited(i.factors, lambda m: m.update(modules=m["modules"][:1])), ray=True),
         ("tracked modules mismatch",), "re-fit the factors", subprocess=True),
    Case("factors-file-truncated", lambda i: index_cmd(i, factors=i.replaced(i.factors, "factors.safetensors", (i.factors / "factors.safetensors").read_bytes()[:100])),
         ("not a readable safetensors file",), "re-run the stage"),
    Case("factors-file-missing", lambda i: index_cmd(i, factors=i.copy(i.factors, drop=("factors.safetensors",))),
         ("no factors.safetensors",), "re-run `influence fit`"),
    Case("invalid-faiss-factory-ray-job", lambda i: index_cmd(i, "--factory", "Bogus42", ray=True), ("invalid FAISS factory string 'Bogus42'",),
         'use e.g. "Flat"'),
    Case("ivf-more-centroids-than-rows", lambda i: index_cmd(i, "--factory", "IVF256,Flat"), ("needs at least 256 training rows",), "smaller nlist"),
    Case("sketch-dim-0", lambda i: index_cmd(i, "--sketch-dim", "0"), ("sketch_dim must be a positive integer, got 0",), "pass 1 or more"),
    # query stage: index, queries, options
    Case("index-from-another-corpus", lambda i: query_cmd(i, "--corpus", str(i.other_corpus)), ("corpus mismatch",),
         "pass the corpus directory the index was built from", subprocess=True),
    Case("index-manifest-fingerprint-edited", lambda i: query_cmd(i, index=i.manifest_edited(i.index, lambda m: m.update(corpus_fingerprint="0" * 32))),
         ("corpus mismatch",), "pass the corpus directory"),
    Case("index-manifest-invalid-json", lambda i: query_cmd(i, index=i.replaced(i.index, "manifest.json", '{"kind": "index",')),
         ("manifest.json is not valid JSON",), "re-run the stage"),
    Case("index-store-corrupt", lambda i: query_cmd(i, index=i.replaced(i.index, "sketches.npy", b"not a numpy array")),
         ("not a readable sketch store",), "rebuild the index"),
    Case("index-missing", lambda i: query_cmd(i, index=i.scratch / "no_index"), ("no manifest.json",), "re-run the index stage"),
    Case("empty-completion", lambda i: query_cmd(i, completion=""), ("empty completion",), "give the text whose probability to explain"),
    Case("over-long-prompt", lambda i: query_cmd(i, prompt="word " * 400), ("longer than the model's context of 128",), "shorten the prompt"),
    Case("queries-duplicate-ids", lambda i: queries_cmd(i, GOOD_QUERY * 2), ("queries.jsonl:2 repeats query id 'a'",), "must be unique",
         subprocess=True),
    Case("queries-bad-json-line", lambda i: queries_cmd(i, GOOD_QUERY + "{bad\n"), ("queries.jsonl:2 is not valid JSON",), "fix or remove that line"),
    Case("queries-non-utf8", lambda i: queries_cmd(i, GOOD_QUERY.encode() + b'{"prompt": "caf\xe9", "completion": " x"}\n'),
         ("queries.jsonl:2 is not UTF-8",), "re-encode"),
    Case("queries-missing-field", lambda i: queries_cmd(i, '{"prompt": "Hello"}\n'), ("queries.jsonl:1 needs the fields",), "'completion'"),
    Case("queries-file-missing", lambda i: ["query", "--index", str(i.index), "--out", str(i.out), "--queries", str(i.scratch / "nope.jsonl")],
         ("nope.jsonl does not exist",), "pass a JSONL file"),
    Case("query-out-under-a-file", lambda i: query_cmd(i, out=i.blocked()), ("cannot create output directory",), "choose a writable path"),
    Case("negative-stop-margin", lambda i: query_cmd(i, "--stop-margin", "-1"), ("stop_margin must be a non-negative number",), "pass 0 or more"),
    Case("unknown-generator", lambda i: query_cmd(i, "--generator", "magic"), ("unknown candidate generator 'magic'",), "choose index, bm25 or exact"),
    Case("candidates-below-top-k", lambda i: query_cmd(i, "--top-k", "10", "--candidates", "5"), ("candidates (5)",), "at least top_k"),
    # score stage
    Case("score-factors-from-another-model", lambda i: score_cmd(i, factors=i.other_factors), ("model mismatch",), "pass the model they were fitted on"),
    Case("score-out-not-parquet", lambda i: score_cmd(i, out=i.out / "scores.csv"), ("--out must name a .parquet file",), ".parquet"),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tokenizer, llama_dir, corpus_file, corpus_dir, ekfac_dir, index_dir) -> dict:
    from influence.arguments import CorpusArgs, FactorArgs
    from influence.corpus import prepare_corpus
    from influence.factors import fit_factors
    from jobs.demo.tiny import build_model

    root = tmp_path_factory.mktemp("bad_inputs_shared")
    other_model = build_model(root / "other_model", tokenizer, "llama", seed=1, hidden=8, layers=2, heads=2, intermediate=12)
    return dict(
        model=llama_dir, docs=corpus_file, corpus=corpus_dir, factors=ekfac_dir, index=index_dir,
        other_factors=fit_factors(other_model, corpus_dir, root / "other_factors", FactorArgs(progress=False, strategy="diagonal")),
        other_corpus=prepare_corpus(corpus_file, llama_dir, root / "other_corpus", CorpusArgs(max_length=8), progress=False),
    )


def run_cli(argv: list[str], in_subprocess: bool, capsys) -> tuple[int, str]:
    if in_subprocess:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, "-m", "jobs.cli", *argv], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        return proc.returncode, proc.stderr
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def leftovers(out: Path) -> list[str]:
    """Every file under `out`: after a refused run there must be none, not even a temporary one."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.exists() else []


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)] if c.xfail else [])
                                  for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, shared, tmp_path, capsys):
    (tmp_path / "scratch").mkdir()
    inputs = Inputs(**shared, scratch=tmp_path / "scratch", out=tmp_path / "out")
    code, stderr = run_cli(case.build(inputs), case.subprocess, capsys)

    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    message = errors[0]
    for text in case.problem:
        assert text in message, message
    assert case.fix in message, message
    assert code == 2, (code, message)
    assert not leftovers(inputs.out), leftovers(inputs.out)
