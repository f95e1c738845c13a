"""Counterfactual faithfulness: the linear datamodeling score (LDS) of every attribution method, side by side.

Protocol (Park et al. 2023, "TRAK", sec. 2; used by Kronfluence and Bae et al. 2024):

1. Data: a seeded sample of English chatterbot-corpus dialogues; `num_queries` held-out ones give the queries (their
   first exchange), `num_train_docs` others are the training documents, chunked into `context`-token sequences.
   A document's attribution is the sum of its chunks' scores.
2. Model: a tiny Llama with a seeded init saved once; the full-data model is trained from it (`train_model`,
   `epochs` epochs, one torch thread, so every run is bit-reproducible).
3. Ground truth: `num_subsets` random subsets of round(alpha x documents) documents, each retrained from the same
   init with the same recipe and `num_seeds` seeds; the measurement is each query's completion NLL (summed),
   averaged over seeds. Cached under `--work-dir`, one JSON per (subset, seed), so a killed run resumes.
4. Methods, all on the full-data model: the engine's ekfac, kfac and identity (`fit_factors` + `compute_scores`);
   the index sketch without re-rank (`build_index` + the engine's query sketch against the 4-bit store, at
   `sketch_dim`); Kronfluence ekfac (`kronfluence_peer`); TRAK (`pip install --no-deps traker`: CPU BasicProjector,
   one checkpoint). A peer that is not installed is skipped with the reason.
5. LDS of a query = Spearman over subsets of (sum of the subset's attributions, -measured NLL): every method scores
   "positive = upweighting raises log p(completion)", so a perfect method scores +1. Reported: the mean over
   queries with its standard error; `seed_agreement` (Spearman between two seeds' losses) is the noise ceiling.

    python benchmarks/lds.py              # M=64 subsets x 2 seeds: about 20 min on 2 cores (estimated; the ground truth is cached)
    python benchmarks/lds.py --quick      # tiny sizes, M=8: about a minute; writes to a temp path
    python benchmarks/lds.py --methods ekfac,trak --rescore
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import shutil
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402  (sets the environment before torch is imported)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.kronfluence_peer import kronfluence_available, run_kronfluence  # noqa: E402
from indexes.build import build_index  # noqa: E402
from indexes.engine import QueryEngine  # noqa: E402
from influence import CorpusArgs, FactorArgs, IndexArgs, InfluenceError, Query, ScoreArgs, compute_scores, fit_factors  # noqa: E402
from influence import load_sequences, prepare_corpus  # noqa: E402
from influence.artifacts import read_json, write_json, write_parquet  # noqa: E402
from influence.gradients import make_token_batch  # noqa: E402
from influence.models import describe_model, load_model, load_tokenizer  # noqa: E402
from influence.queries import tokenize_query  # noqa: E402
from jobs.demo.chatterbot import chatterbot_documents  # noqa: E402
from jobs.demo.tiny import build_model, build_tokenizer, train_model  # noqa: E402

LOG = logging.getLogger("benchmarks.lds")
METHODS = ("ekfac", "kfac", "identity", "index_sketch", "kronfluence_ekfac", "trak")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that defines a run. Fields in RUNTIME do not change the ground truth."""

    num_train_docs: int = 300
    num_queries: int = 12
    model: common.TinyLlama = common.TinyLlama(vocab_size=512, hidden=32, layers=2, heads=2, intermediate=64, context=64, seed=0)
    epochs: int = 10
    alpha: float = 0.5
    num_subsets: int = 64
    num_seeds: int = 2
    data_seed: int = 0
    subset_seed: int = 1
    sketch_dim: int = 8192
    trak_proj_dim: int = 2048
    trak_lambda: float = 0.01  # ridge on X^T X: proj_dim > sequences makes it rank-deficient otherwise

    RUNTIME = ("num_subsets", "num_seeds", "sketch_dim", "trak_proj_dim", "trak_lambda")

    def ground_truth_key(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUNTIME}
        documents, candidates = select_documents(self)
        fields.update(torch=torch.__version__, documents=documents["text"].to_pylist(), queries=candidates)
        return hashlib.blake2b(json.dumps(fields, sort_keys=True, default=str).encode(), digest_size=6).hexdigest()


