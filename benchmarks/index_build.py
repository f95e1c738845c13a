"""Index build: throughput against a bare forward+backward loop, bytes per document, peak memory, sketch fidelity.

Setup: chatterbot-corpus conversations in every language, a seeded permutation; the first `num_docs` form corpus N,
the first `scale x num_docs` corpus 4N, held-out first exchanges are the queries. A tiny Llama is trained
on corpus 4N and EK-FAC factors are fitted on corpus N (cached under `--work-dir`).

1. Throughput (sequences/s) of `build_index` with the default `IndexArgs`, in this process (a LocalExecutor, torch's
   threads) and on a `RayExecutor(workers=2)` (one thread per worker), at both sizes:
   - end to end: a cold build, from nothing loaded (for Ray: cluster and actor start, model loading included);
   - steady: the same build again into a new directory on the same executor (model, factors and sketcher loaded
     in every worker: planning, dispatch, sketching and the merge remain);
   each relative to the bare loop (`common.bare_forward_backward`: `model(...).loss.backward()`, every parameter
   trainable, the same sequences in the same shards and batches) run warm on the same executor. For Ray, the corpus
   size from which the end-to-end rate reaches 0.7 of the bare loop follows from the fixed cost (cold - steady).
2. Bytes per document on disk: every file of the index directory (sketches.npy, docs.parquet, the JSON files) over
   the number of sequences, against sketch_dim x 2 + the doc table.
3. Peak RSS (VmHWM) of the driver during each build (reset before it) and of each Ray worker.
4. Sketch fidelity on corpus N by `sketch_dim`: per query, Spearman and Pearson of the sketch scores (the engine's
   query sketch against the stored 4-bit sketches) with the exact EK-FAC scores (`compute_scores`), and the recall
   of the exact top-10 (both signs) among the sketch top-10/100.

    python benchmarks/index_build.py            # about 8 min on a quiet 2-core machine (estimated)
    python benchmarks/index_build.py --quick    # corpus N only, tiny model: about a minute; writes to a temp path
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402  (sets the environment before torch is imported)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from indexes.build import build_index  # noqa: E402
from indexes.engine import QueryEngine  # noqa: E402
from influence import CorpusArgs, FactorArgs, IndexArgs, LocalExecutor, ScoreArgs, compute_scores, fit_factors  # noqa: E402
from influence import load_sequences, prepare_corpus  # noqa: E402
from influence.artifacts import read_manifest, write_parquet  # noqa: E402
from jobs.demo.chatterbot import chatterbot_documents  # noqa: E402
from jobs.runner import RayExecutor  # noqa: E402

WORKER_TITLE = "ray::StageWorker"  # how Ray names the runner's actor processes


@dataclasses.dataclass(frozen=True)
class Settings:
    num_docs: int = 1000
    scale: int = 4
    large_corpus: bool = True      # also measure the build throughput on corpus scale x N
    num_queries: int = 16
    model: common.TinyLlama = common.TinyLlama(vocab_size=1024, hidden=64, layers=2, heads=4, intermediate=128, context=128, train_steps=300)
    workers: int = 2
    sketch_dims: tuple = (1024, 2048, 4096, 8192, 16384)
    seed: int = 0


DEFAULT = Settings()
QUICK = Settings(num_docs=120, scale=2, large_corpus=False, num_queries=4, sketch_dims=(256, 1024, 2048),
                 model=common.TinyLlama(vocab_size=300, hidden=16, layers=2, heads=2, intermediate=32, context=48, train_steps=20))


def prepare(settings: Settings, work_dir: Path):
    """The trained model, corpora N and 4N, factors fitted on N, and queries from held-out documents."""
    documents = chatterbot_documents(None)
    order = np.random.default_rng(settings.seed).permutation(documents.num_rows)
    large = documents.take(np.sort(order[: settings.scale * settings.num_docs]))
    held_out = documents.take(order[settings.scale * settings.num_docs:])
    model_dir, corpus_large = common.prepare_trained_model(work_dir, large, settings.model, settings.model.context)
    cache = model_dir.parent
    write_parquet(cache / "documents_N.parquet", documents.take(np.sort(order[: settings.num_docs])))
    corpora = {"N": prepare_corpus(cache / "documents_N.parquet", model_dir, cache / "corpus_N",
                                   CorpusArgs(max_length=settings.model.context), progress=False), f"{settings.scale}N": corpus_large}
    factors_dir = cache / "factors_N"
    if not (factors_dir / "manifest.json").exists():
        fit_factors(model_dir, corpora["N"], factors_dir, FactorArgs(progress=False))
    queries = common.first_exchange_queries(held_out, settings.num_queries, model_dir, settings.model.context)
    return model_dir, corpora, factors_dir, queries


def index_bytes(index_dir: Path, sketch_dim: int) -> dict:
    """Bytes per document of everything in the index directory, and what the 4-bit sketch plus doc table predicts."""
    files = common.dir_bytes(index_dir)
    n = read_manifest(index_dir, "index")["num_sequences"]
    per_doc = {name: size / n for name, size in files.items()}
    return {"per_file": per_doc, "total": sum(per_doc.values()), "expected": (sketch_dim + 1) // 2 + per_doc.get("docs.parquet", 0.0),
            "sequences": n}


def build_rates(model_dir: Path, factors_dir: Path, corpus_dir: Path, scratch: Path, executor, sequences) -> dict:
    """Cold and warm builds and the warm bare loop on one executor, with the driver's peak RSS of each build."""
    out = {}
    for run in ("end_to_end", "steady"):
        common.reset_peak_rss()
        with common.Timer() as timer:
            build_index(model_dir, factors_dir, corpus_dir, scratch / run, IndexArgs(progress=False), executor)
        out[run] = {"seconds": timer.seconds, "sequences_per_s": sequences.num_rows / timer.seconds,
                    "driver_cpu_seconds": timer.cpu_seconds, "driver_peak_rss_mb": common.peak_rss_mb()}
    out["bare"] = common.bare_forward_backward(model_dir, sequences, IndexArgs().batch_tokens, executor, IndexArgs().shard_size)
    out["bytes_per_document"] = index_bytes(scratch / "steady", IndexArgs().sketch_dim)
    return out


