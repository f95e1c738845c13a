"""The `influence` command line. Each subcommand runs one stage; its options come from the stage's dataclass.

Errors in the input (InfluenceError) print one line, `error: <problem>; <fix>`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import typing
from pathlib import Path
from typing import Callable, Optional, Sequence

from influence.arguments import CorpusArgs, FactorArgs, IndexArgs, QueryArgs, ScoreArgs
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


def prepared_corpus(corpus: Path, model: Path, out_dir: Path, namespace: argparse.Namespace) -> Path:
    """A corpus directory as is, or documents tokenised into `out_dir/corpus` first."""
    from influence.constants import MANIFEST_NAME
    from influence.corpus import prepare_corpus

    if corpus.is_dir() and (corpus / MANIFEST_NAME).exists():
        return corpus
    return prepare_corpus(corpus, model, out_dir / "corpus", dataclass_from(namespace, CorpusArgs), progress=namespace.progress)


def corpus_options(parser):
    parser.add_argument("--documents", type=Path, required=True, help="Parquet/JSONL file or datasets folder with a 'text' column")
    parser.add_argument("--model", type=Path, required=True, help="model directory (its tokenizer is used)")
    parser.add_argument("--out", type=Path, required=True, help="output corpus directory")
    add_dataclass_options(parser, CorpusArgs)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def corpus_run(ns):
    from influence.corpus import prepare_corpus

    out = prepare_corpus(ns.documents, ns.model, ns.out, dataclass_from(ns, CorpusArgs), progress=ns.progress)
    print(f"corpus written to {out}")
    return 0


def fit_options(parser):
    parser.add_argument("--model", type=Path, required=True, help="model directory written by save_pretrained")
    parser.add_argument("--corpus", type=Path, required=True, help="corpus directory, or documents to tokenise into OUT/corpus")
    parser.add_argument("--out", type=Path, required=True, help="output factors directory")
    parser.add_argument("--num-shards", type=int, default=None, help="split each pass into this many resumable shards (default: workers)")
    add_ray_options(parser)
    add_dataclass_options(parser, FactorArgs)
    add_dataclass_options(parser, CorpusArgs, skip=("add_special_tokens",))


def fit_run(ns):
    args = dataclass_from(ns, FactorArgs)  # validate every option before anything is written
    if ns.num_shards is not None and ns.num_shards < 1:
        raise InfluenceError(f"--num-shards must be at least 1, got {ns.num_shards}")
    corpus = prepared_corpus(ns.corpus, ns.model, ns.out, ns)
    start = time.perf_counter()
    if ns.in_process:
        from influence.factors import fit_factors

        out = fit_factors(ns.model, corpus, ns.out, args, num_shards=ns.num_shards or 1)
    else:
        from jobs.fit import run_fit_job

        out = run_fit_job(ns.model, corpus, ns.out, args, num_shards=ns.num_shards, workers=ns.workers, address=ns.address)
    from influence.artifacts import read_manifest

    corpus_manifest = read_manifest(corpus, "corpus")
    print(summary("factors", out, corpus_manifest["num_sequences"], corpus_manifest["num_tokens"], time.perf_counter() - start))
    return 0


def summary(what: str, out: Path, sequences: int, tokens: int, seconds: float) -> str:
    """The line a long stage ends with: what, where, how much, how fast, how big."""
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    seconds = max(seconds, 1e-9)
    return (f"{what} written to {out}: {sequences} sequences, {tokens} tokens in {seconds:.1f}s "
            f"({sequences / seconds:.1f} seq/s, {tokens / seconds:.0f} tok/s), {size / 2**20:.1f} MiB on disk")


def add_ray_options(parser) -> None:
    parser.add_argument("--workers", type=int, default=2, help="Ray workers, each holding the model (default: 2)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    parser.add_argument("--in-process", action="store_true", help="run in this process without Ray (debugging, tiny corpora)")


def index_options(parser):
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--factors", type=Path, required=True, help="factors directory from `influence fit`")
    parser.add_argument("--corpus", type=Path, required=True, help="corpus directory")
    parser.add_argument("--out", type=Path, required=True, help="output index directory")
    add_ray_options(parser)
    add_dataclass_options(parser, IndexArgs, skip=("workers",))


def index_run(ns):
    from influence.artifacts import read_manifest

    args = dataclass_from(ns, IndexArgs)
    args = IndexArgs.from_dict({**args.to_dict(), "workers": ns.workers})
    start = time.perf_counter()
    if ns.in_process:
        from indexes.build import build_index

        out = build_index(ns.model, ns.factors, ns.corpus, ns.out, args)
    else:
        from jobs.index import run_index_job

        out = run_index_job(ns.model, ns.factors, ns.corpus, ns.out, args, address=ns.address)
    manifest = read_manifest(out, "index")
    print(summary("index", out, manifest["num_sequences"], manifest["num_tokens"], time.perf_counter() - start))
    return 0


def add_query_options(parser) -> None:
    parser.add_argument("--prompt", help="the query's prompt")
    parser.add_argument("--completion", help="the completion whose log-probability is explained")
    parser.add_argument("--queries", type=Path, help="JSONL file of {query_id, prompt, completion, lang}")


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
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--factors", type=Path, required=True, help="factors directory from `influence fit`")
    parser.add_argument("--corpus", type=Path, required=True, help="corpus directory from `influence corpus` (or `fit`)")
    parser.add_argument("--out", type=Path, required=True, help="output Parquet file")
    parser.add_argument("--top", type=int, default=5, help="documents to print per query and sign")
    add_query_options(parser)
    add_dataclass_options(parser, ScoreArgs)


def score_run(ns):
    import numpy as np

    from influence.corpus import load_sequences
    from influence.scores import compute_scores

    if ns.out.suffix != ".parquet":
        raise InfluenceError(f"--out must name a .parquet file, got {ns.out}")
    queries = queries_from(ns)
    result = compute_scores(ns.model, ns.factors, ns.corpus, queries, dataclass_from(ns, ScoreArgs), out_path=ns.out)
    sequences, _ = load_sequences(ns.corpus)
    for qi, query_id in enumerate(result.query_ids):
        order = np.argsort(-result.scores[qi])
        print(f"\n== {query_id}: most positive / most negative influence ==")
        for label, rows in (("+", order[: ns.top]), ("-", order[::-1][: ns.top])):
            for row in rows:
                seq = int(result.seq_ids[row])
                text = sequences["text"][seq].as_py().replace("\n", " ")
                print(f" {label} {result.scores[qi, row]:+.4e}  {sequences['doc_id'][seq].as_py():<24} {text[:70]}")
    print(f"\nscores written to {ns.out}")
    return 0


def query_options(parser):
    parser.add_argument("--index", type=Path, required=True, help="index directory from `influence index`")
    parser.add_argument("--model", type=Path, default=None, help="override the model directory recorded in the index")
    parser.add_argument("--factors", type=Path, default=None, help="override the factors directory recorded in the index")
    parser.add_argument("--corpus", type=Path, default=None, help="override the corpus directory recorded in the index")
    parser.add_argument("--out", type=Path, default=Path("query_results"), help="where results.json/.parquet and report.html go")
    add_query_options(parser)
    parser.add_argument("--lang", default="und", help="language tag of a --prompt/--completion query")
    add_dataclass_options(parser, QueryArgs)


def query_run(ns):
    from indexes.engine import QueryEngine
    from jobs.report import render_terminal, save_results

    queries = queries_from(ns)
    engine = QueryEngine(ns.index, dataclass_from(ns, QueryArgs), ns.model, ns.factors, ns.corpus)
    results = engine.query(queries)
    print(render_terminal(results))
    out = save_results(results, ns.out)
    print(f"\nresults written to {out}/ (results.json, results.parquet, report.html)")
    return 0


def demo_options(parser):
    parser.add_argument("--work-dir", type=Path, default=Path("demo_runs"), help="where models, factors, indexes and reports go (cached)")
    parser.add_argument("--preset", default="full", help="'full' (the README demo) or 'tiny' (seconds, for tests and notebooks)")
    add_ray_options(parser)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def demo_run(ns):
    from jobs.demo import run_demo

    out = run_demo(ns.work_dir, ns.preset, ns.workers, ns.in_process, ns.progress, ns.address)
    print(f"\nShutdown query on the largest model ('{out['largest']}', {out['num_sequences']} training sequences):")
    print(out["terminal"])
    import pyarrow.parquet as pq

    overlap = pq.read_table(out["compare"] / "overlap.parquet").to_pylist()
    print("\nAcross model sizes and languages (reference: the English query's top-10):")
    print(f"  {'model':<8} {'params':>9} {'lang':<5} {'jaccard':>8} {'rbo':>6} {'cross-lingual':>13}")
    for row in overlap:
        print(f"  {row['run']:<8} {row['parameters']:>9} {row['lang']:<5} {row['jaccard']:>8.2f} {row['rbo']:>6.2f} {row['crosslingual_ratio']:>13.3f}")
    print(f"\nHTML report: {out['report']}\ncompare tables and plots: {out['compare']}/\ndone in {out['seconds']:.0f}s")
    return 0


def parse_runs(items: Sequence[str]) -> dict[str, Path]:
    runs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InfluenceError(f"--run takes NAME=INDEX_DIR, got {item!r}")
        runs[name] = Path(path)
    return runs


def compare_options(parser):
    parser.add_argument("--run", action="append", default=[], help="NAME=INDEX_DIR, once per run (e.g. per model size)")
    parser.add_argument("--queries", type=Path, required=True, help="JSONL queries; translations share a 'group' and differ in 'lang'")
    parser.add_argument("--out", type=Path, required=True, help="output directory for tables and plots")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=200)
    add_ray_options(parser)


def compare_run(ns):
    from influence.queries import load_queries
    from jobs.compare import run_compare_job

    args = QueryArgs(top_k=ns.top_k, candidates=ns.candidates, per_token=False)
    out = run_compare_job(parse_runs(ns.run), load_queries(ns.queries), ns.out, args, address=ns.address, in_process=ns.in_process)
    print(f"compare tables and plots written to {out}/")
    return 0


def audit_options(parser):
    parser.add_argument("--index", type=Path, required=True, help="index directory")
    parser.add_argument("--queries", type=Path, default=None, help="JSONL queries whose influence is broken down by source and language")
    parser.add_argument("--out", type=Path, required=True, help="output directory for tables and report.html")
    parser.add_argument("--top", type=int, default=20, help="outliers and dominant documents listed")
    parser.add_argument("--top-k", type=int, default=10, help="a document 'dominates' a query when in its top-k")
    add_ray_options(parser)


def audit_run(ns):
    from influence.queries import load_queries
    from jobs.audit import run_audit_job

    queries = load_queries(ns.queries) if ns.queries else []
    out = run_audit_job(ns.index, queries, ns.out, ns.top, ns.top_k, 0 if ns.in_process else ns.workers, ns.address)
    print(f"audit written to {out}/ (report.html, *.csv, *.parquet)")
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "corpus": ("tokenise documents (Parquet, JSONL or a datasets folder) into sequences", corpus_options, corpus_run),
    "fit": ("fit EK-FAC (or kfac/diagonal/identity) factors over a corpus", fit_options, fit_run),
    "index": ("sketch every training sequence's whitened gradient into a FAISS index (a Ray job)", index_options, index_run),
    "query": ("the most influential training documents for a completion: index search + exact re-rank", query_options, query_run),
    "demo": ("build everything on the bundled multilingual corpus and ask the shutdown query in 3 languages", demo_options, demo_run),
    "compare": ("compare top documents across runs (model sizes) and query translations (a Ray job)", compare_options, compare_run),
    "audit": ("self-influence outliers and influence by source/language over a whole index (a Ray job)", audit_options, audit_run),
    "score": ("exact influence of every training sequence on one or more queries", score_options, score_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="influence", description="Which training documents made the model say this?")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_options, _run) in COMMANDS.items():
        add_options(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        return COMMANDS[ns.command][2](ns)
    except InfluenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a Ray task's error arrives wrapped; ours are unwrapped to the one-line form
        cause = getattr(exc, "cause", None)
        if isinstance(cause, InfluenceError):
            print(f"error: {cause}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
