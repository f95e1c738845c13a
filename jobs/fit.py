"""The fit job: both EK-FAC passes spread over Ray actors by corpus shard, reduced on the driver."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from influence.arguments import FactorArgs
from influence.constants import MANIFEST_NAME
from influence.errors import InfluenceError
from influence.factors import (
    FitContext,
    aggregate_covariances,
    aggregate_factors,
    fit_covariance_shard,
    fit_eigenvalue_shard,
)
from jobs.cluster import ray_cluster

LOG = logging.getLogger(__name__)


class FitWorker:
    """A Ray actor: loads the model and corpus once, then runs shard passes on request."""

    def __init__(self, model_dir: str, corpus_dir: str, args: FactorArgs):
        self.ctx = FitContext(model_dir, corpus_dir, FactorArgs.from_dict({**args.to_dict(), "progress": False}))

    def covariance(self, out_dir: str, shard: int, num_shards: int) -> str:
        return str(fit_covariance_shard(self.ctx, Path(out_dir), shard, num_shards))

    def eigenvalues(self, out_dir: str, shard: int, num_shards: int) -> str:
        return str(fit_eigenvalue_shard(self.ctx, Path(out_dir), shard, num_shards))


def _run_pass(pool, method: str, out_dir: Path, shards: list[int], num_shards: int, progress: bool) -> None:
    from ray.exceptions import RayTaskError

    results = pool.map_unordered(lambda actor, shard: getattr(actor, method).remote(str(out_dir), shard, num_shards), shards)
    try:
        for _ in tqdm(results, total=len(shards), desc=f"{method} shards", unit="shard", disable=not progress):
            pass
    except RayTaskError as exc:  # a worker's InfluenceError, e.g. a corrupt shard: its one-line message, not Ray's traceback
        if isinstance(exc.cause, InfluenceError):
            raise exc.cause from None
        raise


def run_fit_job(model_dir: Path | str, corpus_dir: Path | str, out_dir: Path | str, args: FactorArgs = FactorArgs(),
                num_shards: Optional[int] = None, workers: int = 2, address: Optional[str] = None) -> Path:
    """Fit factors with `workers` Ray actors; equals `influence.factors.fit_factors` on one process.

    The number of shards defaults to the number of workers; re-running resumes from finished shards.
    """
    import ray
    from ray.util import ActorPool

    out_dir = Path(out_dir)
    if workers < 1 or (num_shards is not None and num_shards < 1):
        raise InfluenceError(f"--workers ({workers}) and --num-shards ({num_shards}) must be at least 1; pass positive numbers")
    num_shards = num_shards or workers
    ctx = FitContext(model_dir, corpus_dir, args)  # the driver reduces, so it needs the module list too
    ctx.start(out_dir)
    if (out_dir / MANIFEST_NAME).exists():
        return out_dir
    start = time.perf_counter()
    with ray_cluster(address):
        actor = ray.remote(num_cpus=1, max_restarts=3, max_task_retries=3)(FitWorker)
        pool = ActorPool([actor.remote(str(model_dir), str(corpus_dir), args) for _ in range(min(workers, num_shards))])
        shards = list(range(num_shards))
        if args.strategy in ("kfac", "ekfac"):
            _run_pass(pool, "covariance", out_dir, shards, num_shards, args.progress)
            aggregate_covariances(ctx, out_dir, num_shards)
        if args.strategy in ("diagonal", "ekfac"):
            _run_pass(pool, "eigenvalues", out_dir, shards, num_shards, args.progress)
    aggregate_factors(ctx, out_dir, num_shards)
    LOG.info("fit job: %d shards on %d workers in %.1fs", num_shards, workers, time.perf_counter() - start)
    return out_dir
