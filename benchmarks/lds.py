"""Counterfactual evaluation: the linear datamodeling score (LDS) of every attribution method, side by side.

Protocol (Park et al. 2023, "TRAK", sec. 2; used by Kronfluence and by Bae et al. 2024):

1. Data. English chatterbot-corpus dialogues (`jobs.demo.chatterbot`), a seeded sample: `num_queries` held-out
   conversations give the queries (their first exchange: prompt "User: ...\\nAssistant:", completion " ..."),
   `num_train_docs` others are the training documents. A byte-level BPE is trained on the training texts and
   the documents are chunked into `context`-token sequences (`prepare_corpus`); a document's attribution is
   the sum of its chunks' scores.
2. Model. A tiny Llama (`jobs.demo.tiny`) with a seeded init saved once; the full-data model is trained from
   it by `jobs.demo.tiny.train_model` (AdamW, cosine schedule) for `epochs` epochs. Training always runs with
   one torch thread, so every run is bit-reproducible whatever `--jobs` is.
3. Ground truth. `num_subsets` random subsets of exactly round(alpha x documents) documents (subset j drawn
   from `default_rng([subset_seed, j])`); each is trained from the SAME init, with the same recipe (same
   number of epochs, so steps scale with the subset's sequences) and `num_seeds` training seeds (the seed
   changes data order and batching). The measurement is the query's completion NLL (summed over completion
   tokens, the engine's convention), averaged over seeds.
4. Attribution methods, all on the full-data model: the engine's ekfac, kfac and identity (gradient dot
   product); Kronfluence ekfac (`benchmarks/kronfluence_peer.py`); TRAK (the `traker` package, CPU
   BasicProjector, one checkpoint); and the index's sketch scores <sketch(q), sketch(z)> (`influence.sketches`,
   `indexes.build`; skipped, with the reason, while that API is absent).
5. LDS of a query = Spearman over subsets j of (sum over documents d in S_j of attribution(query, d),
   -measured NLL_j). Sign: every method here scores "positive = upweighting d raises log p(completion)",
   i.e. lowers the NLL, so a subset holding more helpful documents should have a LOWER loss; correlating the
   predicted sum with the NEGATIVE loss makes a perfect method score +1. The reported LDS is the mean over
   queries (with its standard error); `seed_agreement` (Spearman between two training seeds' losses across
   subsets) is a rough noise ceiling: how well one retraining predicts another.

Ground truth is cached under `--work-dir` (default `benchmarks/results/.work/lds_cache/`, git-ignored), keyed by every setting
that changes it, the selected documents and queries, the source of the functions that build, train and
measure the models, and the torch/transformers versions (not by num_subsets / num_seeds: subset j and seed s
are the same runs whatever their number, so a larger run reuses a smaller one's); one atomic JSON per
(subset, seed), so a killed run resumes.

    python benchmarks/lds.py                      # default: see DEFAULT below; < 1 hour on 2 CPU cores
    python benchmarks/lds.py --quick              # tiny sizes, M=4: a couple of minutes
    python benchmarks/lds.py --rescore            # re-score the methods on the cached ground truth only
    python benchmarks/lds.py --methods ekfac,trak --jobs 2

Writes `benchmarks/results/lds.json` (`lds_quick.json` with --quick; or `--out`) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import importlib.util
import inspect
import json
import logging
import math
import multiprocessing
import os
import platform
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from influence.arguments import CorpusArgs, FactorArgs, ScoreArgs  # noqa: E402
from influence.artifacts import write_json, write_parquet  # noqa: E402
from jobs.demo.chatterbot import chatterbot_documents  # noqa: E402
from influence.corpus import load_sequences, prepare_corpus  # noqa: E402
from influence.errors import InfluenceError  # noqa: E402
from influence.factors import fit_factors  # noqa: E402
from influence.gradients import make_token_batch  # noqa: E402
from influence.models import find_tracked_modules, load_model, load_tokenizer  # noqa: E402
from influence.queries import Query, TokenizedQuery, tokenize_query  # noqa: E402
from influence.scores import compute_scores  # noqa: E402
from jobs.demo.tiny import build_model, build_tokenizer, model_config, train_model  # noqa: E402

LOG = logging.getLogger("benchmarks.lds")
GROUND_TRUTH_VERSION = 1  # bump to invalidate every cached ground truth
METHODS = ("ekfac", "kfac", "identity", "kronfluence_ekfac", "trak", "index_sketch")
RESULTS = ROOT / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that defines a run. Fields in `RUNTIME` do not change the ground truth."""

    num_train_docs: int = 300       # training documents (chatterbot conversations)
    num_queries: int = 12           # held-out first exchanges
    vocab_size: int = 512
    hidden: int = 32
    layers: int = 2
    heads: int = 2
    intermediate: int = 64
    context: int = 64               # model context = chunk length of the corpus
    epochs: int = 10                # same for the full model and every subset model
    lr: float = 3e-3
    batch_size: int = 16
    alpha: float = 0.5              # subset fraction
    num_subsets: int = 64           # M
    num_seeds: int = 2              # S, training seeds per subset
    data_seed: int = 0              # document sample and query choice
    init_seed: int = 0              # model init, shared by every run
    subset_seed: int = 1
    trak_proj_dim: int = 2048       # traker's default
    trak_lambda: float = 0.01       # ridge on X^T X: needed since proj_dim > sequences (rank-deficient otherwise)
    index_sketch_size: int = 16     # k: each module's whitened gradient is projected to k x k numbers

    RUNTIME = ("num_subsets", "num_seeds", "trak_proj_dim", "trak_lambda", "index_sketch_size")

    def ground_truth_key(self) -> str:
        """A short hash of what the cached losses depend on: these settings, the selected documents and
        queries, the source of the functions that build, train and measure the models, and the versions."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUNTIME}
        documents, candidates = select_documents(self)
        fields.update(version=GROUND_TRUTH_VERSION, torch=torch.__version__, transformers=_version("transformers"),
                      documents=documents["text"].to_pylist(), queries=candidates,
                      code=[inspect.getsource(f) for f in (build_tokenizer, model_config, build_model, train_model, _train,
                                                           query_losses, subset_mask, training_seed)])
        return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=6).hexdigest()


DEFAULT = Settings()
QUICK = Settings(num_train_docs=40, num_queries=4, vocab_size=300, hidden=16, layers=2, heads=2, intermediate=32,
                 context=48, epochs=4, num_subsets=4, num_seeds=2, trak_proj_dim=256, index_sketch_size=4)


@dataclasses.dataclass
class Setup:
    """The artifacts every method and every retraining share."""

    dir: Path
    init_dir: Path                  # seeded init (never trained)
    model_dir: Path                 # full-data model
    corpus_dir: Path
    doc_ids: list[str]              # training documents, in corpus order
    seq_doc: np.ndarray             # (sequences,) index into doc_ids of each sequence
    sequences: list[list[int]]
    queries: list[Query]
    tokenized: list[TokenizedQuery]


# --------------------------------------------------------------------------- data, model


def _first_exchange(text: str) -> Optional[tuple[str, str]]:
    """(prompt, completion) of a rendered conversation's first user/assistant pair, or None."""
    if not text.startswith("User: ") or "\nAssistant: " not in text:
        return None
    user, rest = text[len("User: "):].split("\nAssistant: ", 1)
    answer = rest.split("\nUser: ", 1)[0]
    if not user.strip() or not answer.strip():
        return None
    return f"User: {user}\nAssistant:", f" {answer}"