DEFAULT = Settings()
QUICK = Settings(num_train_docs=40, num_queries=4, epochs=4, num_subsets=8, num_seeds=2, sketch_dim=1024, trak_proj_dim=256,
                 model=common.TinyLlama(vocab_size=300, hidden=16, layers=2, heads=2, intermediate=32, context=48, seed=0))


@dataclasses.dataclass
class Setup:
    dir: Path
    init_dir: Path
    model_dir: Path
    corpus_dir: Path
    doc_ids: list[str]
    seq_doc: np.ndarray        # (sequences,) index into doc_ids
    sequences: list[list[int]]
    queries: list[Query]


def select_documents(settings: Settings):
    """A seeded sample of English conversations: (training documents, query candidates (doc_id, prompt, completion))."""
    documents = chatterbot_documents(("english",))
    texts, candidates, train_rows = documents["text"].to_pylist(), [], []
    for row in np.random.default_rng(settings.data_seed).permutation(documents.num_rows).tolist():
        exchange = common.first_exchange(texts[row])
        if len(candidates) < 3 * settings.num_queries and exchange and sum(map(len, exchange)) <= 1.5 * settings.model.context:
            candidates.append((documents["doc_id"][row].as_py(), *exchange))
        elif len(train_rows) < settings.num_train_docs:
            train_rows.append(row)
    return documents.take(sorted(train_rows)), candidates


