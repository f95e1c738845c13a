"""Query latency and retrieval quality of the engine, with Kronfluence and Bergson measured in the same run.

What is measured (issue 7):

1. Latency of ONE query (`QueryEngine.query([query])`: tokenise + query gradient + candidate search + exact
   EK-FAC re-rank with per-module and per-token breakdowns), p50/p95 over `num_queries` varied queries in
   several languages, at 10k sequences (a real index) and at 100k (the real 10k sketches plus 90k synthetic
   rows drawn from a Gaussian with the real sketches' mean and covariance, their doc-table rows pointing at
   real sequences so that the re-rank does real work), at several candidate depths, with the engine's own
   per-stage seconds (gradient, search, rerank). Model, factors and index are loaded once; warm-up queries
   are excluded. A cProfile of the 100k path says what dominates.
2. Quality against the full exact scan (`influence.scores.compute_scores` over the 10k corpus): recall@10
   of the exact top-10 after index candidates + exact re-rank, per sign and candidate depth; the same for
   BM25 candidates (the paper's TF-IDF-style baseline); Spearman of the re-ranked scores vs the exact ones
   (1 up to float error: the re-rank is exact) and of the raw sketch scores vs the exact ones.
3. Peers on the same model, queries and a subset of the corpus (`peer_docs` sequences):
   Kronfluence 1.0 (`benchmarks/kronfluence_peer.run_kronfluence`; only its scoring time counts, its
   factor fit is excluded) and Bergson 2.5.1 (a store of randomly projected gradients searched with FAISS;
   it cannot combine EK-FAC with projection or FAISS, so its store holds raw projected gradients, scored by
   inner product and by cosine). Bergson runs in a subprocess with its own site directory (see below).

Data: chatterbot-corpus conversations in several languages (`jobs.demo.chatterbot`), packed and re-rendered
with several turn formats into documents of ~32-64 tokens until the corpus holds `num_sequences`
sequences. Model: a tiny Llama (`jobs.demo.tiny`) trained briefly on those sequences.

    python benchmarks/query_latency.py             # default: < 20 min on 2 CPU cores
    python benchmarks/query_latency.py --quick     # tiny sizes, about a minute
    python benchmarks/query_latency.py --peers kronfluence   # skip Bergson

Writes `benchmarks/results/query_latency.json` (`query_latency_quick.json` with --quick, or `--out`) and
prints markdown tables. Artifacts (model, corpus, factors, indexes, exact scores) are cached under
`--work-dir`, keyed by the settings; a cached build's timings are reported as those of the run that built it.

Installing Bergson on CPU without touching torch (its FAISS path touches `faiss.GpuIndex`, so it needs the
faiss-gpu-cu12 wheel, which imports fine without a GPU; kept in its own directory so that it never shadows
faiss-cpu for the engine):

    pip install --no-deps --target benchmarks/results/.work/bergson_site bergson==2.5.1 peft torchopt optree \\
        jaxtyping wadler-lindig natsort petname simple-parsing docstring-parser ml_dtypes \\
        faiss-gpu-cu12 nvidia-cuda-runtime-cu12 nvidia-cublas-cu12
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def bergson_worker(spec_path: str) -> None:
    """Build a Bergson gradient store over the given sequences and time its FAISS queries (a subprocess).

    Runs before any engine import so that the faiss-gpu wheel in `spec["site"]` is the faiss this process
    loads. Writes `result.json` and `scores_<variant>.npy` (queries, docs) into `spec["out_dir"]`.
    """
    import re
    import shutil
    import time
    import traceback

    spec = json.loads(Path(spec_path).read_text())
    out_dir = Path(spec["out_dir"])
    result: dict = {"status": "failed", "stage": "import"}
    sys.path.insert(0, spec["site"])
    try:
        import numpy as np
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(spec["threads"])
        import faiss
        import bergson
        from datasets import Dataset
        from transformers import AutoModelForCausalLM

        from bergson.collection import collect_gradients
        from bergson.collector.collector import HookCollectorBase
        from bergson.collector.gradient_collectors import TraceCollector
        from bergson.config.config import FaissConfig, IndexConfig
        from bergson.data import allocate_batches
        from bergson.query.attributor import Attributor
        from bergson.utils.worker_utils import processor_for

        result["versions"] = {"bergson": bergson.__version__, "faiss": faiss.__version__, "faiss_file": faiss.__file__,
                              "faiss_has_GpuIndex": hasattr(faiss, "GpuIndex")}
        result["stage"] = "build"
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
        base = model.base_model  # bergson hooks the base model (module names without the "model." prefix)
        targets = {name for name in HookCollectorBase.discover_targets(base) if re.search(spec["module_regex"], name)}
        run_path = Path(spec["work_dir"]) / "store"
        cfg = IndexConfig(run_path=str(run_path), model=spec["model_dir"], projection_dim=spec["projection_dim"],
                          token_batch_size=spec["token_batch_size"], loss_reduction="sum", precision="fp32")
        shutil.rmtree(run_path, ignore_errors=True)
        shutil.rmtree(cfg.partial_run_path, ignore_errors=True)
        cfg.partial_run_path.mkdir(parents=True)
        sequences = spec["sequences"]
        lengths = [len(s) for s in sequences]
        data = Dataset.from_dict({"input_ids": sequences, "length": lengths})
        processor = processor_for(cfg)
        processor.save(cfg.partial_run_path)
        start = time.perf_counter()
        collect_gradients(model=model, data=data, processor=processor, cfg=cfg, batches=allocate_batches(lengths, cfg.token_batch_size),
                          target_modules=targets)
        result["build_seconds"] = time.perf_counter() - start
        shutil.move(str(cfg.partial_run_path), str(run_path))
        result["store_bytes_per_doc"] = (run_path / "gradients.bin").stat().st_size / len(sequences)
        result["tracked_modules"] = sorted(targets)

        def query_gradients(attributor, prompt: list[int], completion: list[int]) -> dict:
            """What `Attributor.trace` does, restricted to the tracked modules (trace() would hook every linear layer)."""
            collector = TraceCollector(model=base, processor=attributor.processor, target_modules=targets, device="cpu", dtype=torch.float32)
            ids = torch.tensor([prompt + completion])
            labels = ids[:, 1:].clone()
            labels[:, : len(prompt) - 1] = -100  # completion tokens only: the summed completion NLL
            with collector:
                logits = model(ids).logits[:, :-1]
                F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").backward()
            model.zero_grad(set_to_none=True)
            return {name: torch.cat(collector.mod_grads[name], dim=1) for name in attributor.ordered_modules}

        result["stage"] = "query"
        result["variants"] = {}
        queries = spec["queries"]
        for variant, unit_norm in (("inner_product", False), ("cosine", True)):
            start = time.perf_counter()
            attributor = Attributor(run_path, device="cpu", unit_norm=unit_norm, faiss_cfg=FaissConfig(index_factory="Flat"))
            index_seconds = time.perf_counter() - start
            for prompt, completion in queries[: spec["warmup"]]:
                attributor.search(query_gradients(attributor, prompt, completion), spec["top_k"])
            timed = queries[spec["warmup"]:]
            timings = {"total": [], "gradient": [], "search": []}
            scores = np.zeros((len(timed), len(sequences)))
            for qi, (prompt, completion) in enumerate(timed):
                tick = time.perf_counter()
                grads = query_gradients(attributor, prompt, completion)
                middle = time.perf_counter()
                attributor.search(grads, spec["top_k"])
                done = time.perf_counter()
                timings["gradient"].append(middle - tick)
                timings["search"].append(done - middle)
                timings["total"].append(done - tick)
                values, ids = attributor.search(grads, None)  # every document, for the agreement metrics (not timed)
                scores[qi, ids[0].numpy()] = values[0].numpy()
            np.save(out_dir / f"scores_{variant}.npy", scores)
            faiss_dir = next(p for p in run_path.iterdir() if p.name.startswith("faiss_Flat") and ("cosine" in p.name) == unit_norm)
            faiss_bytes = sum(p.stat().st_size for p in faiss_dir.glob("*.faiss"))
            result["variants"][variant] = {"timings": timings, "faiss_build_seconds": index_seconds,
                                           "faiss_bytes_per_doc": faiss_bytes / len(sequences)}
        result["status"] = "ok"
        result.pop("stage")
    except BaseException as exc:  # everything goes back to the parent as a reason
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc(limit=12)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--bergson-worker":
    bergson_worker(sys.argv[2])
    sys.exit(0)

import argparse  # noqa: E402
import cProfile  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import importlib.metadata as md  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from typing import Optional  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402

from indexes.build import build_index  # noqa: E402
from indexes.constants import DOCS_NAME, INDEX_META_NAME, INDEX_NAME  # noqa: E402
from indexes.engine import QueryEngine  # noqa: E402
from indexes.search import search_index  # noqa: E402
from indexes.shards import iterate_shard_sketches  # noqa: E402
from indexes.store import load_doc_table  # noqa: E402
from influence.arguments import CorpusArgs, FactorArgs, IndexArgs, QueryArgs, ScoreArgs  # noqa: E402
from influence.artifacts import read_json, read_manifest, write_json, write_parquet  # noqa: E402
from jobs.demo.chatterbot import DEFAULT_TURN_FORMAT, _turns, chatterbot_data_dir, LANGUAGE_CODES, render_conversation  # noqa: E402
from influence.constants import MANIFEST_NAME  # noqa: E402
from influence.corpus import load_sequences, prepare_corpus  # noqa: E402
from influence.factors import fit_factors  # noqa: E402
from influence.models import load_tokenizer  # noqa: E402
from influence.queries import Query, tokenize_query  # noqa: E402
from influence.scores import compute_scores  # noqa: E402
from jobs.demo.tiny import build_model, build_tokenizer  # noqa: E402

LOG = logging.getLogger("benchmarks.query_latency")
RESULTS = ROOT / "benchmarks" / "results"
PEERS = ("kronfluence", "bergson")
CACHE_VERSION = 3  # bump when the data, model or artifact recipe changes
THREAD_QUERIES = 3  # queries timed with torch's default thread count (slow on a loaded machine)
MIN_TOKENS = 4  # CorpusArgs.min_tokens of every corpus built here
TURN_FORMATS = (DEFAULT_TURN_FORMAT, "Q: {}\nA: {}", "Human: {}\nBot: {}", "- {}\n- {}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that defines a run; fields in RUNTIME change no cached artifact."""

    num_sequences: int = 10_000     # corpus size (sequences) of the real index
    large_n: int = 100_000          # rows of the synthetic large index (real rows + Gaussian ones)
    languages: tuple = ("english", "spanish", "french", "german", "italian", "portuguese", "dutch", "russian",
                        "turkish", "chinese", "japanese", "korean")
    vocab_size: int = 1024
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    context: int = 128
    seq_tokens: int = 64            # corpus chunk length; documents are packed to >= seq_tokens / 2 tokens
    train_steps: int = 300
    train_batch: int = 32
    lr: float = 3e-3
    sketch_size: int = IndexArgs().sketch_size  # k x k numbers per module (indexes are cached per sketch and k)
    seed: int = 0
    num_queries: int = 24           # timed queries
    warmup: int = 2                 # untimed queries before each timed series
    top_k: int = 10
    latency_depths: tuple = (50, 100, 200)
    recall_depths: tuple = (10, 50, 100, 200, 500)
    peer_docs: int = 2000           # corpus subset for the peers (and the engine on that subset)
    peer_depth: Optional[int] = None  # engine candidates per sign on the subset (None: QueryArgs' default)
    kronfluence_queries: int = 1    # queries scored by Kronfluence (its fit is paid per call)
    bergson_projection: int = IndexArgs().sketch_size  # p: Bergson projects each module's gradient to p x p (the engine's bytes per doc)
    profile_queries: int = 3
    variant_queries: int = 8        # timed queries of each extra variant at large_n (threads, patches)
    thread_variant: bool = True     # also time torch's default thread count at large_n (slow on a loaded machine)
    compare_sketches: tuple = ("kronecker", "eigen")  # other IndexArgs.sketch methods whose candidate recall is also measured

    RUNTIME = ("num_queries", "warmup", "top_k", "latency_depths", "recall_depths", "peer_depth", "kronfluence_queries",
               "bergson_projection", "profile_queries", "variant_queries", "thread_variant", "compare_sketches", "large_n",
               "sketch_size")  # sketch_size: the index directories carry it in their names

    def cache_key(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUNTIME}
        fields.update(version=CACHE_VERSION, torch=torch.__version__, transformers=_version("transformers"))
        return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=6).hexdigest()