def select_documents(settings: Settings):
    """Seeded sample of English conversations: (training documents table, query candidates)."""
    documents = chatterbot_documents(("english",))
    texts, order = documents["text"].to_pylist(), np.random.default_rng(settings.data_seed).permutation(documents.num_rows)
    candidates, train_rows = [], []
    for row in order.tolist():
        exchange = _first_exchange(texts[row])
        # query candidates: short exchanges, so they fit the context; more than needed (some may not fit)
        if len(candidates) < 3 * settings.num_queries and exchange and len(exchange[0]) + len(exchange[1]) <= 1.5 * settings.context:
            candidates.append((documents["doc_id"][row].as_py(), *exchange))
        elif len(train_rows) < settings.num_train_docs:
            train_rows.append(row)
        if len(candidates) >= 3 * settings.num_queries and len(train_rows) >= settings.num_train_docs:
            break
    return documents.take(sorted(train_rows)), candidates


def prepare_setup(settings: Settings, cache_dir: Path) -> Setup:
    """Documents, tokenizer, seeded init, corpus and the trained full-data model; reused when on disk."""
    init_dir, model_dir, corpus_dir = cache_dir / "init", cache_dir / "model", cache_dir / "corpus"
    train_docs, candidates = select_documents(settings)
    if not (init_dir / "config.json").exists():
        tokenizer = build_tokenizer(train_docs["text"].to_pylist(), vocab_size=settings.vocab_size)
        tmp = cache_dir / ".init.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        build_model(tmp, tokenizer, "llama", seed=settings.init_seed, hidden=settings.hidden, layers=settings.layers,
                    heads=settings.heads, intermediate=settings.intermediate, context=settings.context)
        tmp.rename(init_dir)
    write_parquet(cache_dir / "documents.parquet", train_docs)
    prepare_corpus(cache_dir / "documents.parquet", init_dir, corpus_dir, CorpusArgs(max_length=settings.context), progress=False)
    table, _ = load_sequences(corpus_dir)
    doc_ids = train_docs["doc_id"].to_pylist()
    position = {d: i for i, d in enumerate(doc_ids)}
    seq_doc = np.asarray([position[d] for d in table["doc_id"].to_pylist()], dtype=np.int64)
    sequences = table["input_ids"].to_pylist()
    tokenizer = load_tokenizer(init_dir)
    queries, tokenized = [], []
    for doc_id, prompt, completion in candidates:
        query = Query(f"q{len(queries)}:{doc_id}", prompt, completion, "en")
        try:
            tokenized.append(tokenize_query(query, tokenizer, settings.context))
        except InfluenceError:
            continue  # longer than the context
        queries.append(query)
        if len(queries) == settings.num_queries:
            break
    if len(queries) < settings.num_queries:
        raise InfluenceError(f"only {len(queries)} held-out exchanges fit the context of {settings.context} tokens")
    if not (model_dir / "training.json").exists():
        tmp = cache_dir / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(init_dir, tmp)
        _train(tmp, sequences, settings, seed=settings.init_seed)
        tmp.rename(model_dir)
    return Setup(cache_dir, init_dir, model_dir, corpus_dir, doc_ids, seq_doc, sequences, queries, tokenized)


