"""How many bytes per document the sketch needs on a real model: recall@10 of the exact top-10 by candidate depth, for
sketches of 2^10 numbers per document up to `--max-dim`, and what a query re-ranking that deep would cost.

It reads a `real_models.py` run's directory (`<work-dir>/runs/<model>`): its corpus, factors, queries, the exact scan
of those queries (`exact.npz`); the run needs to have finished its exact scan, not its query stage. Its passes are
those of a bare loop timed in the same call (`BARE_SAMPLE` of the run's sequences, one thread, like the queries):
this machine's speed drifts by tens of percent between hours, so a run's own bare loop, hours earlier, is no
yardstick. It builds one more index, at `--max-dim` with its float32 shards kept (`IndexArgs(keep_shards=True)`);
a smaller sketch is that one folded (`indexes.search.fold`: for power-of-two dimensions, exactly the numbers an index
of that dimension holds, tests/indexes/test_tiers.py), then rounded to 4 bits as the store keeps it
(`encode_sketches`; the JSON also has the unrounded depths).

Per dimension and sign: recall@10 at depths 10, 20, 50, ... candidates per sign; the depth at which the mean recall
over the queries first reaches 0.95; and the query that depth implies, in bare forward+backward passes: (the query's
fixed part + 2 x depth x seconds per re-ranked candidate) / the bare loop's seconds per sequence. Both costs are
measured on the run's own index as `real_models.py` answers queries (one thread): each query answered with 10 and with
30 candidates per sign, all re-ranked; the slope is the candidate's cost, the rest (the query's gradient, its search)
the fixed part. A perfect sketch would still re-rank the top 10 of each sign: that query's passes are the floor no
sketch size can go below. The same depths for BM25 over the sequences' text (`--generator bm25`, the paper's TF-IDF
baseline) show what a first stage that stores no gradient at all reaches. Last, the default query answered end to end
on the run's own index as `real_models.py` answers it, with the index's candidates and with the hybrid generator's (the
index's and BM25's top 50, `--generator hybrid`): recall@10 against the exact scan, candidates re-ranked, seconds and
bare passes. Issue 13's goals ask for at most 20 passes at recall 0.95 and at most 8 KiB per document.

    python benchmarks/real_models.py --models models --only smollm2-135m-instruct --docs 1000 --queries 3 \\
        --work-dir W ...                                                   # first: the run this reads
    python benchmarks/sketch_budget.py --run W/runs/smollm2-135m-instruct --max-dim 1048576
    python benchmarks/sketch_budget.py ... --reuse-index   # again, reading the large index the first call built
    python benchmarks/sketch_budget.py --quick         # a tiny Llama's quick run, then this on it: a minute; temp path
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402  (sets the environment before torch is imported)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import real_models  # noqa: E402
from indexes.build import build_index  # noqa: E402
from indexes.engine import QueryEngine  # noqa: E402
from indexes.codes import SketchStore, encode_sketches  # noqa: E402
from indexes.search import fold  # noqa: E402
from indexes.shards import load_shard_rows, load_shard_sketches  # noqa: E402
from influence import IndexArgs, QueryArgs  # noqa: E402
from influence.artifacts import read_json  # noqa: E402
from influence.stage import LocalExecutor  # noqa: E402
from jobs.runner import RayExecutor  # noqa: E402

DEPTHS = (10, 20, 50, 100, 200, 400, 1000)
TARGET_RECALL = 0.95
MIN_DIM = 1024
GENERATORS = ("index", "hybrid")  # the default query answered with each, on the run's own index
RERANK_PROBES = (10, 30)  # candidates per sign each query re-ranks when the cost of a re-rank is measured
BARE_SAMPLE = 128  # sequences of the run's corpus in the same-call bare loop: a minute or two at one thread


def full_sketches(run: Path, model_dir: Path, work: Path, max_dim: int, workers: int, batch_tokens: int, reuse: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, dict]:
    """An index of the run's corpus at `max_dim` with its float shards kept: (seq_ids (n,), float32 sketches (n, max_dim),
    the build's figures). With `reuse`, one this script built before at that dimension is read instead (not timed)."""
    index = work / f"index_{max_dim}"
    args = IndexArgs(sketch_dim=max_dim, keep_shards=True, factory="none", batch_tokens=batch_tokens, progress=False)
    if reuse and _same_sketches_of(index, run / "index", max_dim):
        seconds = None
    else:
        shutil.rmtree(index, ignore_errors=True)  # built whole each time: its seconds are a figure
        with RayExecutor(workers) if workers else nullcontext(LocalExecutor()) as executor, common.Timer() as timer:
            build_index(model_dir, run / "factors", run / "corpus", index, args, executor)
        seconds = timer.seconds
    shards = read_json(index / "manifest.json")["num_shards"]
    seq_ids = np.concatenate([load_shard_rows(index, k, shards)["seq_id"].to_numpy() for k in range(shards)])
    sketches = np.concatenate([np.asarray(load_shard_sketches(index, k, shards), dtype=np.float32) for k in range(shards)])
    return seq_ids, sketches, {"dim": max_dim, "seconds": seconds, "reused": seconds is None, "path": str(index)}