DEFAULT = Settings()
QUICK = Settings(num_sequences=600, large_n=6000, languages=("english", "spanish", "chinese"), vocab_size=384, hidden=32,
                 heads=2, intermediate=64, context=64, seq_tokens=48, train_steps=30, train_batch=16, sketch_size=8, bergson_projection=8,
                 num_queries=5, warmup=1, latency_depths=(20, 50), recall_depths=(10, 20, 50), peer_docs=150, peer_depth=20,
                 profile_queries=2, variant_queries=3, thread_variant=False)


# --------------------------------------------------------------------------- data


def conversations(languages: tuple) -> list[dict]:
    """Every conversation of the given chatterbot languages: {lang, topic, index, turns}."""
    import yaml

    data, rows = chatterbot_data_dir(), []
    for language in languages:
        for topic_file in sorted((f for f in (data / language).iterdir() if f.name.endswith((".yml", ".yaml"))), key=lambda f: f.name):
            content = yaml.load(topic_file.read_text(encoding="utf-8"), Loader=getattr(yaml, "CBaseLoader", yaml.BaseLoader))
            for index, conversation in enumerate((content or {}).get("conversations") or []):
                turns = _turns(conversation)
                if turns:
                    rows.append({"lang": LANGUAGE_CODES.get(language, "und"), "language": language,
                                 "topic": topic_file.name.rsplit(".", 1)[0], "index": index, "turns": turns})
    return rows


def make_documents(settings: Settings, convs: list[dict], tokenizer) -> tuple[pa.Table, int]:
    """Augmented documents: conversations re-rendered with each turn format in turn and packed (within a topic)
    until a document holds >= seq_tokens/2 tokens, round after round (shifting the packing) until the corpus
    stage will cut `num_sequences` sequences. Returns the documents and that sequence count."""
    target, short = settings.num_sequences, settings.seq_tokens // 2
    columns: dict[str, list] = {"doc_id": [], "text": [], "source": [], "lang": []}
    count, round_ = 0, 0
    while count < target:
        turn_format = TURN_FORMATS[round_ % len(TURN_FORMATS)]
        rendered = [render_conversation(c["turns"], turn_format) for c in convs]
        lengths = [len(ids) for ids in tokenizer(rendered, add_special_tokens=True)["input_ids"]]
        pending: list[int] = list(range(round_ % 3))  # shift the packing boundaries from round to round
        for i in range(round_ % 3, len(convs) + round_ % 3):
            i %= len(convs)
            same_topic = not pending or (convs[pending[0]]["language"], convs[pending[0]]["topic"]) == (convs[i]["language"], convs[i]["topic"])
            if pending and not same_topic:
                pending = []
            pending.append(i)
            if sum(lengths[j] for j in pending) < short:
                continue
            text = "\n".join(rendered[j] for j in pending)
            num = len(tokenizer(text, add_special_tokens=True)["input_ids"])
            first = convs[pending[0]]
            columns["doc_id"].append(f"r{round_}/{first['language']}/{first['topic']}/{first['index']}+{len(pending)}")
            columns["text"].append(text)
            columns["source"].append(first["topic"])
            columns["lang"].append(first["lang"])
            full, tail = divmod(num, settings.seq_tokens)
            count += full + (tail >= MIN_TOKENS)  # the corpus stage drops chunks shorter than MIN_TOKENS
            pending = []
            if count >= target:
                break
        round_ += 1
    return pa.table(columns), count