def _train(model_dir: Path, sequences: list[list[int]], settings: Settings, seed: int) -> None:
    """`train_model` for `epochs` epochs, single-threaded so that a run is reproducible bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = math.ceil(settings.epochs * len(sequences) / settings.batch_size)
        train_model(model_dir, sequences, steps=steps, lr=settings.lr, batch_size=settings.batch_size, seed=seed, progress=False)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def query_losses(model_dir: Path, tokenized: list[TokenizedQuery]) -> list[float]:
    """Each query's completion NLL, summed over completion tokens (what the engine's query gradient differentiates)."""
    model = load_model(model_dir)
    batch = make_token_batch([q.input_ids for q in tokenized], [q.completion_start for q in tokenized])
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), reduction="none")
    return (nll.view_as(batch.labels) * batch.label_mask).sum(1).tolist()


# --------------------------------------------------------------------------- ground truth


def subset_mask(settings: Settings, num_docs: int, subset: int) -> np.ndarray:
    """Documents of subset `subset`: exactly round(alpha x num_docs) of them."""
    chosen = np.random.default_rng([settings.subset_seed, subset]).choice(num_docs, round(settings.alpha * num_docs), replace=False)
    mask = np.zeros(num_docs, dtype=bool)
    mask[chosen] = True
    return mask


def training_seed(subset: int, seed: int) -> int:
    return 1_000_003 * (seed + 1) + subset


def _run_path(setup_dir: Path, subset: int, seed: int) -> Path:
    return setup_dir / "ground_truth" / f"subset{subset:04d}_seed{seed}.json"


def train_subset(setup: Setup, settings: Settings, subset: int, seed: int) -> Path:
    """Retrain from the init on one subset with one seed; write the query losses atomically."""
    path = _run_path(setup.dir, subset, seed)
    if path.exists():
        return path
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    mask = subset_mask(settings, len(setup.doc_ids), subset)
    sequences = [s for s, d in zip(setup.sequences, setup.seq_doc) if mask[d]]
    run_dir = setup.dir / "runs" / f"subset{subset:04d}_seed{seed}_{os.getpid()}"
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    try:
        shutil.copytree(setup.init_dir, run_dir / "model")
        _train(run_dir / "model", sequences, settings, seed=training_seed(subset, seed))
        losses = query_losses(run_dir / "model", setup.tokenized)
        training = json.loads((run_dir / "model" / "training.json").read_text())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    write_json(path, {"subset": subset, "seed": seed, "training_seed": training_seed(subset, seed), "losses": losses,
                      "query_ids": [q.query_id for q in setup.queries], "num_sequences": len(sequences),
                      "steps": training["steps"], "final_loss_mean": training["final_loss_mean"],
                      "seconds": time.perf_counter() - start})
    return path


def _worker_init() -> None:
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)


def compute_ground_truth(setup: Setup, settings: Settings, jobs: int, rescore: bool, progress: bool = True) -> dict:
    """Losses (subsets, seeds, queries) for every (subset, seed), training the missing runs (in `jobs` processes)."""
    runs = [(j, s) for j in range(settings.num_subsets) for s in range(settings.num_seeds)]
    missing = [(j, s) for j, s in runs if not _run_path(setup.dir, j, s).exists()]
    if missing and rescore:
        raise InfluenceError(f"--rescore needs the cached ground truth, but {len(missing)} of {len(runs)} runs are missing "
                             f"under {setup.dir / 'ground_truth'}; run once without --rescore")
    start = time.perf_counter()
    if missing:
        LOG.info("ground truth: training %d of %d runs (%d cached) in %d process(es)", len(missing), len(runs),
                 len(runs) - len(missing), jobs)
        done = 0
        if jobs <= 1:
            for j, s in missing:
                train_subset(setup, settings, j, s)
                done += 1
                _progress(progress, done, len(missing), start)
        else:
            context = multiprocessing.get_context("spawn")  # fork after torch's thread pools started can hang
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init) as pool:
                futures = [pool.submit(train_subset, setup, settings, j, s) for j, s in missing]
                for future in concurrent.futures.as_completed(futures):
                    future.result()
                    done += 1
                    _progress(progress, done, len(missing), start)
    records = [json.loads(_run_path(setup.dir, j, s).read_text()) for j, s in runs]
    query_ids = [q.query_id for q in setup.queries]
    for record in records:
        if record["query_ids"] != query_ids:
            raise InfluenceError(f"cached run subset {record['subset']} seed {record['seed']} has other queries; "
                                 f"delete {setup.dir / 'ground_truth'}")
    losses = np.asarray([r["losses"] for r in records]).reshape(settings.num_subsets, settings.num_seeds, -1)
    return {"losses": losses, "trained_now": len(missing), "cached": len(runs) - len(missing),
            "seconds_this_invocation": time.perf_counter() - start,
            "seconds_per_run_mean": float(np.mean([r["seconds"] for r in records])),
            "seconds_sum_of_runs": float(np.sum([r["seconds"] for r in records])),  # when they were trained, maybe earlier
            "steps_per_run_mean": float(np.mean([r["steps"] for r in records])),
            "final_train_loss_mean": float(np.mean([r["final_loss_mean"] for r in records]))}


def _progress(enabled: bool, done: int, total: int, start: float) -> None:
    if enabled:
        elapsed = time.perf_counter() - start
        print(f"  ground truth {done}/{total} runs, {elapsed:.0f}s elapsed, ~{elapsed / done * (total - done):.0f}s left",
              file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- attribution methods
# Each returns (queries, sequences) scores, "positive = upweighting the sequence lowers the query's NLL".


def score_engine(strategy: str) -> Callable[[Setup, Settings, Path], dict]:
    def run(setup: Setup, settings: Settings, out: Path) -> dict:
        factors_dir = out / f"factors-{strategy}"
        shutil.rmtree(factors_dir, ignore_errors=True)
        start = time.perf_counter()
        fit_factors(setup.model_dir, setup.corpus_dir, factors_dir, FactorArgs(strategy=strategy, progress=False))
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        result = compute_scores(setup.model_dir, factors_dir, setup.corpus_dir, setup.queries,
                                ScoreArgs(per_module=False, progress=False))
        if strategy != "ekfac":  # the index_sketch method reuses the ekfac factors
            shutil.rmtree(factors_dir, ignore_errors=True)
        return {"scores": result.scores, "seconds": {"fit": fit_seconds, "score": time.perf_counter() - start},
                "details": {"modules": result.modules, "fisher": "true", "damping": "0.1 x mean(Lambda) per module"}}
    return run


def score_kronfluence(setup: Setup, settings: Settings, out: Path) -> dict:
    from benchmarks.kronfluence_peer import run_kronfluence

    model = load_model(setup.model_dir)
    modules = [m.name for m in find_tracked_modules(model)]  # the engine's default: the MLP linear layers
    kwargs = {"fisher": "true"} if "fisher" in inspect.signature(run_kronfluence).parameters else {}
    work = out / "kronfluence"
    shutil.rmtree(work, ignore_errors=True)
    result = run_kronfluence(str(setup.model_dir), setup.sequences, [(q.prompt_ids, q.completion_ids) for q in setup.tokenized],
                             modules, strategy="ekfac", damping=None, dtype=torch.float32, work_dir=str(work), seed=0, **kwargs)
    shutil.rmtree(work, ignore_errors=True)
    return {"scores": result["scores"], "seconds": {"fit": result["fit_seconds"], "score": result["score_seconds"]},
            "details": {"modules": modules, "kronfluence_version": result["kronfluence_version"], "fisher": "true"}}


def score_index_sketch(setup: Setup, settings: Settings, out: Path) -> dict:
    """What the index ranks by: <sketch(q), sketch(z)> of the whitened gradients (IndexArgs' default sketch).

    Training sketches come from `indexes.build.SketchBatches` (the index stage's own unit of work), query
    sketches from `Sketcher.sketch_gradients` of the engine's query gradients; the FAISS Flat index returns
    exactly these inner products. Reuses the ekfac factors when the ekfac method ran first. Skipped, with
    the reason, while the sketch API is absent.
    """
    if importlib.util.find_spec("influence.sketches") is None:
        return {"skipped": "index not built yet (no influence.sketches module)"}
    try:
        from indexes.build import SketchBatches
        from influence.arguments import IndexArgs
        from influence.scores import Scorer
    except ImportError as exc:
        return {"skipped": f"index not built yet ({exc})"}
    factors_dir = out / "factors-ekfac"
    start = time.perf_counter()
    fit_factors(setup.model_dir, setup.corpus_dir, factors_dir, FactorArgs(strategy="ekfac", progress=False))
    fit_seconds = time.perf_counter() - start
    args = IndexArgs(sketch_size=settings.index_sketch_size, progress=False)
    start = time.perf_counter()
    sketcher = SketchBatches(str(setup.model_dir), str(factors_dir), args)
    train = sketcher({"seq_id": list(range(len(setup.sequences))), "input_ids": setup.sequences})["sketch"]
    sketch_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scorer = Scorer(setup.model_dir, factors_dir, ScoreArgs(per_module=False, progress=False))
    queries = sketcher.sketcher.sketch_gradients(scorer.query_gradients(setup.tokenized)).cpu().numpy()
    scores = queries.astype(np.float64) @ train.astype(np.float64).T  # (queries, sequences)
    return {"scores": scores, "seconds": {"fit": fit_seconds + sketch_seconds, "score": time.perf_counter() - start},
            "details": {"sketch": getattr(args, "sketch", "kronecker"), "sketch_size": settings.index_sketch_size,
                        "sketch_dim": int(train.shape[1]),
                        "fit_includes": "ekfac factors (0 if reused) + sketching the corpus", "factors": "ekfac"}}


def _trak_output_class():
    from trak.modelout_functions import AbstractModelOutput

    class CausalLMOutput(AbstractModelOutput):
        """TRAK's margin, summed over labelled tokens: sum_t [logit(y_t) - logsumexp(other logits)].

        Its out-to-loss term Q is the mean over labelled tokens of 1 - p(y_t) (TRAK's classification Q,
        averaged). No attention mask is passed: with right padding a causal model's valid positions never
        see the padding, and HF's mask construction has data-dependent branches that `vmap` refuses.
        """

        def __init__(self) -> None:
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, input_ids, labels):  # one example under vmap
            logits = torch.func.functional_call(model, (weights, buffers), args=(),
                                                kwargs={"input_ids": input_ids.unsqueeze(0), "use_cache": False}).logits[0]
            logits, targets = logits[:-1], labels[1:]  # (tokens - 1, vocab), (tokens - 1,)
            valid = (targets != -100).to(logits.dtype)
            safe = targets.clamp_min(0)
            correct = logits.gather(-1, safe[:, None]).squeeze(-1)
            others = logits.masked_fill(torch.arange(logits.shape[-1]) == safe[:, None], float("-inf")).logsumexp(-1)
            return ((correct - others) * valid).sum()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            input_ids, labels = batch
            with torch.no_grad():
                logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]  # (batch, tokens - 1, vocab)
            targets = labels[:, 1:]
            valid = (targets != -100).float()
            p = logits.softmax(-1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
            return (((1 - p) * valid).sum(1) / valid.sum(1).clamp_min(1)).unsqueeze(-1)

    return CausalLMOutput


def score_trak(setup: Setup, settings: Settings, out: Path) -> dict:
    """TRAK (`pip install --no-deps traker`) on CPU: BasicProjector (normal), float32, one checkpoint, all parameters."""
    try:
        import trak
        from trak import TRAKer
    except ImportError as exc:
        return {"skipped": f"traker is not installed ({exc}); `pip install --no-deps traker`"}
    from transformers import AutoModelForCausalLM

    # eager attention: torch has no vmap batching rule for the CPU SDPA kernel (a slow fallback otherwise)
    model = AutoModelForCausalLM.from_pretrained(str(setup.model_dir), dtype=torch.float32, local_files_only=True,
                                                 attn_implementation="eager").eval()
    save_dir = out / "trak"
    shutil.rmtree(save_dir, ignore_errors=True)

    def padded(items: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.zeros(len(items), width, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for row, (ids, first_label) in enumerate(items):
            input_ids[row, : len(ids)] = torch.as_tensor(ids)
            labels[row, first_label: len(ids)] = torch.as_tensor(ids[first_label:])
        return input_ids, labels

    start = time.perf_counter()
    traker = TRAKer(model=model, task=_trak_output_class()(), train_set_size=len(setup.sequences), save_dir=str(save_dir),
                    device="cpu", proj_dim=settings.trak_proj_dim, use_half_precision=False, lambda_reg=settings.trak_lambda,
                    logging_level=logging.ERROR)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for begin in range(0, len(setup.sequences), 64):  # BasicProjector regenerates its blocks per batch: keep batches large
        batch = padded([(ids, 0) for ids in setup.sequences[begin: begin + 64]])
        traker.featurize(batch=batch, num_samples=len(batch[0]))
    traker.finalize_features()
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # traker 0.3.2: finalize_features frees the projection matrix and score() does not rebuild it when there is
    # a single block (proj_dim <= 100), so rebuild it here (AttributeError: no attribute 'proj_matrix' otherwise)
    if hasattr(traker.projector, "generator_states"):
        traker.projector.generate_sketch_matrix(traker.projector.generator_states[0])
    traker.start_scoring_checkpoint(exp_name="queries", checkpoint=model.state_dict(), model_id=0, num_targets=len(setup.queries))
    traker.score(batch=padded([(q.input_ids, q.completion_start) for q in setup.tokenized]), num_samples=len(setup.queries))
    scores = np.asarray(traker.finalize_scores(exp_name="queries"), dtype=np.float64).T  # (queries, sequences)
    shutil.rmtree(save_dir, ignore_errors=True)
    return {"scores": scores, "seconds": {"fit": fit_seconds, "score": time.perf_counter() - start},
            "details": {"traker_version": getattr(trak, "__version__", "unknown"), "projector": "BasicProjector (normal)",
                        "proj_dim": settings.trak_proj_dim, "lambda_reg": settings.trak_lambda, "checkpoints": 1,
                        "parameters": "all", "device": "cpu"}}


SCORERS: dict[str, Callable[[Setup, Settings, Path], dict]] = {
    "ekfac": score_engine("ekfac"), "kfac": score_engine("kfac"), "identity": score_engine("identity"),
    "kronfluence_ekfac": score_kronfluence, "trak": score_trak, "index_sketch": score_index_sketch,
}


# --------------------------------------------------------------------------- LDS


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def linear_datamodeling_scores(doc_scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Per-query LDS: Spearman over subsets of (predicted helpfulness, -measured NLL).

    Args:
        doc_scores: (queries, docs) attributions, positive = helpful (lowers the NLL).
        masks: (subsets, docs) bool, the documents each subset holds.
        losses: (subsets, queries) measured NLL, averaged over seeds.
    """
    predicted = masks.astype(np.float64) @ doc_scores.T  # (subsets, queries)
    return np.asarray([spearman(predicted[:, q], -losses[:, q]) for q in range(losses.shape[1])])


def document_scores(sequence_scores: np.ndarray, seq_doc: np.ndarray, num_docs: int) -> np.ndarray:
    """(queries, sequences) -> (queries, docs): a document's attribution is the sum over its chunks."""
    out = np.zeros((sequence_scores.shape[0], num_docs))
    np.add.at(out.T, seq_doc, sequence_scores.T)
    return out


def summarize(values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return {"mean": float("nan"), "sem": float("nan"), "min": float("nan"), "max": float("nan"), "nan_queries": len(values)}
    sem = float(finite.std(ddof=1) / np.sqrt(len(finite))) if len(finite) > 1 else float("nan")
    return {"mean": float(finite.mean()), "sem": sem, "min": float(finite.min()), "max": float(finite.max()),
            "nan_queries": int(len(values) - len(finite))}


# --------------------------------------------------------------------------- run


def _version(name: str) -> Optional[str]:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def machine() -> dict:
    names = ("torch", "transformers", "kronfluence", "traker", "scipy", "numpy", "chatterbot-corpus", "influence-engine")
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average_at_start": list(os.getloadavg()),
            "versions": {n: _version(n) for n in names},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def score_method(name: str, setup: Setup, settings: Settings, scratch: Path, masks: np.ndarray,
                 measured: np.ndarray) -> tuple[dict, Optional[np.ndarray]]:
    """Run one method and its LDS: (result entry, (queries, docs) attributions or None if it did not run)."""
    LOG.info("scoring %s", name)
    start = time.perf_counter()
    try:
        outcome = SCORERS[name](setup, settings, scratch)
    except Exception as exc:  # a peer failing is a result to report, not a reason to lose the others
        outcome = {"failed": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
    wall = time.perf_counter() - start
    if "scores" not in outcome:
        return {"status": "skipped" if "skipped" in outcome else "failed", "reason": outcome.get("skipped") or outcome.get("failed"),
                "wall_seconds": wall, **{k: outcome[k] for k in ("traceback",) if k in outcome}}, None
    scores = np.asarray(outcome["scores"], dtype=np.float64)  # (queries, sequences)
    if scores.shape != (len(setup.queries), len(setup.sequences)) or not np.isfinite(scores).all():
        return {"status": "failed", "reason": f"scores of shape {scores.shape}, all finite: {bool(np.isfinite(scores).all())}",
                "wall_seconds": wall}, None
    np.save(setup.dir / f"scores_{name}.npy", scores)  # for inspection; never read back
    per_doc = document_scores(scores, setup.seq_doc, len(setup.doc_ids))
    lds = linear_datamodeling_scores(per_doc, masks, measured)
    return {"status": "ok", "lds": summarize(lds),
            "lds_per_query": {q.query_id: (float(v) if np.isfinite(v) else None) for q, v in zip(setup.queries, lds)},
            "seconds": outcome["seconds"], "wall_seconds": wall, "details": outcome.get("details", {})}, per_doc


def run(settings: Settings, methods: list[str], work_dir: Path, jobs: int = 1, rescore: bool = False, progress: bool = True,
        command: str = "") -> dict:
    """Build (or reuse) the setup and ground truth, score every method, and return the result dictionary."""
    started, info = time.perf_counter(), machine()
    cache_dir = work_dir / f"lds-{settings.ground_truth_key()}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    setup = prepare_setup(settings, cache_dir)
    setup_seconds = time.perf_counter() - start
    truth = compute_ground_truth(setup, settings, jobs, rescore, progress)
    masks = np.stack([subset_mask(settings, len(setup.doc_ids), j) for j in range(settings.num_subsets)])
    losses = truth.pop("losses")  # (subsets, seeds, queries)
    measured = losses.mean(1)
    seed_agreement = None
    if settings.num_seeds >= 2:
        seed_agreement = summarize(np.asarray([spearman(losses[:, 0, q], losses[:, 1, q]) for q in range(losses.shape[2])]))

    scratch, results, per_doc = cache_dir / "scratch", {}, {}
    for name in methods:
        results[name], scores = score_method(name, setup, settings, scratch, masks, measured)
        if scores is not None:
            per_doc[name] = scores
    if "ekfac" in per_doc:  # signs and rankings at a glance: how each method orders documents relative to the engine's ekfac
        for name, scores in per_doc.items():
            results[name]["doc_spearman_with_ekfac"] = float(np.mean([spearman(a, b) for a, b in zip(scores, per_doc["ekfac"])]))
    shutil.rmtree(scratch, ignore_errors=True)
    full_training = json.loads((setup.model_dir / "training.json").read_text())
    return {
        "benchmark": "linear datamodeling score (LDS)",
        "sign_convention": "attribution > 0 = upweighting the document lowers the query's completion NLL; "
                           "LDS = Spearman(sum of attributions over the subset, -measured NLL), mean over queries",
        "settings": dataclasses.asdict(settings),
        "corpus": {"source": "chatterbot-corpus english", "num_train_docs": len(setup.doc_ids),
                   "num_sequences": len(setup.sequences), "num_tokens": int(sum(len(s) for s in setup.sequences)),
                   "num_queries": len(setup.queries)},
        "model": {"architecture": "llama", "parameters": int(sum(p.numel() for p in load_model(setup.model_dir).parameters())),
                  "hidden": settings.hidden, "layers": settings.layers, "heads": settings.heads,
                  "intermediate": settings.intermediate, "context": settings.context, "vocab_size": len(load_tokenizer(setup.init_dir))},
        "full_model_training": full_training,
        "ground_truth": {"num_subsets": settings.num_subsets, "num_seeds": settings.num_seeds, "alpha": settings.alpha,
                         "subset_docs": int(masks[0].sum()), "cache_dir": str(cache_dir), **truth,
                         "seed_agreement": seed_agreement,
                         "measured_nll_mean_per_query": dict(zip([q.query_id for q in setup.queries], measured.mean(0).tolist())),
                         "full_model_nll_per_query": dict(zip([q.query_id for q in setup.queries], query_losses(setup.model_dir, setup.tokenized)))},
        "queries": [dataclasses.asdict(q) for q in setup.queries],
        "methods": results,
        "rescore": rescore,
        "timings": {"setup_seconds": setup_seconds, "ground_truth_seconds": truth["seconds_this_invocation"],
                    "total_seconds": time.perf_counter() - started,
                    "load_average_at_end": list(os.getloadavg()),
                    "note": "wall-clock seconds on a shared machine; see machine.load_average_at_start"},
        "machine": info,
        "command": command,
    }


def markdown_table(result: dict) -> str:
    lines = ["| method | LDS (mean over queries) | ± s.e. | min | max | doc ρ vs ekfac | fit s | score s | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["methods"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | – | – | – | – | – | – | – | {r['status']}: {r['reason']} |")
            continue
        lds, seconds = r["lds"], r["seconds"]
        lines.append(f"| {name} | {lds['mean']:.3f} | {lds['sem']:.3f} | {lds['min']:.3f} | {lds['max']:.3f} | "
                     f"{r.get('doc_spearman_with_ekfac', float('nan')):.3f} | {seconds['fit']:.1f} | {seconds['score']:.1f} | ok |")
    agreement = result["ground_truth"]["seed_agreement"]
    if agreement:
        lines.append(f"| *seed agreement (noise ceiling)* | {agreement['mean']:.3f} | {agreement['sem']:.3f} | "
                     f"{agreement['min']:.3f} | {agreement['max']:.3f} | | | | |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and M=4 subsets: a couple of minutes")
    parser.add_argument("--rescore", action="store_true", help="only re-score the methods; the ground truth must be cached")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--num-subsets", type=int, help="M, subsets (default 64; quick 4)")
    parser.add_argument("--num-seeds", type=int, help="S, training seeds per subset (default 2)")
    parser.add_argument("--alpha", type=float, help="subset fraction (default 0.5)")
    parser.add_argument("--trak-proj-dim", type=int, help="TRAK projection dimension (default 2048; quick 256)")
    parser.add_argument("--trak-lambda", type=float, help="TRAK ridge term added to X^T X (default 0.01)")
    parser.add_argument("--index-sketch-size", type=int, help="k of the index sketches (default 16; quick 4)")
    parser.add_argument("--jobs", type=int, help="training processes, 1 thread each (default: 2, or 1 with --quick)")
    parser.add_argument("--work-dir", type=Path, default=RESULTS / ".work" / "lds_cache", help="cache of models and ground truth")
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/lds.json or lds_quick.json)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "kronfluence", "TRAK", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # kronfluence's torch.cuda.amp.GradScaler notices
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose among {', '.join(METHODS)}")
    overrides = {k: v for k, v in {"num_subsets": args.num_subsets, "num_seeds": args.num_seeds, "alpha": args.alpha,
                                   "trak_proj_dim": args.trak_proj_dim, "trak_lambda": args.trak_lambda,
                                   "index_sketch_size": args.index_sketch_size}.items() if v is not None}
    settings = dataclasses.replace(QUICK if args.quick else DEFAULT, **overrides)
    if settings.num_subsets < 3 or settings.num_seeds < 1 or not 0 < settings.alpha < 1:
        parser.error("need num_subsets >= 3, num_seeds >= 1 and 0 < alpha < 1")
    jobs = args.jobs or (1 if args.quick else min(2, os.cpu_count() or 1))  # quick runs are shorter than spawning workers
    command = " ".join(["python benchmarks/lds.py", *(sys.argv[1:] if argv is None else argv)])
    result = run(settings, methods, args.work_dir, jobs=max(1, jobs), rescore=args.rescore, progress=not args.no_progress,
                 command=command)
    out = args.out or RESULTS / ("lds_quick.json" if args.quick else "lds.json")
    write_json(out, result)
    print(markdown_table(result))
    print(f"\n{result['corpus']['num_train_docs']} documents ({result['corpus']['num_sequences']} sequences), "
          f"{result['corpus']['num_queries']} queries, M={settings.num_subsets} subsets x S={settings.num_seeds} seeds at "
          f"alpha={settings.alpha}; total {result['timings']['total_seconds']:.0f}s; wrote {out}")
    return result


if __name__ == "__main__":
    main()
