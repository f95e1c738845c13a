"""The index stage: model + factors + corpus -> sketch shards -> FAISS index, doc table, manifest.

`SketchBatches` is the unit of work: a callable that holds a model, its factors and the projections,
and turns a batch of sequences into sketches, exact self-influences and gradient norms. It is what
`jobs/index.py` hands to Ray Data's `map_batches`; `build_index` runs the same code in this process.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from indexes.shards import sketch_shard_exists, write_sketch_shard
from indexes.store import check_factory, index_exists, merge_sketch_shards
from influence.arguments import IndexArgs
from influence.artifacts import read_json, read_manifest, require_same, write_json, write_manifest
from influence.constants import ARGS_NAME, FACTORS_NAME, MANIFEST_NAME
from influence.corpus import load_sequences, require_fits_context
from influence.errors import InfluenceError
from influence.factors import load_factors, shard_rows
from influence.gradients import capture_module_io, make_token_batch
from influence.models import find_tracked_modules, fingerprint_model, load_model
from influence.sketches import Sketcher

LOG = logging.getLogger(__name__)
DOC_COLUMNS = ("doc_id", "chunk", "source", "lang", "num_tokens")


class SketchBatches:
    """Loads the model and factors once; each call sketches one batch of sequences."""

    def __init__(self, model_dir: str, factors_dir: str, args: IndexArgs):
        import torch

        torch.set_grad_enabled(True)
        self.args = args
        self.model = load_model(model_dir, dtype=args.torch_dtype, device=args.device)
        factors = load_factors(factors_dir, model_dir)
        self.modules = find_tracked_modules(self.model, factors.manifest["args"]["module_pattern"])
        require_same("tracked modules", [m.name for m in self.modules], factors.manifest["modules"], Path(factors_dir),
                     "re-fit the factors with `influence fit` (the manifest's module list no longer matches the model)")
        compute_dtype = torch.float64 if args.torch_dtype == torch.float64 else torch.float32
        self.sketcher = Sketcher(factors.to(compute_dtype, args.device), self.modules, args.sketch_size, args.seed, args.sketch)

    def __call__(self, batch: dict) -> dict:
        """{seq_id, input_ids} -> {seq_id, sketch (n, dim) float32, self_influence, grad_norm}."""
        seq_ids = [int(s) for s in batch["seq_id"]]
        sequences = [list(map(int, ids)) for ids in batch["input_ids"]]
        sketches, selfs, norms = [], [], []
        for start in range(0, len(sequences), self.args.batch_size):
            token_batch = make_token_batch(sequences[start : start + self.args.batch_size], device=self.args.device)
            io, _ = capture_module_io(self.model, self.modules, token_batch)
            result = self.sketcher.sketch_io(io)
            sketches.append(result.sketches.cpu().numpy())
            selfs.append(result.self_influence.cpu().numpy())
            norms.append(result.gradient_norm.cpu().numpy())
        return {"seq_id": np.asarray(seq_ids, dtype=np.int64), "sketch": np.concatenate(sketches),
                "self_influence": np.concatenate(selfs), "grad_norm": np.concatenate(norms)}


def index_identity(model_dir: Path, factors_dir: Path, corpus_dir: Path, args: IndexArgs) -> dict:
    """What an index is built from; stored in args.json and the manifest, compared on resume and load."""
    factors = read_manifest(factors_dir, "factors")
    require_same("model", fingerprint_model(model_dir), factors["model_fingerprint"], factors_dir,
                 "fit factors for this model with `influence fit`")
    _, corpus = load_sequences(corpus_dir)
    import hashlib

    if not (factors_dir / FACTORS_NAME).is_file():
        raise InfluenceError(f"{factors_dir} has a manifest but no {FACTORS_NAME}; re-run `influence fit` into a new directory")
    factors_hash = hashlib.blake2b((factors_dir / FACTORS_NAME).read_bytes(), digest_size=16).hexdigest()
    return {"model_fingerprint": factors["model_fingerprint"], "corpus_fingerprint": corpus["corpus_fingerprint"],
            "factors_fingerprint": factors_hash, "modules": factors["modules"], "strategy": factors["args"]["strategy"],
            "args": args.artifact_dict()}


def check_index_inputs(worker: SketchBatches, sequences: pa.Table, corpus_dir: Path, args: IndexArgs) -> None:
    """Refuse, before anything is written, what would otherwise fail after the sketching or inside a Ray
    worker: sequences longer than the model's context, and a factory the sketches cannot be indexed with."""
    require_fits_context(sequences, worker.model, corpus_dir)
    check_factory(worker.sketcher.dim, args.factory, min(args.train_size, sequences.num_rows))