def train(model_dir: Path, sequences: list[list[int]], settings: Settings, seed: int) -> None:
    """`train_model` for `epochs` epochs on one thread (bit-reproducible)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = math.ceil(settings.epochs * len(sequences) / settings.model.train_batch)
        train_model(model_dir, sequences, steps=steps, lr=settings.model.lr, batch_size=settings.model.train_batch, seed=seed, progress=False)
    finally:
        torch.set_num_threads(threads)


def prepare_setup(settings: Settings, cache: Path) -> Setup:
    """Documents, tokenizer, seeded init, corpus and the trained full-data model; reused when on disk."""
    init_dir, model_dir, corpus_dir = cache / "init", cache / "model", cache / "corpus"
    documents, candidates = select_documents(settings)
    spec = settings.model
    if not (init_dir / "config.json").exists():
        tokenizer = build_tokenizer(documents["text"].to_pylist(), vocab_size=spec.vocab_size)
        shutil.rmtree(cache / ".init", ignore_errors=True)
        build_model(cache / ".init", tokenizer, "llama", seed=spec.seed, hidden=spec.hidden, layers=spec.layers, heads=spec.heads,
                    intermediate=spec.intermediate, context=spec.context)
        (cache / ".init").rename(init_dir)
    write_parquet(cache / "documents.parquet", documents)
    prepare_corpus(cache / "documents.parquet", init_dir, corpus_dir, CorpusArgs(max_length=spec.context), progress=False)
    table, _ = load_sequences(corpus_dir)
    position = {d: i for i, d in enumerate(documents["doc_id"].to_pylist())}
    seq_doc = np.asarray([position[d] for d in table["doc_id"].to_pylist()])
    tokenizer, queries = load_tokenizer(init_dir), []
    for doc_id, prompt, completion in candidates:
        query = Query(f"q{len(queries)}:{doc_id}", prompt, completion, "en")
        try:
            tokenize_query(query, tokenizer, spec.context)
        except InfluenceError:
            continue
        queries.append(query)
        if len(queries) == settings.num_queries:
            break
    if len(queries) < settings.num_queries:
        raise InfluenceError(f"only {len(queries)} held-out exchanges fit the context of {spec.context} tokens")
    if not (model_dir / "training.json").exists():
        shutil.rmtree(cache / ".model", ignore_errors=True)
        shutil.copytree(init_dir, cache / ".model")
        train(cache / ".model", table["input_ids"].to_pylist(), settings, seed=spec.seed)
        (cache / ".model").rename(model_dir)
    return Setup(cache, init_dir, model_dir, corpus_dir, documents["doc_id"].to_pylist(), seq_doc, table["input_ids"].to_pylist(), queries)


@torch.no_grad()
def query_losses(model_dir: Path, queries: list[Query]) -> list[float]:
    """Each query's completion NLL, summed over its completion tokens (what the engine's query gradient differentiates)."""
    tokenized = [tokenize_query(q, load_tokenizer(model_dir)) for q in queries]
    batch = make_token_batch([q.input_ids for q in tokenized], [q.completion_start for q in tokenized])
    logits = load_model(model_dir)(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), reduction="none")
    return (nll.view_as(batch.labels) * batch.label_mask).sum(1).tolist()


# --------------------------------------------------------------------------- ground truth


def subset_mask(settings: Settings, num_docs: int, subset: int) -> np.ndarray:
    chosen = np.random.default_rng([settings.subset_seed, subset]).choice(num_docs, round(settings.alpha * num_docs), replace=False)
    mask = np.zeros(num_docs, dtype=bool)
    mask[chosen] = True
    return mask


def train_subset(setup: Setup, settings: Settings, subset: int, seed: int) -> Path:
    """Retrain from the init on one subset with one seed; write the query losses atomically."""
    path = setup.dir / "ground_truth" / f"subset{subset:04d}_seed{seed}.json"
    if path.exists():
        return path
    mask = subset_mask(settings, len(setup.doc_ids), subset)
    run_dir = setup.dir / "runs" / f"subset{subset:04d}_seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        shutil.copytree(setup.init_dir, run_dir)
        with common.Timer() as timer:
            train(run_dir, [s for s, d in zip(setup.sequences, setup.seq_doc) if mask[d]], settings, seed=1_000_003 * (seed + 1) + subset)
        losses = query_losses(run_dir, setup.queries)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    write_json(path, {"losses": losses, "query_ids": [q.query_id for q in setup.queries], "seconds": timer.seconds})
    return path


def _quiet_worker() -> None:
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)


def ground_truth(setup: Setup, settings: Settings, jobs: int, rescore: bool) -> tuple[np.ndarray, dict]:
    """Losses (subsets, seeds, queries), training the missing runs in `jobs` processes."""
    runs = [(j, s) for j in range(settings.num_subsets) for s in range(settings.num_seeds)]
    missing = [(j, s) for j, s in runs if not (setup.dir / "ground_truth" / f"subset{j:04d}_seed{s}.json").exists()]
    if missing and rescore:
        raise InfluenceError(f"--rescore needs the cached ground truth, but {len(missing)} of {len(runs)} runs are missing; run without it")
    with common.Timer() as timer:
        if jobs <= 1:
            for j, s in missing:
                train_subset(setup, settings, j, s)
        elif missing:
            context = multiprocessing.get_context("spawn")  # fork after torch's thread pools started can hang
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_quiet_worker) as pool:
                for future in concurrent.futures.as_completed([pool.submit(train_subset, setup, settings, j, s) for j, s in missing]):
                    future.result()
    records = [read_json(setup.dir / "ground_truth" / f"subset{j:04d}_seed{s}.json") for j, s in runs]
    if any(r["query_ids"] != [q.query_id for q in setup.queries] for r in records):
        raise InfluenceError(f"cached runs under {setup.dir / 'ground_truth'} hold other queries; delete them")
    losses = np.asarray([r["losses"] for r in records]).reshape(settings.num_subsets, settings.num_seeds, -1)
    return losses, {"trained_now": len(missing), "cached": len(runs) - len(missing), "seconds_this_run": timer.seconds,
                    "seconds_per_run_mean": float(np.mean([r["seconds"] for r in records]))}


# --------------------------------------------------------------------------- attribution methods: (queries, sequences) scores


def score_engine(strategy: str) -> Callable[[Setup, Settings, Path], dict]:
    def run(setup: Setup, settings: Settings, scratch: Path) -> dict:
        factors_dir = scratch / f"factors-{strategy}"
        with common.Timer() as fit:
            fit_factors(setup.model_dir, setup.corpus_dir, factors_dir, FactorArgs(strategy=strategy, progress=False))
        with common.Timer() as score:
            result = compute_scores(setup.model_dir, factors_dir, setup.corpus_dir, setup.queries, ScoreArgs(per_module=False, progress=False))
        return {"scores": result.scores, "seconds": {"fit": fit.seconds, "score": score.seconds}}
    return run


def score_index_sketch(setup: Setup, settings: Settings, scratch: Path) -> dict:
    """What the index ranks by before the re-rank: the engine's query sketch against every stored sketch."""
    factors_dir = scratch / "factors-ekfac"
    if not factors_dir.exists():
        fit_factors(setup.model_dir, setup.corpus_dir, factors_dir, FactorArgs(progress=False))
    with common.Timer() as build:
        build_index(setup.model_dir, factors_dir, setup.corpus_dir, scratch / "index", IndexArgs(sketch_dim=settings.sketch_dim, progress=False))
    with common.Timer() as score:
        scores, _ = common.sketch_scores(QueryEngine(scratch / "index"), setup.queries)
    return {"scores": scores, "seconds": {"fit": build.seconds, "score": score.seconds},
            "details": {"sketch_dim": settings.sketch_dim, "fit": "build_index (the ekfac factors are reused)"}}