def throughput(settings: Settings, model_dir: Path, factors_dir: Path, corpus_dir: Path, scratch: Path) -> dict:
    """In this process and on Ray: rates, ratios to the bare loop, memory."""
    sequences, corpus = load_sequences(corpus_dir)
    result = {"corpus": {"documents": corpus["num_documents"], "sequences": sequences.num_rows, "tokens": corpus["num_tokens"]}}
    result["in_process"] = build_rates(model_dir, factors_dir, corpus_dir, scratch / "local", LocalExecutor(), sequences)
    result["in_process"]["threads"] = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        with common.Timer() as enter:  # the cluster starts here or at the first pass: a cold build includes it either way
            executor = stack.enter_context(RayExecutor(workers=settings.workers))
        ray = build_rates(model_dir, factors_dir, corpus_dir, scratch / "ray", executor, sequences)
        ray["workers_peak_rss_mb"] = [p["peak_rss_mb"] for p in common.process_peaks(WORKER_TITLE)]  # before they exit
    ray["end_to_end"]["seconds"] += enter.seconds
    ray["end_to_end"]["sequences_per_s"] = sequences.num_rows / ray["end_to_end"]["seconds"]
    ray["workers"] = settings.workers
    result["ray"] = ray
    for entry in (result["in_process"], result["ray"]):
        bare = entry["bare"]["sequences_per_s"]
        entry["ratio_to_bare"] = {run: entry[run]["sequences_per_s"] / bare for run in ("end_to_end", "steady")}
    fixed = ray["end_to_end"]["seconds"] - ray["steady"]["seconds"]  # cluster, actors, model loading
    marginal = ray["steady"]["seconds"] / sequences.num_rows
    target = 0.7 * ray["bare"]["sequences_per_s"]
    ray["fixed_seconds"] = fixed
    ray["sequences_for_end_to_end_ratio_0.7"] = target * fixed / (1 - target * marginal) if target * marginal < 1 else None
    return result


