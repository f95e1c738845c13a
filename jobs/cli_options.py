"""The command line's vocabulary, shared by every subcommand: argument types, options generated from a stage's
dataclass, the parser that reports a bad option on one line, where work runs (Ray or this process), and how a stage's
inputs and results are named on the terminal."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from influence.arguments import CorpusArgs, check_positive_int
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


def shown(path) -> str:
    from jobs.report import terminal_text

    return terminal_text(path)