def score_kronfluence(setup: Setup, settings: Settings, scratch: Path) -> dict:
    if kronfluence_available():
        return {"skipped": kronfluence_available()}
    tokenized = [tokenize_query(q, load_tokenizer(setup.model_dir)) for q in setup.queries]
    result = run_kronfluence(str(setup.model_dir), setup.sequences, [(t.prompt_ids, t.completion_ids) for t in tokenized],
                             describe_model(setup.model_dir).module_names, work_dir=str(scratch / "kronfluence"), strategy="ekfac")
    return {"scores": result["scores"], "seconds": {"fit": result["fit_seconds"], "score": result["score_seconds"]},
            "details": {"version": result["version"], "fisher": "true"}}


def score_trak(setup: Setup, settings: Settings, scratch: Path) -> dict:
    """TRAK on CPU: BasicProjector (normal), float32, one checkpoint, every parameter; the margin summed over labelled tokens."""
    try:
        import trak
        from trak import TRAKer
        from trak.modelout_functions import AbstractModelOutput
    except ImportError as exc:
        return {"skipped": f"traker is not installed ({exc}); pip install --no-deps traker"}
    from transformers import AutoModelForCausalLM

    class CausalLMOutput(AbstractModelOutput):
        """Margin sum_t [logit(y_t) - logsumexp(other logits)]; out-to-loss: mean over labelled tokens of 1 - p(y_t)."""

        def __init__(self) -> None:  # abstract in traker
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, input_ids, labels):  # one example, under vmap; right padding needs no mask
            logits = torch.func.functional_call(model, (weights, buffers), args=(), kwargs={"input_ids": input_ids.unsqueeze(0)}).logits[0]
            logits, targets = logits[:-1], labels[1:]
            safe = targets.clamp_min(0)
            correct = logits.gather(-1, safe[:, None]).squeeze(-1)
            others = logits.masked_fill(torch.arange(logits.shape[-1]) == safe[:, None], float("-inf")).logsumexp(-1)
            return ((correct - others) * (targets != -100).to(logits.dtype)).sum()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            input_ids, labels = batch
            with torch.no_grad():
                logits = model(input_ids=input_ids).logits[:, :-1]
            targets, valid = labels[:, 1:], (labels[:, 1:] != -100).float()
            p = logits.softmax(-1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
            return (((1 - p) * valid).sum(1) / valid.sum(1).clamp_min(1)).unsqueeze(-1)

    def padded(items: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids, _ in items)
        input_ids, labels = torch.zeros(len(items), width, dtype=torch.long), torch.full((len(items), width), -100, dtype=torch.long)
        for row, (ids, first_label) in enumerate(items):
            input_ids[row, : len(ids)] = torch.as_tensor(ids)
            labels[row, first_label: len(ids)] = torch.as_tensor(ids[first_label:])
        return input_ids, labels

    # eager attention: torch has no vmap rule for the CPU SDPA kernel
    model = AutoModelForCausalLM.from_pretrained(str(setup.model_dir), attn_implementation="eager").eval()
    tokenized = [tokenize_query(q, load_tokenizer(setup.model_dir)) for q in setup.queries]
    with common.Timer() as fit:
        traker = TRAKer(model=model, task=CausalLMOutput(), train_set_size=len(setup.sequences), save_dir=str(scratch / "trak"), device="cpu",
                        proj_dim=settings.trak_proj_dim, use_half_precision=False, lambda_reg=settings.trak_lambda, logging_level=logging.ERROR)
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for begin in range(0, len(setup.sequences), 64):
            batch = padded([(ids, 0) for ids in setup.sequences[begin: begin + 64]])
            traker.featurize(batch=batch, num_samples=len(batch[0]))
        traker.finalize_features()
    with common.Timer() as score:
        if hasattr(traker.projector, "generator_states"):  # traker 0.3.2 frees a single-block projection in finalize_features
            traker.projector.generate_sketch_matrix(traker.projector.generator_states[0])
        traker.start_scoring_checkpoint(exp_name="queries", checkpoint=model.state_dict(), model_id=0, num_targets=len(tokenized))
        traker.score(batch=padded([(q.input_ids, q.completion_start) for q in tokenized]), num_samples=len(tokenized))
        scores = np.asarray(traker.finalize_scores(exp_name="queries"), dtype=np.float64).T
    return {"scores": scores, "seconds": {"fit": fit.seconds, "score": score.seconds},
            "details": {"version": getattr(trak, "__version__", "unknown"), "proj_dim": settings.trak_proj_dim, "lambda_reg": settings.trak_lambda}}


SCORERS: dict[str, Callable[[Setup, Settings, Path], dict]] = {
    "ekfac": score_engine("ekfac"), "kfac": score_engine("kfac"), "identity": score_engine("identity"),
    "index_sketch": score_index_sketch, "kronfluence_ekfac": score_kronfluence, "trak": score_trak,
}


# --------------------------------------------------------------------------- LDS


def linear_datamodeling_scores(doc_scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Per query: Spearman over subsets of (the subset's summed attributions, -measured NLL).

    doc_scores (queries, docs), masks (subsets, docs) bool, losses (subsets, queries) averaged over seeds.
    """
    predicted = masks.astype(np.float64) @ doc_scores.T  # (subsets, queries)
    return np.asarray([common.spearman(predicted[:, q], -losses[:, q]) for q in range(losses.shape[1])])


def score_method(name: str, setup: Setup, settings: Settings, scratch: Path, masks: np.ndarray, measured: np.ndarray):
    """One method's scores and LDS: (its entry, (queries, docs) attributions or None)."""
    try:
        outcome = SCORERS[name](setup, settings, scratch)
    except Exception as exc:  # a peer failing is a result to report, not a reason to lose the others
        outcome = {"failed": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
    if "scores" not in outcome:
        status = "skipped" if "skipped" in outcome else "failed"
        return {"status": status, "reason": outcome.get(status), **{k: v for k, v in outcome.items() if k == "traceback"}}, None
    scores = np.asarray(outcome["scores"], dtype=np.float64)
    if scores.shape != (len(setup.queries), len(setup.sequences)) or not np.isfinite(scores).all():
        return {"status": "failed", "reason": f"scores of shape {scores.shape}, finite: {bool(np.isfinite(scores).all())}"}, None
    per_doc = np.zeros((len(setup.queries), len(setup.doc_ids)))
    np.add.at(per_doc.T, setup.seq_doc, scores.T)  # a document's attribution is the sum over its chunks
    lds = linear_datamodeling_scores(per_doc, masks, measured)
    return {"status": "ok", "lds": common.mean_sem(lds), "lds_per_query": dict(zip([q.query_id for q in setup.queries], lds)),
            "seconds": outcome["seconds"], "details": outcome.get("details", {})}, per_doc


def markdown_table(result: dict) -> str:
    lines = ["| method | LDS (mean ± s.e.) | doc Spearman vs ekfac | fit s | score s |", "|---|---|---|---|---|"]
    for name, r in result["methods"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status']}: {r['reason']} | | | |")
            continue
        lines.append(f"| {name} | {r['lds']['mean']:.3f} ± {r['lds']['sem']:.3f} | {r.get('doc_spearman_with_ekfac', float('nan')):.3f} | "
                     f"{r['seconds']['fit']:.1f} | {r['seconds']['score']:.1f} |")
    ceiling = result["ground_truth"]["seed_agreement"]
    if ceiling:
        lines.append(f"| *seed agreement (noise ceiling)* | {ceiling['mean']:.3f} ± {ceiling['sem']:.3f} | | | |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, M=8 subsets: about a minute")
    parser.add_argument("--rescore", action="store_true", help="only re-score the methods; the ground truth must be cached")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--num-subsets", type=int, help="M (default 64; quick 8)")
    parser.add_argument("--jobs", type=int, help="training processes, one thread each (default 2; quick 1)")
    parser.add_argument("--work-dir", type=Path, default=common.WORK / "lds", help="cache of the models and the ground truth")
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/lds.json; --quick: a temp file)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # kronfluence's torch.cuda.amp notices
    methods = [m for m in args.methods.split(",") if m]
    if set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(set(methods) - set(METHODS))}; choose among {', '.join(METHODS)}")
    settings = QUICK if args.quick else DEFAULT
    if args.num_subsets:
        settings = dataclasses.replace(settings, num_subsets=args.num_subsets)
    facts = common.machine_facts()
    with common.Timer() as total:
        cache = args.work_dir / f"lds-{settings.ground_truth_key()}"
        cache.mkdir(parents=True, exist_ok=True)
        setup = prepare_setup(settings, cache)
        losses, truth = ground_truth(setup, settings, args.jobs or (1 if args.quick else 2), args.rescore)
        masks = np.stack([subset_mask(settings, len(setup.doc_ids), j) for j in range(settings.num_subsets)])
        measured = losses.mean(1)  # (subsets, queries)
        seed_agreement = common.mean_sem([common.spearman(losses[:, 0, q], losses[:, 1, q]) for q in range(losses.shape[2])]) \
            if settings.num_seeds >= 2 else None
        scratch = cache / "scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        results, per_doc = {}, {}
        for name in methods:
            results[name], scores = score_method(name, setup, settings, scratch, masks, measured)
            if scores is not None:
                per_doc[name] = scores
        if "ekfac" in per_doc:
            for name, scores in per_doc.items():
                results[name]["doc_spearman_with_ekfac"] = float(np.mean([common.spearman(a, b) for a, b in zip(scores, per_doc["ekfac"])]))
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "benchmark": "linear datamodeling score (LDS)",
        "sign_convention": "attribution > 0 = upweighting lowers the query's completion NLL; LDS = Spearman(summed attributions, -NLL)",
        "settings": dataclasses.asdict(settings),
        "corpus": {"source": "chatterbot-corpus english", "num_train_docs": len(setup.doc_ids), "num_sequences": len(setup.sequences),
                   "num_queries": len(setup.queries)},
        "model": {"parameters": describe_model(setup.model_dir).parameters, "training": read_json(setup.model_dir / "training.json")},
        "ground_truth": {**truth, "num_subsets": settings.num_subsets, "num_seeds": settings.num_seeds, "alpha": settings.alpha,
                         "seed_agreement": seed_agreement, "cache_dir": str(cache),
                         "full_model_nll_per_query": dict(zip([q.query_id for q in setup.queries], query_losses(setup.model_dir, setup.queries)))},
        "queries": [dataclasses.asdict(q) for q in setup.queries],
        "methods": results, "total_seconds": total.seconds, "machine": common.finish_machine(facts),
    }
    out = common.write_results(args.out or common.default_out("lds", args.quick), result, common.command_line("lds.py", argv))
    print(f"{markdown_table(result)}\n\n{len(setup.doc_ids)} documents ({len(setup.sequences)} sequences), {len(setup.queries)} queries, "
          f"M={settings.num_subsets} x S={settings.num_seeds}; {total.seconds:.0f}s; wrote {out}")
    return result


if __name__ == "__main__":
    main()