def fidelity(settings: Settings, model_dir: Path, factors_dir: Path, corpus_dir: Path, queries, scratch: Path) -> dict:
    """Sketch scores against exact EK-FAC scores, per sketch_dim."""
    with common.Timer() as exact_timer:
        exact = compute_scores(model_dir, factors_dir, corpus_dir, queries, ScoreArgs(per_module=False, progress=False)).scores
    out: dict = {"exact_scan_seconds": exact_timer.seconds}
    executor = LocalExecutor()
    for dim in settings.sketch_dims:
        index_dir = scratch / f"dim{dim}"
        build_index(model_dir, factors_dir, corpus_dir, index_dir, IndexArgs(sketch_dim=dim, progress=False), executor)
        sketch, _ = common.sketch_scores(QueryEngine(index_dir), queries)
        entry = {"spearman": common.mean_sem(common.spearman(s, e) for s, e in zip(sketch, exact)),
                 "pearson": common.mean_sem(common.pearson(s, e) for s, e in zip(sketch, exact)),
                 "bytes_per_document": index_bytes(index_dir, dim)}
        for sign in "+-":
            for depth in (10, 100):
                entry[f"recall10_at_{depth}{sign}"] = float(np.mean([common.recall_at_k(common.top_ids(s, depth, sign), common.top_ids(e, 10, sign))
                                                                     for s, e in zip(sketch, exact)]))
        out[str(dim)] = entry
        shutil.rmtree(index_dir, ignore_errors=True)
    return out


def markdown(result: dict) -> str:
    lines = ["| corpus | run | end to end seq/s | steady seq/s | bare seq/s | ratio to bare (end to end / steady) | driver peak RSS MB | worker peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for label, entry in result["throughput"].items():
        for run in ("in_process", "ray"):
            r = entry[run]
            workers = ", ".join(f"{m:.0f}" for m in r.get("workers_peak_rss_mb", [])) or "-"
            lines.append(f"| {entry['corpus']['sequences']} seqs ({label}) | {run} | {r['end_to_end']['sequences_per_s']:.1f} | "
                         f"{r['steady']['sequences_per_s']:.1f} | {r['bare']['sequences_per_s']:.1f} | {r['ratio_to_bare']['end_to_end']:.2f} / "
                         f"{r['ratio_to_bare']['steady']:.2f} | {max(r['end_to_end']['driver_peak_rss_mb'], r['steady']['driver_peak_rss_mb']):.0f} | {workers} |")
    lines += ["", "| sketch_dim | bytes/doc | Spearman | Pearson | recall of exact top-10 in sketch top-100 (+ / -) |", "|---|---|---|---|---|"]
    for dim, f in result["fidelity"].items():
        if dim.isdigit():
            lines.append(f"| {dim} | {f['bytes_per_document']['total']:.0f} | {f['spearman']['mean']:.3f} | {f['pearson']['mean']:.3f} | "
                         f"{f['recall10_at_100+']:.2f} / {f['recall10_at_100-']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="corpus N only, a tiny model: about a minute")
    parser.add_argument("--work-dir", type=Path, default=common.WORK / "index_build", help="cache of the model, corpora and factors")
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/index_build.json; --quick: a temp file)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in this process (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else DEFAULT
    facts = common.machine_facts()
    with common.Timer() as total:
        model_dir, corpora, factors_dir, queries = prepare(settings, args.work_dir)
        scratch = Path(tempfile.mkdtemp(prefix="index_build-", dir=args.work_dir))
        try:
            sizes = ["N", f"{settings.scale}N"] if settings.large_corpus else ["N"]
            measured = {label: throughput(settings, model_dir, factors_dir, corpora[label], scratch / label) for label in sizes}
            quality = fidelity(settings, model_dir, factors_dir, corpora["N"], queries, scratch / "fidelity")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    result = {"benchmark": "index_build", "mode": "quick" if args.quick else "default", "settings": dataclasses.asdict(settings),
              "index_args": IndexArgs().to_dict(), "queries": [q.query_id for q in queries], "throughput": measured,
              "fidelity": quality, "total_seconds": total.seconds, "machine": common.finish_machine(facts)}
    out = common.write_results(args.out or common.default_out("index_build", args.quick), result, common.command_line("index_build.py", argv))
    print(f"{markdown(result)}\n\nwrote {out} in {total.seconds:.0f}s")
    return result


if __name__ == "__main__":
    main()
