"""The index job: Ray Data `map_batches` over a pool of model-holding actors, shards written by the driver.

Rows stream back in corpus order (`preserve_order`), so the driver writes each shard as soon as its last
row arrives and holds at most one shard in memory. A killed driver leaves finished shards on disk and a
re-run sends only the rows of unfinished shards; a killed worker is restarted by Ray and its batch retried.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from indexes.build import SketchBatches, build_stats, check_index_inputs, finish_index, index_identity, start_index, write_shard
from indexes.shards import sketch_shard_exists
from indexes.store import index_exists
from influence.arguments import IndexArgs
from influence.constants import MANIFEST_NAME
from influence.corpus import load_sequences
from influence.errors import InfluenceError
from influence.factors import shard_rows
from jobs.cluster import ray_cluster

LOG = logging.getLogger(__name__)


def run_index_job(model_dir: Path | str, factors_dir: Path | str, corpus_dir: Path | str, index_dir: Path | str,
                  args: IndexArgs = IndexArgs(), address: Optional[str] = None) -> Path:
    """Build the sketch index with `args.workers` Ray actors; resumable shard by shard."""
    import ray
    import ray.data

    model_dir, factors_dir, corpus_dir, index_dir = map(Path, (model_dir, factors_dir, corpus_dir, index_dir))
    identity = index_identity(model_dir, factors_dir, corpus_dir, args)
    finished = index_exists(index_dir) and (index_dir / MANIFEST_NAME).exists()
    sequences, _ = load_sequences(corpus_dir)
    if not finished:
        # Preflight on the driver: a worker failing in its constructor surfaces only as a Ray ActorDiedError
        # (a traceback, after retries), so the checks the workers would make run here once, before any write.
        check_index_inputs(SketchBatches(str(model_dir), str(factors_dir), args), sequences, corpus_dir, args)
    start_index(index_dir, identity, args)
    if finished:
        return index_dir
    num_shards = -(-sequences.num_rows // args.shard_size)
    pending = [s for s in range(num_shards) if not sketch_shard_exists(index_dir, s, num_shards)]
    start = time.perf_counter()
    if pending:
        with ray_cluster(address):
            context = ray.data.DataContext.get_current()
            context.execution_options.preserve_order = True
            context.enable_progress_bars = False
            ranges = [shard_rows(sequences.num_rows, s, num_shards) for s in pending]
            todo = ray.data.from_arrow([sequences.select(["seq_id", "input_ids"]).slice(r.start, len(r)) for r in ranges])
            results = todo.map_batches(
                SketchBatches, fn_constructor_args=(str(model_dir), str(factors_dir), args), concurrency=args.workers,
                batch_size=args.batch_size * 4, num_cpus=1, batch_format="numpy",
                max_restarts=-1, max_task_retries=-1,  # a killed worker is replaced and its batch retried
            )
            _write_shards_as_they_complete(results, index_dir, pending, ranges, num_shards, sequences, args.progress)
    stats = build_stats(sequences, time.perf_counter() - start)
    stats["workers"] = args.workers
    return finish_index(index_dir, identity, args, num_shards, stats, model_dir, factors_dir, corpus_dir)


def _write_shards_as_they_complete(results, index_dir, pending, ranges, num_shards, sequences, progress) -> None:
    buffer: dict[str, list[np.ndarray]] = {}
    shard_iter = iter(zip(pending, ranges))
    shard, rows = next(shard_iter)
    filled = 0
    with tqdm(total=sum(len(r) for r in ranges), desc="index", unit="seq", disable=not progress) as bar:
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            offset = 0
            total = len(batch["seq_id"])
            while offset < total:
                if shard is None:
                    raise InfluenceError("index workers returned more rows than were sent; this is a bug, please report it")
                take = min(len(rows) - filled, total - offset)
                for key, value in batch.items():
                    buffer.setdefault(key, []).append(value[offset : offset + take])
                offset, filled = offset + take, filled + take
                bar.update(take)
                if filled == len(rows):
                    output = {key: np.concatenate(parts) for key, parts in buffer.items()}
                    write_shard(index_dir, shard, num_shards, sequences, rows, output)
                    buffer, filled = {}, 0
                    shard, rows = next(shard_iter, (None, range(0)))
    if shard is not None:
        raise InfluenceError(f"index workers returned too few rows (shard {shard} incomplete); re-run to resume")