def first_exchange_queries(convs: list[dict], count: int, seed: int) -> list[Query]:
    """Queries "User: <first turn>\\nAssistant:" -> " <second turn>", round-robin over languages (seeded)."""
    rng = np.random.default_rng(seed)
    by_lang: dict[str, list[dict]] = {}
    for c in convs:
        if len(c["turns"]) >= 2 and 2 <= len(c["turns"][1]) <= 160 and len(c["turns"][0]) <= 120:
            by_lang.setdefault(c["lang"], []).append(c)
    pools = {lang: [items[i] for i in rng.permutation(len(items))] for lang, items in sorted(by_lang.items())}
    queries: list[Query] = []
    while len(queries) < count and any(pools.values()):
        for lang, pool in pools.items():
            if pool and len(queries) < count:
                c = pool.pop()
                queries.append(Query(f"q{len(queries):02d}-{lang}", f"User: {c['turns'][0]}\nAssistant:", f" {c['turns'][1]}", lang))
    return queries


# --------------------------------------------------------------------------- artifacts


@dataclasses.dataclass
class Setup:
    dir: Path
    model_dir: Path
    corpus_dir: Path
    factors_dir: Path
    index_dir: Path
    queries: list[Query]
    warmup: list[Query]
    build_seconds: dict


def index_name(sketch: str, sketch_size: int) -> str:
    return f"index_{sketch}_k{sketch_size}"


def _timed(record: dict, name: str, path: Path, build) -> None:
    """Run `build` unless its output marker exists; keep its seconds in `record` (and on disk, for cached runs)."""
    marker = path / ".seconds.json"
    if marker.exists():
        record[name] = {**read_json(marker), "cached": True}
        return
    start = time.perf_counter()
    build()
    record[name] = {"seconds": time.perf_counter() - start, "load_average": list(os.getloadavg())}
    write_json(marker, record[name])


def prepare_setup(settings: Settings, cache_dir: Path, progress: bool) -> Setup:
    """Documents, tokenizer, trained model, corpus, EK-FAC factors and the real index; reused when on disk."""
    from jobs.demo.tiny import train_model

    convs = conversations(settings.languages)
    all_queries = first_exchange_queries(convs, settings.num_queries + settings.warmup, settings.seed)
    model_dir, corpus_dir = cache_dir / "model", cache_dir / "corpus"
    factors_dir, index_dir = cache_dir / "factors", cache_dir / index_name(IndexArgs().sketch, settings.sketch_size)
    seconds: dict = {}

    def build_model_dir() -> None:
        texts = [render_conversation(c["turns"], f) for c in convs for f in TURN_FORMATS[:2]]
        tokenizer = build_tokenizer(texts, vocab_size=settings.vocab_size)
        tmp = cache_dir / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        build_model(tmp, tokenizer, "llama", seed=settings.seed, hidden=settings.hidden, layers=settings.layers,
                    heads=settings.heads, intermediate=settings.intermediate, context=settings.context)
        tmp.rename(model_dir)

    if not (model_dir / "config.json").exists():
        build_model_dir()
    tokenizer = load_tokenizer(model_dir)

    def build_corpus() -> None:
        documents, _ = make_documents(settings, convs, tokenizer)
        write_parquet(cache_dir / "documents.parquet", documents)
        prepare_corpus(cache_dir / "documents.parquet", model_dir, corpus_dir,
                       CorpusArgs(max_length=settings.seq_tokens, min_tokens=MIN_TOKENS), progress=False)

    _timed(seconds, "corpus", corpus_dir, build_corpus)

    def train() -> None:
        sequences, _ = load_sequences(corpus_dir)
        train_model(model_dir, sequences["input_ids"].to_pylist(), steps=settings.train_steps, lr=settings.lr,
                    batch_size=settings.train_batch, seed=settings.seed, progress=progress)

    _timed(seconds, "train", model_dir, train)
    _timed(seconds, "fit", factors_dir, lambda: fit_factors(model_dir, corpus_dir, factors_dir,
                                                          FactorArgs(batch_size=32, progress=progress)))
    _timed(seconds, "index", index_dir, lambda: build_index(model_dir, factors_dir, corpus_dir, index_dir,
                                                          IndexArgs(sketch_size=settings.sketch_size, batch_size=32, progress=progress)))
    return Setup(cache_dir, model_dir, corpus_dir, factors_dir, index_dir, all_queries[settings.warmup:],
                 all_queries[: settings.warmup], seconds)


def exact_scores(setup: Setup, queries: list[Query], corpus_dir: Path, name: str) -> tuple[np.ndarray, float]:
    """(queries, sequences) exact EK-FAC scores from one pass over the corpus; cached per query set."""
    key = hashlib.blake2b(json.dumps([dataclasses.asdict(q) for q in queries]).encode(), digest_size=6).hexdigest()
    path = setup.dir / f"exact_{name}_{key}.npy"
    if path.exists():
        return np.load(path), float(read_json(path.with_suffix(".json"))["seconds"])
    start = time.perf_counter()
    result = compute_scores(setup.model_dir, setup.factors_dir, corpus_dir, queries,
                            ScoreArgs(per_module=False, per_token=False, batch_size=32, progress=False))
    seconds = time.perf_counter() - start
    assert np.array_equal(result.seq_ids, np.arange(result.scores.shape[1])), "seq ids are row positions"
    np.save(path, result.scores)
    write_json(path.with_suffix(".json"), {"seconds": seconds})
    return result.scores, seconds


def synthetic_index(setup: Setup, settings: Settings, out_dir: Path) -> dict:
    """The real index's rows plus Gaussian rows matching their mean and covariance, up to `large_n` rows.

    The synthetic rows' doc-table entries point at seeded random real sequences, so a synthetic candidate is
    re-ranked like a real one. Written as an index directory the QueryEngine opens unchanged.
    """
    info_path = out_dir / "synthetic.json"
    if info_path.exists():
        return read_json(info_path)
    start = time.perf_counter()
    manifest = read_manifest(setup.index_dir, "index")
    real = np.concatenate(list(iterate_shard_sketches(setup.index_dir, manifest["num_shards"])))  # (n, d)
    n, d = real.shape
    extra = settings.large_n - n
    mean = real.mean(0, dtype=np.float64)
    centered = real.astype(np.float64) - mean
    cov = centered.T @ centered / (n - 1)  # (d, d)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    factor = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))).astype(np.float32)  # cov = factor @ factor.T
    rng = np.random.default_rng(settings.seed + 1)
    index = faiss.IndexFlatIP(d)
    index.add(np.ascontiguousarray(real))
    for startrow in range(0, extra, 16384):
        rows = min(16384, extra - startrow)
        z = rng.standard_normal((rows, d), dtype=np.float32)
        index.add(np.ascontiguousarray(z @ factor.T + mean.astype(np.float32)))
    out_dir.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out_dir / INDEX_NAME))
    docs = load_doc_table(setup.index_dir)
    pick = rng.integers(0, n, size=extra)
    synthetic = docs.take(pa.array(pick))
    synthetic = synthetic.set_column(synthetic.schema.get_field_index("index_id"), "index_id",
                                     pa.array(np.arange(n, n + extra, dtype=np.int64)))
    write_parquet(out_dir / DOCS_NAME, pa.concat_tables([docs, synthetic]).combine_chunks())
    meta = read_json(setup.index_dir / INDEX_META_NAME)
    write_json(out_dir / INDEX_META_NAME, {**meta, "ntotal": n + extra, "shard_rows": [n + extra], "num_shards": 1,
                                           "synthetic_rows": extra})
    info = {"real_rows": n, "synthetic_rows": extra, "dim": d, "seconds": time.perf_counter() - start,
            "method": "real sketches + Gaussian rows N(mean, cov) of the real sketches (full-rank covariance, seeded); "
                      "synthetic doc-table rows point at uniformly drawn real sequences (duplicates of real seq ids)",
            "real_mean_norm": float(np.linalg.norm(mean)), "real_trace_cov": float(np.trace(cov))}
    write_json(out_dir / MANIFEST_NAME, {**manifest, "num_sequences": n + extra, "synthetic": info})
    write_json(info_path, info)
    return info