def start_index(index_dir: Path, identity: dict, args: IndexArgs) -> None:
    """Record what the index is built from, or refuse to resume one built from something else."""
    path = index_dir / ARGS_NAME
    if path.exists():
        saved = read_json(path)
        for key in ("model_fingerprint", "corpus_fingerprint", "factors_fingerprint"):
            require_same(key.replace("_fingerprint", ""), identity[key], saved.get(key), index_dir,
                         "use a new --out directory for another model, corpus or factors")
        args.require_matches(saved["args"], str(index_dir))
    else:
        write_json(path, identity)


def shard_table(sequences: pa.Table, rows: range) -> pa.Table:
    return sequences.slice(rows.start, len(rows))


def write_shard(index_dir: Path, shard: int, num_shards: int, sequences: pa.Table, rows: range, output: dict) -> Path:
    """Join the worker's output with the doc metadata of its rows and write the shard."""
    meta = shard_table(sequences, rows)
    expected = meta["seq_id"].to_numpy()
    if not np.array_equal(output["seq_id"], expected):
        raise InfluenceError(f"shard {shard}: workers returned rows out of order; this is a bug, please report it")
    table = pa.table({"seq_id": output["seq_id"], **{c: meta[c] for c in DOC_COLUMNS},
                      "self_influence": output["self_influence"], "grad_norm": output["grad_norm"]})
    return write_sketch_shard(index_dir, shard, num_shards, output["sketch"], table)


def finish_index(index_dir: Path, identity: dict, args: IndexArgs, num_shards: int, stats: dict,
                 model_dir: Path, factors_dir: Path, corpus_dir: Path) -> Path:
    """Merge the shards and write the manifest last (it marks the index complete)."""
    merge_sketch_shards(index_dir, num_shards, factory=args.factory, train_size=args.train_size, seed=args.seed, progress=args.progress)
    sources = {"model_dir": str(model_dir.resolve()), "factors_dir": str(factors_dir.resolve()), "corpus_dir": str(corpus_dir.resolve())}
    write_manifest(index_dir, "index", **identity, **sources, num_shards=num_shards, **stats)
    return index_dir


def build_index(model_dir: Path | str, factors_dir: Path | str, corpus_dir: Path | str, index_dir: Path | str,
                args: IndexArgs = IndexArgs(), worker: Optional[SketchBatches] = None) -> Path:
    """Sketch every sequence in this process, shard by shard (resumable), then merge into a FAISS index."""
    from tqdm.auto import tqdm

    model_dir, factors_dir, corpus_dir, index_dir = map(Path, (model_dir, factors_dir, corpus_dir, index_dir))
    identity = index_identity(model_dir, factors_dir, corpus_dir, args)
    finished = index_exists(index_dir) and (index_dir / MANIFEST_NAME).exists()
    sequences, _ = load_sequences(corpus_dir)
    if not finished:
        worker = worker or SketchBatches(str(model_dir), str(factors_dir), args)
        check_index_inputs(worker, sequences, corpus_dir, args)
    start_index(index_dir, identity, args)
    if finished:
        return index_dir
    num_shards = -(-sequences.num_rows // args.shard_size)
    start = time.perf_counter()
    for shard in tqdm(range(num_shards), desc="index shards", unit="shard", disable=not args.progress):
        if sketch_shard_exists(index_dir, shard, num_shards):
            continue
        worker = worker or SketchBatches(str(model_dir), str(factors_dir), args)
        rows = shard_rows(sequences.num_rows, shard, num_shards)
        table = shard_table(sequences, rows)
        write_shard(index_dir, shard, num_shards, sequences, rows,
                    worker({"seq_id": table["seq_id"].to_numpy(), "input_ids": table["input_ids"].to_pylist()}))
    stats = build_stats(sequences, time.perf_counter() - start)
    return finish_index(index_dir, identity, args, num_shards, stats, model_dir, factors_dir, corpus_dir)


def build_stats(sequences: pa.Table, seconds: float) -> dict:
    tokens = int(sum(sequences["num_tokens"].to_pylist()))
    return {"num_sequences": sequences.num_rows, "num_tokens": tokens, "build_seconds": round(seconds, 3)}
