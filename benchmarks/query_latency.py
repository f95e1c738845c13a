"""Query latency and retrieval quality of the engine, with Kronfluence and Bergson measured in the same run.

Data: every chatterbot-corpus conversation in every language, rendered with four turn formats and packed within a
topic into documents of >= `min_chars` characters; a seeded sample of them is the corpus (about `num_sequences`
sequences of <= 64 tokens). A tiny Llama trained on it, EK-FAC factors and an index with the
default `IndexArgs` (cached under `--work-dir`). Queries: first exchanges ("User: ...\\nAssistant:" -> " ...") of
chatterbot conversations, round-robin over languages. One function per section:

- `latency`: wall time of `QueryEngine.query([one query])` (query gradient, search, adaptive exact re-rank with
  per-layer and per-token breakdowns), p50/p95 with the engine's stage seconds, by candidate depth, at the real size
  and at `large_n` rows (`large_index`: the real sketches plus synthetic rows drawn from their mean and covariance,
  over a corpus of the real documents repeated, so a synthetic candidate's re-rank scores a real sequence);
  `variants` at `large_n`: adaptive off, per-token off.
- `rerank_exactness`: the engine's answers against a full exact scan (`compute_scores`): recall@10 per sign and the
  largest error of the re-ranked scores relative to the largest exact score (the re-rank is exact: ~1e-7).
- `candidate_recall`: recall of the exact top-10 per sign among the index's top candidates, by depth (what an exact
  re-rank of that many would return), and Spearman of sketch scores with exact scores over all documents.
- `many_queries`: seconds per query with 1, 6 and 32 queries in one call, against one call each.
- `no_rerank` (`QueryArgs(rerank=False)`, `influence query --no-rerank`): latency and recall of the top sketch scores.
- `bm25_answers`: the engine's answers with BM25 candidates (the paper's TF-IDF-style filter) at the default depth.
- `peers`: Kronfluence's pairwise EK-FAC scores over the corpus (its fit excluded from the time) against the engine's
  p50, measured and extrapolated to `large_n`; Bergson (`bergson_peer`, when installed) and the engine (default and
  `--no-rerank`) on a `peer_docs`-sequence subset with their own stores.

    python benchmarks/query_latency.py             # about 15 min on a quiet 2-core machine (estimated)
    python benchmarks/query_latency.py --quick     # tiny sizes, about a minute; writes to a temp path
    python benchmarks/query_latency.py --peers kronfluence
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402  (sets the environment before torch is imported)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from benchmarks.bergson_peer import bergson_available, run_bergson  # noqa: E402
from benchmarks.kronfluence_peer import kronfluence_available, run_kronfluence  # noqa: E402
from indexes import load_doc_table, load_sketch_store, merge_sketch_shards, sketch_shard_path, write_sketch_shard  # noqa: E402
from indexes.build import build_index  # noqa: E402
from indexes.engine import QueryEngine  # noqa: E402
from influence import CorpusArgs, FactorArgs, IndexArgs, QueryArgs, ScoreArgs, compute_scores, fit_factors  # noqa: E402
from influence import load_sequences, prepare_corpus  # noqa: E402
from influence.arguments import DEFAULT_CANDIDATES  # noqa: E402
from influence.artifacts import read_json, read_manifest, references, write_json, write_manifest, write_parquet  # noqa: E402
from influence.models import load_tokenizer  # noqa: E402
from influence.queries import tokenize_query  # noqa: E402
from jobs.demo.chatterbot import DEFAULT_TURN_FORMAT, chatterbot_documents  # noqa: E402

PEERS = ("kronfluence", "bergson")
TURN_FORMATS = (DEFAULT_TURN_FORMAT, "Q: {}\nA: {}", "Human: {}\nBot: {}", "- {}\n- {}")
MIN_TOKENS = 4  # CorpusArgs.min_tokens of every corpus built here


@dataclasses.dataclass(frozen=True)
class Settings:
    num_sequences: int = 10_000     # about this many sequences in the corpus
    min_chars: int = 160
    seq_tokens: int = 64
    large_n: int = 100_000
    model: common.TinyLlama = common.TinyLlama(vocab_size=1024, hidden=64, layers=2, heads=4, intermediate=128, context=128,
                                               train_steps=300, train_batch=32)
    num_queries: int = 24
    warmup: int = 2
    top_k: int = 10
    latency_depths: tuple = (50, 100, 200)
    tier_depths: tuple = (200, 400, 1000)  # the store's default depth, and the refine tier's (QueryArgs.depth)
    tier_sketch_dims: tuple = (8192, 4096)  # the stores the refine tier stands on: 4 and 2 KiB per document
    recall_depths: tuple = (10, 50, 100, 200, 500)
    variant_queries: int = 8
    peer_docs: int = 2000
    kronfluence_queries: int = 1
    seed: int = 0


DEFAULT = Settings()
QUICK = Settings(num_sequences=600, seq_tokens=48, large_n=6000, num_queries=5, warmup=1, latency_depths=(50, 200), tier_depths=(50, 200),
                 recall_depths=(10, 50, 200), variant_queries=2, peer_docs=150,
                 model=common.TinyLlama(vocab_size=384, hidden=32, layers=2, heads=2, intermediate=64, context=64, train_steps=30))


@dataclasses.dataclass
class Setup:
    cache: Path
    model_dir: Path
    corpus_dir: Path
    factors_dir: Path
    index_dir: Path
    queries: list
    warmup: list


# --------------------------------------------------------------------------- setup


def make_documents(min_chars: int) -> pa.Table:
    """Every conversation, rendered with each turn format and packed (consecutive ones of one topic) to >= min_chars."""
    columns: dict[str, list] = {"doc_id": [], "text": [], "source": [], "lang": []}
    for number, turn_format in enumerate(TURN_FORMATS):
        docs = chatterbot_documents(None, turn_format=turn_format).to_pylist()
        pending: list[dict] = []
        for i, doc in enumerate(docs):
            pending.append(doc)
            last = i + 1 == len(docs) or (docs[i + 1]["lang"], docs[i + 1]["source"]) != (doc["lang"], doc["source"])
            if last or sum(len(d["text"]) for d in pending) >= min_chars:
                columns["doc_id"].append(f"f{number}/{pending[0]['doc_id']}+{len(pending)}")
                columns["text"].append("\n".join(d["text"] for d in pending))
                columns["source"].append(doc["source"])
                columns["lang"].append(doc["lang"])
                pending = []
    return pa.table(columns)


def select_documents(settings: Settings, pool: pa.Table, tokenizer) -> pa.Table:
    """A seeded sample of the pool that the corpus stage will cut into about `num_sequences` sequences."""
    order, chunks, taken = np.random.default_rng(settings.seed).permutation(pool.num_rows), 0, 0
    texts = pool["text"].to_pylist()
    while chunks < settings.num_sequences and taken < len(order):
        block = order[taken: taken + 256]
        for ids in tokenizer([texts[i] for i in block])["input_ids"]:
            chunks, taken = chunks + math.ceil(len(ids) / settings.seq_tokens), taken + 1
            if chunks >= settings.num_sequences:
                break
    return pool.take(np.sort(order[:taken]))


def prepare(settings: Settings, work_dir: Path) -> Setup:
    """Corpus, trained model, factors, the index and the queries; reused when on disk."""
    from jobs.demo.tiny import build_tokenizer

    pool = make_documents(settings.min_chars)
    tokenizer = build_tokenizer(pool["text"].to_pylist(), settings.model.vocab_size)  # every rendered conversation
    model_dir, corpus_dir = common.prepare_trained_model(work_dir, select_documents(settings, pool, tokenizer), settings.model,
                                                         settings.seq_tokens, MIN_TOKENS, tokenizer=tokenizer)
    cache = model_dir.parent
    factors_dir = fit_factors(model_dir, corpus_dir, cache / "factors", FactorArgs(progress=False))
    index_dir = build_index(model_dir, factors_dir, corpus_dir, cache / "index", IndexArgs(progress=False))
    conversations = chatterbot_documents(None)
    conversations = conversations.take(np.random.default_rng(settings.seed + 1).permutation(conversations.num_rows))
    queries = common.first_exchange_queries(conversations, settings.num_queries + settings.warmup, model_dir, settings.model.context)
    return Setup(cache, model_dir, corpus_dir, factors_dir, index_dir, queries[settings.warmup:], queries[: settings.warmup])


def exact_scan(setup: Setup, corpus_dir: Path, queries: list) -> tuple[np.ndarray, float]:
    """(queries, sequences) exact EK-FAC scores of a full scan, and its seconds; cached per corpus and queries."""
    key = hashlib.blake2b(json.dumps([str(corpus_dir), *[dataclasses.astuple(q) for q in queries]]).encode(), digest_size=6).hexdigest()
    path = setup.cache / f"exact-{key}.npy"
    if not path.exists():
        with common.Timer() as timer:
            scores = compute_scores(setup.model_dir, setup.factors_dir, corpus_dir, queries, ScoreArgs(per_module=False, progress=False)).scores
        np.save(path, scores)
        write_json(path.with_suffix(".json"), {"seconds": timer.seconds})
    return np.load(path), read_json(path.with_suffix(".json"))["seconds"]


def large_index(setup: Setup, settings: Settings) -> tuple[Path, dict]:
    """An index of `large_n`-ish rows: the real sketches, then Gaussian rows with their mean and covariance (seeded).

    Its corpus holds the real documents repeated (the first copy is the real corpus, row for row), so every synthetic
    row points at a real sequence, which the re-rank scores like any other; its self-influence is that sequence's.
    Written with the store's own functions (shards, `merge_sketch_shards`) and an index manifest naming that corpus.
    """
    out = setup.cache / f"large-{settings.large_n}"
    index_dir = out / "index"
    if (index_dir / "manifest.json").exists():
        return index_dir, read_json(out / "synthetic.json")
    shutil.rmtree(out, ignore_errors=True)
    real_docs, real_sequences = pq.read_table(setup.cache / "documents.parquet"), load_sequences(setup.corpus_dir)[0]
    n = real_sequences.num_rows
    copies = [real_docs] + [real_docs.set_column(0, "doc_id", pa.array([f"copy{c}/{d}" for d in real_docs["doc_id"].to_pylist()]))
                            for c in range(1, math.ceil(settings.large_n / n))]
    write_parquet(out / "documents.parquet", pa.concat_tables(copies))
    corpus_dir = prepare_corpus(out / "documents.parquet", setup.model_dir, out / "corpus",
                                CorpusArgs(max_length=settings.seq_tokens, min_tokens=MIN_TOKENS), progress=False)
    sequences, corpus = load_sequences(corpus_dir)
    assert sequences.slice(0, n)["input_ids"].equals(real_sequences["input_ids"]), "the first copy must be the real corpus"
    store, docs = load_sketch_store(setup.index_dir), load_doc_table(setup.index_dir)
    order = np.argsort(docs["seq_id"].to_numpy())  # store rows -> seq_id order
    real = store.decode(order)  # (n, d)
    mean = real.mean(0, dtype=np.float64)
    centered = (real - mean).astype(np.float32)
    if n <= real.shape[1]:  # cov = factor @ factor.T with factor (d, n): cheaper than (d, d) when n < d
        factor = centered.T / np.float32(math.sqrt(n - 1))
    else:
        eigenvalues, eigenvectors = np.linalg.eigh(centered.T.astype(np.float64) @ centered / (n - 1))
        factor = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))).astype(np.float32)
    rng = np.random.default_rng(settings.seed + 2)
    total, block = sequences.num_rows, 16384
    num_shards = math.ceil(total / block)
    meta = {name: docs[name].to_numpy()[order] for name in ("self_influence", "grad_norm")}
    for shard in range(num_shards):
        rows = np.arange(shard * block, min(total, (shard + 1) * block))
        synthetic = rng.standard_normal((len(rows), factor.shape[1]), dtype=np.float32) @ factor.T + mean.astype(np.float32)
        sketches = np.where((rows < n)[:, None], real[np.minimum(rows, n - 1)], synthetic)
        table = sequences.take(pa.array(rows)).select(["seq_id", "doc_id", "chunk", "source", "lang", "num_tokens"])
        for name, values in meta.items():
            table = table.append_column(name, pa.array(values[rows % n]))
        write_sketch_shard(index_dir, shard, num_shards, np.ascontiguousarray(sketches), table)
    merge_sketch_shards(index_dir, num_shards, progress=False)
    for shard in range(num_shards):
        shutil.rmtree(sketch_shard_path(index_dir, shard, num_shards))
    info = {"real_rows": n, "synthetic_rows": total - n, "rows": total, "dim": int(real.shape[1]),
            "method": "real sketches + rows drawn from N(mean, covariance) of the real sketches (seeded); synthetic rows point at "
                      "copies of real sequences"}
    real_manifest = read_manifest(setup.index_dir, "index")
    kept = {k: v for k, v in real_manifest.items() if k not in ("kind", "versions") and not k.endswith(("_dir", "_relative"))}
    write_manifest(index_dir, "index", **{**kept, "corpus_fingerprint": corpus["corpus_fingerprint"], "num_sequences": total,
                                          "num_shards": num_shards, "synthetic": info},
                   **references(index_dir, model_dir=setup.model_dir, factors_dir=setup.factors_dir, corpus_dir=corpus_dir))
    write_json(out / "synthetic.json", info)
    return index_dir, info


# --------------------------------------------------------------------------- measurements


def time_queries(configs: dict[str, tuple[QueryEngine, QueryArgs]], queries: list, warmup: list) -> tuple[dict, dict]:
    """Wall time of `engine.query([q])` per config, query by query in turn (so a shared machine's load drifts alike)."""
    for engine, args in configs.values():
        for query in warmup:
            engine.query([query], args)
    walls: dict[str, list] = {name: [] for name in configs}
    results: dict[str, list] = {name: [] for name in configs}
    for query in queries:
        for name, (engine, args) in configs.items():
            with common.Timer() as timer:
                (result,) = engine.query([query], args)
            walls[name].append(timer.seconds)
            results[name].append(result)
    summaries = {name: {"wall": common.percentiles(walls[name]),
                        "stages": {stage: common.percentiles(r.seconds[stage] for r in results[name])
                                   for stage in results[name][0].seconds},
                        "reranked": common.percentiles(r.num_candidates for r in results[name]),
                        "refine_rows_read": common.percentiles(r.refined for r in results[name])} for name in configs}
    return summaries, results


def rerank_exactness(results: list, exact: np.ndarray, top_k: int) -> dict:
    """The engine's answers against the exact scan: recall@k per sign and the re-ranked scores' largest relative error."""
    recall: dict[str, list] = {"+": [], "-": []}
    errors = []
    for row, result in zip(exact, results):
        for sign in "+-":
            recall[sign].append(common.recall_at_k([d.seq_id for d in result.documents if d.sign == sign], common.top_ids(row, top_k, sign)))
        if result.exact:
            errors.append(max(abs(d.score - row[d.seq_id]) for d in result.documents) / np.abs(row).max())
    return {"recall_at_k": {sign: float(np.mean(v)) for sign, v in recall.items()}, "k": top_k,
            "max_error_over_max_abs_score": float(max(errors)) if errors else None}


def candidate_recall(engine: QueryEngine, queries: list, exact: np.ndarray, depths: tuple, top_k: int) -> dict:
    """Recall of the exact top-k per sign among the index's top candidates by depth; Spearman of sketch vs exact scores."""
    sketch, norms = common.sketch_scores(engine, queries)
    recall = {sign: {str(d): float(np.mean([common.recall_at_k(common.top_ids(s, d, sign), common.top_ids(e, top_k, sign))
                                            for s, e in zip(sketch, exact)])) for d in depths} for sign in "+-"}
    document_norms = engine.document_norms[np.argsort(engine.seq_ids)]  # ||W(z)||, by seq_id
    cosine = exact / np.multiply.outer(norms, document_norms)  # in the whitened space: what a sketch must resolve
    return {"recall_at_k": recall, "k": top_k, "spearman_sketch_vs_exact": common.percentiles(common.spearman(s, e) for s, e in zip(sketch, exact)),
            "median_cosine_of_exact_top_k": {sign: common.percentiles(np.median(c[common.top_ids(e, top_k, sign)]) for c, e in zip(cosine, exact))
                                             for sign in "+-"},
            "sketch_noise_per_unit_norm": 1 / math.sqrt(engine.sketcher.dim)}


def latency(setup: Setup, settings: Settings, engines: dict[str, QueryEngine], exact: np.ndarray) -> tuple[dict, dict]:
    """Latency by size and depth, and the exactness of the real-size answers at each depth."""
    out: dict = {size: {} for size in engines}
    exactness = {}
    for depth in settings.latency_depths:
        args = QueryArgs(top_k=settings.top_k, candidates=depth)
        summaries, results = time_queries({size: (engine, args) for size, engine in engines.items()}, setup.queries, setup.warmup)
        for size, summary in summaries.items():
            out[size][str(depth)] = summary
        exactness[str(depth)] = rerank_exactness(results[next(iter(engines))], exact, settings.top_k)
    return out, exactness


def variants(settings: Settings, engine: QueryEngine, setup: Setup) -> dict:
    """The default query at the large size against settings that trade time for exactness of the answer's extras."""
    base = QueryArgs(top_k=settings.top_k)
    configs = {"default": (engine, base), "adaptive_false": (engine, dataclasses.replace(base, adaptive=False)),
               "per_token_false": (engine, dataclasses.replace(base, per_token=False))}
    return time_queries(configs, setup.queries[: settings.variant_queries], setup.warmup[:1])[0]


def many_queries(settings: Settings, engine: QueryEngine, setup: Setup, counts: tuple = (1, 6, 32), repeats: int = 3) -> dict:
    """Seconds per query when `n` queries go in one `engine.query` call (they share the query gradients' pass, the search
    call and the re-rank batches), against the same queries one call each, alternated `repeats` times (medians: one
    run of each is at the mercy of a shared machine); the queries cycle through the benchmark's with fresh ids."""
    args = QueryArgs(top_k=settings.top_k)
    pool = [dataclasses.replace(setup.queries[i % len(setup.queries)], query_id=f"many-{i}") for i in range(max(counts))]
    engine.query(setup.warmup[:1], args)
    out = {}
    for n in counts:
        batch, together, apart = pool[:n], [], []
        for _ in range(repeats):
            with common.Timer() as timer:
                engine.query(batch, args)
            together.append(timer.seconds)
            with common.Timer() as timer:
                for query in batch:
                    engine.query([query], args)
            apart.append(timer.seconds)
        out[str(n)] = {"seconds_per_query_in_one_call": float(np.median(together)) / n,
                       "seconds_per_query_one_call_each": float(np.median(apart)) / n,
                       "ratio": float(np.median(together) / np.median(apart)), "repeats": repeats}
    return out


def no_rerank(settings: Settings, engine: QueryEngine, setup: Setup, exact: np.ndarray) -> dict:
    """`QueryArgs(rerank=False)`: the top sketch scores, end to end, against the exact scan."""
    summaries, results = time_queries({"no_rerank": (engine, QueryArgs(top_k=settings.top_k, rerank=False))}, setup.queries, setup.warmup)
    return {**summaries["no_rerank"], **rerank_exactness(results["no_rerank"], exact, settings.top_k)}


def bm25_answers(settings: Settings, engine: QueryEngine, setup: Setup, exact: np.ndarray) -> dict:
    """The engine's answers with BM25 candidates (same depth per sign as the default), against the exact scan."""
    summaries, results = time_queries({"bm25": (engine, QueryArgs(top_k=settings.top_k, generator="bm25", per_token=False))},
                                      setup.queries, setup.warmup)
    return {**summaries["bm25"], **rerank_exactness(results["bm25"], exact, settings.top_k)}


def kronfluence_peer(setup: Setup, settings: Settings, engine_p50: dict[str, float], exact: np.ndarray) -> dict:
    """Kronfluence's pairwise scores of the first queries over the whole corpus: seconds per query against the engine."""
    if kronfluence_available():
        return {"status": "skipped", "reason": kronfluence_available()}
    queries = setup.queries[: settings.kronfluence_queries]
    tokenized = [tokenize_query(q, load_tokenizer(setup.model_dir)) for q in queries]
    sequences = load_sequences(setup.corpus_dir)[0]
    with tempfile.TemporaryDirectory(dir=setup.cache) as work:
        peer = run_kronfluence(str(setup.model_dir), sequences["input_ids"].to_pylist(), [(t.prompt_ids, t.completion_ids) for t in tokenized],
                               read_manifest(setup.factors_dir, "factors")["modules"], work_dir=work, strategy="ekfac", seed=settings.seed)
    per_query, exact = peer["score_seconds"] / len(queries), exact[: len(queries)]
    return {"status": "ok", "version": peer["version"], "docs": sequences.num_rows, "fit_seconds_excluded": peer["fit_seconds"],
            "score_seconds_per_query": per_query,
            "agreement_with_engine_exact": {"spearman": common.mean_sem(common.spearman(a, b) for a, b in zip(peer["scores"], exact)),
                                            **{f"top{settings.top_k}_overlap{s}": float(np.mean([common.topk_overlap(a, b, settings.top_k, s)
                                                                                                 for a, b in zip(peer["scores"], exact)])) for s in "+-"}},
            "ratio_to_engine_p50": {size: per_query * int(size) / sequences.num_rows / p50 for size, p50 in engine_p50.items()},
            "note": "Kronfluence scans every document per query: its time is measured at the real size and extrapolated linearly "
                    "(per document) to the large one; the engine's p50 is that of the default depth in the latency section"}


def subset_peers(setup: Setup, settings: Settings, peers: list[str], exact_full: np.ndarray) -> dict:
    """The engine (default, --no-rerank) and Bergson on the first documents holding ~peer_docs sequences, each with its store."""
    sequences = load_sequences(setup.corpus_dir)[0]
    docs = pq.read_table(setup.cache / "documents.parquet")
    last_doc = sequences["doc_id"][min(settings.peer_docs, sequences.num_rows) - 1].as_py()
    count = docs["doc_id"].to_pylist().index(last_doc) + 1
    sub = setup.cache / f"subset-{count}"
    write_parquet(sub / "documents.parquet", docs.slice(0, count))
    corpus_dir = prepare_corpus(sub / "documents.parquet", setup.model_dir, sub / "corpus",
                                CorpusArgs(max_length=settings.seq_tokens, min_tokens=MIN_TOKENS), progress=False)
    index_dir = build_index(setup.model_dir, setup.factors_dir, corpus_dir, sub / "index", IndexArgs(progress=False))
    sub_sequences = load_sequences(corpus_dir)[0]
    assert sub_sequences["input_ids"].equals(sequences.slice(0, sub_sequences.num_rows)["input_ids"]), "the subset is the corpus's head"
    exact = exact_full[:, : sub_sequences.num_rows]
    engine = QueryEngine(index_dir, QueryArgs(top_k=settings.top_k))
    configs = {"engine": (engine, QueryArgs(top_k=settings.top_k)), "engine_no_rerank": (engine, QueryArgs(top_k=settings.top_k, rerank=False))}
    summaries, results = time_queries(configs, setup.queries, setup.warmup)
    out: dict = {"docs": sub_sequences.num_rows,
                 "engine_bytes_per_doc": sum(common.dir_bytes(index_dir).values()) / sub_sequences.num_rows}
    for name in configs:
        out[name] = {**summaries[name], **rerank_exactness(results[name], exact, settings.top_k)}
    if "bergson" in peers:
        modules = len(read_manifest(setup.factors_dir, "factors")["modules"])
        projection = max(1, math.isqrt(IndexArgs().sketch_dim // 2 // 4 // modules))  # float32 p x p per module: the store's bytes
        tokenizer = load_tokenizer(setup.model_dir)
        with tempfile.TemporaryDirectory(dir=setup.cache) as work:
            bergson = run_bergson(setup.model_dir, sub_sequences["input_ids"].to_pylist(),
                                  [(t.prompt_ids, t.completion_ids) for t in (tokenize_query(q, tokenizer) for q in [*setup.warmup, *setup.queries])],
                                  len(setup.warmup), projection, 16 * settings.seq_tokens, settings.top_k, Path(work), torch.get_num_threads())
        for variant in bergson.get("variants", {}).values():
            scores = variant.pop("scores")
            variant["timings"] = {k: common.percentiles(v) for k, v in variant["timings"].items()}
            variant["recall_at_k"] = {s: float(np.mean([common.topk_overlap(a, b, settings.top_k, s) for a, b in zip(scores, exact)])) for s in "+-"}
            variant["spearman_vs_exact"] = common.mean_sem(common.spearman(a, b) for a, b in zip(scores, exact))
        out["bergson"] = {**bergson, "projection": f"{projection} x {projection} per module, float32, no preconditioner"}
    return out


def tiers(setup: Setup, settings: Settings, exact: np.ndarray) -> dict:
    """The tiers side by side on the real corpus, query by query in turn: the 4-bit sketch store alone (the default
    index), and the refine tier (float16 whitened gradients on disk) standing on stores of `tier_sketch_dims` numbers;
    by depth (candidates per sign from the store): latency, exact re-ranks, recall@10 against the exact scan, bytes."""
    n = exact.shape[1]
    indexes = {"store": setup.index_dir}
    for dim in settings.tier_sketch_dims:
        indexes[f"store {dim} + refine"] = build_index(setup.model_dir, setup.factors_dir, setup.corpus_dir, setup.cache / f"index-{dim}-refine",
                                                       IndexArgs(progress=False, sketch_dim=dim, refine=True))
    engines = {name: QueryEngine(path, QueryArgs(top_k=settings.top_k)) for name, path in indexes.items()}
    out: dict = {}
    for name, path in indexes.items():
        files = common.dir_bytes(path)
        out[name] = {"sketch_dim": engines[name].sketcher.dim, "bytes_per_doc": {
            "store (read whole by every query)": files.get("sketches.npy", 0) / n,
            "refine tier (read at the candidates)": files.get("refine.npy", 0) / n, "all files": sum(files.values()) / n},
            "by_depth": {}}
    for depth in settings.tier_depths:
        args = QueryArgs(top_k=settings.top_k, candidates=depth)
        summaries, results = time_queries({name: (engine, args) for name, engine in engines.items()}, setup.queries, setup.warmup)
        for name in engines:
            out[name]["by_depth"][str(depth)] = {**summaries[name], **rerank_exactness(results[name], exact, settings.top_k)}
    for name, engine in engines.items():  # the refine tier's own order, no exact re-rank
        summaries, results = time_queries({name: (engine, QueryArgs(top_k=settings.top_k, candidates=max(settings.tier_depths), rerank=False))},
                                          setup.queries, setup.warmup)
        out[name]["no_rerank"] = {**summaries[name], **rerank_exactness(results[name], exact, settings.top_k)}
    return out


def markdown(result: dict) -> str:
    lines = ["| rows | candidates/sign | p50 s | p95 s | search p50 | rerank p50 | re-ranked p50 |", "|---|---|---|---|---|---|---|"]
    for size, by_depth in result["latency"].items():
        for depth, r in by_depth.items():
            lines.append(f"| {int(size):,} | {depth} | {r['wall']['p50']:.3f} | {r['wall']['p95']:.3f} | {r['stages']['search']['p50']:.3f} | "
                         f"{r['stages']['rerank']['p50']:.3f} | {r['reranked']['p50']:.0f} |")
    recall = result["candidate_recall"]["recall_at_k"]
    depths = list(recall["+"])
    lines += ["", "| candidates/sign | " + " | ".join(depths) + " |", "|---" * (len(depths) + 1) + "|"]
    lines += [f"| index {sign} | " + " | ".join(f"{recall[sign][d]:.2f}" for d in depths) + " |" for sign in "+-"]
    lines.append("\nengine answers, recall@10 (+/-) by depth: " + "; ".join(
        f"{d}: {r['recall_at_k']['+']:.2f}/{r['recall_at_k']['-']:.2f} (max err {r['max_error_over_max_abs_score']:.1e})"
        for d, r in result["rerank_exactness"].items()))
    nr = result["no_rerank"]
    lines.append(f"--no-rerank: p50 {nr['wall']['p50']:.3f}s, recall@10 {nr['recall_at_k']['+']:.2f}/{nr['recall_at_k']['-']:.2f}")
    lines += ["", "| tiers | store B/doc | refine B/doc | candidates/sign | p50 s | p95 s | refine rows read p50 | re-ranked p50 | recall@10 +/- |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, tier in result["tiers"].items():
        size = tier["bytes_per_doc"]
        for depth, r in [*tier["by_depth"].items(), ("no re-rank", tier["no_rerank"])]:
            lines.append(f"| {name} | {size['store (read whole by every query)']:,.0f} | {size['refine tier (read at the candidates)']:,.0f} | "
                         f"{depth} | {r['wall']['p50']:.3f} | {r['wall']['p95']:.3f} | {r['refine_rows_read']['p50']:.0f} | {r['reranked']['p50']:.0f} | "
                         f"{r['recall_at_k']['+']:.2f}/{r['recall_at_k']['-']:.2f} |")
    kron = result["peers"].get("kronfluence", {})
    if kron.get("status") == "ok":
        lines.append(f"Kronfluence {kron['version']}: {kron['score_seconds_per_query']:.2f}s per query over {kron['docs']:,} docs; "
                     + ", ".join(f"{r:.0f}x the engine at {int(s):,} rows" for s, r in kron["ratio_to_engine_p50"].items()))
    return "\n".join(lines)


def run(settings: Settings, peers: list[str], work_dir: Path, threads: int) -> dict:
    """Every section in order, each timed; the results keyed as in the JSON."""
    seconds: dict[str, float] = {}

    def timed(name: str, section, *args):
        with common.Timer() as timer:
            value = section(*args)
        seconds[name] = timer.seconds
        return value

    setup = timed("setup", prepare, settings, work_dir)
    exact, exact_seconds = timed("exact_scan", exact_scan, setup, setup.corpus_dir, setup.queries)
    large_dir, synthetic = timed("large_index", large_index, setup, settings)
    torch.set_num_threads(threads)  # the queries run with `threads`; the setup above with torch's default
    n, large = exact.shape[1], str(synthetic["rows"])
    engines = {str(n): QueryEngine(setup.index_dir, QueryArgs(top_k=settings.top_k)), large: QueryEngine(large_dir)}
    result: dict = {"corpus": {"sequences": n, **{k: read_manifest(setup.corpus_dir, "corpus")[k] for k in ("num_documents", "num_tokens")}},
                    "index": {"args": IndexArgs().to_dict(), "bytes_per_doc": sum(common.dir_bytes(setup.index_dir).values()) / n},
                    "synthetic_large_index": synthetic, "queries": [q.query_id for q in setup.queries],
                    "exact_scan_seconds": exact_seconds}
    result["latency"], result["rerank_exactness"] = timed("latency", latency, setup, settings, engines, exact)
    result["tiers"] = timed("tiers", tiers, setup, settings, exact)
    result["variants_at_large_n"] = timed("variants", variants, settings, engines[large], setup)
    depths = tuple(d for d in settings.recall_depths if d <= n)
    result["candidate_recall"] = timed("candidate_recall", candidate_recall, engines[str(n)], setup.queries, exact, depths, settings.top_k)
    result["no_rerank"] = timed("no_rerank", no_rerank, settings, engines[str(n)], setup, exact)
    result["many_queries"] = timed("many_queries", many_queries, settings, engines[str(n)], setup)
    result["bm25_answers"] = timed("bm25_answers", bm25_answers, settings, engines[str(n)], setup, exact)
    result["peers"] = {}
    if "kronfluence" in peers:
        default = str(DEFAULT_CANDIDATES)
        p50 = {size: by_depth[default]["wall"]["p50"] for size, by_depth in result["latency"].items() if default in by_depth}
        result["peers"]["kronfluence"] = timed("kronfluence", kronfluence_peer, setup, settings, p50, exact)
    if peers:
        result["peers"]["subset"] = timed("subset_peers", subset_peers, setup, settings, peers, exact)
    result["section_seconds"] = seconds
    return result


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: about a minute")
    parser.add_argument("--peers", default=None, help=f"comma-separated subset of {','.join(PEERS)} or '' (default: those installed)")
    parser.add_argument("--work-dir", type=Path, default=common.WORK / "query_latency", help="cache of the built artifacts")
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/query_latency.json; --quick: a temp file)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while querying (default 1: a shared 2-core machine)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    available = [p for p, why in (("kronfluence", kronfluence_available()), ("bergson", bergson_available())) if why is None]
    peers = available if args.peers is None else [p for p in args.peers.split(",") if p]
    if set(peers) - set(PEERS):
        parser.error(f"unknown peers {sorted(set(peers) - set(PEERS))}; choose among {', '.join(PEERS)}")
    settings = QUICK if args.quick else DEFAULT
    facts = common.machine_facts()
    with common.Timer() as total:
        result = run(settings, peers, args.work_dir, args.threads)
    result = {"benchmark": "query_latency", "mode": "quick" if args.quick else "default", "settings": dataclasses.asdict(settings),
              "threads": args.threads, **result, "total_seconds": total.seconds, "machine": common.finish_machine(facts)}
    out = common.write_results(args.out or common.default_out("query_latency", args.quick), result, common.command_line("query_latency.py", argv))
    print(f"{markdown(result)}\n\nwrote {out} in {total.seconds:.0f}s")
    return result


if __name__ == "__main__":
    main()