def subset_corpus(setup: Setup, settings: Settings) -> tuple[Path, Path, np.ndarray, dict]:
    """A corpus of whole documents holding ~peer_docs sequences (seeded), its engine index, and the map
    subset row -> full-corpus seq id."""
    sub_dir = setup.dir / f"subset_{settings.peer_docs}"
    corpus_dir, index_dir = sub_dir / "corpus", sub_dir / index_name(IndexArgs().sketch, settings.sketch_size)
    sequences, _ = load_sequences(setup.corpus_dir)
    seconds: dict = {}

    def build_corpus() -> None:
        import pyarrow.parquet as pq

        documents = pq.read_table(setup.dir / "documents.parquet")
        per_doc: dict[str, int] = {}
        for doc_id in sequences["doc_id"].to_pylist():
            per_doc[doc_id] = per_doc.get(doc_id, 0) + 1
        order = np.random.default_rng(settings.seed + 2).permutation(documents.num_rows)
        doc_ids, chosen, total = documents["doc_id"].to_pylist(), [], 0
        for row in order.tolist():
            if total >= settings.peer_docs:
                break
            chosen.append(row)
            total += per_doc.get(doc_ids[row], 0)
        write_parquet(sub_dir / "documents.parquet", documents.take(pa.array(sorted(chosen))))
        prepare_corpus(sub_dir / "documents.parquet", setup.model_dir, corpus_dir,
                       CorpusArgs(max_length=settings.seq_tokens, min_tokens=MIN_TOKENS), progress=False)

    _timed(seconds, "corpus", corpus_dir, build_corpus)
    _timed(seconds, "index", index_dir, lambda: build_index(setup.model_dir, setup.factors_dir, corpus_dir, index_dir,
                                                          IndexArgs(sketch_size=settings.sketch_size, batch_size=32, progress=False)))
    sub, _ = load_sequences(corpus_dir)
    full = {(d, c): s for d, c, s in zip(sequences["doc_id"].to_pylist(), sequences["chunk"].to_pylist(), sequences["seq_id"].to_pylist())}
    mapping = np.asarray([full[(d, c)] for d, c in zip(sub["doc_id"].to_pylist(), sub["chunk"].to_pylist())], dtype=np.int64)
    return corpus_dir, index_dir, mapping, seconds


# --------------------------------------------------------------------------- measurements


def percentiles(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)), "mean": float(values.mean()),
            "min": float(values.min()), "max": float(values.max()), "n": int(values.size)}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    value = spearmanr(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)).statistic
    return float(value) if np.isfinite(value) else float("nan")


def exact_top(scores: np.ndarray, k: int, sign: str) -> np.ndarray:
    """Row positions of the k most positive (+) or most negative (-) scores, best first."""
    order = np.argsort(-scores if sign == "+" else scores, kind="stable")
    return order[:k]


@dataclasses.dataclass
class Config:
    """One way of running a query: an engine, its arguments, an optional patch (see `patched`) and thread count."""

    engine: QueryEngine
    args: QueryArgs
    patch: dict = dataclasses.field(default_factory=dict)
    threads: Optional[int] = None

    @contextlib.contextmanager
    def applied(self):
        with patched(self.engine, **self.patch), (thread_count(self.threads) if self.threads else contextlib.nullcontext()):
            yield


def time_interleaved(configs: dict[str, Config], queries: list[Query], warmup: list[Query]) -> tuple[dict, dict]:
    """Latency of one query at a time under each config, query by query in turn (so that the load of a shared
    machine drifts alike over every config): wall-clock of `engine.query([q])` and the engine's stage seconds."""
    for config in configs.values():
        with config.applied():
            for query in warmup:
                config.engine.query([query], config.args)
    wall = {name: [] for name in configs}
    results: dict[str, list] = {name: [] for name in configs}
    for query in queries:
        for name, config in configs.items():
            with config.applied():
                tick = time.perf_counter()
                (result,) = config.engine.query([query], config.args)
                wall[name].append(time.perf_counter() - tick)
            results[name].append(result)
    summaries = {}
    for name in configs:
        stages = {stage: percentiles([r.seconds[stage] for r in results[name]]) for stage in ("gradient", "search", "rerank", "total")}
        summaries[name] = {"wall": percentiles(wall[name]), "stages": stages,
                           "candidates_reranked": percentiles([r.num_candidates for r in results[name]]),
                           "load_average": list(os.getloadavg())}
    return summaries, results


def time_queries(engine: QueryEngine, queries: list[Query], warmup: list[Query], args: QueryArgs) -> tuple[dict, list]:
    summaries, results = time_interleaved({"only": Config(engine, args)}, queries, warmup)
    return summaries["only"], results["only"]


def rerank_agreement(results: list, exact: np.ndarray, top_k: int, seq_map: Optional[np.ndarray] = None) -> dict:
    """Returned documents vs the exact scan: recall@k per sign, score error, Spearman over the returned docs."""
    recalls = {"+": [], "-": []}
    rel_errors, rhos = [], []
    for qi, result in enumerate(results):
        row = exact[qi] if seq_map is None else exact[qi][seq_map]
        returned, exact_of_returned = [], []
        for sign in "+-":
            docs = [d for d in result.documents if d.sign == sign]
            truth = set(exact_top(row, top_k, sign).tolist())
            recalls[sign].append(len(truth & {d.seq_id for d in docs}) / top_k)
            returned += [d.score for d in docs]
            exact_of_returned += [row[d.seq_id] for d in docs]
        returned, exact_of_returned = np.asarray(returned), np.asarray(exact_of_returned)
        scale = np.abs(row).max()
        rel_errors.append(float(np.abs(returned - exact_of_returned).max() / scale))
        rhos.append(spearman(returned, exact_of_returned))
    return {"recall_at_k": {s: float(np.mean(v)) for s, v in recalls.items()}, "k": top_k,
            "max_abs_error_over_max_abs_score": float(max(rel_errors)), "spearman_rerank_vs_exact": float(np.nanmean(rhos)),
            "spearman_rerank_vs_exact_min": float(np.nanmin(rhos))}


def candidate_recall(engine: QueryEngine, queries: list[Query], exact: np.ndarray, depths: tuple, top_k: int) -> dict:
    """Recall@k of the exact top-k after candidates (index or BM25) + the exact re-rank, per sign and depth.

    The re-rank is exact, so the re-ranked top-k holds every exact top-k document that is a candidate; it is
    formed here as the top-k by exact score within the candidates (what the engine returns, see the
    `engine_runs` check that compares real engine results).
    """
    scorer = engine.scorer
    gradients = scorer.query_gradients(scorer.tokenize(queries))
    sketches = engine.sketcher.sketch_gradients(gradients).numpy()  # (queries, dim)
    depth_max = min(max(depths), exact.shape[1])
    q = len(queries)
    _, top_ids = search_index(engine.index, np.concatenate([sketches, -sketches]), depth_max)
    pools = {"index": {"+": engine.seq_ids[top_ids[:q]], "-": engine.seq_ids[top_ids[q:]]}}
    bm25 = np.stack(engine._bm25_candidates(queries, depth_max))  # the engine's own BM25 generator (same pool for both signs)
    pools["bm25"] = {"+": bm25, "-": bm25}
    recall: dict = {}
    for generator, by_sign in pools.items():
        recall[generator] = {}
        for sign in "+-":
            recall[generator][sign] = {}
            for depth in depths:
                values = []
                for qi in range(q):
                    candidates = by_sign[sign][qi][:depth]
                    within = candidates[exact_top(exact[qi][candidates], top_k, sign)]
                    values.append(len(set(within.tolist()) & set(exact_top(exact[qi], top_k, sign).tolist())) / top_k)
                recall[generator][sign][str(depth)] = float(np.mean(values))
    # raw sketch scores vs exact, over every document and over each query's top candidates
    manifest = read_manifest(engine.index_dir, "index")
    all_sketches = np.concatenate(list(iterate_shard_sketches(engine.index_dir, manifest["num_shards"])))  # (n, d), seq order
    sketch_scores = sketches.astype(np.float64) @ all_sketches.T.astype(np.float64)  # (queries, n)
    rho_all = [spearman(sketch_scores[i], exact[i]) for i in range(q)]
    pool_depth = min(200, depth_max)
    rho_pool = []
    for i in range(q):
        pool = np.unique(np.concatenate([pools["index"]["+"][i][:pool_depth], pools["index"]["-"][i][:pool_depth]]))
        rho_pool.append(spearman(sketch_scores[i][pool], exact[i][pool]))
    return {"recall_at_k": recall, "k": top_k, "depths": list(depths),
            "spearman_sketch_vs_exact_all_docs": percentiles(rho_all),
            f"spearman_sketch_vs_exact_index_candidates_depth{pool_depth}": percentiles(rho_pool),
            "sketch_scores_are": "<sketch(q), sketch(z)> from the stored sketches (an unbiased estimate of the exact score)"}