def _same_sketches_of(index: Path, run_index: Path, dim: int) -> bool:
    """Whether `index` is a finished index of `dim` numbers built from the factors and corpus of the run's own index."""
    if not (index / "manifest.json").is_file():
        return False
    built, run_built = read_json(index / "manifest.json"), read_json(run_index / "manifest.json")
    return built["sketch_dim"] == dim and all(built[key] == run_built[key] for key in ("factors_fingerprint", "corpus_fingerprint"))


def queries_and_rerank_cost(engine: QueryEngine, queries: list, index: Path, max_dim: int, seq_ids: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray, dict]:
    """The run's queries (the rows of its exact scan, in order) sketched by the large index's hash functions; their BM25
    scores over `seq_ids` (higher is better: the text retriever's ranking, as a first stage to compare with); and what
    a query's re-rank costs, on the run's own index (its default sketch, as `real_models.py` answers queries: one torch
    thread, per-token breakdowns, after a warm-up query): each query answered with each of `RERANK_PROBES` candidates
    per sign, all re-ranked; the slope between them is the seconds per re-ranked candidate, the rest (the query's
    gradient, the search) the fixed part."""
    seeds = {read_json(path / "manifest.json")["args"]["seed"] for path in (index, engine.index_dir)}
    if len(seeds) != 1:
        raise SystemExit(f"error: {index} and {engine.index_dir} hash with different seeds ({sorted(seeds)}); rebuild without --reuse-index")
    sketches, _ = engine.sketch_queries(queries, dim=max_dim)  # as the large index's hash functions place them
    text_scores = np.zeros((len(queries), len(seq_ids)))
    row_of = {int(seq_id): row for row, seq_id in enumerate(seq_ids)}
    for qi, ranked in enumerate(engine.bm25_candidates(queries, len(seq_ids))):
        text_scores[qi, [row_of[int(seq_id)] for seq_id in ranked]] = np.arange(len(ranked), 0, -1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine.query(queries[:1], dataclasses.replace(engine.args, candidates=RERANK_PROBES[0]))  # warm-up: caches, allocator
        probes = []
        for query in queries:
            for per_sign in RERANK_PROBES:
                with common.Timer() as timer:
                    [answer] = engine.query([query], dataclasses.replace(engine.args, candidates=per_sign))
                probes.append({"query": query.query_id, "candidates_per_sign": per_sign, "seconds": timer.seconds,
                               "candidates": answer.num_candidates})
    finally:
        torch.set_num_threads(threads)
    slopes, fixed = [], []
    for low, high in zip(probes[::2], probes[1::2]):
        slope = (high["seconds"] - low["seconds"]) / (high["candidates"] - low["candidates"])
        slopes.append(slope)
        fixed.append(low["seconds"] - slope * low["candidates"])
    return sketches, text_scores, {"probes": probes, "index": str(engine.index_dir), "seconds_per_candidate": float(np.median(slopes)),
                                   "fixed_seconds": float(np.median(fixed))}


def bare_loop(model_dir: Path, sequences, batch_tokens: int) -> dict:
    """`common.bare_forward_backward` over a fixed random sample of the run's sequences, in this process at one thread
    (as the queries are timed), warm: the yardstick of this call's passes."""
    rows = np.sort(np.random.default_rng(0).choice(sequences.num_rows, min(BARE_SAMPLE, sequences.num_rows), replace=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return common.bare_forward_backward(model_dir, sequences.take(rows), batch_tokens, repeats=2)
    finally:
        torch.set_num_threads(threads)


def depth_figures(sketch_scores: np.ndarray, exact: np.ndarray, top_k: int) -> dict:
    """Recall of each sign's exact top k among the top sketch scores, by depth; the depth at which the mean recall over
    queries first reaches TARGET_RECALL."""
    n = exact.shape[1]
    figures: dict = {"recall_at": {}, "depth_for_target": {}}
    for sign, direction in (("+", 1.0), ("-", -1.0)):
        ranks = []  # per query: where the sketch puts each exact top-k document (0 = first)
        for q in range(exact.shape[0]):
            position = np.empty(n, np.int64)
            position[np.argsort(-direction * sketch_scores[q], kind="stable")] = np.arange(n)
            ranks.append(np.sort(position[common.top_ids(exact[q], top_k, sign)]))
        ranks = np.stack(ranks)  # (queries, k)
        figures["recall_at"][sign] = {str(d): float((ranks < d).mean()) for d in DEPTHS if d <= n}
        # the mean recall at depth d is the share of all (query, top-k document) ranks below d
        figures["depth_for_target"][sign] = int(np.sort(ranks.ravel())[int(np.ceil(round(TARGET_RECALL * ranks.size, 6))) - 1] + 1)
    return figures


def budget(run: Path, work: Path, max_dim: int, workers: int, batch_tokens: int, reuse_index: bool = False) -> dict:
    log = read_json(run / "stages.json")
    stages, identity = log["stages"], log["identity"]
    model_dir = Path(identity["model_dir"])
    if "exact" not in stages:
        raise SystemExit(f"error: {run} has no finished exact scan; run its real_models.py command again with --resume "
                         f"(it keeps the stages it finished)")
    scan = real_models.ExactScan.load(run / "exact.npz")
    seq_ids, docs, build = full_sketches(run, model_dir, work, max_dim, workers, batch_tokens, reuse_index)
    # the scan's columns put in the index's row order (not the rows in the scan's: a second copy of a 5 GB array)
    exact = scan.columns_in_order_of(seq_ids, f"the index built here from {run}")
    # one engine on the run's own index for every query of this script: one model load; each call passes its own args
    engine = QueryEngine(run / "index", QueryArgs(adaptive=False, batch_tokens=batch_tokens))
    queries = real_models.first_exchange_queries(real_models.load_documents_table(run / "documents.parquet"),
                                                 identity["settings"]["queries"], engine.tokenizer, engine.context)
    query_sketches, text_scores, rerank = queries_and_rerank_cost(engine, queries, Path(build["path"]), max_dim, seq_ids)
    settings = real_models.Settings(**identity["settings"])
    bare = bare_loop(model_dir, engine.sequences, settings.batch_tokens)
    bare_per_sequence = real_models.bare_seconds_per_sequence(bare)  # one process, one thread
    run_bare = stages["bare"]

    def passes(depth: int) -> float:  # a query re-ranking `depth` candidates per sign, in bare passes
        return (rerank["fixed_seconds"] + 2 * depth * rerank["seconds_per_candidate"]) / bare_per_sequence

    rows = []
    dim, folded, query_folded = max_dim, docs, query_sketches
    del docs  # from the largest sketch down, each fold halving the previous: one large array at a time
    while True:
        codes, steps = encoded(folded)
        rounded = depth_figures(stored_scores(SketchStore(codes, steps, dim), query_folded), exact, real_models.Settings.top_k)
        unrounded = depth_figures(query_folded @ folded.T, exact, real_models.Settings.top_k)
        depth = max(rounded["depth_for_target"].values())
        rows.insert(0, {"dim": dim, "sketch_bytes_per_sequence": codes.shape[1] + steps.itemsize,
                        "sketch_bytes_per_document": (codes.shape[1] + steps.itemsize) * len(seq_ids) / stages["corpus"]["documents"],
                        **rounded, "depth_for_target_unrounded": unrounded["depth_for_target"],
                        "passes_at_target": passes(depth)})
        if dim // 2 < min(MIN_DIM, max_dim):
            break
        dim //= 2
        folded, query_folded = fold(folded, dim), fold(query_folded, dim)
    text = depth_figures(text_scores, exact, real_models.Settings.top_k)
    text["passes_at_target"] = passes(max(text["depth_for_target"].values()))
    # the default query as real_models.py measures it, with the index's candidates and with the hybrid generator's
    answered = {generator: real_models.query_figures(engine, queries, scan, settings, bare, generator)
                for generator in GENERATORS}
    return {"run": str(run), "model": identity["model"],
            "documents": stages["corpus"]["documents"], "sequences": len(seq_ids), "queries": int(scan.scores.shape[0]),
            "target_recall": TARGET_RECALL,
            "index": {**build, "ratio_to_run_index": build["seconds"] and build["seconds"] / stages["index"]["seconds"]},
            "rerank": rerank, "rerank_seconds_per_candidate": rerank["seconds_per_candidate"], "bare_seconds_per_sequence": bare_per_sequence,
            "bare": bare, "run_bare_seconds_per_sequence": real_models.bare_seconds_per_sequence(run_bare),
            # what no sketch can beat: the top-k of each sign re-ranked and nothing else
            "passes_with_a_perfect_sketch": passes(real_models.Settings.top_k), "dims": rows,
            # the text retriever as the first stage (`--generator bm25`): what a sketch of any size should beat
            "bm25": text,
            # answered end to end on the run's own index: seconds, candidates re-ranked, recall@10 against the exact scan
            "default_query": answered}


def encoded(sketches: np.ndarray, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """`encode_sketches` a block of rows at a time: its float temporaries of a whole 2^20-number sketch would take
    several times the sketch's 5 GB."""
    parts = [encode_sketches(sketches[start:start + block]) for start in range(0, len(sketches), block)]
    return np.concatenate([codes for codes, _ in parts]), np.concatenate([steps for _, steps in parts])


def stored_scores(store: SketchStore, queries: np.ndarray, block: int = 256) -> np.ndarray:
    """(q, n) inner products of the queries with every row as the store decodes it, a block of rows at a time."""
    return np.concatenate([queries @ store.decode(slice(start, start + block)).T for start in range(0, store.ntotal, block)], axis=1)


def markdown(result: dict) -> str:
    lines = [f"{result['model']}, {result['documents']} documents ({result['sequences']} sequences), {result['queries']} queries",
             "", "| numbers per document | sketch bytes per document | recall@10 at 10 per sign +/- | at 200 +/- | "
             f"depth for recall {result['target_recall']} +/- | unrounded +/- | est. query passes |",
             "|---|---|---|---|---|---|---|"]
    for row in result["dims"]:
        at = row["recall_at"]
        lines.append(f"| {row['dim']} | {row['sketch_bytes_per_document']:.0f} | {at['+']['10']:.2f} / {at['-']['10']:.2f} | "
                     f"{at['+'].get('200', float('nan')):.2f} / {at['-'].get('200', float('nan')):.2f} | "
                     f"{row['depth_for_target']['+']} / {row['depth_for_target']['-']} | "
                     f"{row['depth_for_target_unrounded']['+']} / {row['depth_for_target_unrounded']['-']} | "
                     f"{row['passes_at_target']:.0f} |")
    text = result["bm25"]
    lines.append(f"| BM25 over the text | (the text) | {text['recall_at']['+']['10']:.2f} / {text['recall_at']['-']['10']:.2f} | "
                 f"{text['recall_at']['+'].get('200', float('nan')):.2f} / {text['recall_at']['-'].get('200', float('nan')):.2f} | "
                 f"{text['depth_for_target']['+']} / {text['depth_for_target']['-']} | | {text['passes_at_target']:.0f} |")
    lines += ["", "| the default query's generator | recall@10 + / − | candidates re-ranked (p50) | p50 seconds | bare passes |",
              "|---|---|---|---|---|"]
    for generator, answered in result["default_query"].items():
        lines.append(f"| {generator} | {answered['recall_at_10']['+']:.2f} / {answered['recall_at_10']['-']:.2f} | "
                     f"{answered['candidates_reranked']['p50']:.0f} | {answered['seconds']['p50']:.1f} | "
                     f"{answered['p50_in_forward_backward_passes']:.0f} |")
    rerank = result["rerank"]
    lines += ["", f"A re-ranked candidate: {rerank['seconds_per_candidate']:.3f} s; a query's fixed part (gradient, search) "
              f"{rerank['fixed_seconds']:.2f} s; a bare pass {result['bare_seconds_per_sequence']:.3f} s per sequence; "
              f"with a perfect sketch (the top {real_models.Settings.top_k} of each sign re-ranked, nothing else) a query "
              f"takes {result['passes_with_a_perfect_sketch']:.1f} passes."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a real_models.py run directory (<work-dir>/runs/<model>) with its exact scan")
    parser.add_argument("--max-dim", type=int, default=2**18, help="the largest sketch (a power of two); the smaller ones fold it")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers of the large index's build; 0: this process")
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--reuse-index", action="store_true",
                        help="read the --max-dim index an earlier run of this script left in --work-dir (its build is then not timed)")
    parser.add_argument("--quick", action="store_true", help="a tiny Llama's quick real_models.py run, then this on it")
    parser.add_argument("--work-dir", type=Path, default=common.WORK / "sketch_budget")
    parser.add_argument("--out", type=Path, default=None)
    ns = parser.parse_args(argv)
    if ns.max_dim < 2 or ns.max_dim & (ns.max_dim - 1):
        parser.error(f"--max-dim must be a power of two (folding is exact only between powers of two), not {ns.max_dim}")
    facts = common.machine_facts()
    run, max_dim, workers = ns.run, ns.max_dim, ns.workers
    if ns.quick:
        run, max_dim, workers = real_models.quick_run(ns.work_dir), 4096, 0
    elif run is None or not (run / "stages.json").is_file():
        parser.error(f"--run must be a real_models.py run directory (with stages.json); got {run}")
    result = budget(run.resolve(), ns.work_dir / "budget", max_dim, workers, ns.batch_tokens, ns.reuse_index)
    common.publish("sketch_budget.py", result, facts, markdown(result), ns.out, ns.quick, argv)
    return result


if __name__ == "__main__":
    main()
