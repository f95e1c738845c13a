"""The index stage: model + factors + corpus -> sketch shards -> sketch store (+ FAISS index), doc table, manifest.

One pass: each task sketches one shard of the corpus (`sketch_work`, on any executor), the driver writes each
shard as it arrives, and the reduce merges them. The factors may come from a fit on a sample of this corpus or on
another corpus cut by the same tokenizer (as in the paper); the manifest records both corpora.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from indexes.constants import NO_FACTORY, REFINE_SCALE
from indexes.codes import encode_refine
from indexes.shards import sketch_shard_exists, sketch_shard_path, write_sketch_shard
from indexes.store import index_exists, merge_sketch_shards
from indexes.text import require_bm25, text_index_exists, write_text_index
from indexes.tiers import check_factory
from influence.arguments import IndexArgs
from influence.artifacts import read_json, read_manifest, references, require_same, require_same_plan, write_json, write_manifest
from influence.constants import ARGS_NAME, FACTORS_NAME, MANIFEST_NAME
from influence.corpus import TokenRows, load_sequences, require_fits_context, require_same_tokenizer, shard_rows, token_rows
from influence.errors import InfluenceError
from influence.factors import Factors, load_factors
from influence.gradients import capture_module_io, make_token_batch, plan_model_batches
from influence.models import ModelInfo, ModelSpec, describe_model, load_model_context, model_identity, require_model_dir
from influence.outputs import check_existing, prepare_output
from influence.sketches import Sketcher
from influence.stage import Executor, Pass, Workspace, run_stage

LOG = logging.getLogger(__name__)
DOC_COLUMNS = ("doc_id", "chunk", "source", "lang", "num_tokens")


@dataclass
class IndexPlan:
    """Everything an index is built from, checked before anything is written."""

    model_dir: Path
    factors_dir: Path
    corpus_dir: Path
    out_dir: Path
    args: IndexArgs
    info: ModelInfo
    spec: ModelSpec
    sequences: pa.Table
    identity: dict    # saved as args.json and in the manifest: compared when resuming and loading
    num_shards: int
    factory: str      # the first tier's FAISS factory ('auto' resolved), or 'none'

    def rows(self, shard: int) -> range:
        return shard_rows(self.sequences.num_rows, shard, self.num_shards)


@dataclass(frozen=True)
class IndexWork:
    """What every task of the index stage shares: the model to load, the factors and the sketch settings."""

    spec: ModelSpec
    factors: Factors
    modules: tuple[str, ...]
    sketch_dim: int
    seed: int
    batch_tokens: int
    key: tuple
    refine: bool = False


def plan_index(model_dir: Path | str, factors_dir: Path | str, corpus_dir: Path | str, out_dir: Path | str,
               args: IndexArgs = IndexArgs()) -> IndexPlan:
    """Check the model, factors, corpus, settings and output before anything is sketched."""
    model_dir = require_model_dir(model_dir)
    factors_dir, corpus_dir, out_dir = (Path(p).resolve() for p in (factors_dir, corpus_dir, out_dir))
    factors = read_manifest(factors_dir, "factors")
    identity = model_identity(model_dir)
    require_same("model", identity.fingerprint, factors["model_fingerprint"], factors_dir, "fit factors for this model with `influence fit`")
    if not (factors_dir / FACTORS_NAME).is_file():
        raise InfluenceError(f"{factors_dir} has a manifest but no {FACTORS_NAME}; re-run `influence fit` into a new directory")
    info = describe_model(model_dir, factors["args"]["module_pattern"])
    require_same("tracked modules", info.module_names, factors["modules"], factors_dir,
                 "re-fit the factors with `influence fit` (the manifest's module list no longer matches the model)")
    sequences, corpus = load_sequences(corpus_dir)
    require_same_tokenizer(corpus, model_dir, corpus_dir)
    require_fits_context(sequences, info.context, corpus_dir)
    factory = first_tier_factory(args.factory, sequences.num_rows, args.fold_dim)
    if factory != NO_FACTORY:
        check_factory(min(args.fold_dim, args.sketch_dim), factory, min(args.train_size, sequences.num_rows))
    plan_identity = {"model_fingerprint": identity.fingerprint, "corpus_fingerprint": corpus["corpus_fingerprint"],
                     "factors_fingerprint": factors["factors_fingerprint"], "factors_corpus_fingerprint": factors["corpus_fingerprint"],
                     "modules": factors["modules"], "strategy": factors["args"]["strategy"], "args": args.artifact_dict()}
    check_existing(out_dir, "index", {"model": model_dir, "factors": factors_dir, "corpus": corpus_dir})  # before trusting it
    saved_path = out_dir / ARGS_NAME
    if saved_path.is_file() and (any(out_dir.glob("sketch_shard_*")) or (out_dir / MANIFEST_NAME).exists()):
        require_same_plan(read_json(saved_path), saved_path, plan_identity,
                          ("model_fingerprint", "corpus_fingerprint", "factors_fingerprint"), out_dir, "model, corpus or factors", args)
    if args.refine:
        _check_refine_size(info, args.shard_size)
    if args.text_index:
        require_bm25()
    spec = ModelSpec(str(model_dir), args.dtype, args.device, factors["args"]["module_pattern"], identity.quick)
    num_shards = -(-sequences.num_rows // args.shard_size)
    return IndexPlan(model_dir, factors_dir, corpus_dir, out_dir, args, info, spec, sequences, plan_identity, num_shards, factory)


AUTO_FIRST_TIER_FROM = 100_000
#: The most numbers a refine row may hold (8 MiB per document in float16): beyond it the tier costs more disk than a corpus
#: can afford and more reading per candidate than its exact re-rank would.
REFINE_MAX_NUMBERS = 1 << 22
#: The most bytes of refine rows one index task holds and sends (a shard's worth)
REFINE_MAX_SHARD_BYTES = 1 << 30


def refine_numbers(info: ModelInfo) -> int:
    """D: the numbers of one whitened gradient over the tracked modules (a refine row)."""
    return sum(d_out * d_in for _, (d_out, d_in) in info.modules)


def _check_refine_size(info: ModelInfo, shard_size: int) -> None:
    numbers = refine_numbers(info)
    if numbers > REFINE_MAX_NUMBERS:
        raise InfluenceError(f"--refine would store {numbers:,} numbers ({2 * numbers / 2**20:,.1f} MiB) per document: the tracked modules' "
                             f"whole gradient; it is meant for models up to {REFINE_MAX_NUMBERS:,} tracked numbers. Drop --refine, or "
                             "track fewer modules (--module-pattern) when fitting the factors")
    if 2 * numbers * shard_size > REFINE_MAX_SHARD_BYTES:
        fits = max(1, REFINE_MAX_SHARD_BYTES // (2 * numbers))
        raise InfluenceError(f"--refine with --shard-size {shard_size} would hold {2 * numbers * shard_size / 2**30:.1f} GiB of refine rows "
                             f"per index task ({2 * numbers / 2**20:.1f} MiB per document); pass --shard-size {fits} or less")


def first_tier_factory(factory: str, num_rows: int, fold_dim: int) -> str:
    """'auto' made concrete: below 100,000 sequences the 4-bit store is scanned (about 3 ms per 1,000 rows on one thread,
    through FAISS); above, an IVF-PQ first tier over the folded sketches (about sqrt(n) lists, fold_dim/8 bytes of codes
    per document)."""
    if factory != "auto":
        return factory
    if num_rows < AUTO_FIRST_TIER_FROM:
        return NO_FACTORY
    nlist = 1 << max(6, min(16, round(np.log2(np.sqrt(num_rows)))))
    return f"IVF{nlist},PQ{max(1, fold_dim // 8)}"


def build_index(model_dir: Path | str, factors_dir: Path | str, corpus_dir: Path | str, index_dir: Path | str,
                args: IndexArgs = IndexArgs(), executor: Optional[Executor] = None) -> Path:
    """Sketch every sequence on `executor` (default: this process), shard by shard (resumable), then merge."""
    plan = plan_index(model_dir, factors_dir, corpus_dir, index_dir, args)
    inputs = {"model": plan.model_dir, "factors": plan.factors_dir, "corpus": plan.corpus_dir}
    text_bytes = TEXT_INDEX_BYTES_PER_TOKEN * int(sum(plan.sequences["num_tokens"].to_pylist())) if args.text_index else 0
    if index_exists(plan.out_dir) and (plan.out_dir / MANIFEST_NAME).exists():
        read_manifest(plan.out_dir, "index")
        if not args.keep_shards:  # a run killed between its manifest and the clean-up
            _remove_shards(plan)
        if args.text_index and not text_index_exists(plan.out_dir):
            with prepare_output(plan.out_dir, "index", inputs, text_bytes):
                _store_text_index(plan)
        return plan.out_dir
    dim, n = args.sketch_dim, plan.sequences.num_rows
    refine_bytes = 2 * 2 * refine_numbers(plan.info) if args.refine else 0  # float16, in the shards and merged
    bytes_needed = n * (dim * (2 + 4) + (4 * args.fold_dim if plan.factory != NO_FACTORY else 0) + refine_bytes) + text_bytes
    with prepare_output(plan.out_dir, "index", inputs, bytes_needed):
        write_json(plan.out_dir / ARGS_NAME, plan.identity)
        start = time.perf_counter()
        report = run_stage("index", index_passes(plan, executor), executor, args.progress)
        LOG.info("index: %s in %.1fs", report.seconds, time.perf_counter() - start)
    return plan.out_dir


#: A stored text index's bytes per corpus token, at most: a score (float32) and a row (int32) per distinct word of a
#: sequence, and the vocabulary (5-8 bytes per word measured on Bible verses, `benchmarks/text_index.py`; a word is
#: one token or more)
TEXT_INDEX_BYTES_PER_TOKEN = 12


def _store_text_index(plan: IndexPlan) -> None:
    write_text_index(plan.out_dir, plan.sequences["text"].to_pylist(), plan.identity["corpus_fingerprint"], plan.args.progress)


def index_passes(plan: IndexPlan, executor: Optional[Executor] = None):
    args = plan.args
    factors = load_factors(plan.factors_dir, plan.identity["model_fingerprint"])
    key = (plan.identity["factors_fingerprint"], args.sketch_dim, args.seed, args.dtype, args.device)
    work = IndexWork(plan.spec, factors, tuple(plan.info.module_names), args.sketch_dim, args.seed, args.batch_tokens, key, args.refine)
    pending = [k for k in range(plan.num_shards) if not sketch_shard_exists(plan.out_dir, k, plan.num_shards)]
    start = time.perf_counter()
    yield Pass("sketch", pending, sketch_work, save=partial(_save_shard, plan), reduce=partial(_finish, plan, start, executor),
               payload=lambda k: token_rows(plan.sequences, plan.rows(k)), shared=work, shared_key=("index", key, plan.spec),
               sizes=[len(plan.rows(k)) for k in pending],
               done=sum(len(plan.rows(k)) for k in set(range(plan.num_shards)) - set(pending)))


def sketch_work(workspace: Workspace, work: IndexWork, rows: TokenRows) -> dict:
    """Sketches, exact self-influences and gradient norms of some rows, in row order; with `work.refine`, also their
    whitened gradients as refine rows (float16, encoded here: half the bytes to send)."""
    loaded = workspace.get(("model", work.spec), partial(load_model_context, work.spec))
    sketcher = workspace.get(("sketcher", work.key), lambda: Sketcher(
        work.factors.to(torch.float64 if work.spec.dtype == "float64" else torch.float32, work.spec.device),
        work.modules, work.sketch_dim, work.seed))
    n = len(rows)
    sketches = np.zeros((n, work.sketch_dim), np.float32)
    self_influence, grad_norm = np.zeros(n), np.zeros(n)
    refine = np.zeros((n, sketcher.whitened_dim), np.float16) if work.refine else None
    refine_scale = np.zeros(n, np.float32)
    for positions in plan_model_batches(rows.lengths, work.batch_tokens, loaded.modules):
        batch = make_token_batch([rows.sequence(i) for i in positions], device=work.spec.device)
        io, _ = capture_module_io(loaded.model, loaded.modules, batch)
        result = sketcher.sketch_io(io, whitened=work.refine)
        sketches[positions] = result.sketches.cpu().numpy()
        self_influence[positions] = result.self_influence.numpy()
        grad_norm[positions] = result.gradient_norm.numpy()
        if work.refine:
            refine[positions], refine_scale[positions] = encode_refine(result.whitened.cpu().numpy())
    output = {"seq_id": rows.seq_ids, "sketch": sketches, "self_influence": self_influence, "grad_norm": grad_norm}
    return {**output, "refine": refine, REFINE_SCALE: refine_scale} if work.refine else output


def _save_shard(plan: IndexPlan, shard: int, output: dict) -> None:
    """Join the worker's output with the doc metadata of its rows and write the shard."""
    rows = plan.rows(shard)
    meta = plan.sequences.slice(rows.start, len(rows))
    if not np.array_equal(output["seq_id"], meta["seq_id"].to_numpy()):
        raise InfluenceError(f"shard {shard}: a worker returned other rows than it was sent; this is a bug, please report it")
    table = pa.table({"seq_id": output["seq_id"], **{c: meta[c] for c in DOC_COLUMNS},
                      "self_influence": output["self_influence"], "grad_norm": output["grad_norm"],
                      **({REFINE_SCALE: output[REFINE_SCALE]} if "refine" in output else {})})
    write_sketch_shard(plan.out_dir, shard, plan.num_shards, output["sketch"], table, output.get("refine"))


def _finish(plan: IndexPlan, start: float, executor: Optional[Executor]) -> None:
    """Merge the shards, write the manifest last (it marks the index complete), then drop the shards."""
    args = plan.args
    merge_sketch_shards(plan.out_dir, plan.num_shards, factory=plan.factory, train_size=args.train_size, seed=args.seed,
                        progress=args.progress, fold_dim=args.fold_dim, executor=executor)
    if args.text_index:
        _store_text_index(plan)
    tokens = int(sum(plan.sequences["num_tokens"].to_pylist()))
    write_manifest(plan.out_dir, "index", **plan.identity, sketch_dim=args.sketch_dim, first_tier=plan.factory,
                   **references(plan.out_dir, model_dir=plan.model_dir, factors_dir=plan.factors_dir, corpus_dir=plan.corpus_dir),
                   num_shards=plan.num_shards,
                   num_sequences=plan.sequences.num_rows, num_tokens=tokens, build_seconds=round(time.perf_counter() - start, 3))
    if not args.keep_shards:
        _remove_shards(plan)


def _remove_shards(plan: IndexPlan) -> None:
    for shard in range(plan.num_shards):
        shutil.rmtree(sketch_shard_path(plan.out_dir, shard, plan.num_shards), ignore_errors=True)