def sketch_difficulty(engine: QueryEngine, queries: list[Query], exact: np.ndarray, top_k: int) -> dict:
    """Why some exact top documents are hard to find from sketches: their cosine with the query in the whitened
    space (score / (||W(q)|| ||W(z)||)) against a sketch's noise per unit norm, 1/sqrt(dim); and how isotropic the
    whitened gradients are (sum of Lambda / (Lambda + lambda) over the whitened dimension D: near 1, no subset of
    coordinates holds most of the variance)."""
    _, query_norms = engine.sketcher.sketch_gradients_with_norms(engine.scorer.query_gradients(engine.scorer.tokenize(queries)))
    document_norms = np.empty(len(engine.seq_ids))
    document_norms[engine.seq_ids] = engine.document_norms  # by seq id, the columns of `exact`
    cosine = exact / np.multiply.outer(query_norms, document_norms)
    factors = engine.scorer.factors.modules
    ratio = sum(float((f.eigenvalues / (f.eigenvalues + f.damping)).sum()) for f in factors.values())
    width = sum(f.eigenvalues.numel() for f in factors.values())
    return {"median_cosine_of_exact_top_k": {sign: percentiles([float(np.median(cosine[i][exact_top(exact[i], top_k, sign)]))
                                                                 for i in range(len(queries))]) for sign in "+-"},
            "sketch_noise_per_unit_norm": 1.0 / math.sqrt(engine.sketcher.dim),
            "sum_ratio_over_whitened_dim": ratio / width, "whitened_dim": width,
            "note": sketch_difficulty.__doc__.replace("\n    ", " ")}


def other_sketches(setup: Setup, settings: Settings, exact: np.ndarray) -> dict:
    """Candidate recall of indexes built with the other sketch methods (same model, factors, corpus and queries)."""
    if "sketch" not in {f.name for f in dataclasses.fields(IndexArgs)}:
        return {}
    results = {}
    for method in settings.compare_sketches:
        if method == IndexArgs().sketch:
            continue
        index_dir = setup.dir / index_name(method, settings.sketch_size)
        seconds: dict = {}
        _timed(seconds, "index", index_dir, lambda: build_index(setup.model_dir, setup.factors_dir, setup.corpus_dir, index_dir,
                                                              IndexArgs(sketch=method, sketch_size=settings.sketch_size,
                                                                        batch_size=32, progress=False)))
        engine = QueryEngine(index_dir, QueryArgs(top_k=settings.top_k, progress=False))
        recall = candidate_recall(engine, setup.queries, exact, tuple(d for d in settings.recall_depths if d <= exact.shape[1]),
                                  settings.top_k)
        results[method] = {"recall_at_k": recall["recall_at_k"]["index"], "build": seconds["index"],
                           **{k: v for k, v in recall.items() if k.startswith("spearman")}}
    return results


def profile_queries(engine: QueryEngine, queries: list[Query], args: QueryArgs, top: int = 25) -> dict:
    """cProfile of `engine.query` over a few queries: the functions with the most cumulative and own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for query in queries:
        engine.query([query], args)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = max(stats.total_tt, 1e-9)
    rows = []
    for (filename, line, name), (cc, nc, tt, ct, _) in stats.stats.items():
        short = filename.replace(str(ROOT) + "/", "")
        short = short[short.find("site-packages/") + 14:] if "site-packages/" in short else short
        rows.append({"function": f"{short}:{line}({name})", "calls_per_query": nc / len(queries),
                     "own_s_per_query": tt / len(queries), "cumulative_s_per_query": ct / len(queries)})
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(30)
    return {"queries": len(queries), "profiled_seconds_per_query": total / len(queries),
            "top_cumulative": sorted(rows, key=lambda r: -r["cumulative_s_per_query"])[:top],
            "top_own": sorted(rows, key=lambda r: -r["own_s_per_query"])[:top]}


@contextlib.contextmanager
def patched(engine: QueryEngine, batch_size: Optional[int] = None):
    """Temporarily change this engine instance (not the library) to time a proposed change."""
    saved_args = engine.args
    if batch_size:  # QueryEngine._score reads the constructor's args.batch_size, not the per-call one
        engine.args = dataclasses.replace(engine.args, batch_size=batch_size)
    try:
        yield
    finally:
        engine.args = saved_args


def latency_variants(engine: QueryEngine, queries: list[Query], warmup: list[Query], args: QueryArgs, thread_variant: bool) -> dict:
    """The same queries under other settings of the query path that could make it faster."""
    configs = {"baseline": Config(engine, args), "per_token_false": Config(engine, dataclasses.replace(args, per_token=False)),
               "rerank_batch_size_32": Config(engine, args, {"batch_size": 32}),
               "rerank_batch_size_64": Config(engine, args, {"batch_size": 64}),
               "adaptive_false": Config(engine, dataclasses.replace(args, adaptive=False))}
    variants, _ = time_interleaved(configs, queries, warmup)
    if thread_variant and torch.get_num_threads() != os.cpu_count():
        # torch's default thread count, on fewer queries: on a loaded machine it can be many times slower
        threads = {f"torch_threads_{t}_first_{THREAD_QUERIES}_queries": Config(engine, args, threads=t)
                   for t in (torch.get_num_threads(), os.cpu_count())}
        variants.update(time_interleaved(threads, queries[:THREAD_QUERIES], warmup)[0])
    return variants


# --------------------------------------------------------------------------- peers


def run_kronfluence_peer(setup: Setup, settings: Settings, queries: list[Query], corpus_dir: Path) -> dict:
    """Kronfluence's EK-FAC fit (excluded) and pairwise scoring (timed) of `queries` over the corpus."""
    from benchmarks.kronfluence_peer import run_kronfluence

    tokenizer = load_tokenizer(setup.model_dir)
    sequences, _ = load_sequences(corpus_dir)
    modules = read_manifest(setup.factors_dir, "factors")["modules"]
    tokenized = [tokenize_query(q, tokenizer) for q in queries]
    work = Path(tempfile.mkdtemp(prefix="kronfluence_", dir=setup.dir))
    try:
        load_before = list(os.getloadavg())
        out = run_kronfluence(str(setup.model_dir), sequences["input_ids"].to_pylist(),
                              [(t.prompt_ids, t.completion_ids) for t in tokenized], modules, strategy="ekfac",
                              batch_size=8, work_dir=str(work), seed=settings.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"status": "ok", "version": out["kronfluence_version"], "docs": sequences.num_rows, "queries_scored": len(queries),
            "fit_seconds_excluded": out["fit_seconds"], "score_seconds": out["score_seconds"],
            "score_seconds_per_query": out["score_seconds"] / len(queries),
            "load_average": {"before": load_before, "after": list(os.getloadavg())}}


def time_repeated(configs: dict[str, Config], queries: list[Query], reps: int) -> dict[str, list[float]]:
    """Wall-clock of each config on the same queries, `reps` rounds, configs in turn."""
    walls: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(reps):
        for query in queries:
            for name, config in configs.items():
                with config.applied():
                    tick = time.perf_counter()
                    config.engine.query([query], config.args)
                    walls[name].append(time.perf_counter() - tick)
    return walls


def compare_kronfluence(kron: dict, before: dict, after: dict, candidates: int) -> dict:
    """Kronfluence's time per query vs the engine's on the same queries, timed just before and after it.

    Kronfluence scores a query with a pass over every training sequence, so its time grows linearly with the
    corpus: it is measured over the real corpus and extrapolated to the large index size (time per
    document x documents; that also scales its fixed per-call overhead, which overstates it slightly).
    """
    engine = {name: float(np.median(before[name] + after[name])) for name in before}
    measured_at = str(kron["docs"])
    per_doc = kron["score_seconds_per_query"] / kron["docs"]
    extrapolated = {size: {"kronfluence_seconds_per_query": per_doc * int(size), "engine_seconds": seconds,
                           "ratio": per_doc * int(size) / seconds}
                    for size, seconds in engine.items() if size != measured_at}
    return {**kron, "engine_seconds_same_queries": {"docs": kron["docs"], "seconds": engine[measured_at], "candidates_per_sign": candidates,
                                                    "before": before[measured_at], "after": after[measured_at]},
            "ratio_measured": kron["score_seconds_per_query"] / engine[measured_at],
            "extrapolated": extrapolated, "extrapolated_engine_candidates_per_sign": candidates,
            "engine_seconds_before_after": {"before": before, "after": after},
            "note": compare_kronfluence.__doc__.split("\n\n")[1].replace("\n    ", " ").strip()}


def run_bergson_peer(setup: Setup, settings: Settings, queries: list[Query], warmup: list[Query], corpus_dir: Path,
                     site: Path, exact_subset: np.ndarray, engine: dict, timeout: int) -> dict:
    if not (site / "bergson").is_dir():
        return {"status": "skipped", "reason": f"bergson is not installed in {site}; see this script's docstring for the install command"}
    tokenizer = load_tokenizer(setup.model_dir)
    sequences, _ = load_sequences(corpus_dir)
    work = Path(tempfile.mkdtemp(prefix="bergson_", dir=setup.dir))
    try:
        spec = {"site": str(site), "threads": torch.get_num_threads(), "model_dir": str(setup.model_dir), "work_dir": str(work),
                "out_dir": str(work), "module_regex": r"\.mlp\.", "projection_dim": settings.bergson_projection,
                "token_batch_size": 16 * settings.seq_tokens, "sequences": sequences["input_ids"].to_pylist(),
                "queries": [[t.prompt_ids, t.completion_ids] for t in (tokenize_query(q, tokenizer) for q in [*warmup, *queries])],
                "warmup": len(warmup), "top_k": settings.top_k}
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true", "HF_HUB_OFFLINE": "1"}
        start = time.perf_counter()
        try:
            completed = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--bergson-worker", str(spec_path)],
                                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"the Bergson subprocess ran past {timeout}s"}
        wall = time.perf_counter() - start
        result_path = work / "result.json"
        if not result_path.exists():
            return {"status": "failed", "reason": f"the Bergson subprocess exited {completed.returncode} without a result",
                    "stderr_tail": completed.stderr[-3000:]}
        worker = json.loads(result_path.read_text())
        if worker["status"] != "ok":
            return {"status": "failed", "reason": worker.get("error"), "stage": worker.get("stage"),
                    "traceback": worker.get("traceback"), "stderr_tail": completed.stderr[-2000:]}
        variants = {}
        for name, variant in worker["variants"].items():
            scores = np.load(work / f"scores_{name}.npy")  # (timed queries, docs)
            variants[name] = {
                "latency": {k: percentiles(v) for k, v in variant["timings"].items()},
                "faiss_build_seconds": variant["faiss_build_seconds"], "faiss_bytes_per_doc": variant["faiss_bytes_per_doc"],
                "agreement_with_exact_ekfac": agreement(scores, exact_subset, settings.top_k),
            }
        return {"status": "ok", "versions": worker["versions"], "docs": len(spec["sequences"]), "subprocess_wall_seconds": wall,
                "store_build_seconds": worker["build_seconds"], "store_bytes_per_doc": worker["store_bytes_per_doc"],
                "projection": f"per module {settings.bergson_projection} x {settings.bergson_projection} (Bergson's "
                              "double-sided random projection), float32, no preconditioner (Bergson cannot apply EK-FAC "
                              "with projection or FAISS)",
                "tracked_modules": worker["tracked_modules"], "variants": variants,
                "engine_same_subset": engine,
                "query": "Bergson query = query gradient (TraceCollector hooks, projection) + FAISS Flat search for the top-k "
                         "positive; timings exclude model/index loading and warm-up"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def agreement(scores: np.ndarray, exact: np.ndarray, top_k: int) -> dict:
    """A method's full score matrix vs the exact EK-FAC one: recall@k of the exact top-k per sign, Spearman."""
    recall = {s: float(np.mean([len(set(exact_top(a, top_k, s).tolist()) & set(exact_top(b, top_k, s).tolist())) / top_k
                                for a, b in zip(scores, exact)])) for s in "+-"}
    rho = [spearman(a, b) for a, b in zip(scores, exact)]
    return {"recall_at_k": recall, "k": top_k, "spearman_all_docs": percentiles(rho)}


# --------------------------------------------------------------------------- run


def _version(name: str) -> Optional[str]:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    names = ("torch", "transformers", "faiss-cpu", "numpy", "kronfluence", "bm25s", "scipy", "chatterbot-corpus")
    return {"platform": platform.platform(), "cpu": cpu or platform.processor(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
            "load_average_at_start": list(os.getloadavg()), "versions": {n: _version(n) for n in names},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


@contextlib.contextmanager
def thread_count(threads: int):
    """torch intra-op and FAISS OpenMP threads inside the block."""
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())


def run(settings: Settings, peers: list[str], work_dir: Path, bergson_site: Path, progress: bool) -> dict:
    started, info = time.perf_counter(), machine()
    cache_dir = work_dir / f"query_latency-{settings.cache_key()}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    setup = prepare_setup(settings, cache_dir, progress)
    sequences, corpus_manifest = load_sequences(setup.corpus_dir)
    n = sequences.num_rows
    LOG.info("corpus: %d sequences; exact scores for %d queries", n, len(setup.queries))
    exact, exact_seconds = exact_scores(setup, setup.queries, setup.corpus_dir, "full")
    timings: dict = {"build": setup.build_seconds, "exact_scan_seconds": exact_seconds}

    # 1: latency at the real size and at the large size (synthetic rows), interleaved query by query
    large_dir = cache_dir / f"{index_name(IndexArgs().sketch, settings.sketch_size)}_synthetic_{settings.large_n}"
    LOG.info("synthetic index of %d rows", settings.large_n)
    synthetic = synthetic_index(setup, settings, large_dir)
    base_args = QueryArgs(top_k=settings.top_k, progress=False)
    start = time.perf_counter()
    engine = QueryEngine(setup.index_dir, base_args)
    timings["engine_load_seconds_real"] = time.perf_counter() - start
    start = time.perf_counter()
    large = QueryEngine(large_dir, base_args)
    timings["engine_load_seconds_large"] = time.perf_counter() - start
    latency: dict = {str(n): {}, str(settings.large_n): {}}
    engine_runs: dict = {}
    for depth in settings.latency_depths:
        LOG.info("latency at %d and %d rows, %d candidates per sign", n, settings.large_n, depth)
        args = dataclasses.replace(base_args, candidates=depth)
        summaries, results = time_interleaved({str(n): Config(engine, args), str(settings.large_n): Config(large, args)},
                                              setup.queries, setup.warmup)
        for size, summary in summaries.items():
            latency[size][str(depth)] = summary
        engine_runs[str(depth)] = rerank_agreement(results[str(n)], exact, settings.top_k)

    # 2: quality against the exact scan
    LOG.info("candidate recall (index, bm25)")
    start = time.perf_counter()
    quality = candidate_recall(engine, setup.queries, exact, tuple(d for d in settings.recall_depths if d <= n), settings.top_k)
    quality["engine_runs"] = engine_runs
    quality["difficulty"] = sketch_difficulty(engine, setup.queries, exact, settings.top_k)
    quality["sketch"] = read_manifest(setup.index_dir, "index")["args"].get("sketch", "kronecker")
    quality["other_sketches"] = other_sketches(setup, settings, exact)
    timings["recall_seconds"] = time.perf_counter() - start
    real_bytes = {"index_faiss": (setup.index_dir / INDEX_NAME).stat().st_size / n,
                  "doc_table": (setup.index_dir / DOCS_NAME).stat().st_size / n,
                  "sketch_shards_kept_for_resume": sum(dir_bytes(p) for p in setup.index_dir.glob("sketch_shard_*")) / n}
    sketch_dim = engine.sketcher.dim

    # what dominates at the large size (at the engine's default depth), and what other settings would save
    default_depth = QueryArgs().candidates
    LOG.info("profiling %d queries at %d rows", settings.profile_queries, settings.large_n)
    profile = profile_queries(large, setup.queries[: settings.profile_queries], dataclasses.replace(base_args, candidates=default_depth))
    profile["settings"] = {"rows": settings.large_n, "candidates": default_depth, "per_token": base_args.per_token}
    LOG.info("latency variants at %d rows", settings.large_n)
    variants = latency_variants(large, setup.queries[: settings.variant_queries], setup.warmup[:1],
                                dataclasses.replace(base_args, candidates=default_depth), settings.thread_variant)
    # 3 peers on a subset
    peer_results: dict = {}
    if peers:
        LOG.info("peers on a subset of ~%d sequences", settings.peer_docs)
        sub_corpus, sub_index, seq_map, sub_seconds = subset_corpus(setup, settings)
        timings["subset_build"] = sub_seconds
        exact_sub = exact[:, seq_map]
        sub = QueryEngine(sub_index, base_args)
        args = dataclasses.replace(base_args, candidates=min(settings.peer_depth or base_args.candidates, len(seq_map)))
        engine_sub, results = time_queries(sub, setup.queries, setup.warmup, args)
        engine_sub["agreement_with_exact_ekfac"] = rerank_agreement(results, exact_sub, settings.top_k)
        engine_sub["candidates_per_sign"] = args.candidates
        engine_sub["docs"] = len(seq_map)
        engine_sub["bytes_per_doc"] = {"index_faiss": (sub_index / INDEX_NAME).stat().st_size / len(seq_map),
                                       "doc_table": (sub_index / DOCS_NAME).stat().st_size / len(seq_map)}
        # the engine's sketches alone (no re-rank), the analogue of a Bergson query: top-k by sketch score
        sketch = candidate_recall(sub, setup.queries, exact_sub, (settings.top_k,), settings.top_k)
        gradient_and_search = [g + s for g, s in zip(*([r.seconds[k] for r in results] for k in ("gradient", "search")))]
        sketch_wall, sketch_results = time_queries(sub, setup.queries, setup.warmup, dataclasses.replace(base_args, rerank=False))
        engine_sub["sketch_only"] = {
            "query_rerank_false": {"wall": sketch_wall["wall"], "agreement_with_exact_ekfac": rerank_agreement(sketch_results, exact_sub, settings.top_k),
                                   "note": "engine.query with QueryArgs(rerank=False): the top sketch scores, no re-rank"},
            "recall_at_k": {sign: sketch["recall_at_k"]["index"][sign][str(settings.top_k)] for sign in "+-"},
            "spearman_all_docs": sketch["spearman_sketch_vs_exact_all_docs"],
            "gradient_plus_search_seconds": percentiles(gradient_and_search),
            "bm25_recall_at_k": {sign: sketch["recall_at_k"]["bm25"][sign][str(settings.top_k)] for sign in "+-"}}
        if "kronfluence" in peers:
            # Kronfluence over the whole real corpus; the engine (default settings) on exactly the queries it scores,
            # at the real and the large size, just before and just after it (the load drifts)
            default_args = dataclasses.replace(base_args, candidates=QueryArgs().candidates)
            bracket = {str(n): Config(engine, default_args), str(settings.large_n): Config(large, default_args)}
            kron_queries = setup.queries[: settings.kronfluence_queries]
            before = time_repeated(bracket, kron_queries, reps=3)
            LOG.info("kronfluence over %d sequences", n)
            try:
                kron = run_kronfluence_peer(setup, settings, kron_queries, setup.corpus_dir)
                after = time_repeated(bracket, kron_queries, reps=3)
                peer_results["kronfluence"] = compare_kronfluence(kron, before, after, default_args.candidates)
            except Exception as exc:  # a peer failing is a result to report
                peer_results["kronfluence"] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                                               "traceback": traceback.format_exc(limit=8)}
        if "bergson" in peers:
            LOG.info("bergson (subprocess)")
            peer_results["bergson"] = run_bergson_peer(setup, settings, setup.queries, setup.warmup, sub_corpus, bergson_site,
                                                       exact_sub, {"latency_p50": engine_sub["wall"]["p50"]}, timeout=1500)
        peer_results["engine_same_subset"] = engine_sub

    goals = {"p50_under_1s_at_large_n": {str(d): latency[str(settings.large_n)][str(d)]["wall"]["p50"] < 1.0
                                         for d in settings.latency_depths},
             "recall_at_k_ge_0.95_engine_runs": {d: {sign: r["recall_at_k"][sign] >= 0.95 for sign in "+-"}
                                                 for d, r in engine_runs.items()}}
    kron = peer_results.get("kronfluence", {})
    if kron.get("status") == "ok":
        goals["kronfluence_100x_slower"] = {f"at_{kron['docs']}_measured": kron["ratio_measured"] >= 100,
                                            **{f"at_{size}_extrapolated": e["ratio"] >= 100 for size, e in kron["extrapolated"].items()}}
    del engine, large
    gc.collect()
    return {
        "benchmark": "query latency and retrieval quality (issue 7)",
        "quick": settings == QUICK or settings.num_sequences < 1000,
        "settings": dataclasses.asdict(settings),
        "corpus": {"source": "chatterbot-corpus conversations, re-rendered with turn formats " + repr(TURN_FORMATS)
                             + " and packed within a topic into documents of >= seq_tokens/2 tokens, then chunked",
                   "languages": list(settings.languages), "num_documents": corpus_manifest["num_documents"],
                   "num_sequences": n, "num_tokens": corpus_manifest["num_tokens"],
                   "tokens_per_sequence": percentiles(sequences["num_tokens"].to_numpy()),
                   "sequences_per_lang": {k: int(v) for k, v in zip(*np.unique(sequences["lang"].to_numpy(zero_copy_only=False), return_counts=True))}},
        "model": {"architecture": "llama", "hidden": settings.hidden, "layers": settings.layers, "heads": settings.heads,
                  "intermediate": settings.intermediate, "context": settings.context, "vocab_size": settings.vocab_size,
                  "tracked_modules": read_manifest(setup.factors_dir, "factors")["modules"],
                  "training": {k: v for k, v in read_json(setup.model_dir / "training.json").items() if k != "losses"}},
        "index": {"sketch": read_manifest(setup.index_dir, "index")["args"].get("sketch", "kronecker"),
                  "sketch_size": settings.sketch_size, "sketch_dim": sketch_dim, "factory": "Flat", "bytes_per_doc": real_bytes},
        "synthetic_large_index": synthetic,
        "queries": [dataclasses.asdict(q) for q in setup.queries],
        "latency": latency,
        "latency_variants_at_large_n": {"rows": settings.large_n, "candidates": default_depth, "variants": variants,
                                        "note": "the first variant_queries queries under each setting or patched copy of the "
                                                "query path (the library is not changed); baseline = the same queries unpatched"},
        "latency_note": "wall = engine.query([one query]) end to end (tokenise, query gradient, search, exact re-rank with "
                        "per-module and per-token breakdowns, result objects); stages = the engine's own seconds. "
                        f"The {settings.large_n}-row index is the real {n} sketches plus synthetic Gaussian rows (see "
                        "synthetic_large_index): it stands in for the corpus part of the cost (the search); the re-rank "
                        "scores real sequences.",
        "quality": quality,
        "profile_large_n": profile,
        "peers": peer_results,
        "goals": goals,
        "timings": {**timings, "total_seconds": time.perf_counter() - started},
        "machine": {**info, "load_average_at_end": list(os.getloadavg())},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = ["### Latency of one query (seconds)", "",
             "| docs | candidates/sign | p50 | p95 | gradient p50 | search p50 | rerank p50 | reranked docs p50 |",
             "|---|---|---|---|---|---|---|---|"]
    for docs, by_depth in result["latency"].items():
        for depth, r in by_depth.items():
            st = r["stages"]
            lines.append(f"| {int(docs):,} | {depth} | {r['wall']['p50']:.3f} | {r['wall']['p95']:.3f} | {st['gradient']['p50']:.3f} | "
                         f"{st['search']['p50']:.3f} | {st['rerank']['p50']:.3f} | {r['candidates_reranked']['p50']:.0f} |")
    lv = result["latency_variants_at_large_n"]
    lines += ["", f"Variants at {lv['rows']:,} rows, {lv['candidates']} candidates/sign, first {s['variant_queries']} queries:", "",
              "| variant | p50 | p95 | gradient p50 | search p50 | rerank p50 | reranked docs p50 |", "|---|---|---|---|---|---|---|"]
    for name, r in lv["variants"].items():
        lines.append(f"| {name} | {r['wall']['p50']:.3f} | {r['wall']['p95']:.3f} | "
                     f"{r['stages']['gradient']['p50']:.3f} | {r['stages']['search']['p50']:.3f} | {r['stages']['rerank']['p50']:.3f} | "
                     f"{r['candidates_reranked']['p50']:.0f} |")
    q = result["quality"]
    k = q["k"]
    others = q.get("other_sketches", {})
    lines += ["", f"### Recall@{k} of the exact top-{k} after candidates + exact re-rank ({result['corpus']['num_sequences']:,} docs)", "",
              f"| candidates/sign | index ({q['sketch']}) + | index ({q['sketch']}) − | "
              + "".join(f"index ({m}) + | index ({m}) − | " for m in others) + "BM25 + | BM25 − |",
              "|---|---|---|" + "---|---|" * len(others) + "---|---|"]
    for depth in q["depths"]:
        r, d = q["recall_at_k"], str(depth)
        other = "".join(f"{o['recall_at_k']['+'][d]:.3f} | {o['recall_at_k']['-'][d]:.3f} | " for o in others.values())
        lines.append(f"| {depth} | {r['index']['+'][d]:.3f} | {r['index']['-'][d]:.3f} | {other}"
                     f"{r['bm25']['+'][d]:.3f} | {r['bm25']['-'][d]:.3f} |")
    runs = q["engine_runs"]
    lines += ["", "Engine runs: " + "; ".join(
        f"depth {d}: recall +{r['recall_at_k']['+']:.2f}/−{r['recall_at_k']['-']:.2f}, ρ(re-ranked, exact) {r['spearman_rerank_vs_exact']:.6f}, "
        f"max |err|/max|score| {r['max_abs_error_over_max_abs_score']:.1e}" for d, r in runs.items())]
    pool_key = next(key for key in q if key.startswith("spearman_sketch_vs_exact_index_candidates"))
    lines.append(f"Spearman(raw sketch score, exact), mean over queries: {q['sketch']} all docs "
                 f"{q['spearman_sketch_vs_exact_all_docs']['mean']:.3f}, its candidates {q[pool_key]['mean']:.3f}"
                 + "".join(f"; {m} all docs {o['spearman_sketch_vs_exact_all_docs']['mean']:.3f}" for m, o in others.items()) + ".")
    peers = result["peers"]
    if peers:
        e = peers["engine_same_subset"]
        lines += ["", f"### Peers on the same model, queries and a {e['docs']:,}-sequence subset", "",
                  "| system | query p50 (s) | p95 (s) | bytes/doc | recall@10 + | recall@10 − | Spearman vs exact (all docs) | notes |",
                  "|---|---|---|---|---|---|---|---|"]
        ag = e["agreement_with_exact_ekfac"]
        lines.append(f"| engine (index {e['candidates_per_sign']}/sign + exact re-rank) | {e['wall']['p50']:.3f} | {e['wall']['p95']:.3f} | "
                     f"{e['bytes_per_doc']['index_faiss']:.0f} + {e['bytes_per_doc']['doc_table']:.0f} doc table | "
                     f"{ag['recall_at_k']['+']:.2f} | {ag['recall_at_k']['-']:.2f} | exact on returned docs | |")
        so = e["sketch_only"]
        lines.append(f"| engine, rerank=False (top-{k} by sketch score) | {so['query_rerank_false']['wall']['p50']:.3f} | "
                     f"{so['query_rerank_false']['wall']['p95']:.3f} | (same index) | {so['recall_at_k']['+']:.2f} | "
                     f"{so['recall_at_k']['-']:.2f} | {so['spearman_all_docs']['mean']:.3f} | engine.query end to end |")
        kr = peers.get("kronfluence")
        if kr and kr["status"] == "ok":
            es = kr["engine_seconds_same_queries"]
            lines.append(f"| Kronfluence {kr['version']} (ekfac, full scan of {kr['docs']:,} docs) | {kr['score_seconds_per_query']:.2f} | – | "
                         f"– (no store) | 1.00 | 1.00 | (reference method) | fit {kr['fit_seconds_excluded']:.0f}s excluded; "
                         f"{kr['ratio_measured']:.0f}x the engine's {es['seconds']:.2f}s on the same query and {es['docs']:,} docs |")
            for size, e in kr["extrapolated"].items():
                lines.append(f"| Kronfluence extrapolated to {int(size):,} docs | ~{e['kronfluence_seconds_per_query']:.0f} | – | – | | | | "
                             f"linear in docs; {e['ratio']:.0f}x the engine's {e['engine_seconds']:.2f}s there "
                             f"({kr['extrapolated_engine_candidates_per_sign']}/sign, same query, same time) |")
        elif kr:
            lines.append(f"| Kronfluence | – | – | – | – | – | – | {kr['status']}: {kr.get('reason')} |")
        bg = peers.get("bergson")
        if bg and bg["status"] == "ok":
            for name, v in bg["variants"].items():
                a = v["agreement_with_exact_ekfac"]
                lines.append(f"| Bergson {bg['versions']['bergson']} ({name}, FAISS Flat) | {v['latency']['total']['p50']:.3f} | "
                             f"{v['latency']['total']['p95']:.3f} | {bg['store_bytes_per_doc']:.0f} store + {v['faiss_bytes_per_doc']:.0f} faiss | "
                             f"{a['recall_at_k']['+']:.2f} | {a['recall_at_k']['-']:.2f} | {a['spearman_all_docs']['mean']:.3f} | "
                             f"no preconditioner |")
        elif bg:
            lines.append(f"| Bergson | – | – | – | – | – | – | {bg['status']}: {bg.get('reason')} |")
    lines += ["", f"load average start {result['machine']['load_average_at_start']}, end {result['machine']['load_average_at_end']}; "
                  f"total {result['timings']['total_seconds']:.0f}s"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: about a minute")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}, or '' for none")
    parser.add_argument("--work-dir", type=Path, default=RESULTS / ".work" / "query_latency", help="cache of built artifacts")
    parser.add_argument("--bergson-site", type=Path, default=RESULTS / ".work" / "bergson_site",
                        help="pip --target directory holding bergson and faiss-gpu-cu12")
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/query_latency[_quick].json)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and FAISS threads for every system measured (default 1: on a shared 2-core machine, "
                             "2 intra-op threads make small-matrix work many times slower; the large-n run also reports "
                             "torch's default)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "kronfluence", "transformers", "indexes", "influence", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if set(peers) - set(PEERS):
        parser.error(f"unknown peers {sorted(set(peers) - set(PEERS))}; choose among {', '.join(PEERS)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    settings = QUICK if args.quick else DEFAULT
    result = run(settings, peers, args.work_dir, args.bergson_site, progress=not args.no_progress)
    out = args.out or RESULTS / ("query_latency_quick.json" if args.quick else "query_latency.json")
    write_json(out, result)
    print(markdown(result))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
